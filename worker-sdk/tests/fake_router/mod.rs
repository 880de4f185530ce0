//! A stand-in for the router's bridge side: a real zeromq ROUTER socket
//! bound on a free loopback port, driven step by step by the test.
//!
//! Like the real router it can have a secret (then [`FakeRouter::handshake`]
//! answers the hello with a `challenge` and checks the `auth` with
//! [`bridge_proto::auth::verify`]) and a frame limit (`max_frame_bytes` in
//! its welcome).
//!
//! Every wait is bounded by [`WAIT`], so a worker that never answers fails
//! the test instead of hanging it.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::time::Duration;

use bridge_proto::{
    auth, decode_from_worker_versioned, encode_to_worker, Auth, Cancel, Challenge, FromWorker,
    Goodbye, Hello, Request, ToWorker, Welcome,
};
use bytes::Bytes;
use serde_json::Value;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Upper bound on any single wait for the worker.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct FakeRouter {
    socket: RouterSocket,
    pub endpoint: String,
    /// The secret [`handshake`](Self::handshake) challenges for, if any.
    pub secret: Option<String>,
    /// `max_frame_bytes` of the welcomes it sends.
    pub max_frame_bytes: Option<u64>,
    /// Every payload frame received so far (to check what never crossed the wire).
    pub received: Vec<Bytes>,
}

impl FakeRouter {
    /// Binds on a free port of 127.0.0.1.
    pub async fn bind() -> Self {
        Self::bind_at("tcp://127.0.0.1:0").await
    }

    /// Binds on `endpoint` (to come back on the same port).
    pub async fn bind_at(endpoint: &str) -> Self {
        let mut socket = RouterSocket::new();
        let bound = socket.bind(endpoint).await.expect("bind fake router");
        Self {
            socket,
            endpoint: bound.to_string(),
            secret: None,
            max_frame_bytes: None,
            received: Vec::new(),
        }
    }

    /// Challenges every hello for `secret`.
    pub fn with_secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.to_owned());
        self
    }

    /// Announces a frame limit in its welcomes.
    pub fn with_max_frame_bytes(mut self, limit: u64) -> Self {
        self.max_frame_bytes = Some(limit);
        self
    }

    /// Whether `needle` appears in any frame received so far.
    pub fn ever_received(&self, needle: &[u8]) -> bool {
        self.received
            .iter()
            .any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// Unbinds and drops the socket, closing every worker connection.
    pub async fn close(self) {
        let errors = self.socket.close().await;
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Next message from any worker, heartbeats included, with its payload
    /// frame as received. Every message must be protocol version 2.
    pub async fn recv_raw(&mut self) -> (Bytes, Bytes, FromWorker) {
        let message = tokio::time::timeout(WAIT, self.socket.recv())
            .await
            .expect("timed out waiting for a worker message")
            .expect("router recv");
        let frames = message.into_vec();
        assert_eq!(frames.len(), 2, "expected [identity, payload]");
        let (v, msg) =
            decode_from_worker_versioned(&frames[1]).expect("worker sent a valid bridge message");
        assert_eq!(v, bridge_proto::PROTOCOL_VERSION, "{msg:?}");
        self.received.push(frames[1].clone());
        (frames[0].clone(), frames[1].clone(), msg)
    }

    /// Next message from any worker, heartbeats included.
    pub async fn recv_any(&mut self) -> (Bytes, FromWorker) {
        let (id, _, msg) = self.recv_raw().await;
        (id, msg)
    }

    /// Next message that is not a heartbeat.
    pub async fn recv(&mut self) -> (Bytes, FromWorker) {
        loop {
            let (id, msg) = self.recv_any().await;
            if msg != FromWorker::Heartbeat {
                return (id, msg);
            }
        }
    }

    /// Next non-heartbeat message, which must be for request `cid`.
    pub async fn recv_for(&mut self, cid: &str) -> FromWorker {
        let (_, msg) = self.recv().await;
        assert_eq!(cid_of(&msg), Some(cid), "unexpected message {msg:?}");
        msg
    }

    pub async fn send(&mut self, id: &Bytes, msg: ToWorker) {
        self.send_bytes(id, encode_to_worker(&msg)).await;
    }

    /// Sends any payload frame (for frames the codec would not produce).
    pub async fn send_bytes(&mut self, id: &Bytes, payload: Vec<u8>) {
        let mut message = ZmqMessage::from(id.clone());
        message.push_back(Bytes::from(payload));
        self.socket.send(message).await.expect("router send");
    }

    /// Waits for a hello.
    pub async fn expect_hello(&mut self) -> (Bytes, Hello) {
        match self.recv().await {
            (id, FromWorker::Hello(h)) => (id, h),
            (_, other) => panic!("expected hello, got {other:?}"),
        }
    }

    /// Waits for a hello, challenges it when the router has a secret (and
    /// checks the proof), and welcomes the worker.
    pub async fn handshake(&mut self, heartbeat_ms: u64, liveness: u32) -> (Bytes, Hello) {
        let (id, hello) = self.expect_hello().await;
        if let Some(secret) = self.secret.clone() {
            let nonce = fresh_nonce();
            let auth = self.challenge(&id, &nonce).await;
            assert!(
                auth::verify(secret.as_bytes(), &nonce, &auth.proof),
                "the worker's proof does not verify"
            );
        }
        self.welcome(&id, heartbeat_ms, liveness).await;
        (id, hello)
    }

    /// Sends `challenge{nonce}` and returns the `auth` that answers it. A
    /// hello resent meanwhile gets the same challenge again, as from the
    /// real router.
    pub async fn challenge(&mut self, id: &Bytes, nonce: &[u8]) -> Auth {
        let challenge = ToWorker::Challenge(Challenge {
            nonce: nonce.to_vec(),
        });
        self.send(id, challenge.clone()).await;
        loop {
            match self.recv().await {
                (from, FromWorker::Auth(a)) => {
                    assert_eq!(&from, id, "auth from another socket");
                    return a;
                }
                (from, FromWorker::Hello(_)) if from == id => {
                    self.send(id, challenge.clone()).await;
                }
                (_, other) => panic!("expected auth, got {other:?}"),
            }
        }
    }

    pub async fn welcome(&mut self, id: &Bytes, heartbeat_ms: u64, liveness: u32) {
        self.send(
            id,
            ToWorker::Welcome(Welcome {
                router_id: "fake-router".into(),
                heartbeat_ms,
                liveness,
                max_frame_bytes: self.max_frame_bytes,
            }),
        )
        .await;
    }

    pub async fn goodbye(&mut self, id: &Bytes, reason: &str, reconnect: bool) {
        self.send(
            id,
            ToWorker::Goodbye(Goodbye {
                reason: reason.into(),
                reconnect,
            }),
        )
        .await;
    }

    pub async fn request(&mut self, id: &Bytes, cid: &str, msg_type: &str, data: Value) {
        self.request_with_timeout(id, cid, msg_type, data, 30_000)
            .await;
    }

    pub async fn request_with_timeout(
        &mut self,
        id: &Bytes,
        cid: &str,
        msg_type: &str,
        data: Value,
        timeout_ms: u64,
    ) {
        self.send(
            id,
            ToWorker::Request(request(cid, msg_type, data, timeout_ms)),
        )
        .await;
    }

    pub async fn cancel(&mut self, id: &Bytes, cid: &str) {
        self.send(
            id,
            ToWorker::Cancel(Cancel {
                cid: cid.into(),
                reason: "client".into(),
            }),
        )
        .await;
    }
}

/// 32 random bytes, like the router's nonces.
pub fn fresh_nonce() -> Vec<u8> {
    rand::random::<[u8; 32]>().to_vec()
}

pub fn request(cid: &str, msg_type: &str, data: Value, timeout_ms: u64) -> Request {
    Request {
        cid: cid.into(),
        conn: "conn-1".into(),
        route: "/ws/test".into(),
        service: "svc".into(),
        msg_type: msg_type.into(),
        id: Value::String(format!("client-{cid}")),
        data,
        timeout_ms,
        deadline_ms: 0,
        attempt: 1,
        claims: None,
    }
}

/// The request a reply or error belongs to.
pub fn cid_of(msg: &FromWorker) -> Option<&str> {
    match msg {
        FromWorker::Reply(r) => Some(&r.cid),
        FromWorker::Error(e) => Some(&e.cid),
        _ => None,
    }
}

/// Whether `msg` ends its request.
pub fn is_terminal(msg: &FromWorker) -> bool {
    matches!(msg, FromWorker::Reply(r) if r.done) || matches!(msg, FromWorker::Error(_))
}
