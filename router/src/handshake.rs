//! The worker handshake: which `hello` registers a worker, and the
//! challenge-response that proves a worker knows the bridge secret.
//!
//! Pure state, no sockets, like the broker that owns it. A peer is
//! untrusted until this module says [`Step::Register`]: before that it can
//! make the router send it a `challenge` or a `goodbye`, and nothing else.
//!
//! Rules (PROTOCOL.md §8.1, §13, §14):
//! - a `hello` is checked against the bounds below before anything is kept
//!   (its optional `msg_types` too: at most [`MAX_MSG_TYPES`], each as long
//!   as a client `type` may be);
//! - without a secret, a valid `hello` of version 1 or 2 registers at once;
//! - with a secret, a version-1 `hello` (which would carry the secret in
//!   clear) is refused with a `goodbye` naming version 2; a version-2 `hello`
//!   gets a `challenge` with a fresh nonce, and the worker's `auth` must
//!   carry `HMAC-SHA256(secret, nonce)`, compared in constant time;
//! - a `hello` repeated before the `auth` gets the *same* nonce again, so a
//!   worker that resent its hello never answers a nonce the router dropped;
//! - at most [`MAX_PENDING`] challenges are open at once, each for at most
//!   [`CHALLENGE_TTL`]: a peer that never answers costs a bounded amount.
//!   When they are all taken, the oldest makes room (a flood of fresh
//!   connections cannot lock real workers out for longer than it lasts);
//! - a challenge is re-sent at most once per [`RESEND_EVERY`]: a peer that
//!   repeats `hello` without reading cannot fill its send queue with
//!   challenges and stall the bridge.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use bridge_proto::{self as proto, auth, ToWorker, PROTOCOL_VERSION};
use tokio::time::Instant;

use crate::broker::PeerId;

/// Longest `worker_id` and `sdk`, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most services one `hello` may name.
pub const MAX_SERVICES: usize = 64;
/// Longest service name, in bytes.
pub const MAX_SERVICE_LEN: usize = 256;
/// Most message types one `hello` may announce.
pub const MAX_MSG_TYPES: usize = 256;
/// Longest announced message type, in bytes: no client may send a longer one.
pub const MAX_MSG_TYPE_LEN: usize = crate::client::MAX_TYPE_LEN;
/// Challenges open at once; more hellos wait for a slot (they are asked to
/// reconnect).
pub const MAX_PENDING: usize = 1024;
/// How long a challenge stays valid.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(10);
/// Least time between two sends of the same challenge.
pub const RESEND_EVERY: Duration = Duration::from_secs(1);

/// A `hello` that passed every check: register this worker.
#[derive(Debug)]
pub struct Admitted {
    pub hello: proto::Hello,
    /// Services without duplicates, in the order named.
    pub services: Vec<String>,
    /// The message types the worker announced (`None`: it did not say).
    pub msg_types: Option<BTreeSet<String>>,
    /// The protocol version to answer this worker in.
    pub version: u8,
}

/// What the router does with a handshake message.
#[derive(Debug)]
pub enum Step {
    /// Register (or update) the worker and send it `welcome`.
    Register(Admitted),
    /// Send this to the peer (a `challenge`, or a `goodbye` asking it to
    /// reconnect later), in this protocol version.
    Reply(u8, ToWorker),
    /// Refuse for good: `goodbye{reconnect: false}` with this reason, in
    /// this protocol version.
    Refuse(u8, String),
    /// Nothing to do (an `auth` nobody asked for).
    Ignore,
}

#[derive(Debug)]
struct Open {
    nonce: [u8; auth::NONCE_LEN],
    hello: proto::Hello,
    services: Vec<String>,
    msg_types: Option<BTreeSet<String>>,
    opened: Instant,
    /// When the challenge was last sent.
    sent: Instant,
}

/// Open challenges, and the secret they test.
pub struct Handshake {
    secret: Option<Vec<u8>>,
    open: HashMap<PeerId, Open>,
}

impl std::fmt::Debug for Handshake {
    // Hand-written so the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("open", &self.open.len())
            .finish()
    }
}

impl Handshake {
    pub fn new(secret: Option<&str>) -> Self {
        Self {
            secret: secret.map(|s| s.as_bytes().to_vec()),
            open: HashMap::new(),
        }
    }

    /// Challenges currently open (for metrics and tests).
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// A `hello` of protocol `version` from `peer`. `registered`: the peer
    /// already passed the handshake on this connection (a resent hello
    /// then only updates its registration).
    pub fn on_hello(
        &mut self,
        peer: &PeerId,
        version: u8,
        hello: proto::Hello,
        registered: bool,
        now: Instant,
    ) -> Step {
        let (services, msg_types) = match check(&hello) {
            Ok(checked) => checked,
            Err(reason) => return Step::Refuse(version, reason),
        };
        let Some(_) = &self.secret else {
            return Step::Register(Admitted {
                hello,
                services,
                msg_types,
                version,
            });
        };
        if version < PROTOCOL_VERSION {
            return Step::Refuse(
                version,
                format!(
                    "this router requires bridge protocol version {PROTOCOL_VERSION} \
                     (challenge-response authentication); the hello used version {version}"
                ),
            );
        }
        if registered {
            // Routing ids are assigned per connection by the router, so this
            // peer is the connection that already proved the secret.
            return Step::Register(Admitted {
                hello,
                services,
                msg_types,
                version,
            });
        }
        if let Some(open) = self.open.get_mut(peer) {
            open.hello = hello;
            open.services = services;
            open.msg_types = msg_types;
            if now.duration_since(open.sent) < RESEND_EVERY {
                return Step::Ignore;
            }
            open.sent = now;
            let nonce = open.nonce.to_vec();
            return Step::Reply(version, ToWorker::Challenge(proto::Challenge { nonce }));
        }
        if self.open.len() >= MAX_PENDING {
            self.expire(now);
        }
        if self.open.len() >= MAX_PENDING {
            // Evict the oldest: its peer says hello again if it is real.
            if let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, o)| o.opened)
                .map(|(p, _)| p.clone())
            {
                self.open.remove(&oldest);
            }
        }
        let nonce: [u8; auth::NONCE_LEN] = rand::random();
        self.open.insert(
            peer.clone(),
            Open {
                nonce,
                hello,
                services,
                msg_types,
                opened: now,
                sent: now,
            },
        );
        Step::Reply(
            version,
            ToWorker::Challenge(proto::Challenge {
                nonce: nonce.to_vec(),
            }),
        )
    }

    /// An `auth` from `peer`.
    pub fn on_auth(&mut self, peer: &PeerId, version: u8, a: &proto::Auth, now: Instant) -> Step {
        let (Some(secret), Some(open)) = (&self.secret, self.open.remove(peer)) else {
            return Step::Ignore;
        };
        if now.duration_since(open.opened) > CHALLENGE_TTL {
            return Step::Reply(
                version,
                ToWorker::Goodbye(proto::Goodbye {
                    reason: "the challenge expired: say hello again".into(),
                    reconnect: true,
                }),
            );
        }
        if !auth::verify(secret, &open.nonce, &a.proof) {
            return Step::Refuse(version, "authentication failed: wrong bridge secret".into());
        }
        Step::Register(Admitted {
            hello: open.hello,
            services: open.services,
            msg_types: open.msg_types,
            version,
        })
    }

    /// Forgets challenges older than [`CHALLENGE_TTL`].
    pub fn expire(&mut self, now: Instant) {
        self.open
            .retain(|_, o| now.duration_since(o.opened) <= CHALLENGE_TTL);
    }

    /// The peer's connection is gone.
    pub fn forget(&mut self, peer: &PeerId) {
        self.open.remove(peer);
    }
}

/// The bounds of a `hello`; the services without duplicates, and the
/// announced message types as a set.
fn check(hello: &proto::Hello) -> Result<(Vec<String>, Option<BTreeSet<String>>), String> {
    if hello.worker_id.len() > MAX_NAME_LEN || hello.sdk.len() > MAX_NAME_LEN {
        return Err(format!(
            "worker_id and sdk must be at most {MAX_NAME_LEN} bytes"
        ));
    }
    if hello.services.len() > MAX_SERVICES {
        return Err(format!("a hello may name at most {MAX_SERVICES} services"));
    }
    if hello
        .services
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_SERVICE_LEN)
    {
        return Err(format!(
            "service names must be 1 to {MAX_SERVICE_LEN} bytes"
        ));
    }
    if hello.services.is_empty() && hello.capacity != 0 {
        return Err(
            "a hello without services registers a publisher and must have capacity 0".into(),
        );
    }
    if !hello.services.is_empty() && hello.capacity == 0 {
        return Err("capacity must be at least 1".into());
    }
    if let Some(types) = &hello.msg_types {
        if types.len() > MAX_MSG_TYPES {
            return Err(format!(
                "a hello may announce at most {MAX_MSG_TYPES} msg_types"
            ));
        }
        if types
            .iter()
            .any(|t| t.is_empty() || t.len() > MAX_MSG_TYPE_LEN)
        {
            return Err(format!(
                "msg_types must be 1 to {MAX_MSG_TYPE_LEN} bytes each"
            ));
        }
    }
    let mut seen = HashSet::new();
    let services = hello
        .services
        .iter()
        .filter(|s| seen.insert(s.as_str()))
        .cloned()
        .collect();
    let msg_types = hello
        .msg_types
        .as_ref()
        .map(|t| t.iter().cloned().collect());
    Ok((services, msg_types))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn hello(services: &[&str], capacity: u32) -> proto::Hello {
        proto::Hello {
            worker_id: "w".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            capacity,
            sdk: "test".into(),
            msg_types: None,
        }
    }

    fn peer(n: u8) -> PeerId {
        Bytes::from(vec![n])
    }

    fn nonce_of(step: Step) -> Vec<u8> {
        match step {
            Step::Reply(2, ToWorker::Challenge(c)) => c.nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    #[test]
    fn without_a_secret_both_versions_register_at_once() {
        let mut h = Handshake::new(None);
        let now = Instant::now();
        for v in [1, 2] {
            assert!(matches!(
                h.on_hello(&peer(1), v, hello(&["echo"], 2), false, now),
                Step::Register(Admitted { version, .. }) if version == v
            ));
        }
    }

    #[test]
    fn with_a_secret_v1_is_refused_naming_version_2() {
        let mut h = Handshake::new(Some("s3cret"));
        match h.on_hello(&peer(1), 1, hello(&["echo"], 2), false, Instant::now()) {
            Step::Refuse(1, reason) => assert!(reason.contains("version 2"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.open_count(), 0);
    }

    #[test]
    fn the_right_proof_registers_and_a_wrong_one_is_refused() {
        let mut h = Handshake::new(Some("s3cret"));
        let now = Instant::now();
        let nonce = nonce_of(h.on_hello(&peer(1), 2, hello(&["echo"], 2), false, now));
        assert_eq!(nonce.len(), auth::NONCE_LEN);
        let good = proto::Auth {
            proof: auth::proof(b"s3cret", &nonce).to_vec(),
        };
        assert!(matches!(
            h.on_auth(&peer(1), 2, &good, now),
            Step::Register(Admitted { version: 2, .. })
        ));
        // The challenge is used up: replaying the proof does nothing.
        assert!(matches!(h.on_auth(&peer(1), 2, &good, now), Step::Ignore));

        let nonce = nonce_of(h.on_hello(&peer(2), 2, hello(&["echo"], 2), false, now));
        let bad = proto::Auth {
            proof: auth::proof(b"guess", &nonce).to_vec(),
        };
        assert!(matches!(
            h.on_auth(&peer(2), 2, &bad, now),
            Step::Refuse(2, _)
        ));
    }

    #[test]
    fn a_proof_is_worth_nothing_on_another_connection() {
        let mut h = Handshake::new(Some("s3cret"));
        let now = Instant::now();
        let n1 = nonce_of(h.on_hello(&peer(1), 2, hello(&["echo"], 1), false, now));
        let n2 = nonce_of(h.on_hello(&peer(2), 2, hello(&["echo"], 1), false, now));
        assert_ne!(n1, n2);
        let captured = proto::Auth {
            proof: auth::proof(b"s3cret", &n1).to_vec(),
        };
        assert!(matches!(
            h.on_auth(&peer(2), 2, &captured, now),
            Step::Refuse(..)
        ));
    }

    #[test]
    fn a_resent_hello_gets_the_same_nonce_at_most_once_a_second() {
        let mut h = Handshake::new(Some("s3cret"));
        let now = Instant::now();
        let a = nonce_of(h.on_hello(&peer(1), 2, hello(&["echo"], 1), false, now));
        let just_before = now + RESEND_EVERY - Duration::from_millis(1);
        assert!(matches!(
            h.on_hello(&peer(1), 2, hello(&["echo"], 2), false, just_before),
            Step::Ignore
        ));
        let b = nonce_of(h.on_hello(&peer(1), 2, hello(&["echo"], 3), false, now + RESEND_EVERY));
        assert_eq!(a, b);
        let proof = proto::Auth {
            proof: auth::proof(b"s3cret", &a).to_vec(),
        };
        match h.on_auth(&peer(1), 2, &proof, now) {
            Step::Register(adm) => assert_eq!(adm.hello.capacity, 3, "the latest hello counts"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn challenges_are_bounded_the_oldest_makes_room_and_they_expire() {
        let mut h = Handshake::new(Some("s3cret"));
        let t0 = Instant::now();
        let key = |i: u32| Bytes::from(i.to_be_bytes().to_vec());
        for i in 0..MAX_PENDING as u32 {
            let at = t0 + Duration::from_millis(u64::from(i));
            nonce_of(h.on_hello(&key(i), 2, hello(&["echo"], 1), false, at));
        }
        // A real worker arriving during a flood still gets its challenge.
        let during = t0 + Duration::from_secs(2);
        let nonce = nonce_of(h.on_hello(&peer(0), 2, hello(&["echo"], 1), false, during));
        assert_eq!(h.open_count(), MAX_PENDING);
        let first = proto::Auth {
            proof: auth::proof(b"s3cret", &[0u8; auth::NONCE_LEN]).to_vec(),
        };
        assert!(
            matches!(h.on_auth(&key(0), 2, &first, during), Step::Ignore),
            "the oldest challenge was evicted"
        );
        let proof = proto::Auth {
            proof: auth::proof(b"s3cret", &nonce).to_vec(),
        };
        assert!(matches!(
            h.on_auth(&peer(0), 2, &proof, during),
            Step::Register(_)
        ));
        let later = t0 + Duration::from_secs(3) + CHALLENGE_TTL;
        h.expire(later);
        assert_eq!(h.open_count(), 0, "every challenge expires");
    }

    #[test]
    fn hello_bounds_are_enforced() {
        let mut h = Handshake::new(None);
        let now = Instant::now();
        let long = "x".repeat(MAX_SERVICE_LEN + 1);
        let many: Vec<String> = (0..=MAX_SERVICES).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cases: Vec<(proto::Hello, &str)> = vec![
            (hello(&[long.as_str()], 1), "service names"),
            (hello(&many, 1), "at most"),
            (hello(&[""], 1), "service names"),
            (hello(&["echo"], 0), "capacity"),
            (hello(&[], 4), "publisher"),
            (
                proto::Hello {
                    worker_id: "w".repeat(MAX_NAME_LEN + 1),
                    ..hello(&["echo"], 1)
                },
                "worker_id",
            ),
            (
                proto::Hello {
                    msg_types: Some(vec!["t".repeat(MAX_MSG_TYPE_LEN + 1)]),
                    ..hello(&["echo"], 1)
                },
                "msg_types must be 1 to 128 bytes",
            ),
            (
                proto::Hello {
                    msg_types: Some(vec![String::new()]),
                    ..hello(&["echo"], 1)
                },
                "msg_types must be 1 to 128 bytes",
            ),
            (
                proto::Hello {
                    msg_types: Some((0..=MAX_MSG_TYPES).map(|i| format!("t{i}")).collect()),
                    ..hello(&["echo"], 1)
                },
                "at most 256 msg_types",
            ),
        ];
        for (hl, needle) in cases {
            match h.on_hello(&peer(1), 2, hl, false, now) {
                Step::Refuse(_, reason) => assert!(reason.contains(needle), "{reason}"),
                other => panic!("{needle}: {other:?}"),
            }
        }
        // A publisher: no services, capacity 0.
        assert!(matches!(
            h.on_hello(&peer(1), 2, hello(&[], 0), false, now),
            Step::Register(_)
        ));
        // Duplicates collapse.
        match h.on_hello(&peer(1), 2, hello(&["a", "b", "a"], 1), false, now) {
            Step::Register(adm) => assert_eq!(adm.services, vec!["a", "b"]),
            other => panic!("{other:?}"),
        }
        // Announced types become a set; no announcement stays "unknown", and
        // the most a hello may announce, each as long as allowed, registers.
        let typed = proto::Hello {
            msg_types: Some(vec!["b".into(), "a".into(), "b".into()]),
            ..hello(&["echo"], 1)
        };
        match h.on_hello(&peer(1), 2, typed, false, now) {
            Step::Register(adm) => assert_eq!(
                adm.msg_types,
                Some(BTreeSet::from(["a".to_owned(), "b".to_owned()]))
            ),
            other => panic!("{other:?}"),
        }
        match h.on_hello(&peer(1), 2, hello(&["echo"], 1), false, now) {
            Step::Register(adm) => assert_eq!(adm.msg_types, None),
            other => panic!("{other:?}"),
        }
        let widest = proto::Hello {
            msg_types: Some(
                (0..MAX_MSG_TYPES)
                    .map(|i| format!("{i:0>width$}", width = MAX_MSG_TYPE_LEN))
                    .collect(),
            ),
            ..hello(&["echo"], 1)
        };
        assert!(matches!(
            h.on_hello(&peer(1), 2, widest, false, now),
            Step::Register(_)
        ));
    }
}
