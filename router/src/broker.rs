//! The broker: which worker gets which message, and what happens to every
//! request until its single terminal frame.
//!
//! Pure state, no sockets: the bridge task owns one `Broker`, feeds it
//! commands from sessions, decoded worker messages, ticks and deadline
//! expiries, and the broker answers through an [`Outbox`] (to workers) and
//! the [`Hub`] (to clients). Tests drive it the same way with a recording
//! outbox.
//!
//! Invariants (see ARCHITECTURE.md):
//! - a worker never has more requests outstanding than its announced capacity;
//!   a request stays outstanding (holds a credit) until the worker's terminal
//!   message, even after the router gave up on it (a "zombie");
//! - every request gets exactly one terminal frame to its client: the worker's
//!   final reply or error, or one router error (`timeout`, `no_workers`,
//!   `worker_error`, `cancelled`, `overloaded`), whichever comes first; later
//!   replies are dropped;
//! - replies are only accepted from the worker the request was sent to.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
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
    hub::Hub,
    ids::{Cid, ConnId},
};

/// ZeroMQ identity of a worker's DEALER connection.
pub type PeerId = Bytes;

/// Requests that may wait for a free worker credit, across all services.
pub const MAX_WAITING: usize = 10_000;

/// Where the broker's messages to workers go.
pub trait Outbox {
    fn send(&mut self, peer: &PeerId, msg: ToWorker);
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
}

/// What sessions ask of the bridge.
#[derive(Debug)]
pub enum Command {
    Request(RequestCmd),
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
}

#[derive(Debug)]
struct Pending {
    conn: ConnId,
    client_key: String,
    client_id: Value,
    msg_type: String,
    service: String,
    worker: PeerId,
    deadline: delay_queue::Key,
}

#[derive(Debug)]
struct Waiting {
    cmd: RequestCmd,
    deadline: delay_queue::Key,
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
}

pub struct Broker {
    cfg: BrokerConfig,
    hub: Arc<Hub>,
    workers: HashMap<PeerId, Worker>,
    pending: HashMap<Cid, Pending>,
    /// Requests the router gave up on but the worker has not finished:
    /// they keep their credit until the worker's terminal message.
    zombies: HashMap<Cid, PeerId>,
    waiting: HashMap<Cid, Waiting>,
    /// Arrival order of `waiting`, per service (may hold ids already gone).
    queues: HashMap<String, VecDeque<Cid>>,
    conns: HashMap<ConnId, ConnEntry>,
    /// Deadlines of pending and waiting requests.
    pub deadlines: DelayQueue<Cid>,
}

impl Broker {
    pub fn new(cfg: BrokerConfig, hub: Arc<Hub>) -> Self {
        Self {
            cfg,
            hub,
            workers: HashMap::new(),
            pending: HashMap::new(),
            zombies: HashMap::new(),
            waiting: HashMap::new(),
            queues: HashMap::new(),
            conns: HashMap::new(),
            deadlines: DelayQueue::new(),
        }
    }

    fn deliver(&self, conn: &ConnId, frame: OutFrame) {
        self.hub.send(conn, frame.into());
    }

    fn end_client_request(&self, conn: &ConnId, client_key: &str) {
        if let Some(c) = self.hub.get(conn) {
            c.end_request(client_key);
        }
    }

    /// Fails a request that never reached (or lost) its worker.
    fn fail_client(
        &self,
        conn: &ConnId,
        client_key: &str,
        client_id: Value,
        cid: &Cid,
        code: &str,
        message: String,
    ) {
        self.end_client_request(conn, client_key);
        self.deliver(
            conn,
            OutFrame::error(Some(client_id), Some(&cid.0), code, message, None),
        );
    }

    // ----- commands from sessions -------------------------------------------------

    pub fn on_command(&mut self, cmd: Command, out: &mut dyn Outbox) {
        match cmd {
            Command::Request(req) => self.on_request(req, out),
            Command::Event {
                conn,
                msg_type,
                data,
            } => {
                if let Some((peer, route, service)) = self.home_of(&conn, out) {
                    out.send(
                        &peer,
                        ToWorker::Event(proto::Event {
                            conn: conn.0,
                            route,
                            service,
                            msg_type,
                            data,
                        }),
                    );
                } else {
                    self.deliver(
                        &conn,
                        OutFrame::error(
                            None,
                            None,
                            codes::NO_WORKERS,
                            format!("no live worker to take a `{msg_type}` message"),
                            None,
                        ),
                    );
                }
            }
            Command::Binary { conn, data } => {
                if let Some((peer, route, service)) = self.home_of(&conn, out) {
                    out.send(
                        &peer,
                        ToWorker::Binary(proto::Binary {
                            conn: conn.0,
                            route,
                            service,
                            data: data.to_vec(),
                        }),
                    );
                } else {
                    self.deliver(
                        &conn,
                        OutFrame::error(
                            None,
                            None,
                            codes::NO_WORKERS,
                            "no live worker to take a binary frame",
                            None,
                        ),
                    );
                }
            }
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
        self.workers
            .iter()
            .filter(move |(_, w)| !w.draining && w.services.iter().any(|s| s == service))
    }

    /// Least outstanding requests first; ties go to the worker with more room.
    fn pick(&self, service: &str, need_credit: bool) -> Option<PeerId> {
        self.live_workers_of(service)
            .filter(|(_, w)| !need_credit || w.in_flight < w.capacity)
            .min_by_key(|(_, w)| (w.in_flight, u32::MAX - w.capacity))
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
        let peer = self.pick(&service, false)?;
        let entry = self.conns.get_mut(conn)?;
        entry.home = Some(peer.clone());
        out.send(&peer, ToWorker::Connect((*entry.connect).clone()));
        Some((peer, route, service))
    }

    fn on_request(&mut self, req: RequestCmd, out: &mut dyn Outbox) {
        if self.live_workers_of(&req.service).next().is_none() {
            self.fail_client(
                &req.conn,
                &req.client_key,
                req.client_id,
                &req.cid,
                codes::NO_WORKERS,
                format!("no live worker serves `{}`", req.service),
            );
            return;
        }
        let target = if req.affinity {
            self.home_of(&req.conn, out).map(|(p, _, _)| p).filter(|p| {
                self.workers
                    .get(p)
                    .is_some_and(|w| w.in_flight < w.capacity)
            })
        } else {
            self.pick(&req.service, true)
        };
        let key = self.deadlines.insert(req.cid.clone(), req.timeout);
        match target {
            Some(peer) => self.dispatch(req, peer, key, out),
            None if self.waiting.len() >= MAX_WAITING => {
                self.deadlines.remove(&key);
                self.fail_client(
                    &req.conn,
                    &req.client_key,
                    req.client_id,
                    &req.cid,
                    codes::OVERLOADED,
                    "every worker is at capacity and the wait queue is full".into(),
                );
            }
            None => {
                debug!(correlation.id = %req.cid, service = %req.service, "all workers busy: request waits");
                self.queues
                    .entry(req.service.clone())
                    .or_default()
                    .push_back(req.cid.clone());
                self.waiting.insert(
                    req.cid.clone(),
                    Waiting {
                        cmd: req,
                        deadline: key,
                    },
                );
            }
        }
    }

    fn dispatch(
        &mut self,
        req: RequestCmd,
        peer: PeerId,
        deadline: delay_queue::Key,
        out: &mut dyn Outbox,
    ) {
        let Some(worker) = self.workers.get_mut(&peer) else {
            return;
        };
        worker.in_flight += 1;
        let left = self
            .deadlines
            .deadline(&deadline)
            .into_std()
            .saturating_duration_since(Instant::now());
        debug!(correlation.id = %req.cid, session.id = %req.conn, worker = %worker.name, r#type = %req.msg_type, "request sent to worker");
        out.send(
            &peer,
            ToWorker::Request(proto::Request {
                cid: req.cid.0.clone(),
                conn: req.conn.0.clone(),
                route: req.route,
                service: req.service.clone(),
                msg_type: req.msg_type.clone(),
                id: req.client_id.clone(),
                data: req.data,
                timeout_ms: left.as_millis() as u64,
                deadline_ms: unix_ms() + left.as_millis() as u64,
                attempt: 1,
            }),
        );
        self.pending.insert(
            req.cid,
            Pending {
                conn: req.conn,
                client_key: req.client_key,
                client_id: req.client_id,
                msg_type: req.msg_type,
                service: req.service,
                worker: peer,
                deadline,
            },
        );
    }

    /// Hands queued requests of these services to workers with free credits.
    fn drain_waiting(&mut self, services: &[String], out: &mut dyn Outbox) {
        for service in services {
            while let Some(peer) = self.pick(service, true) {
                let Some(cid) = self.queues.get_mut(service).and_then(|q| q.pop_front()) else {
                    break;
                };
                let Some(w) = self.waiting.remove(&cid) else {
                    continue; // expired or cancelled meanwhile
                };
                if w.cmd.affinity {
                    // Affinity requests wait for their own home worker.
                    match self.home_of(&w.cmd.conn, out) {
                        Some((home, _, _))
                            if self
                                .workers
                                .get(&home)
                                .is_some_and(|h| h.in_flight < h.capacity) =>
                        {
                            self.dispatch(w.cmd, home, w.deadline, out)
                        }
                        _ => {
                            let cid = w.cmd.cid.clone();
                            self.waiting.insert(cid.clone(), w);
                            self.queues
                                .entry(service.clone())
                                .or_default()
                                .push_back(cid);
                            break;
                        }
                    }
                } else {
                    self.dispatch(w.cmd, peer, w.deadline, out);
                }
            }
            if self.queues.get(service).is_some_and(|q| q.is_empty()) {
                self.queues.remove(service);
            }
        }
    }

    /// The router stops waiting for a request (client cancel, disconnect).
    /// `notify_client`: send the client its `cancelled` terminal frame.
    fn abandon(&mut self, cid: &Cid, reason: &str, notify_client: bool, out: &mut dyn Outbox) {
        if let Some(p) = self.pending.remove(cid) {
            self.deadlines.remove(&p.deadline);
            out.send(
                &p.worker,
                ToWorker::Cancel(proto::Cancel {
                    cid: cid.0.clone(),
                    reason: reason.to_owned(),
                }),
            );
            self.zombies.insert(cid.clone(), p.worker);
            if notify_client {
                self.fail_client(
                    &p.conn,
                    &p.client_key,
                    p.client_id,
                    cid,
                    codes::CANCELLED,
                    format!("request cancelled ({reason})"),
                );
            }
        } else if let Some(w) = self.waiting.remove(cid) {
            self.deadlines.remove(&w.deadline);
            if notify_client {
                self.fail_client(
                    &w.cmd.conn,
                    &w.cmd.client_key,
                    w.cmd.client_id,
                    cid,
                    codes::CANCELLED,
                    format!("request cancelled ({reason})"),
                );
            }
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
            self.zombies.insert(cid.clone(), p.worker);
            warn!(correlation.id = %cid, session.id = %p.conn, "request timed out at the worker");
            self.fail_client(
                &p.conn,
                &p.client_key,
                p.client_id,
                &cid,
                codes::TIMEOUT,
                "no final reply before the request's deadline".into(),
            );
        } else if let Some(w) = self.waiting.remove(&cid) {
            warn!(correlation.id = %cid, session.id = %w.cmd.conn, "request timed out waiting for a free worker");
            self.fail_client(
                &w.cmd.conn,
                &w.cmd.client_key,
                w.cmd.client_id,
                &cid,
                codes::TIMEOUT,
                "every worker stayed busy until the request's deadline".into(),
            );
        }
    }

    // ----- messages from workers --------------------------------------------------

    pub fn on_worker_message(&mut self, peer: PeerId, msg: FromWorker, out: &mut dyn Outbox) {
        if let FromWorker::Hello(hello) = msg {
            self.on_hello(peer, hello, out);
            return;
        }
        let Some(worker) = self.workers.get_mut(&peer) else {
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
        worker.last_seen = Instant::now();
        match msg {
            FromWorker::Hello(_) | FromWorker::Heartbeat => {}
            FromWorker::Reply(r) => {
                let cid = Cid(r.cid);
                match self.pending.get(&cid) {
                    Some(p) if p.worker == peer => {
                        let frame = OutFrame::reply(
                            r.msg_type.unwrap_or_else(|| p.msg_type.clone()),
                            Some(p.client_id.clone()),
                            Some(&cid.0),
                            r.data,
                            r.done,
                        );
                        self.deliver(&p.conn, frame);
                        if r.done {
                            self.finish(&cid, out);
                        }
                    }
                    _ => self.late(&peer, cid, r.done, out),
                }
            }
            FromWorker::Error(e) => {
                let cid = Cid(e.cid);
                match self.pending.get(&cid) {
                    Some(p) if p.worker == peer => {
                        let code = if codes::is_valid_code(&e.code) {
                            e.code
                        } else {
                            codes::WORKER_ERROR.to_owned()
                        };
                        let frame = OutFrame::error(
                            Some(p.client_id.clone()),
                            Some(&cid.0),
                            &code,
                            e.message,
                            None,
                        );
                        self.deliver(&p.conn, frame);
                        self.finish(&cid, out);
                    }
                    _ => self.late(&peer, cid, true, out),
                }
            }
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
                info!(worker = %worker.name, reason = %b.reason, in_flight = worker.in_flight, "worker is stopping: no new work");
                worker.draining = true;
                if worker.in_flight == 0 {
                    self.remove_worker(&peer, "stopped", out);
                }
            }
        }
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
            warn!(correlation.id = %cid, "reply for a request this worker does not hold: dropped");
        }
    }

    fn finish(&mut self, cid: &Cid, out: &mut dyn Outbox) {
        if let Some(p) = self.pending.remove(cid) {
            self.deadlines.remove(&p.deadline);
            self.end_client_request(&p.conn, &p.client_key);
            let _ = p.service;
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

    fn on_hello(&mut self, peer: PeerId, hello: proto::Hello, out: &mut dyn Outbox) {
        let refuse = |out: &mut dyn Outbox, reason: String| {
            warn!(worker = %hello.worker_id, %reason, "worker refused");
            out.send(
                &peer,
                ToWorker::Goodbye(proto::Goodbye {
                    reason,
                    reconnect: false,
                }),
            );
        };
        if let Some(secret) = &self.cfg.secret {
            if hello.secret.as_deref() != Some(secret.as_str()) {
                return refuse(out, "missing or wrong bridge secret".into());
            }
        }
        if hello.services.is_empty() || hello.services.iter().any(|s| s.is_empty()) {
            return refuse(out, "hello must name at least one non-empty service".into());
        }
        if hello.capacity == 0 {
            return refuse(out, "capacity must be at least 1".into());
        }
        let services: Vec<String> = {
            let mut seen = HashSet::new();
            hello
                .services
                .into_iter()
                .filter(|s| seen.insert(s.clone()))
                .collect()
        };
        match self.workers.get_mut(&peer) {
            Some(w) => {
                w.services = services.clone();
                w.capacity = hello.capacity;
                w.last_seen = Instant::now();
                w.draining = false;
            }
            None => {
                info!(worker = %hello.worker_id, services = ?services, capacity = hello.capacity, sdk = %hello.sdk, "worker registered");
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
            }),
        );
        self.drain_waiting(&services, out);
    }

    /// Heartbeats out, dead workers out. Call every heartbeat interval.
    pub fn on_tick(&mut self, out: &mut dyn Outbox) {
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

    /// Forgets a worker; its requests get their terminal `worker_error`.
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
        for cid in lost {
            if let Some(p) = self.pending.remove(&cid) {
                self.deadlines.remove(&p.deadline);
                self.fail_client(
                    &p.conn,
                    &p.client_key,
                    p.client_id,
                    &cid,
                    codes::WORKER_ERROR,
                    format!("worker {} was lost before replying ({why})", worker.name),
                );
            }
        }
        self.zombies.retain(|_, p| p != peer);
        for entry in self.conns.values_mut() {
            if entry.home.as_ref() == Some(peer) {
                entry.home = None;
            }
        }
        // Requests waiting for a service that has no worker left cannot be served.
        for service in &worker.services {
            if self.live_workers_of(service).next().is_none() {
                let queued: Vec<Cid> = self.queues.remove(service).unwrap_or_default().into();
                for cid in queued {
                    if let Some(w) = self.waiting.remove(&cid) {
                        self.deadlines.remove(&w.deadline);
                        self.fail_client(
                            &w.cmd.conn,
                            &w.cmd.client_key,
                            w.cmd.client_id,
                            &cid,
                            codes::NO_WORKERS,
                            format!("no live worker serves `{service}`"),
                        );
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

    pub fn pending_count(&self) -> usize {
        self.pending.len() + self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnShared;
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
        };
        Fixture {
            broker: Broker::new(cfg, hub.clone()),
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
                FromWorker::Hello(Hello {
                    worker_id: String::from_utf8_lossy(p).into_owned(),
                    services: vec!["svc".into()],
                    capacity,
                    sdk: "test".into(),
                    secret: None,
                }),
                &mut self.out,
            );
        }

        fn client(&self) -> (ConnId, Arc<ConnShared>, mpsc::Receiver<Outbound>) {
            let id = ConnId::new();
            let (c, rx) = ConnShared::new(id.clone(), "/ws".into());
            self.hub.register(c.clone());
            (id, c, rx)
        }

        fn request(
            &mut self,
            conn: &ConnId,
            shared: &ConnShared,
            client_id: &str,
            timeout_ms: u64,
        ) -> Cid {
            let cid = Cid::new();
            let key = json!(client_id).to_string();
            assert!(shared.begin_request(key.clone(), cid.clone()));
            self.broker.on_command(
                Command::Request(RequestCmd {
                    cid: cid.clone(),
                    conn: conn.clone(),
                    client_key: key,
                    client_id: json!(client_id),
                    route: "/ws".into(),
                    service: "svc".into(),
                    msg_type: "echo".into(),
                    data: json!({}),
                    timeout: Duration::from_millis(timeout_ms),
                    affinity: false,
                }),
                &mut self.out,
            );
            cid
        }

        fn reply(&mut self, p: &PeerId, cid: &Cid, done: bool) {
            self.broker.on_worker_message(
                p.clone(),
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
            FromWorker::Error(ErrorReply {
                cid: cid.0.clone(),
                code: "cancelled".into(),
                message: "late".into(),
                retryable: false,
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

    #[tokio::test]
    async fn bad_hellos_are_refused_and_unknown_peers_told_to_hello() {
        let mut f = fixture();
        f.broker.cfg.secret = Some("s3cret".into());
        let w = peer("w");
        f.hello(&w, 1);
        assert!(
            matches!(&f.out.0[0].1, ToWorker::Goodbye(g) if !g.reconnect && g.reason.contains("secret"))
        );
        assert_eq!(f.broker.worker_count(), 0);
        f.broker
            .on_worker_message(w.clone(), FromWorker::Heartbeat, &mut f.out);
        assert!(matches!(&f.out.0[1].1, ToWorker::Goodbye(g) if g.reconnect));
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
                FromWorker::Error(ErrorReply {
                    cid: cid.0,
                    code: code.into(),
                    message: "m".into(),
                    retryable: false,
                }),
                &mut f.out,
            );
            let got = frames(&mut rx);
            assert_eq!(got[0].error.as_ref().unwrap().code, want);
        }
    }
}
