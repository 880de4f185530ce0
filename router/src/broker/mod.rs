//! The broker: which worker gets which message, and what happens to every
//! request until its single terminal frame.
//!
//! Pure state, no sockets: the bridge task owns one [`Broker`], feeds it
//! commands from sessions, decoded worker messages, ticks, deadline expiries
//! and retry timers, and the broker answers through an [`Outbox`] (to
//! workers) and the [`Hub`] (to clients). Tests drive it the same way with a
//! recording outbox, on paused tokio time: the broker reads the clock only
//! through `tokio::time::Instant` and passes it down.
//!
//! # Layout
//! - `commands`: what sessions hand over ([`Command`], [`RequestCmd`],
//!   [`BreakerTicket`]) and the [`Snapshot`] for `/routes`.
//! - `lifecycle`: the fate of a request, from its command to its terminal
//!   frame: placement, waiting, dispatch, replies, retries, deadlines,
//!   cancellation.
//! - `timers`: the deadline, retry and grace timers ([`Timers`]), which do
//!   not wake the loop that changes them.
//! - `requests`: the request table it moves requests through (pending,
//!   waiting, retrying, zombies) and the bytes of request data held.
//! - `workers`: the worker registry (credits, liveness, least-outstanding
//!   choice) and a worker's life: registration, `bye`, loss.
//! - `conns`: connections and their home workers.
//!
//! A request is in exactly one of four places: `waiting` (no free credit
//! yet), `pending` (at a worker), `retrying` (its worker failed before
//! replying; another attempt is scheduled), or gone (terminal frame sent).
//!
//! Invariants (see ARCHITECTURE.md):
//! - a worker never has more requests outstanding than its announced capacity;
//!   a request stays outstanding (holds a credit) until the worker's terminal
//!   message, even after the router gave up on it (a "zombie"), or until the
//!   cancel grace after the router's `cancel`;
//! - every request gets exactly one terminal frame to its client: the worker's
//!   final reply or error, or one router error (`timeout`, `no_workers`,
//!   `worker_error`, `cancelled`, `overloaded`), whichever comes first; later
//!   replies are dropped;
//! - replies are only accepted from the worker the request was sent to;
//! - a request is retried only if its route allows it, no reply of it has
//!   reached the client yet, and its deadline has not passed.

mod commands;
mod conns;
mod lifecycle;
mod requests;
mod timers;
mod workers;

#[cfg(test)]
pub(crate) mod testkit;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bridge_proto::{self as proto, FromWorker, ToWorker};
use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, info};

pub use commands::{BreakerTicket, Command, RequestCmd, Snapshot, WorkerInfo};
pub use requests::MAX_WAITING;
pub use timers::Timers;

use crate::{
    client::{OutFrame, Outbound},
    handshake::Handshake,
    hub::Hub,
    ids::{Cid, ConnId},
    metrics::Metrics,
    registry::RouteRegistry,
};
use conns::ConnEntry;
use requests::Requests;
use workers::Workers;

/// ZeroMQ identity of a worker's DEALER connection.
pub type PeerId = Bytes;

/// Where the broker's messages to workers go.
pub trait Outbox {
    /// Sends in the peer's protocol version ([`Broker::version_of`]).
    fn send(&mut self, peer: &PeerId, msg: ToWorker);
    /// Sends in this protocol version (answers to a `hello`, before the
    /// peer is registered).
    fn send_as(&mut self, peer: &PeerId, _version: u8, msg: ToWorker) {
        self.send(peer, msg);
    }
    /// Sends a request in `version` (its worker's), from fields the broker
    /// keeps: the bridge encodes it at once, with nothing copied first.
    fn send_request(&mut self, peer: &PeerId, version: u8, request: &proto::RequestRef<'_>) {
        self.send_as(peer, version, ToWorker::Request(request.to_owned()));
    }
}

/// Broker settings.
#[derive(Clone)]
pub struct BrokerConfig {
    pub router_id: String,
    pub heartbeat: Duration,
    pub liveness: u32,
    pub secret: Option<String>,
    /// The largest frame the bridge socket accepts (told to workers in
    /// `welcome`).
    pub max_frame_bytes: usize,
    /// Bytes of client requests the broker may hold at once.
    pub max_held_request_bytes: usize,
    /// How long after a `cancel` a request keeps its worker credit while
    /// the router waits for the terminal message.
    pub cancel_grace: Duration,
}

impl std::fmt::Debug for BrokerConfig {
    // Hand-written so the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("router_id", &self.router_id)
            .field("heartbeat", &self.heartbeat)
            .field("liveness", &self.liveness)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_held_request_bytes", &self.max_held_request_bytes)
            .field("cancel_grace", &self.cancel_grace)
            .finish()
    }
}

pub struct Broker {
    cfg: BrokerConfig,
    hub: Arc<Hub>,
    /// For dynamic routes (workers registering path-named services).
    registry: Option<Arc<RouteRegistry>>,
    metrics: Arc<Metrics>,
    workers: Workers,
    requests: Requests,
    conns: HashMap<ConnId, ConnEntry>,
    /// Unregistered peers sent a goodbye since the last tick.
    told_to_hello: HashSet<PeerId>,
    /// Dynamic routes whose last worker left, and since when: removed only
    /// after the liveness period, so a worker that restarts at once keeps
    /// its route (and its clients' sessions).
    orphaned: HashMap<String, Instant>,
    /// Open challenges of peers that have not proved the secret yet.
    handshake: Handshake,
    // The request table's timers live here, side by side, so the bridge's
    // loop can wait on all three at once.
    /// Deadlines of every request the router still owes a terminal frame.
    pub deadlines: Timers<Cid>,
    /// When each retrying request gets its next attempt.
    pub retry_timers: Timers<Cid>,
    /// When each zombie's credit is freed without a terminal message.
    pub zombie_timers: Timers<Cid>,
    /// Draws a retry's jitter from `[0, 1)`; tests pin it.
    jitter: fn() -> f64,
}

impl Broker {
    pub fn new(
        cfg: BrokerConfig,
        hub: Arc<Hub>,
        registry: Option<Arc<RouteRegistry>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            handshake: Handshake::new(cfg.secret.as_deref()),
            workers: Workers::new(cfg.heartbeat * cfg.liveness),
            cfg,
            hub,
            registry,
            metrics,
            requests: Requests::default(),
            conns: HashMap::new(),
            told_to_hello: HashSet::new(),
            orphaned: HashMap::new(),
            deadlines: Timers::default(),
            retry_timers: Timers::default(),
            zombie_timers: Timers::default(),
            jitter: rand::random::<f64>,
        }
    }

    fn deliver(&self, conn: &ConnId, frame: OutFrame) {
        self.hub.send(conn, frame.into());
    }

    // ----- commands from sessions -------------------------------------------------

    pub fn on_command(&mut self, cmd: Command, out: &mut dyn Outbox) {
        let now = Instant::now();
        match cmd {
            Command::Request(req) => self.on_request(*req, now, out),
            Command::Event {
                conn,
                msg_type,
                data,
            } => self.on_event(conn, msg_type, data, now, out),
            Command::Binary { conn, data } => self.on_binary(conn, data, now, out),
            Command::Raw {
                conn,
                binary,
                payload,
            } => self.on_raw(conn, binary, payload, now, out),
            Command::Connect(connect) => self.on_connect(connect, now, out),
            Command::Disconnect {
                conn,
                code,
                reason,
                cids,
            } => self.on_disconnect(conn, code, reason, cids, now, out),
            Command::Cancel { cid, reason } => self.abandon(&cid, reason, true, now, out),
            Command::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            workers: self.workers.info(),
        }
    }

    /// Bytes of request data held now (for metrics and tests).
    pub fn held_request_bytes(&self) -> usize {
        self.requests.held_bytes()
    }

    /// Requests the router still owes a terminal frame.
    pub fn pending_count(&self) -> usize {
        self.requests.len()
    }

    // ----- messages from workers --------------------------------------------------

    /// Whether `peer` passed the handshake: the bridge decodes only `hello`
    /// and `auth` of a peer that did not.
    pub fn is_registered(&self, peer: &PeerId) -> bool {
        self.workers.contains(peer)
    }

    /// A message other than `hello`/`auth` from a peer that is not
    /// registered: at most one `goodbye{reconnect:true}` per heartbeat
    /// interval (a peer that floods the socket does not get a flood back),
    /// in the message's protocol version.
    pub fn on_unregistered_message(&mut self, peer: PeerId, version: u8, out: &mut dyn Outbox) {
        if !self.told_to_hello.insert(peer.clone()) {
            return;
        }
        debug!(peer = ?peer, "message from an unregistered peer: asking it to say hello");
        out.send_as(
            &peer,
            version,
            ToWorker::Goodbye(proto::Goodbye {
                reason: "unknown worker: send hello first".into(),
                reconnect: true,
            }),
        );
    }

    /// A decoded message of protocol `version` from `peer`.
    pub fn on_worker_message(
        &mut self,
        peer: PeerId,
        version: u8,
        msg: FromWorker,
        out: &mut dyn Outbox,
    ) {
        let now = Instant::now();
        match msg {
            FromWorker::Hello(hello) => {
                let registered = self.workers.contains(&peer);
                let step = self
                    .handshake
                    .on_hello(&peer, version, hello, registered, now);
                return self.on_handshake(peer, step, now, out);
            }
            FromWorker::Auth(a) => {
                let step = self.handshake.on_auth(&peer, version, &a, now);
                return self.on_handshake(peer, step, now, out);
            }
            _ => {}
        }
        // Any message from a registered worker is a sign of life.
        if !self.workers.heard_from(&peer, now) {
            return self.on_unregistered_message(peer, version, out);
        }
        match msg {
            FromWorker::Hello(_) | FromWorker::Auth(_) | FromWorker::Heartbeat => {}
            FromWorker::Reply(r) => self.on_reply(peer, r, now, out),
            FromWorker::Error(e) => self.on_error(peer, e, now, out),
            FromWorker::Push(p) => {
                let (frame, error) = OutFrame::from_worker_push(p.msg_type, p.data);
                if let Some(code) = error {
                    let worker = self.workers.get(&peer).map(|w| w.name.as_str());
                    info!(session.id = %p.conn, worker, code, "a worker answered a message without request id with an error");
                }
                self.hub.send(&ConnId(p.conn.into()), frame.into());
            }
            FromWorker::PushBinary(p) => {
                self.hub.send(
                    &ConnId(p.conn.into()),
                    Outbound::Binary(Bytes::from(p.data)),
                );
            }
            FromWorker::Raw(r) => {
                self.hub.send(
                    &ConnId(r.conn.into()),
                    Outbound::Raw {
                        binary: r.binary,
                        payload: Bytes::from(r.payload),
                    },
                );
            }
            FromWorker::Close(c) => {
                let code = if c.code == 1000 || (3000..=4999).contains(&c.code) {
                    c.code
                } else {
                    1000
                };
                if let Some(conn) = self.hub.get(&ConnId(c.conn.into())) {
                    conn.close(code, &c.reason);
                }
            }
            FromWorker::Subscribe(t) => {
                if let Err(e) = self
                    .hub
                    .subscribe(&ConnId(t.conn.as_str().into()), &t.topic)
                {
                    debug!(session.id = %t.conn, error = %e, "worker subscription refused");
                }
            }
            FromWorker::Unsubscribe(t) => self.hub.unsubscribe(&ConnId(t.conn.into()), &t.topic),
            FromWorker::Publish(p) => {
                self.hub.publish(&p.topic, &p.msg_type, p.data);
            }
            FromWorker::Bye(b) => self.on_bye(&peer, &b.reason, now, out),
        }
    }
}
