//! The worker registry, and the broker's side of a worker's life.
//!
//! [`Workers`] is plain data with the time passed in: who is registered
//! (only after the handshake), what each serves and may take (credits),
//! when each was last heard from, and the least-outstanding choice of a
//! worker. A worker silent for more than `heartbeat × liveness` is dead: it
//! is skipped by every choice at once and removed on the next tick.
//!
//! The `Broker` methods here drive that life: registration and `welcome`
//! after the handshake, heartbeats, `bye` (draining), credits coming back,
//! and the loss of a worker (its requests retried or failed, its
//! connections homeless, its zombies' credits gone with it).

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use bridge_proto::{self as proto, codes, ToWorker};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Broker, Outbox, PeerId, WorkerInfo};
use crate::{
    handshake::{Admitted, Step},
    policy::breaker::Outcome,
};

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) name: String,
    pub(super) services: Vec<String>,
    pub(super) capacity: u32,
    pub(super) in_flight: u32,
    pub(super) last_seen: Instant,
    pub(super) draining: bool,
    pub(super) sdk: String,
    /// The client message types it announced it handles; `None`: it did
    /// not say (an older worker), so nothing is assumed.
    pub(super) msg_types: Option<BTreeSet<String>>,
    /// The protocol version of its `hello`: every message to it uses it.
    pub(super) version: u8,
}

/// Registered workers.
#[derive(Debug)]
pub(super) struct Workers {
    by_peer: HashMap<PeerId, Worker>,
    /// Silence after which a worker is dead: heartbeat × liveness.
    limit: Duration,
}

impl Workers {
    pub(super) fn new(limit: Duration) -> Self {
        Self {
            by_peer: HashMap::new(),
            limit,
        }
    }

    pub(super) fn get(&self, peer: &PeerId) -> Option<&Worker> {
        self.by_peer.get(peer)
    }

    pub(super) fn contains(&self, peer: &PeerId) -> bool {
        self.by_peer.contains_key(peer)
    }

    pub(super) fn len(&self) -> usize {
        self.by_peer.len()
    }

    pub(super) fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.by_peer.keys()
    }

    /// Registers a worker that passed the handshake, or updates one that
    /// said `hello` again (answered in that hello's version from then on).
    pub(super) fn register(&mut self, peer: &PeerId, admitted: Admitted, now: Instant) {
        let Admitted {
            hello,
            services,
            msg_types,
            version,
        } = admitted;
        if let Some(w) = self.by_peer.get_mut(peer) {
            w.services = services;
            w.capacity = hello.capacity;
            w.last_seen = now;
            w.draining = false;
            w.msg_types = msg_types;
            w.version = version;
            return;
        }
        info!(worker = %hello.worker_id, services = ?services, capacity = hello.capacity, msg_types = ?msg_types, sdk = %hello.sdk, version, "worker registered");
        self.by_peer.insert(
            peer.clone(),
            Worker {
                name: hello.worker_id,
                services,
                capacity: hello.capacity,
                in_flight: 0,
                last_seen: now,
                draining: false,
                sdk: hello.sdk,
                msg_types,
                version,
            },
        );
    }

    /// Any message from a registered worker is a sign of life. `false`: the
    /// peer is not registered.
    pub(super) fn heard_from(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.by_peer.get_mut(peer) {
            Some(w) => {
                w.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Workers that may take new work for `service` now. A worker silent
    /// past the liveness limit is dead even if the next tick has not
    /// removed it yet (e.g. it was just frozen): it is skipped.
    fn live_of<'a>(
        &'a self,
        service: &'a str,
        now: Instant,
    ) -> impl Iterator<Item = (&'a PeerId, &'a Worker)> + 'a {
        self.by_peer.iter().filter(move |(_, w)| {
            !w.draining
                && now.duration_since(w.last_seen) <= self.limit
                && w.services.iter().any(|s| s == service)
        })
    }

    /// Whether any live worker serves `service`.
    pub(super) fn serves(&self, service: &str, now: Instant) -> bool {
        self.live_of(service, now).next().is_some()
    }

    /// Whether a live worker of `service` handles `msg_type`: `None` when
    /// that cannot be known (a live worker did not announce its types, or
    /// none is live). Allocates nothing: it runs for every event.
    pub(super) fn handles(&self, service: &str, msg_type: &str, now: Instant) -> Option<bool> {
        let mut any = false;
        for (_, w) in self.live_of(service, now) {
            if w.msg_types.as_ref()?.contains(msg_type) {
                return Some(true);
            }
            any = true;
        }
        any.then_some(false)
    }

    /// The message types the live workers of `service` announced, together.
    pub(super) fn types_of<'a>(&'a self, service: &'a str, now: Instant) -> BTreeSet<&'a str> {
        self.live_of(service, now)
            .filter_map(|(_, w)| w.msg_types.as_ref())
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// Least outstanding requests first; ties go to the worker with more
    /// room; `avoid` only when nothing else qualifies.
    pub(super) fn pick(
        &self,
        service: &str,
        need_credit: bool,
        avoid: Option<&PeerId>,
        now: Instant,
    ) -> Option<PeerId> {
        self.live_of(service, now)
            .filter(|(_, w)| !need_credit || w.in_flight < w.capacity)
            .min_by_key(|(p, w)| (Some(*p) == avoid, w.in_flight, u32::MAX - w.capacity))
            .map(|(p, _)| p.clone())
    }

    /// Whether `peer` may take one more request.
    pub(super) fn has_credit(&self, peer: &PeerId) -> bool {
        self.by_peer
            .get(peer)
            .is_some_and(|w| !w.draining && w.in_flight < w.capacity)
    }

    /// Whether `peer` may stay a connection's home worker.
    pub(super) fn may_host(&self, peer: &PeerId) -> bool {
        self.by_peer.get(peer).is_some_and(|w| !w.draining)
    }

    /// A request goes to `peer`: one credit taken.
    pub(super) fn take_credit(&mut self, peer: &PeerId) -> Option<&Worker> {
        let w = self.by_peer.get_mut(peer)?;
        w.in_flight += 1;
        Some(w)
    }

    /// A request of `peer`'s is over for it: its credit comes back.
    pub(super) fn give_credit(&mut self, peer: &PeerId) -> Option<&Worker> {
        let w = self.by_peer.get_mut(peer)?;
        w.in_flight = w.in_flight.saturating_sub(1);
        Some(w)
    }

    /// `peer` said `bye`: no new work for it.
    pub(super) fn drain(&mut self, peer: &PeerId) -> Option<&Worker> {
        let w = self.by_peer.get_mut(peer)?;
        w.draining = true;
        Some(w)
    }

    /// Workers silent for more than the liveness limit.
    pub(super) fn silent(&self, now: Instant) -> Vec<PeerId> {
        self.by_peer
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > self.limit)
            .map(|(p, _)| p.clone())
            .collect()
    }

    pub(super) fn remove(&mut self, peer: &PeerId) -> Option<Worker> {
        self.by_peer.remove(peer)
    }

    /// The protocol version to write to `peer` (the current one for peers
    /// that are not registered).
    pub(super) fn version_of(&self, peer: &PeerId) -> u8 {
        self.by_peer
            .get(peer)
            .map_or(proto::PROTOCOL_VERSION, |w| w.version)
    }

    /// Every worker, by name.
    pub(super) fn info(&self) -> Vec<WorkerInfo> {
        let mut workers: Vec<WorkerInfo> = self
            .by_peer
            .values()
            .map(|w| WorkerInfo {
                id: w.name.clone(),
                services: w.services.clone(),
                in_flight: w.in_flight,
                capacity: w.capacity,
                draining: w.draining,
                sdk: w.sdk.clone(),
                msg_types: w.msg_types.as_ref().map(|t| t.iter().cloned().collect()),
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        workers
    }
}

impl Broker {
    pub(super) fn on_handshake(
        &mut self,
        peer: PeerId,
        step: Step,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let admitted = match step {
            Step::Register(a) => a,
            Step::Reply(version, msg) => return out.send_as(&peer, version, msg),
            Step::Refuse(version, reason) => {
                warn!(peer = ?peer, %reason, "worker refused");
                self.metrics.bridge_refused();
                // A registered worker whose new hello is refused is gone.
                self.remove_worker_at(&peer, "refused hello", now, out);
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
        let services = admitted.services.clone();
        let dropped: Vec<String> = self
            .workers
            .get(&peer)
            .map(|w| {
                w.services
                    .iter()
                    .filter(|s| !services.contains(s))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let is_update = self.workers.contains(&peer);
        let worker_name = admitted.hello.worker_id.clone();
        self.workers.register(&peer, admitted, now);
        // Services a re-hello no longer names may have lost their last worker.
        for service in &dropped {
            self.service_may_be_gone(service, now);
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
            // A service no route uses is a typo or a missing route: the
            // worker would wait for traffic that never comes. Said once, at
            // registration (`/routes` keeps saying it).
            if !is_update {
                let table = registry.current();
                for s in &services {
                    if let Some(why) = table.unrouted(s) {
                        warn!(worker = %worker_name, service = %s, "{why}");
                    }
                }
            }
        }
        self.drain_waiting(&services, now, out);
    }

    /// A frame of a protocol version this router does not speak. A peer's
    /// first frame is its `hello`, so an unregistered peer is told, once per
    /// heartbeat interval, in the `goodbye` shape every version keeps.
    pub fn on_unsupported_version(&mut self, peer: PeerId, found: u64, out: &mut dyn Outbox) {
        if self.workers.contains(&peer) || !self.told_to_hello.insert(peer.clone()) {
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
        self.workers.version_of(peer)
    }

    /// The worker said `bye`: it gets no new work, and leaves when its last
    /// request is over.
    pub(super) fn on_bye(
        &mut self,
        peer: &PeerId,
        reason: &str,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let Some(worker) = self.workers.drain(peer) else {
            return;
        };
        info!(worker = %worker.name, reason = %reason, in_flight = worker.in_flight, "worker is stopping: no new work");
        if worker.in_flight == 0 {
            self.remove_worker_at(peer, "stopped", now, out);
        }
    }

    /// Heartbeats out, dead workers out. Call every heartbeat interval.
    pub fn on_tick(&mut self, out: &mut dyn Outbox) {
        let now = Instant::now();
        self.told_to_hello.clear();
        self.handshake.expire(now);
        self.metrics
            .set_held_request_bytes(self.requests.held_bytes());
        for peer in self.workers.silent(now) {
            self.remove_worker_at(&peer, "missed heartbeats", now, out);
        }
        let limit = self.cfg.heartbeat * self.cfg.liveness;
        let workers = &self.workers;
        let gone: Vec<String> = self
            .orphaned
            .iter()
            .filter(|(s, since)| !workers.serves(s, now) && now.duration_since(**since) >= limit)
            .map(|(s, _)| s.clone())
            .collect();
        self.orphaned
            .retain(|s, _| !gone.contains(s) && !workers.serves(s, now));
        if let Some(registry) = &self.registry {
            for service in gone {
                registry.remove_dynamic(&service);
            }
        }
        for peer in self.workers.peers() {
            out.send(peer, ToWorker::Heartbeat);
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

    /// A credit of `peer`'s comes back: a waiting request may take it, or a
    /// draining worker may leave.
    pub(super) fn release(&mut self, peer: &PeerId, now: Instant, out: &mut dyn Outbox) {
        let Some(w) = self.workers.give_credit(peer) else {
            return;
        };
        if w.draining {
            if w.in_flight == 0 {
                self.remove_worker_at(peer, "stopped", now, out);
            }
            return;
        }
        if !self.requests.any_waiting() {
            return;
        }
        let services = w.services.clone();
        self.drain_waiting(&services, now, out);
    }

    /// Forgets a worker; its requests are retried elsewhere where allowed,
    /// else get their terminal `worker_error`.
    pub fn remove_worker(&mut self, peer: &PeerId, why: &str, out: &mut dyn Outbox) {
        self.remove_worker_at(peer, why, Instant::now(), out);
    }

    pub(super) fn remove_worker_at(
        &mut self,
        peer: &PeerId,
        why: &str,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let Some(worker) = self.workers.remove(peer) else {
            return;
        };
        let lost = self.requests.take_pending_of(peer);
        if why == "stopped" {
            info!(worker = %worker.name, "worker left");
        } else {
            warn!(worker = %worker.name, reason = why, lost_requests = lost.len(), "worker declared dead");
        }
        self.requests.forget_zombies_of(peer);
        self.forget_home(peer);
        for p in lost {
            let msg = format!("worker {} was lost before replying ({why})", worker.name);
            // The breaker protects clients from a failing service, not
            // from one crashed process: while the service has another
            // live worker, the loss does not count against the route.
            let outcome = if self.workers.serves(&p.req.cmd.route.service, now) {
                Outcome::Neutral
            } else {
                Outcome::Failure
            };
            self.retry_or_fail(p, codes::WORKER_ERROR, msg, outcome, now);
        }
        for service in &worker.services {
            self.service_may_be_gone(service, now);
        }
        // Requests waiting for this worker (affinity homes it was) may go to
        // a live sibling now.
        self.drain_waiting(&worker.services, now, out);
    }

    /// A worker stopped serving `service`. If no live worker serves it any
    /// more, the requests waiting for it fail, and its dynamic route goes
    /// if no worker comes back within the liveness period (`on_tick`).
    fn service_may_be_gone(&mut self, service: &str, now: Instant) {
        if self.workers.serves(service, now) {
            return;
        }
        if self.registry.is_some() {
            self.orphaned.entry(service.to_owned()).or_insert(now);
        }
        for req in self.requests.take_waiting_for(service) {
            let msg = format!("no live worker serves `{service}`");
            self.fail(req, codes::NO_WORKERS, msg, Outcome::Failure, false, now);
        }
    }

    /// Tells every worker the router is going away (shutdown).
    pub fn goodbye_all(&mut self, out: &mut dyn Outbox) {
        for peer in self.workers.peers() {
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
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use bridge_proto::{self as proto, codes, ErrorReply, FromWorker, Hello, Reply, ToWorker};
    use serde_json::json;
    use tokio::time::Instant;

    use super::super::testkit::*;
    use crate::{
        broker::{BreakerTicket, Command, RequestCmd},
        ids::Cid,
        policy::breaker::{Breaker, BreakerPolicy, BreakerState},
    };

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

    fn hello_msg(services: &[&str], capacity: u32) -> FromWorker {
        FromWorker::Hello(Hello {
            worker_id: "w".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            capacity,
            sdk: "test".into(),
            msg_types: None,
        })
    }

    #[tokio::test]
    async fn an_affinity_request_waiting_for_a_dead_home_goes_to_a_live_sibling_at_once() {
        let mut f = fixture();
        let (home, sibling) = (peer("home"), peer("sibling"));
        f.hello(&home, 1);
        let (conn, shared, _rx) = f.connected_client(); // home: the only worker
        f.hello(&sibling, 1);
        f.request_with(&conn, &shared, "1", 60_000, true);
        let waiting = f.request_with(&conn, &shared, "2", 60_000, true);
        assert_eq!(
            f.out.requests_to(&home).len(),
            1,
            "request 2 waits for its home"
        );
        f.broker.on_connection_closed(&home, &mut f.out);
        assert_eq!(
            f.out.requests_to(&sibling),
            vec![waiting.to_string()],
            "re-homed on the sibling without waiting for anything else"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dynamic_route_outlives_its_last_worker_for_the_liveness_period() {
        use crate::{config::parse_routes, registry::RouteRegistry};
        let mut f = fixture();
        let registry = Arc::new(RouteRegistry::new(
            parse_routes(r#"{"routes":[{"path":"/file"}]}"#).unwrap(),
            true,
        ));
        f.broker.registry = Some(registry.clone());
        let w = peer("w");
        f.broker
            .on_worker_message(w.clone(), 2, hello_msg(&["/ws/dyn"], 1), &mut f.out);
        assert!(registry.current().get("/ws/dyn").is_some());
        f.broker.on_connection_closed(&w, &mut f.out);
        f.broker.on_tick(&mut f.out);
        assert!(
            registry.current().get("/ws/dyn").is_some(),
            "kept while it may come back"
        );
        tokio::time::advance(HEARTBEAT * LIVENESS - ms(1)).await;
        f.broker.on_tick(&mut f.out);
        assert!(
            registry.current().get("/ws/dyn").is_some(),
            "1 ms before the liveness period"
        );
        tokio::time::advance(ms(1)).await;
        f.broker.on_tick(&mut f.out);
        assert!(registry.current().get("/ws/dyn").is_none(), "gone after it");
        // A worker that comes back in time keeps the route.
        f.broker
            .on_worker_message(w.clone(), 2, hello_msg(&["/ws/dyn"], 1), &mut f.out);
        f.broker.on_connection_closed(&w, &mut f.out);
        let back = peer("back");
        f.broker
            .on_worker_message(back, 2, hello_msg(&["/ws/dyn"], 1), &mut f.out);
        tokio::time::advance(HEARTBEAT * LIVENESS).await;
        f.broker.on_tick(&mut f.out);
        assert!(registry.current().get("/ws/dyn").is_some());
    }

    #[tokio::test]
    async fn a_re_hello_that_drops_a_service_fails_what_waits_for_it() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        f.request(&conn, &shared, "1", 60_000);
        f.request(&conn, &shared, "2", 60_000); // waits: capacity 1
        f.broker
            .on_worker_message(w.clone(), 2, hello_msg(&["other"], 1), &mut f.out);
        let codes: Vec<String> = frames(&mut rx)
            .iter()
            .filter_map(|fr| fr.error.as_ref().map(|e| e.code.clone()))
            .collect();
        assert_eq!(
            codes,
            vec![codes::NO_WORKERS.to_string()],
            "request 2 cannot be served any more"
        );
    }

    #[tokio::test]
    async fn a_refused_re_hello_removes_the_worker_and_a_new_version_is_kept() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        f.broker
            .on_worker_message(w.clone(), 1, hello_msg(&["svc"], 1), &mut f.out);
        assert_eq!(
            f.broker.version_of(&w),
            1,
            "answered in the latest hello's version"
        );
        f.broker
            .on_worker_message(w.clone(), 2, hello_msg(&["svc"], 0), &mut f.out);
        assert_eq!(f.broker.worker_count(), 0);
        assert!(matches!(f.out.0.last(), Some((_, ToWorker::Goodbye(g))) if !g.reconnect));
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
                msg_types: None,
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
                msg_types: None,
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
                msg_types: None,
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
                msg_types: None,
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
                let key: std::sync::Arc<str> = json!(i).to_string().into();
                assert!(shared.begin_request(key.clone(), cid));
                let admit = breaker.admit(Instant::now(), &policy).unwrap();
                f.broker.on_command(
                    Command::Request(Box::new(RequestCmd {
                        cid,
                        conn: conn.clone(),
                        client_key: key,
                        client_id: json!(i),
                        route: crate::broker::testkit::ws_route(),
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

    // ----- liveness, on paused time -----------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_is_removed_on_the_first_tick_past_heartbeat_times_liveness() {
        let limit = HEARTBEAT * LIVENESS;
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 4);
        let (conn, shared, mut rx) = f.client();
        let first = f.request(&conn, &shared, "1", 60_000);

        // Silent for exactly the limit: alive, and still chosen.
        f.advance(limit).await;
        f.tick();
        assert_eq!(f.broker.worker_count(), 1, "at the limit");
        let second = f.request(&conn, &shared, "2", 60_000);
        assert_eq!(
            f.out.requests_to(&w),
            vec![first.to_string(), second.to_string()]
        );
        assert!(frames(&mut rx).is_empty());

        // Past it: no longer chosen at once, but removed only by the tick.
        f.advance(ms(1)).await;
        f.request(&conn, &shared, "3", 60_000);
        assert_eq!(error_codes(&frames(&mut rx)), vec![codes::NO_WORKERS]);
        assert_eq!(f.broker.worker_count(), 1, "not before the tick");
        f.tick();
        assert_eq!(f.broker.worker_count(), 0, "on the tick");
        assert_eq!(
            error_codes(&frames(&mut rx)),
            vec![codes::WORKER_ERROR; 2],
            "its requests end at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn any_message_from_a_worker_is_a_sign_of_life() {
        let limit = HEARTBEAT * LIVENESS;
        let messages = [
            ("heartbeat", FromWorker::Heartbeat),
            (
                "a reply nobody waits for",
                FromWorker::Reply(Reply {
                    cid: "gone".into(),
                    done: true,
                    msg_type: None,
                    data: json!(1),
                }),
            ),
            (
                "an error nobody waits for",
                FromWorker::Error(ErrorReply {
                    cid: "gone".into(),
                    code: "e".into(),
                    message: "m".into(),
                    retryable: false,
                    retry_after_ms: None,
                }),
            ),
            (
                "a publication",
                FromWorker::Publish(proto::Publish {
                    topic: "t".into(),
                    msg_type: "m".into(),
                    data: json!(1),
                }),
            ),
        ];
        for (what, msg) in messages {
            let mut f = fixture();
            let w = peer("w");
            f.hello(&w, 1);
            f.advance(limit - ms(1)).await;
            f.broker.on_worker_message(w.clone(), 2, msg, &mut f.out);
            f.advance(limit).await;
            f.tick();
            assert_eq!(
                f.broker.worker_count(),
                1,
                "{what}: alive for the limit after it"
            );
            f.advance(ms(1)).await;
            f.tick();
            assert_eq!(f.broker.worker_count(), 0, "{what}: dead just past it");
        }
    }
}
