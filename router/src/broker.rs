//! The broker: which worker gets which message, and what happens to every
//! request until its single terminal frame.
//!
//! Pure state, no sockets: the bridge task owns one `Broker`, feeds it
//! commands from sessions, decoded worker messages, ticks, deadline expiries
//! and retry timers, and the broker answers through an [`Outbox`] (to
//! workers) and the [`Hub`] (to clients). Tests drive it the same way with a
//! recording outbox.
//!
//! A request is in exactly one of four places: `waiting` (no free credit
//! yet), `pending` (at a worker), `retrying` (its worker failed before
//! replying; another attempt is scheduled), or gone (terminal frame sent).
//!
//! Invariants (see ARCHITECTURE.md):
//! - a worker never has more requests outstanding than its announced capacity;
//!   a request stays outstanding (holds a credit) until the worker's terminal
//!   message, even after the router gave up on it (a "zombie");
//! - every request gets exactly one terminal frame to its client: the worker's
//!   final reply or error, or one router error (`timeout`, `no_workers`,
//!   `worker_error`, `cancelled`, `overloaded`), whichever comes first; later
//!   replies are dropped;
//! - replies are only accepted from the worker the request was sent to;
//! - a request is retried only if its route allows it, no reply of it has
//!   reached the client yet, and its deadline has not passed.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bridge_proto::{self as proto, codes, FromWorker, ToWorker};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::time::{delay_queue, DelayQueue};
use tracing::{debug, info, warn};

use crate::{
    client::{unix_ms, OutFrame, Outbound},
    handshake::{Admitted, Handshake, Step},
    hub::Hub,
    ids::{Cid, ConnId},
    metrics::Metrics,
    policy::breaker::{Admit, Breaker, BreakerPolicy, Outcome},
    registry::RouteRegistry,
};

/// ZeroMQ identity of a worker's DEALER connection.
pub type PeerId = Bytes;

/// Requests that may wait for a free worker credit, across all services.
pub const MAX_WAITING: usize = 10_000;

/// First retry delay; doubled per attempt, plus up to 50% jitter.
const RETRY_BASE: Duration = Duration::from_millis(50);

/// Where the broker's messages to workers go.
pub trait Outbox {
    /// Sends in the peer's protocol version ([`Broker::version_of`]).
    fn send(&mut self, peer: &PeerId, msg: ToWorker);
    /// Sends in this protocol version (answers to a `hello`, before the
    /// peer is registered).
    fn send_as(&mut self, peer: &PeerId, _version: u8, msg: ToWorker) {
        self.send(peer, msg);
    }
}

/// The route's breaker, the admission the session got from it, and the
/// policy to judge the outcome by.
#[derive(Debug, Clone)]
pub struct BreakerTicket {
    pub breaker: Arc<Breaker>,
    pub admit: Admit,
    pub policy: BreakerPolicy,
}

/// A client request, as the session hands it over.
#[derive(Debug)]
pub struct RequestCmd {
    pub cid: Cid,
    pub conn: ConnId,
    /// The client's id as JSON text (the key of the connection's in-flight map).
    pub client_key: String,
    pub client_id: Value,
    pub route: String,
    pub service: String,
    pub msg_type: String,
    pub data: Value,
    pub timeout: Duration,
    pub affinity: bool,
    /// Extra attempts allowed after a transient failure.
    pub retries: u32,
    pub breaker: Option<BreakerTicket>,
    /// Verified token claims of the connection.
    pub claims: Option<Value>,
    /// Bytes of the client's frame: what holding this request costs.
    pub size: usize,
}

/// What sessions ask of the bridge.
#[derive(Debug)]
pub enum Command {
    Request(Box<RequestCmd>),
    Event {
        conn: ConnId,
        msg_type: String,
        data: Value,
    },
    Binary {
        conn: ConnId,
        data: Bytes,
    },
    Raw {
        conn: ConnId,
        binary: bool,
        payload: Bytes,
    },
    Connect(Box<proto::Connect>),
    Disconnect {
        conn: ConnId,
        code: u16,
        reason: String,
        /// Requests still in flight on the connection: they are cancelled.
        cids: Vec<Cid>,
    },
    Cancel {
        cid: Cid,
        reason: &'static str,
    },
    Snapshot(oneshot::Sender<Snapshot>),
}

/// Live workers, for `/routes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub workers: Vec<WorkerInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: String,
    pub services: Vec<String>,
    pub in_flight: u32,
    pub capacity: u32,
    pub draining: bool,
    pub sdk: String,
}

#[derive(Debug)]
struct Worker {
    name: String,
    services: Vec<String>,
    capacity: u32,
    in_flight: u32,
    last_seen: Instant,
    draining: bool,
    sdk: String,
    /// The protocol version of its `hello`: every message to it uses it.
    version: u8,
}

/// Bytes of request data one request holds, counted in a total shared by
/// all of them. Dropping the charge (whatever path the request leaves by)
/// gives the bytes back, so the total cannot drift.
#[derive(Debug)]
struct Charge {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl Charge {
    /// The request no longer keeps its data (sent with no retry left).
    fn release(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

/// A request the router still owes a terminal frame.
#[derive(Debug)]
struct InFlight {
    cmd: RequestCmd,
    /// Its data's bytes, while the broker keeps the data.
    charge: Charge,
    /// 1 for the first attempt.
    attempt: u32,
    deadline: delay_queue::Key,
    /// The worker that failed the previous attempt (tried last next time).
    avoid: Option<PeerId>,
    started: Instant,
}

impl InFlight {
    fn may_retry(&self) -> bool {
        self.attempt <= self.cmd.retries
    }

    fn record(&self, outcome: Outcome) {
        if let Some(t) = &self.cmd.breaker {
            t.breaker
                .record(t.admit, outcome, Instant::now(), &t.policy);
        }
    }
}

#[derive(Debug)]
struct Pending {
    req: InFlight,
    worker: PeerId,
    /// Whether a partial reply reached the client (then no retry: the
    /// client would see the stream twice).
    partial_sent: bool,
}

/// Per-connection bridge state.
#[derive(Debug)]
struct ConnEntry {
    connect: Box<proto::Connect>,
    /// The worker that gets this connection's events (and, with affinity,
    /// its requests). Chosen on connect; re-chosen if it dies.
    home: Option<PeerId>,
}

/// Broker settings.
#[derive(Debug, Clone)]
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

/// Outcome of a worker's error reply, for the breaker: errors that say the
/// worker (not the request) is at fault count as failures.
fn error_outcome(code: &str, retryable: bool) -> Outcome {
    if retryable || matches!(code, codes::WORKER_ERROR | codes::INTERNAL | codes::TIMEOUT) {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

pub struct Broker {
    cfg: BrokerConfig,
    hub: Arc<Hub>,
    /// For dynamic routes (workers registering path-named services).
    registry: Option<Arc<RouteRegistry>>,
    metrics: Arc<Metrics>,
    workers: HashMap<PeerId, Worker>,
    pending: HashMap<Cid, Pending>,
    /// Requests the router gave up on (and sent `cancel` for) but the
    /// worker has not finished: they keep their credit until the worker's
    /// terminal message, or until `cancel_grace` has passed.
    zombies: HashMap<Cid, PeerId>,
    /// When each zombie's credit is freed without a terminal message.
    pub zombie_timers: DelayQueue<Cid>,
    /// Bytes of request data held, the sum of every live [`Charge`].
    held_bytes: Arc<AtomicUsize>,
    waiting: HashMap<Cid, InFlight>,
    /// Arrival order of `waiting`, per service (may hold ids already gone).
    queues: HashMap<String, VecDeque<Cid>>,
    retrying: HashMap<Cid, InFlight>,
    conns: HashMap<ConnId, ConnEntry>,
    /// Unregistered peers sent a goodbye since the last tick.
    told_to_hello: HashSet<PeerId>,
    /// Open challenges of peers that have not proved the secret yet.
    handshake: Handshake,
    /// Deadlines of every request the router still owes a terminal frame.
    pub deadlines: DelayQueue<Cid>,
    /// When each request in `retrying` gets its next attempt.
    pub retry_timers: DelayQueue<Cid>,
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
            cfg,
            hub,
            registry,
            metrics,
            workers: HashMap::new(),
            pending: HashMap::new(),
            zombies: HashMap::new(),
            zombie_timers: DelayQueue::new(),
            held_bytes: Arc::new(AtomicUsize::new(0)),
            waiting: HashMap::new(),
            queues: HashMap::new(),
            retrying: HashMap::new(),
            conns: HashMap::new(),
            told_to_hello: HashSet::new(),
            deadlines: DelayQueue::new(),
            retry_timers: DelayQueue::new(),
        }
    }

    fn deliver(&self, conn: &ConnId, frame: OutFrame) {
        self.hub.send(conn, frame.into());
    }

    /// Sends the router's terminal error for a request and forgets it.
    /// `deadline_fired`: the deadline key already left the queue.
    fn fail(
        &mut self,
        req: InFlight,
        code: &str,
        message: String,
        outcome: Outcome,
        deadline_fired: bool,
    ) {
        if !deadline_fired {
            self.deadlines.try_remove(&req.deadline);
        }
        req.record(outcome);
        self.metrics
            .request_finished(&req.cmd.route, req.started.elapsed());
        let cmd = req.cmd;
        Self::free_client_id(&self.hub, &cmd);
        self.deliver(
            &cmd.conn,
            OutFrame::error(Some(cmd.client_id), Some(&cmd.cid.0), code, message, None),
        );
    }

    // ----- commands from sessions -------------------------------------------------

    pub fn on_command(&mut self, cmd: Command, out: &mut dyn Outbox) {
        match cmd {
            Command::Request(req) => self.on_request(*req, out),
            Command::Event {
                conn,
                msg_type,
                data,
            } => match self.home_of(&conn, out) {
                Some((peer, route, service)) => out.send(
                    &peer,
                    ToWorker::Event(proto::Event {
                        conn: conn.0,
                        route,
                        service,
                        msg_type,
                        data,
                    }),
                ),
                None => self.deliver(
                    &conn,
                    OutFrame::error(
                        None,
                        None,
                        codes::NO_WORKERS,
                        format!("no live worker to take a `{msg_type}` message"),
                        None,
                    ),
                ),
            },
            Command::Binary { conn, data } => match self.home_of(&conn, out) {
                Some((peer, route, service)) => out.send(
                    &peer,
                    ToWorker::Binary(proto::Binary {
                        conn: conn.0,
                        route,
                        service,
                        data: data.to_vec(),
                    }),
                ),
                None => self.deliver(
                    &conn,
                    OutFrame::error(
                        None,
                        None,
                        codes::NO_WORKERS,
                        "no live worker to take a binary frame",
                        None,
                    ),
                ),
            },
            Command::Raw {
                conn,
                binary,
                payload,
            } => {
                if let Some((peer, _, _)) = self.home_of(&conn, out) {
                    out.send(
                        &peer,
                        ToWorker::Raw(proto::RawFrame {
                            conn: conn.0,
                            binary,
                            payload: payload.to_vec(),
                        }),
                    );
                } else if let Some(c) = self.hub.get(&conn) {
                    // A raw client has no error frame to read: 1013 "try again later".
                    c.close(1013, "no live worker serves this route");
                }
            }
            Command::Connect(connect) => {
                let conn = ConnId(connect.conn.clone());
                self.conns.insert(
                    conn.clone(),
                    ConnEntry {
                        connect,
                        home: None,
                    },
                );
                // Choose the home now so the worker learns of the client at once.
                self.home_of(&conn, out);
            }
            Command::Disconnect {
                conn,
                code,
                reason,
                cids,
            } => {
                for cid in cids {
                    self.abandon(&cid, "disconnected", false, out);
                }
                if let Some(entry) = self.conns.remove(&conn) {
                    if let Some(home) = entry.home.filter(|p| self.workers.contains_key(p)) {
                        out.send(
                            &home,
                            ToWorker::Disconnect(proto::Disconnect {
                                conn: conn.0,
                                route: entry.connect.route.clone(),
                                service: entry.connect.service.clone(),
                                code,
                                reason,
                            }),
                        );
                    }
                }
            }
            Command::Cancel { cid, reason } => self.abandon(&cid, reason, true, out),
            Command::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .values()
            .map(|w| WorkerInfo {
                id: w.name.clone(),
                services: w.services.clone(),
                in_flight: w.in_flight,
                capacity: w.capacity,
                draining: w.draining,
                sdk: w.sdk.clone(),
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Snapshot { workers }
    }

    fn live_workers_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = (&'a PeerId, &'a Worker)> + 'a {
        // A worker silent past the liveness limit is dead even if the next
        // tick has not removed it yet (e.g. it was just frozen): skip it.
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let now = Instant::now();
        self.workers.iter().filter(move |(_, w)| {
            !w.draining
                && now.duration_since(w.last_seen) <= limit
                && w.services.iter().any(|s| s == service)
        })
    }

    fn has_credit(&self, peer: &PeerId) -> bool {
        self.workers
            .get(peer)
            .is_some_and(|w| !w.draining && w.in_flight < w.capacity)
    }

    /// Least outstanding requests first; ties go to the worker with more
    /// room; `avoid` only when nothing else qualifies.
    fn pick(&self, service: &str, need_credit: bool, avoid: Option<&PeerId>) -> Option<PeerId> {
        self.live_workers_of(service)
            .filter(|(_, w)| !need_credit || w.in_flight < w.capacity)
            .min_by_key(|(p, w)| (Some(*p) == avoid, w.in_flight, u32::MAX - w.capacity))
            .map(|(p, _)| p.clone())
    }

    /// The connection's home worker, choosing (and telling) one if needed.
    fn home_of(&mut self, conn: &ConnId, out: &mut dyn Outbox) -> Option<(PeerId, String, String)> {
        let entry = self.conns.get(conn)?;
        let service = entry.connect.service.clone();
        let route = entry.connect.route.clone();
        if let Some(home) = &entry.home {
            if self.workers.get(home).is_some_and(|w| !w.draining) {
                return Some((home.clone(), route, service));
            }
        }
        let peer = self.pick(&service, false, None)?;
        let entry = self.conns.get_mut(conn)?;
        entry.home = Some(peer.clone());
        out.send(&peer, ToWorker::Connect((*entry.connect).clone()));
        Some((peer, route, service))
    }

    fn on_request(&mut self, cmd: RequestCmd, out: &mut dyn Outbox) {
        let held = self.held_bytes.load(Ordering::Relaxed);
        let over = held.saturating_add(cmd.size) > self.cfg.max_held_request_bytes;
        self.held_bytes.fetch_add(cmd.size, Ordering::Relaxed);
        let charge = Charge {
            total: self.held_bytes.clone(),
            bytes: cmd.size,
        };
        let deadline = self.deadlines.insert(cmd.cid.clone(), cmd.timeout);
        let req = InFlight {
            cmd,
            charge,
            attempt: 1,
            deadline,
            avoid: None,
            started: Instant::now(),
        };
        if over {
            self.metrics.bound_hit("held_request_bytes");
            let msg = "the router holds too much request data: try again shortly".to_owned();
            self.fail(req, codes::OVERLOADED, msg, Outcome::Neutral, false);
            return;
        }
        self.place(req, out);
    }

    /// Bytes of request data held now (for metrics and tests).
    pub fn held_request_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Sends a request to a worker with a free credit, or queues it.
    fn place(&mut self, req: InFlight, out: &mut dyn Outbox) {
        let service = req.cmd.service.clone();
        if self.live_workers_of(&service).next().is_none() {
            let msg = format!("no live worker serves `{service}`");
            self.fail(req, codes::NO_WORKERS, msg, Outcome::Failure, false);
            return;
        }
        let target = if req.cmd.affinity {
            let conn = req.cmd.conn.clone();
            self.home_of(&conn, out)
                .map(|(p, _, _)| p)
                .filter(|p| self.has_credit(p))
        } else {
            self.pick(&service, true, req.avoid.as_ref())
        };
        match target {
            Some(peer) => self.dispatch(req, peer, out),
            None if self.waiting.len() >= MAX_WAITING => {
                let msg = "every worker is at capacity and the wait queue is full".to_owned();
                self.fail(req, codes::OVERLOADED, msg, Outcome::Neutral, false);
            }
            None => {
                debug!(correlation.id = %req.cmd.cid, service = %service, "all workers busy: request waits");
                let cid = req.cmd.cid.clone();
                self.queues
                    .entry(service)
                    .or_default()
                    .push_back(cid.clone());
                self.waiting.insert(cid, req);
            }
        }
    }

    fn dispatch(&mut self, mut req: InFlight, peer: PeerId, out: &mut dyn Outbox) {
        let Some(worker) = self.workers.get_mut(&peer) else {
            // Callers pick a registered worker; never lose the request anyway.
            let msg = "the chosen worker is gone".to_owned();
            self.fail(req, codes::WORKER_ERROR, msg, Outcome::Failure, false);
            return;
        };
        worker.in_flight += 1;
        let left = self
            .deadlines
            .deadline(&req.deadline)
            .into_std()
            .saturating_duration_since(Instant::now());
        // Keep the data only while another attempt may need it.
        let data = if req.may_retry() {
            req.cmd.data.clone()
        } else {
            req.charge.release();
            std::mem::take(&mut req.cmd.data)
        };
        let cmd = &req.cmd;
        debug!(correlation.id = %cmd.cid, session.id = %cmd.conn, worker = %worker.name, r#type = %cmd.msg_type, attempt = req.attempt, "request sent to worker");
        out.send(
            &peer,
            ToWorker::Request(proto::Request {
                cid: cmd.cid.0.clone(),
                conn: cmd.conn.0.clone(),
                route: cmd.route.clone(),
                service: cmd.service.clone(),
                msg_type: cmd.msg_type.clone(),
                id: cmd.client_id.clone(),
                data,
                timeout_ms: left.as_millis() as u64,
                deadline_ms: unix_ms() + left.as_millis() as u64,
                attempt: req.attempt,
                claims: cmd.claims.clone(),
            }),
        );
        self.pending.insert(
            cmd.cid.clone(),
            Pending {
                req,
                worker: peer,
                partial_sent: false,
            },
        );
    }

    /// Hands queued requests of these services to workers with free credits.
    fn drain_waiting(&mut self, services: &[String], out: &mut dyn Outbox) {
        for service in services {
            // Affinity requests whose home worker is busy are set aside (in
            // order) so they do not hold up requests behind them.
            let mut set_aside: Vec<Cid> = Vec::new();
            while self.pick(service, true, None).is_some() {
                let Some(cid) = self.queues.get_mut(service).and_then(|q| q.pop_front()) else {
                    break;
                };
                let Some(req) = self.waiting.remove(&cid) else {
                    continue; // expired or cancelled meanwhile
                };
                let target = if req.cmd.affinity {
                    let conn = req.cmd.conn.clone();
                    self.home_of(&conn, out)
                        .map(|(home, _, _)| home)
                        .filter(|home| self.has_credit(home))
                } else {
                    self.pick(service, true, req.avoid.as_ref())
                };
                match target {
                    Some(peer) => self.dispatch(req, peer, out),
                    None => {
                        self.waiting.insert(cid.clone(), req);
                        set_aside.push(cid);
                    }
                }
            }
            let queue = self.queues.entry(service.clone()).or_default();
            for cid in set_aside.into_iter().rev() {
                queue.push_front(cid);
            }
            if queue.is_empty() {
                self.queues.remove(service);
            }
        }
    }

    /// Takes a request out of its service's arrival queue (it left `waiting`).
    fn unqueue(&mut self, service: &str, cid: &Cid) {
        if let Some(q) = self.queues.get_mut(service) {
            q.retain(|c| c != cid);
            if q.is_empty() {
                self.queues.remove(service);
            }
        }
    }

    /// The router stops waiting for a request (client cancel, disconnect).
    /// `notify_client`: send the client its `cancelled` terminal frame.
    fn abandon(&mut self, cid: &Cid, reason: &str, notify_client: bool, out: &mut dyn Outbox) {
        let req = if let Some(p) = self.pending.remove(cid) {
            out.send(
                &p.worker,
                ToWorker::Cancel(proto::Cancel {
                    cid: cid.0.clone(),
                    reason: reason.to_owned(),
                }),
            );
            self.make_zombie(cid.clone(), p.worker);
            p.req
        } else if let Some(r) = self.waiting.remove(cid) {
            self.unqueue(&r.cmd.service.clone(), cid);
            r
        } else if let Some(r) = self.retrying.remove(cid) {
            r
        } else {
            return;
        };
        if notify_client {
            self.fail(
                req,
                codes::CANCELLED,
                format!("request cancelled ({reason})"),
                Outcome::Neutral,
                false,
            );
        } else {
            self.deadlines.try_remove(&req.deadline);
            req.record(Outcome::Neutral);
        }
    }

    /// A request's deadline passed.
    pub fn on_deadline(&mut self, cid: Cid, out: &mut dyn Outbox) {
        if let Some(p) = self.pending.remove(&cid) {
            out.send(
                &p.worker,
                ToWorker::Cancel(proto::Cancel {
                    cid: cid.0.clone(),
                    reason: "timeout".into(),
                }),
            );
            self.make_zombie(cid.clone(), p.worker);
            warn!(correlation.id = %cid, session.id = %p.req.cmd.conn, "request timed out at the worker");
            let msg = "no final reply before the request's deadline".to_owned();
            self.fail(p.req, codes::TIMEOUT, msg, Outcome::Failure, true);
        } else if let Some(req) = self.waiting.remove(&cid) {
            self.unqueue(&req.cmd.service.clone(), &cid);
            warn!(correlation.id = %cid, session.id = %req.cmd.conn, "request timed out waiting for a free worker");
            let msg = "every worker stayed busy until the request's deadline".to_owned();
            self.fail(req, codes::TIMEOUT, msg, Outcome::Failure, true);
        } else if let Some(req) = self.retrying.remove(&cid) {
            warn!(correlation.id = %cid, session.id = %req.cmd.conn, "request timed out between attempts");
            let msg = "the request's deadline passed before another attempt".to_owned();
            self.fail(req, codes::TIMEOUT, msg, Outcome::Failure, true);
        }
    }

    /// The router sent `cancel` for a request at `peer`: it keeps its
    /// credit until the worker's terminal message or the grace's end.
    fn make_zombie(&mut self, cid: Cid, peer: PeerId) {
        self.zombie_timers
            .insert(cid.clone(), self.cfg.cancel_grace);
        self.zombies.insert(cid, peer);
    }

    /// A cancelled request's grace is over. If its worker still has not
    /// sent the terminal message (it may never: a request it could not
    /// decode, a handler that ignores cancellation), the credit comes back
    /// now, and a terminal message arriving later is dropped.
    pub fn on_cancel_grace(&mut self, cid: Cid, out: &mut dyn Outbox) {
        let Some(peer) = self.zombies.remove(&cid) else {
            return; // answered in time, or its worker is gone
        };
        let worker = self.workers.get(&peer).map_or("?", |w| w.name.as_str());
        warn!(correlation.id = %cid, worker = %worker, "no terminal message within the grace after cancel: credit freed");
        self.metrics.credit_reclaimed();
        self.release(&peer, out);
    }

    /// A retry's backoff is over: try another worker.
    pub fn on_retry_due(&mut self, cid: Cid, out: &mut dyn Outbox) {
        if let Some(req) = self.retrying.remove(&cid) {
            self.place(req, out);
        }
    }

    /// After a transient failure of `req`'s attempt at `failed`: schedule
    /// another attempt if allowed, else fail it with `code`.
    /// `outcome`: what the failure means for the route's breaker if no
    /// retry happens.
    fn retry_or_fail(
        &mut self,
        mut req: InFlight,
        failed: PeerId,
        partial_sent: bool,
        code: &str,
        message: String,
        outcome: Outcome,
    ) {
        let left = self
            .deadlines
            .deadline(&req.deadline)
            .into_std()
            .saturating_duration_since(Instant::now());
        let base = RETRY_BASE * 2u32.saturating_pow(req.attempt - 1);
        let backoff = base + base.mul_f64(rand::random::<f64>() * 0.5);
        if partial_sent || !req.may_retry() || backoff >= left {
            self.fail(req, code, message, outcome, false);
            return;
        }
        info!(correlation.id = %req.cmd.cid, attempt = req.attempt + 1, backoff_ms = backoff.as_millis() as u64, "retrying on another worker");
        req.attempt += 1;
        req.avoid = Some(failed);
        let cid = req.cmd.cid.clone();
        self.retry_timers.insert(cid.clone(), backoff);
        self.retrying.insert(cid, req);
    }

    // ----- messages from workers --------------------------------------------------

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
                let registered = self.workers.contains_key(&peer);
                let step = self
                    .handshake
                    .on_hello(&peer, version, hello, registered, now);
                return self.on_handshake(peer, step, out);
            }
            FromWorker::Auth(a) => {
                let step = self.handshake.on_auth(&peer, version, &a, now);
                return self.on_handshake(peer, step, out);
            }
            _ => {}
        }
        let Some(worker) = self.workers.get_mut(&peer) else {
            // At most one goodbye per peer per heartbeat interval: a peer that
            // floods the socket does not get a flood back.
            if !self.told_to_hello.insert(peer.clone()) {
                return;
            }
            debug!(peer = ?peer, "message from an unregistered peer: asking it to say hello");
            out.send(
                &peer,
                ToWorker::Goodbye(proto::Goodbye {
                    reason: "unknown worker: send hello first".into(),
                    reconnect: true,
                }),
            );
            return;
        };
        worker.last_seen = now;
        match msg {
            FromWorker::Hello(_) | FromWorker::Auth(_) | FromWorker::Heartbeat => {}
            FromWorker::Reply(r) => self.on_reply(peer, r, out),
            FromWorker::Error(e) => self.on_error(peer, e, out),
            FromWorker::Push(p) => {
                self.hub.send(
                    &ConnId(p.conn),
                    OutFrame::push(p.msg_type, None, p.data).into(),
                );
            }
            FromWorker::PushBinary(p) => {
                self.hub
                    .send(&ConnId(p.conn), Outbound::Binary(Bytes::from(p.data)));
            }
            FromWorker::Raw(r) => {
                self.hub.send(
                    &ConnId(r.conn),
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
                if let Some(conn) = self.hub.get(&ConnId(c.conn)) {
                    conn.close(code, &c.reason);
                }
            }
            FromWorker::Subscribe(t) => {
                if let Err(e) = self.hub.subscribe(&ConnId(t.conn.clone()), &t.topic) {
                    debug!(session.id = %t.conn, error = %e, "worker subscription refused");
                }
            }
            FromWorker::Unsubscribe(t) => self.hub.unsubscribe(&ConnId(t.conn), &t.topic),
            FromWorker::Publish(p) => {
                self.hub.publish(&p.topic, &p.msg_type, p.data);
            }
            FromWorker::Bye(b) => {
                let Some(worker) = self.workers.get_mut(&peer) else {
                    return;
                };
                info!(worker = %worker.name, reason = %b.reason, in_flight = worker.in_flight, "worker is stopping: no new work");
                worker.draining = true;
                if worker.in_flight == 0 {
                    self.remove_worker(&peer, "stopped", out);
                }
            }
        }
    }

    fn on_reply(&mut self, peer: PeerId, r: proto::Reply, out: &mut dyn Outbox) {
        let cid = Cid(r.cid);
        let Some(p) = self.pending.get_mut(&cid).filter(|p| p.worker == peer) else {
            self.late(&peer, cid, r.done, out);
            return;
        };
        let cmd = &p.req.cmd;
        let frame = OutFrame::reply(
            r.msg_type.unwrap_or_else(|| cmd.msg_type.clone()),
            Some(cmd.client_id.clone()),
            Some(&cid.0),
            r.data,
            r.done,
        );
        let conn = cmd.conn.clone();
        p.partial_sent = true;
        if r.done {
            // Free the client's id before the client can see the last
            // frame: it may reuse the id at once.
            Self::free_client_id(&self.hub, cmd);
        }
        self.deliver(&conn, frame);
        if r.done {
            self.complete(&cid, Outcome::Success, out);
        }
    }

    fn on_error(&mut self, peer: PeerId, e: proto::ErrorReply, out: &mut dyn Outbox) {
        let cid = Cid(e.cid);
        if self.pending.get(&cid).is_none_or(|p| p.worker != peer) {
            self.late(&peer, cid, true, out);
            return;
        }
        let code = if codes::is_valid_code(&e.code) {
            e.code
        } else {
            codes::WORKER_ERROR.to_owned()
        };
        if e.retryable {
            // Invariant: checked just above that the request is pending here.
            let Some(p) = self.pending.remove(&cid) else {
                return;
            };
            self.release(&peer, out);
            self.retry_or_fail(
                p.req,
                peer,
                p.partial_sent,
                &code,
                e.message,
                Outcome::Failure,
            );
            return;
        }
        let outcome = error_outcome(&code, false);
        if let Some(p) = self.pending.get(&cid) {
            let cmd = &p.req.cmd;
            let frame = OutFrame::error(
                Some(cmd.client_id.clone()),
                Some(&cid.0),
                &code,
                e.message,
                e.retry_after_ms,
            );
            let conn = cmd.conn.clone();
            Self::free_client_id(&self.hub, cmd);
            self.deliver(&conn, frame);
        }
        self.complete(&cid, outcome, out);
    }

    /// A reply for a request the router no longer waits for (timed out,
    /// cancelled, or not this worker's): dropped, but a terminal one frees
    /// the zombie's credit.
    fn late(&mut self, peer: &PeerId, cid: Cid, terminal: bool, out: &mut dyn Outbox) {
        if self.zombies.get(&cid) == Some(peer) {
            debug!(correlation.id = %cid, "late reply dropped");
            if terminal {
                self.zombies.remove(&cid);
                self.release(peer, out);
            }
        } else {
            // Also the fate of a terminal message after its credit was
            // reclaimed (`on_cancel_grace`).
            debug!(correlation.id = %cid, "reply for a request this worker does not hold: dropped");
        }
    }

    /// The request is over for its client: its id may be reused. Done
    /// before the last frame is queued, because the client may reuse the id
    /// as soon as it reads that frame.
    fn free_client_id(hub: &Hub, cmd: &RequestCmd) {
        if let Some(c) = hub.get(&cmd.conn) {
            c.end_request(&cmd.client_key, &cmd.cid);
        }
    }

    /// The worker's terminal frame was delivered (the client id was freed
    /// before it was).
    fn complete(&mut self, cid: &Cid, outcome: Outcome, out: &mut dyn Outbox) {
        if let Some(p) = self.pending.remove(cid) {
            self.deadlines.try_remove(&p.req.deadline);
            p.req.record(outcome);
            self.metrics
                .request_finished(&p.req.cmd.route, p.req.started.elapsed());
            self.release(&p.worker, out);
        }
    }

    fn release(&mut self, peer: &PeerId, out: &mut dyn Outbox) {
        let Some(w) = self.workers.get_mut(peer) else {
            return;
        };
        w.in_flight = w.in_flight.saturating_sub(1);
        if w.draining {
            if w.in_flight == 0 {
                self.remove_worker(peer, "stopped", out);
            }
            return;
        }
        let services = w.services.clone();
        self.drain_waiting(&services, out);
    }

    fn on_handshake(&mut self, peer: PeerId, step: Step, out: &mut dyn Outbox) {
        let admitted = match step {
            Step::Register(a) => a,
            Step::Reply(version, msg) => return out.send_as(&peer, version, msg),
            Step::Refuse(version, reason) => {
                warn!(peer = ?peer, %reason, "worker refused");
                self.metrics.bridge_refused();
                return out.send_as(
                    &peer,
                    version,
                    ToWorker::Goodbye(proto::Goodbye {
                        reason,
                        reconnect: false,
                    }),
                );
            }
            Step::Ignore => return,
        };
        let Admitted {
            hello,
            services,
            version,
        } = admitted;
        match self.workers.get_mut(&peer) {
            Some(w) => {
                w.services = services.clone();
                w.capacity = hello.capacity;
                w.last_seen = Instant::now();
                w.draining = false;
            }
            None => {
                info!(worker = %hello.worker_id, services = ?services, capacity = hello.capacity, sdk = %hello.sdk, version, "worker registered");
                self.workers.insert(
                    peer.clone(),
                    Worker {
                        name: hello.worker_id,
                        services: services.clone(),
                        capacity: hello.capacity,
                        in_flight: 0,
                        last_seen: Instant::now(),
                        draining: false,
                        sdk: hello.sdk,
                        version,
                    },
                );
            }
        }
        out.send(
            &peer,
            ToWorker::Welcome(proto::Welcome {
                router_id: self.cfg.router_id.clone(),
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
                liveness: self.cfg.liveness,
                max_frame_bytes: Some(self.cfg.max_frame_bytes as u64),
            }),
        );
        if let Some(registry) = &self.registry {
            for s in &services {
                if registry.add_dynamic(s).is_err() {
                    self.metrics.bound_hit("dynamic_routes");
                }
            }
        }
        self.drain_waiting(&services, out);
    }

    /// A frame of a protocol version this router does not speak. A peer's
    /// first frame is its `hello`, so an unregistered peer is told, once per
    /// heartbeat interval, in the `goodbye` shape every version keeps.
    pub fn on_unsupported_version(&mut self, peer: PeerId, found: u64, out: &mut dyn Outbox) {
        if self.workers.contains_key(&peer) || !self.told_to_hello.insert(peer.clone()) {
            return;
        }
        let reason = format!(
            "unsupported protocol version {found} (this router speaks {} to {})",
            proto::MIN_PROTOCOL_VERSION,
            proto::PROTOCOL_VERSION
        );
        warn!(peer = ?peer, %reason, "worker refused");
        self.metrics.bridge_refused();
        out.send_as(
            &peer,
            proto::MIN_PROTOCOL_VERSION,
            ToWorker::Goodbye(proto::Goodbye {
                reason,
                reconnect: false,
            }),
        );
    }

    /// The protocol version to write to `peer` (the current one for peers
    /// that are not registered).
    pub fn version_of(&self, peer: &PeerId) -> u8 {
        self.workers
            .get(peer)
            .map_or(proto::PROTOCOL_VERSION, |w| w.version)
    }

    /// Heartbeats out, dead workers out. Call every heartbeat interval.
    pub fn on_tick(&mut self, out: &mut dyn Outbox) {
        self.told_to_hello.clear();
        self.handshake.expire(Instant::now());
        self.metrics
            .set_held_request_bytes(self.held_bytes.load(Ordering::Relaxed));
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let now = Instant::now();
        let dead: Vec<PeerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > limit)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in dead {
            self.remove_worker(&peer, "missed heartbeats", out);
        }
        let peers: Vec<PeerId> = self.workers.keys().cloned().collect();
        for peer in peers {
            out.send(&peer, ToWorker::Heartbeat);
        }
    }

    /// A bridge connection closed (the socket told us): whatever was bound
    /// to it is gone at once. A registered worker is dead now, not after the
    /// liveness period, so no new request goes to it and its requests are
    /// retried or failed immediately.
    pub fn on_connection_closed(&mut self, peer: &PeerId, out: &mut dyn Outbox) {
        self.handshake.forget(peer);
        self.told_to_hello.remove(peer);
        self.remove_worker(peer, "connection closed", out);
    }

    /// Forgets a worker; its requests are retried elsewhere where allowed,
    /// else get their terminal `worker_error`.
    pub fn remove_worker(&mut self, peer: &PeerId, why: &str, _out: &mut dyn Outbox) {
        let Some(worker) = self.workers.remove(peer) else {
            return;
        };
        let lost: Vec<Cid> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == *peer)
            .map(|(c, _)| c.clone())
            .collect();
        if why == "stopped" {
            info!(worker = %worker.name, "worker left");
        } else {
            warn!(worker = %worker.name, reason = why, lost_requests = lost.len(), "worker declared dead");
        }
        self.zombies.retain(|_, p| p != peer);
        for entry in self.conns.values_mut() {
            if entry.home.as_ref() == Some(peer) {
                entry.home = None;
            }
        }
        for cid in lost {
            if let Some(p) = self.pending.remove(&cid) {
                let msg = format!("worker {} was lost before replying ({why})", worker.name);
                // The breaker protects clients from a failing service, not
                // from one crashed process: while the service has another
                // live worker, the loss does not count against the route.
                let outcome = if self.live_workers_of(&p.req.cmd.service).next().is_some() {
                    Outcome::Neutral
                } else {
                    Outcome::Failure
                };
                self.retry_or_fail(
                    p.req,
                    peer.clone(),
                    p.partial_sent,
                    codes::WORKER_ERROR,
                    msg,
                    outcome,
                );
            }
        }
        // Requests waiting for a service that has no worker left cannot be served.
        for service in &worker.services {
            if self.live_workers_of(service).next().is_none() {
                if let Some(registry) = &self.registry {
                    registry.remove_dynamic(service);
                }
                let queued: Vec<Cid> = self.queues.remove(service).unwrap_or_default().into();
                for cid in queued {
                    if let Some(req) = self.waiting.remove(&cid) {
                        let msg = format!("no live worker serves `{service}`");
                        self.fail(req, codes::NO_WORKERS, msg, Outcome::Failure, false);
                    }
                }
            }
        }
    }

    /// Tells every worker the router is going away (shutdown).
    pub fn goodbye_all(&mut self, out: &mut dyn Outbox) {
        for peer in self.workers.keys() {
            out.send(
                peer,
                ToWorker::Goodbye(proto::Goodbye {
                    reason: "router shutting down".into(),
                    reconnect: true,
                }),
            );
        }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Requests the router still owes a terminal frame.
    pub fn pending_count(&self) -> usize {
        self.pending.len() + self.waiting.len() + self.retrying.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnShared;
    use crate::policy::breaker::BreakerState;
    use bridge_proto::{ErrorReply, Hello, Reply};
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio::sync::mpsc;

    #[derive(Default)]
    struct Recorder(Vec<(PeerId, ToWorker)>);

    impl Outbox for Recorder {
        fn send(&mut self, peer: &PeerId, msg: ToWorker) {
            self.0.push((peer.clone(), msg));
        }
    }

    impl Recorder {
        fn requests_to(&self, peer: &PeerId) -> Vec<String> {
            self.0
                .iter()
                .filter_map(|(p, m)| match m {
                    ToWorker::Request(r) if p == peer => Some(r.cid.clone()),
                    _ => None,
                })
                .collect()
        }
        fn cancels(&self) -> Vec<(PeerId, String)> {
            self.0
                .iter()
                .filter_map(|(p, m)| match m {
                    ToWorker::Cancel(c) => Some((p.clone(), c.reason.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    struct Fixture {
        broker: Broker,
        hub: Arc<Hub>,
        out: Recorder,
    }

    fn fixture() -> Fixture {
        let hub = Arc::new(Hub::new());
        let cfg = BrokerConfig {
            router_id: "r".into(),
            heartbeat: Duration::from_millis(100),
            liveness: 3,
            secret: None,
            max_frame_bytes: 1 << 20,
            max_held_request_bytes: 1 << 20,
            cancel_grace: Duration::from_secs(5),
        };
        Fixture {
            broker: Broker::new(cfg, hub.clone(), None, Arc::new(Metrics::new())),
            hub,
            out: Recorder::default(),
        }
    }

    fn peer(name: &str) -> PeerId {
        Bytes::copy_from_slice(name.as_bytes())
    }

    impl Fixture {
        fn hello(&mut self, p: &PeerId, capacity: u32) {
            self.broker.on_worker_message(
                p.clone(),
                2,
                FromWorker::Hello(Hello {
                    worker_id: String::from_utf8_lossy(p).into_owned(),
                    services: vec!["svc".into()],
                    capacity,
                    sdk: "test".into(),
                }),
                &mut self.out,
            );
        }

        fn client(&self) -> (ConnId, Arc<ConnShared>, mpsc::Receiver<Outbound>) {
            let id = ConnId::new();
            let (c, rx) = ConnShared::new(id.clone(), "/ws".into(), 1 << 20);
            self.hub.register(c.clone());
            (id, c, rx)
        }

        /// A client the broker knows (it sent `connect`), so it has a home worker.
        fn connected_client(&mut self) -> (ConnId, Arc<ConnShared>, mpsc::Receiver<Outbound>) {
            let (id, c, rx) = self.client();
            self.broker.on_command(
                Command::Connect(Box::new(proto::Connect {
                    conn: id.0.clone(),
                    route: "/ws".into(),
                    service: "svc".into(),
                    path: "/ws".into(),
                    params: Default::default(),
                    query: Default::default(),
                    headers: Default::default(),
                    remote: "127.0.0.1:1".into(),
                    claims: None,
                })),
                &mut self.out,
            );
            (id, c, rx)
        }

        fn request(
            &mut self,
            conn: &ConnId,
            shared: &ConnShared,
            client_id: &str,
            timeout_ms: u64,
        ) -> Cid {
            self.request_with(conn, shared, client_id, timeout_ms, false)
        }

        fn request_with(
            &mut self,
            conn: &ConnId,
            shared: &ConnShared,
            client_id: &str,
            timeout_ms: u64,
            affinity: bool,
        ) -> Cid {
            let cid = Cid::new();
            let key = json!(client_id).to_string();
            assert!(shared.begin_request(key.clone(), cid.clone()));
            self.broker.on_command(
                Command::Request(Box::new(RequestCmd {
                    cid: cid.clone(),
                    conn: conn.clone(),
                    client_key: key,
                    client_id: json!(client_id),
                    route: "/ws".into(),
                    service: "svc".into(),
                    msg_type: "echo".into(),
                    data: json!({}),
                    timeout: Duration::from_millis(timeout_ms),
                    affinity,
                    retries: 0,
                    breaker: None,
                    claims: None,
                    size: 100,
                })),
                &mut self.out,
            );
            cid
        }

        fn reply(&mut self, p: &PeerId, cid: &Cid, done: bool) {
            self.broker.on_worker_message(
                p.clone(),
                2,
                FromWorker::Reply(Reply {
                    cid: cid.0.clone(),
                    done,
                    msg_type: None,
                    data: json!(1),
                }),
                &mut self.out,
            );
        }
    }

    fn frames(rx: &mut mpsc::Receiver<Outbound>) -> Vec<OutFrame> {
        let mut v = Vec::new();
        while let Ok(Outbound::Frame(f)) = rx.try_recv() {
            v.push(*f);
        }
        v
    }

    #[tokio::test]
    async fn no_worker_gives_one_no_workers_frame() {
        let mut f = fixture();
        let (conn, shared, mut rx) = f.client();
        f.request(&conn, &shared, "1", 1000);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::NO_WORKERS);
        assert_eq!(shared.inflight_count(), 0);
    }

    #[tokio::test]
    async fn credits_are_never_exceeded_and_queued_requests_flow_on_release() {
        let mut f = fixture();
        let w = peer("w1");
        f.hello(&w, 2);
        let (conn, shared, mut rx) = f.client();
        let cids: Vec<Cid> = (0..5)
            .map(|i| f.request(&conn, &shared, &i.to_string(), 10_000))
            .collect();
        assert_eq!(
            f.out.requests_to(&w).len(),
            2,
            "capacity 2 means 2 outstanding"
        );
        f.reply(&w, &cids[0], true);
        assert_eq!(
            f.out.requests_to(&w).len(),
            3,
            "a release lets one waiting request through"
        );
        f.reply(&w, &cids[1], false);
        assert_eq!(
            f.out.requests_to(&w).len(),
            3,
            "a partial reply does not release a credit"
        );
        let got = frames(&mut rx);
        assert_eq!(got.iter().filter(|fr| fr.done == Some(true)).count(), 1);
        assert_eq!(f.broker.pending_count(), 4);
    }

    #[tokio::test]
    async fn least_outstanding_wins() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 10);
        f.hello(&b, 10);
        let (conn, shared, _rx) = f.client();
        for i in 0..10 {
            f.request(&conn, &shared, &i.to_string(), 10_000);
        }
        assert_eq!(f.out.requests_to(&a).len(), 5);
        assert_eq!(f.out.requests_to(&b).len(), 5);
    }

    #[tokio::test]
    async fn a_lost_worker_fails_its_requests_once_and_late_replies_are_dropped() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 4);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 10_000);
        f.broker.remove_worker(&w, "missed heartbeats", &mut f.out);
        f.reply(&w, &cid, true); // from a peer no longer registered
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::WORKER_ERROR);
        assert_eq!(got[0].id, Some(json!("1")));
        assert_eq!(shared.inflight_count(), 0);
    }

    #[tokio::test]
    async fn replies_from_another_worker_are_not_delivered() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 1);
        f.hello(&b, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 10_000);
        let holder = if f.out.requests_to(&a).is_empty() {
            &b
        } else {
            &a
        };
        let other = if holder == &a { b.clone() } else { a.clone() };
        f.reply(&other, &cid, true);
        assert!(frames(&mut rx).is_empty());
        let holder = holder.clone();
        f.reply(&holder, &cid, true);
        assert_eq!(frames(&mut rx).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_gives_timeout_and_keeps_the_credit_until_the_worker_answers() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 500);
        let expired = f.broker.deadlines.next().await.unwrap().into_inner();
        assert_eq!(expired, cid);
        f.broker.on_deadline(expired, &mut f.out);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::TIMEOUT);
        assert_eq!(f.out.cancels(), vec![(w.clone(), "timeout".to_string())]);

        // Capacity 1 and the zombie holds it: the next request waits.
        let second = f.request(&conn, &shared, "2", 10_000);
        assert_eq!(f.out.requests_to(&w).len(), 1);
        // The worker's late terminal answer is dropped but frees the credit.
        f.broker.on_worker_message(
            w.clone(),
            2,
            FromWorker::Error(ErrorReply {
                cid: cid.0.clone(),
                code: "cancelled".into(),
                message: "late".into(),
                retryable: false,
                retry_after_ms: None,
            }),
            &mut f.out,
        );
        assert!(
            frames(&mut rx).is_empty(),
            "late answers never reach the client"
        );
        assert_eq!(f.out.requests_to(&w), vec![cid.0.clone(), second.0.clone()]);
    }

    #[tokio::test]
    async fn client_cancel_sends_cancelled_and_tells_the_worker() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 10_000);
        f.broker.on_command(
            Command::Cancel {
                cid: cid.clone(),
                reason: "client",
            },
            &mut f.out,
        );
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::CANCELLED);
        assert_eq!(f.out.cancels(), vec![(w.clone(), "client".to_string())]);
        f.reply(&w, &cid, true);
        assert!(frames(&mut rx).is_empty());
    }

    fn with_secret(f: &mut Fixture) {
        f.broker.handshake = Handshake::new(Some("s3cret"));
    }

    #[tokio::test]
    async fn bad_hellos_are_refused_and_unknown_peers_told_to_hello() {
        let mut f = fixture();
        let w = peer("w");
        f.broker.on_worker_message(
            w.clone(),
            2,
            FromWorker::Hello(Hello {
                worker_id: "w".into(),
                services: vec!["svc".into()],
                capacity: 0,
                sdk: "test".into(),
            }),
            &mut f.out,
        );
        assert!(
            matches!(&f.out.0[0].1, ToWorker::Goodbye(g) if !g.reconnect && g.reason.contains("capacity"))
        );
        assert_eq!(f.broker.worker_count(), 0);
        f.broker
            .on_worker_message(w.clone(), 2, FromWorker::Heartbeat, &mut f.out);
        assert!(matches!(&f.out.0[1].1, ToWorker::Goodbye(g) if g.reconnect));
    }

    #[tokio::test]
    async fn with_a_secret_only_the_right_proof_registers() {
        let mut f = fixture();
        with_secret(&mut f);
        let w = peer("w");
        f.hello(&w, 1);
        assert_eq!(
            f.broker.worker_count(),
            0,
            "a hello alone does not register"
        );
        let ToWorker::Challenge(c) = f.out.0[0].1.clone() else {
            panic!("expected a challenge: {:?}", f.out.0);
        };
        // Before the proof, the peer gets nothing but goodbyes.
        f.broker
            .on_worker_message(w.clone(), 2, FromWorker::Heartbeat, &mut f.out);
        assert!(matches!(&f.out.0[1].1, ToWorker::Goodbye(g) if g.reconnect));
        let proof = proto::auth::proof(b"s3cret", &c.nonce).to_vec();
        f.broker.on_worker_message(
            w.clone(),
            2,
            FromWorker::Auth(proto::Auth { proof }),
            &mut f.out,
        );
        assert_eq!(f.broker.worker_count(), 1);
        assert!(
            matches!(&f.out.0[2].1, ToWorker::Welcome(wl) if wl.max_frame_bytes == Some(1 << 20))
        );

        let intruder = peer("x");
        f.hello(&intruder, 1);
        let ToWorker::Challenge(c2) = f.out.0[3].1.clone() else {
            panic!("expected a challenge");
        };
        assert_ne!(c.nonce, c2.nonce);
        // A captured proof of another session is refused for good.
        let replayed = proto::auth::proof(b"s3cret", &c.nonce).to_vec();
        f.broker.on_worker_message(
            intruder.clone(),
            2,
            FromWorker::Auth(proto::Auth { proof: replayed }),
            &mut f.out,
        );
        assert!(matches!(&f.out.0[4].1, ToWorker::Goodbye(g) if !g.reconnect));
        assert_eq!(f.broker.worker_count(), 1);
    }

    #[tokio::test]
    async fn with_a_secret_a_v1_hello_is_told_which_version_it_needs() {
        let mut f = fixture();
        with_secret(&mut f);
        let w = peer("old");
        f.broker.on_worker_message(
            w.clone(),
            1,
            FromWorker::Hello(Hello {
                worker_id: "old".into(),
                services: vec!["svc".into()],
                capacity: 1,
                sdk: "v1".into(),
            }),
            &mut f.out,
        );
        assert_eq!(f.broker.worker_count(), 0);
        assert!(
            matches!(&f.out.0[0].1, ToWorker::Goodbye(g) if !g.reconnect && g.reason.contains("version 2"))
        );
        assert_eq!(f.broker.version_of(&w), proto::PROTOCOL_VERSION);
    }

    #[tokio::test]
    async fn without_a_secret_a_v1_worker_is_answered_in_v1() {
        let mut f = fixture();
        let w = peer("old");
        f.broker.on_worker_message(
            w.clone(),
            1,
            FromWorker::Hello(Hello {
                worker_id: "old".into(),
                services: vec!["svc".into()],
                capacity: 1,
                sdk: "v1".into(),
            }),
            &mut f.out,
        );
        assert_eq!(f.broker.worker_count(), 1);
        assert_eq!(f.broker.version_of(&w), 1);
    }

    #[tokio::test]
    async fn a_publisher_registers_without_services_and_gets_no_requests() {
        let mut f = fixture();
        let p = peer("pub");
        f.broker.on_worker_message(
            p.clone(),
            2,
            FromWorker::Hello(Hello {
                worker_id: "pub".into(),
                services: vec![],
                capacity: 0,
                sdk: "test".into(),
            }),
            &mut f.out,
        );
        assert!(matches!(&f.out.0[0].1, ToWorker::Welcome(_)));
        let (conn, shared, mut rx) = f.client();
        f.request(&conn, &shared, "1", 1000);
        assert_eq!(
            frames(&mut rx)[0].error.as_ref().unwrap().code,
            codes::NO_WORKERS
        );
        assert!(f.out.requests_to(&p).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_credit_comes_back_after_the_cancel_grace_without_a_terminal_message() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        // The worker cannot decode this request and never answers it.
        let stuck = f.request(&conn, &shared, "1", 100);
        let expired = f.broker.deadlines.next().await.unwrap().into_inner();
        f.broker.on_deadline(expired, &mut f.out);
        assert_eq!(
            frames(&mut rx)[0].error.as_ref().unwrap().code,
            codes::TIMEOUT
        );
        let second = f.request(&conn, &shared, "2", 60_000);
        assert_eq!(
            f.out.requests_to(&w),
            vec![stuck.0.clone()],
            "the zombie holds the only credit"
        );

        let before = tokio::time::Instant::now();
        let due = f.broker.zombie_timers.next().await.unwrap().into_inner();
        assert_eq!(
            before.elapsed(),
            Duration::from_secs(5),
            "exactly the grace"
        );
        assert_eq!(due, stuck);
        f.broker.on_cancel_grace(due, &mut f.out);
        assert_eq!(
            f.out.requests_to(&w),
            vec![stuck.0.clone(), second.0.clone()],
            "the freed credit takes the waiting request"
        );
        // A terminal message after the reclaim is dropped and frees nothing twice.
        f.reply(&w, &stuck, true);
        let third = f.request(&conn, &shared, "3", 60_000);
        assert_eq!(
            f.out.requests_to(&w).len(),
            2,
            "{third:?} must wait for a credit"
        );
    }

    #[tokio::test]
    async fn held_request_bytes_are_bounded_and_given_back() {
        let mut f = fixture();
        f.broker.cfg.max_held_request_bytes = 250;
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        // 100 bytes each: the first goes out (no retries: not held), the
        // next two wait (held), the fourth would pass 250.
        let first = f.request(&conn, &shared, "1", 60_000);
        assert_eq!(f.broker.held_request_bytes(), 0);
        f.request(&conn, &shared, "2", 60_000);
        f.request(&conn, &shared, "3", 60_000);
        assert_eq!(f.broker.held_request_bytes(), 200);
        f.request(&conn, &shared, "4", 60_000);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::OVERLOADED);
        assert_eq!(got[0].id, Some(json!("4")));
        assert_eq!(
            f.broker.held_request_bytes(),
            200,
            "a refused request holds nothing"
        );
        f.reply(&w, &first, true);
        assert_eq!(
            f.broker.held_request_bytes(),
            100,
            "request 2 left the queue"
        );
    }

    #[tokio::test]
    async fn losing_one_worker_among_live_siblings_does_not_open_the_breaker() {
        let policy = BreakerPolicy {
            failure_threshold: 2,
            open_for: Duration::from_secs(10),
        };
        for (siblings, want) in [(true, BreakerState::Closed), (false, BreakerState::Open)] {
            let mut f = fixture();
            let (dead, alive) = (peer("dead"), peer("alive"));
            f.hello(&dead, 8);
            if siblings {
                f.hello(&alive, 1);
            }
            let breaker = Arc::new(Breaker::default());
            let (conn, shared, mut rx) = f.client();
            // Fill the alive worker first (least outstanding), then 3 on `dead`.
            let n = if siblings { 4 } else { 3 };
            for i in 0..n {
                let cid = Cid::new();
                let key = json!(i).to_string();
                assert!(shared.begin_request(key.clone(), cid.clone()));
                let admit = breaker.admit(Instant::now(), &policy).unwrap();
                f.broker.on_command(
                    Command::Request(Box::new(RequestCmd {
                        cid,
                        conn: conn.clone(),
                        client_key: key,
                        client_id: json!(i),
                        route: "/ws".into(),
                        service: "svc".into(),
                        msg_type: "echo".into(),
                        data: json!({}),
                        timeout: Duration::from_secs(10),
                        affinity: false,
                        retries: 0,
                        breaker: Some(BreakerTicket {
                            breaker: breaker.clone(),
                            admit,
                            policy,
                        }),
                        claims: None,
                        size: 10,
                    })),
                    &mut f.out,
                );
            }
            assert_eq!(f.out.requests_to(&dead).len(), 3);
            f.broker.on_connection_closed(&dead, &mut f.out);
            let errors: Vec<String> = frames(&mut rx)
                .iter()
                .filter_map(|fr| fr.error.as_ref().map(|e| e.code.clone()))
                .collect();
            assert_eq!(
                errors,
                vec![codes::WORKER_ERROR; 3],
                "at once, siblings={siblings}"
            );
            assert_eq!(breaker.state(Instant::now()), want, "siblings={siblings}");
        }
    }

    #[tokio::test]
    async fn worker_error_codes_pass_through_when_well_formed() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 2);
        let (conn, shared, mut rx) = f.client();
        for (client_id, code, want) in [
            ("1", "invalid_image", "invalid_image"),
            ("2", "Not A Code", codes::WORKER_ERROR),
        ] {
            let cid = f.request(&conn, &shared, client_id, 10_000);
            f.broker.on_worker_message(
                w.clone(),
                2,
                FromWorker::Error(ErrorReply {
                    cid: cid.0,
                    code: code.into(),
                    message: "m".into(),
                    retryable: false,
                    retry_after_ms: None,
                }),
                &mut f.out,
            );
            let got = frames(&mut rx);
            assert_eq!(got[0].error.as_ref().unwrap().code, want);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_waiting_requests_leave_the_queue() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, _rx) = f.client();
        f.request(&conn, &shared, "busy", 60_000);
        for i in 0..5 {
            f.request(&conn, &shared, &i.to_string(), 100);
        }
        assert_eq!(f.broker.queues["svc"].len(), 5);
        for _ in 0..5 {
            let cid = f.broker.deadlines.next().await.unwrap().into_inner();
            f.broker.on_deadline(cid, &mut f.out);
        }
        assert!(
            !f.broker.queues.contains_key("svc"),
            "no dead ids left behind"
        );
    }

    #[tokio::test]
    async fn a_busy_home_worker_does_not_hold_up_other_affinity_requests() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 1);
        let (c1, s1, _r1) = f.connected_client();
        // a is busy when b arrives, so c2 (least loaded) gets b as its home.
        let busy1 = f.request_with(&c1, &s1, "1", 60_000, true);
        f.hello(&b, 1);
        let (c2, s2, _r2) = f.connected_client();
        let home = |f: &Fixture, c: &ConnId| f.broker.conns[c].home.clone().unwrap();
        let (h1, h2) = (home(&f, &c1), home(&f, &c2));
        assert_eq!((&h1, &h2), (&a, &b), "one home each");
        let busy2 = f.request_with(&c2, &s2, "1", 60_000, true);
        let _waits1 = f.request_with(&c1, &s1, "2", 60_000, true);
        let waits2 = f.request_with(&c2, &s2, "2", 60_000, true);
        let _ = busy1;
        // c2's home frees: c2's queued request goes, although c1's is ahead of it.
        f.reply(&h2, &busy2, true);
        assert!(f.out.requests_to(&h2).contains(&waits2.0));
    }
}
