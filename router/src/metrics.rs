//! Metrics (Prometheus text at `/metrics`) and the counters behind `/stats`.
//!
//! Label values that clients control (message types) are capped per route:
//! after [`MAX_TYPES_PER_ROUTE`] distinct types, further ones are counted as
//! `other`, so a client cannot grow the registry without bound.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use dashmap::{DashMap, DashSet};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use serde::Serialize;

/// Distinct message types labelled per route before the rest become `other`.
pub const MAX_TYPES_PER_ROUTE: usize = 64;

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];

fn l1(k: &'static str, v: &str) -> L1 {
    [(k, v.to_owned())]
}

fn l2(k1: &'static str, v1: &str, k2: &'static str, v2: &str) -> L2 {
    [(k1, v1.to_owned()), (k2, v2.to_owned())]
}

/// The label of a WebSocket close code: the codes of RFC 6455 as they are;
/// the application ranges (which clients and workers choose freely) as
/// `3xxx` and `4xxx`, so they cannot grow the registry.
fn close_code_label(code: u16) -> &'static str {
    const KNOWN: [(u16, &str); 13] = [
        (1000, "1000"),
        (1001, "1001"),
        (1002, "1002"),
        (1003, "1003"),
        (1005, "1005"),
        (1006, "1006"),
        (1007, "1007"),
        (1008, "1008"),
        (1009, "1009"),
        (1010, "1010"),
        (1011, "1011"),
        (1012, "1012"),
        (1013, "1013"),
    ];
    match code {
        3000..=3999 => "3xxx",
        4000..=4999 => "4xxx",
        _ => KNOWN
            .iter()
            .find(|(c, _)| *c == code)
            .map_or("other", |(_, l)| l),
    }
}

/// The label of an error code: the router's own codes as they are, any
/// code a worker made up as `other` (workers choose them freely).
fn error_code_label(code: &str) -> &str {
    if bridge_proto::codes::ALL.contains(&code) {
        code
    } else {
        "other"
    }
}

/// The capacity figures the metrics mirror.
#[derive(Debug, Clone, Copy, Default)]
pub struct CapacityFigures {
    pub max_connections: usize,
    pub sessions: usize,
    pub full: bool,
    pub tcp_open: usize,
    pub tcp_pending: usize,
    pub descriptor_limit: u64,
}

/// The cluster link's figures the metrics mirror (`cluster`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterFigures {
    pub up: bool,
    pub members: usize,
    pub relayed: u64,
    pub received: u64,
    pub unrelayed: u64,
}

#[derive(Debug, Default)]
struct ClusterGauges {
    up: Gauge,
    members: Gauge,
    relayed: Gauge,
    received: Gauge,
    unrelayed: Gauge,
}

#[derive(Debug, Default)]
struct CapacityGauges {
    max: Gauge,
    sessions: Gauge,
    full: Gauge,
    tcp_open: Gauge,
    tcp_pending: Gauge,
    tcp_evicted: Counter,
    descriptor_limit: Gauge,
}

/// Plain counters of one route, for `/stats`.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// The route's path pattern (the `route` label).
    pub route: Box<str>,
    pub connections: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

/// The outcome of the last routes-file load, for `/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    pub ok: bool,
    pub path: String,
    pub loaded_at_unix_ms: u64,
    pub routes: usize,
    /// The problems of the last rejected file (the running routes are older).
    pub error: Option<String>,
    pub reloads: u64,
    pub failed_reloads: u64,
}

pub struct Metrics {
    registry: Registry,
    connections: Family<L1, Gauge>,
    connections_opened: Family<L1, Counter>,
    connections_closed: Family<L2, Counter>,
    refused_upgrades: Family<L1, Counter>,
    messages_in: Family<L2, Counter>,
    messages_out: Family<L2, Counter>,
    request_seconds: Family<L1, Histogram>,
    errors: Family<L2, Counter>,
    rate_limited: Family<L2, Counter>,
    breaker_state: Family<L1, Gauge>,
    workers_live: Family<L1, Gauge>,
    worker_in_flight: Family<L1, Gauge>,
    reloads: Family<L1, Counter>,
    outbound_dropped: Counter,
    bridge_invalid: Counter,
    bridge_refused: Counter,
    bound_hits: Family<L1, Counter>,
    credits_reclaimed: Counter,
    held_request_bytes: Gauge,
    outbound_bytes: Gauge,
    accept_errors: Counter,
    capacity: CapacityGauges,
    cluster: ClusterGauges,
    tls_reloads: Family<L1, Counter>,
    tls_handshake_failures: Counter,
    resume_parked_sessions: Gauge,
    resume_parked_bytes: Gauge,
    resume_kept_bytes: Gauge,
    resume_parked_total: Counter,
    resumes: Counter,
    resume_failures: Family<L1, Counter>,
    resume_ended: Family<L1, Counter>,
    types: DashMap<String, DashSet<String>>,
    routes: DashMap<String, Arc<RouteCounters>>,
    /// Each route's request-duration histogram, found without building its
    /// label (the family is keyed by an owned label set).
    request_histograms: DashMap<String, Histogram>,
    config: Mutex<Option<ConfigStatus>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("router");
        let m = Self {
            connections: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            refused_upgrades: Family::default(),
            messages_in: Family::default(),
            messages_out: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                // 1 ms .. ~65 s
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
            errors: Family::default(),
            rate_limited: Family::default(),
            breaker_state: Family::default(),
            workers_live: Family::default(),
            worker_in_flight: Family::default(),
            reloads: Family::default(),
            outbound_dropped: Counter::default(),
            bridge_invalid: Counter::default(),
            bridge_refused: Counter::default(),
            bound_hits: Family::default(),
            credits_reclaimed: Counter::default(),
            held_request_bytes: Gauge::default(),
            outbound_bytes: Gauge::default(),
            accept_errors: Counter::default(),
            capacity: CapacityGauges::default(),
            cluster: ClusterGauges::default(),
            tls_reloads: Family::default(),
            tls_handshake_failures: Counter::default(),
            resume_parked_sessions: Gauge::default(),
            resume_parked_bytes: Gauge::default(),
            resume_kept_bytes: Gauge::default(),
            resume_parked_total: Counter::default(),
            resumes: Counter::default(),
            resume_failures: Family::default(),
            resume_ended: Family::default(),
            types: DashMap::new(),
            routes: DashMap::new(),
            request_histograms: DashMap::new(),
            config: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket connections closed, by close code",
            m.connections_closed.clone(),
        );
        registry.register(
            "refused_upgrades",
            "Upgrades refused, by reason",
            m.refused_upgrades.clone(),
        );
        registry.register(
            "messages_in",
            "Client messages received, by route and type",
            m.messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "Frames sent to clients, by route and type",
            m.messages_out.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to terminal frame",
            m.request_seconds.clone(),
        );
        registry.register(
            "errors",
            "Error frames sent to clients, by code",
            m.errors.clone(),
        );
        registry.register(
            "rate_limited",
            "Messages or connections refused by a rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker state per route: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        registry.register(
            "workers_live",
            "Live workers per service",
            m.workers_live.clone(),
        );
        registry.register(
            "worker_in_flight",
            "Requests outstanding at the workers of a service",
            m.worker_in_flight.clone(),
        );
        // Reloads after the start only (the load at start is not one), so
        // this counter and `/stats` `config.reloads` always agree; both
        // series exist from the start.
        for result in ["success", "failure"] {
            drop(m.reloads.get_or_create(&l1("result", result)));
        }
        registry.register(
            "config_reloads",
            "Routes file reloads after the start, by result",
            m.reloads.clone(),
        );
        registry.register(
            "outbound_dropped",
            "Connections closed because their outbound queue was full",
            m.outbound_dropped.clone(),
        );
        registry.register(
            "bridge_invalid_frames",
            "Bridge frames dropped as undecodable",
            m.bridge_invalid.clone(),
        );
        registry.register(
            "bridge_refused",
            "Worker handshakes refused (wrong secret, version, bounds of hello)",
            m.bridge_refused.clone(),
        );
        registry.register(
            "bound_hits",
            "Times a size bound refused something, by bound (outbound_bytes, \
             held_request_bytes, worker_send_queue, dynamic_routes)",
            m.bound_hits.clone(),
        );
        registry.register(
            "credits_reclaimed",
            "Worker credits freed because no terminal message came within the grace after a cancel",
            m.credits_reclaimed.clone(),
        );
        registry.register(
            "held_request_bytes",
            "Bytes of client requests the bridge holds (waiting for a credit or kept for a retry)",
            m.held_request_bytes.clone(),
        );
        registry.register(
            "outbound_bytes",
            "Bytes queued for clients across all connections, not yet written",
            m.outbound_bytes.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the client port (out of descriptors, mostly)",
            m.accept_errors.clone(),
        );
        registry.register(
            "max_connections",
            "The cap on WebSocket sessions (MAX_CONNECTIONS)",
            m.capacity.max.clone(),
        );
        registry.register(
            "sessions",
            "WebSocket sessions counted against MAX_CONNECTIONS",
            m.capacity.sessions.clone(),
        );
        registry.register(
            "cluster_up",
            "1 while the link to the cluster's Redis (CLUSTER_URL) is up; 0 when down or without a cluster",
            m.cluster.up.clone(),
        );
        registry.register(
            "cluster_members",
            "Routers of the cluster alive (this one included), as Redis lists them",
            m.cluster.members.clone(),
        );
        registry.register(
            "cluster_relayed",
            "Publications and presence changes made here and sent to the other routers (a running total)",
            m.cluster.relayed.clone(),
        );
        registry.register(
            "cluster_received",
            "Publications and presence changes received from the other routers (a running total)",
            m.cluster.received.clone(),
        );
        registry.register(
            "cluster_unrelayed",
            "Publications and presence changes made here that reached this router's subscribers only: the link was down or behind (a running total)",
            m.cluster.unrelayed.clone(),
        );
        registry.register(
            "at_capacity",
            "1 from reaching MAX_CONNECTIONS until back at its low-water mark (then /ready is 503)",
            m.capacity.full.clone(),
        );
        registry.register(
            "tcp_connections",
            "Open TCP connections on the client port, sessions or not",
            m.capacity.tcp_open.clone(),
        );
        registry.register(
            "tcp_pending",
            "Open TCP connections on the client port that have not upgraded",
            m.capacity.tcp_pending.clone(),
        );
        registry.register(
            "tcp_evicted",
            "Connections without a session closed early to make room for new ones",
            m.capacity.tcp_evicted.clone(),
        );
        registry.register(
            "descriptor_limit",
            "The process's soft limit of open file descriptors",
            m.capacity.descriptor_limit.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the TLS certificate pair, by result (ok, rejected)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (bad client certificate, not TLS, deadline)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "resume_parked_sessions",
            "Sessions whose connection dropped, waiting for their client to resume them",
            m.resume_parked_sessions.clone(),
        );
        registry.register(
            "resume_parked_bytes",
            "Bytes parked sessions hold (frames kept for a replay, replies queued while away)",
            m.resume_parked_bytes.clone(),
        );
        registry.register(
            "resume_kept_bytes",
            "Bytes of sent frames live and parked sessions keep for a resume (bounded by RESUME_MAX_BYTES)",
            m.resume_kept_bytes.clone(),
        );
        registry.register(
            "resume_parked",
            "Sessions parked when their connection dropped",
            m.resume_parked_total.clone(),
        );
        registry.register(
            "resumes",
            "Sessions resumed by a new connection",
            m.resumes.clone(),
        );
        registry.register(
            "resume_failures",
            "Resumes refused, by reason",
            m.resume_failures.clone(),
        );
        registry.register(
            "resume_ended",
            "Parked sessions that ended without a resume, by reason (expired, overflow, shutdown, route_removed)",
            m.resume_ended.clone(),
        );
        Self { registry, ..m }
    }

    pub fn resume_parked(&self) {
        self.resume_parked_total.inc();
    }

    pub fn resumed(&self) {
        self.resumes.inc();
    }

    pub fn resume_failed(&self, reason: &'static str) {
        self.resume_failures
            .get_or_create(&l1("reason", reason))
            .inc();
    }

    pub fn resume_ended(&self, reason: &'static str) {
        self.resume_ended.get_or_create(&l1("reason", reason)).inc();
    }

    /// Refreshes the parked-session gauges (at scrape time).
    pub fn set_resume_parked(&self, sessions: usize, bytes: usize, kept: usize) {
        self.resume_parked_sessions.set(sessions as i64);
        self.resume_parked_bytes.set(bytes as i64);
        self.resume_kept_bytes.set(kept as i64);
    }

    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.tls_reloads.get_or_create(&l1("result", result)).inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Counts one; returns the count so far.
    pub fn accept_error(&self) -> u64 {
        self.accept_errors.inc() + 1
    }

    /// A connection without a session was closed to make room.
    pub fn tcp_evicted(&self) {
        self.capacity.tcp_evicted.inc();
    }

    pub fn tcp_evicted_total(&self) -> u64 {
        self.capacity.tcp_evicted.get()
    }

    /// Refreshes the capacity gauges (at scrape time: the figures live in
    /// `capacity` and the listener).
    pub fn set_capacity(&self, c: CapacityFigures) {
        let g = &self.capacity;
        g.max.set(c.max_connections as i64);
        g.sessions.set(c.sessions as i64);
        g.full.set(i64::from(c.full));
        g.tcp_open.set(c.tcp_open as i64);
        g.tcp_pending.set(c.tcp_pending as i64);
        g.descriptor_limit.set(c.descriptor_limit as i64);
    }

    /// Refreshes the cluster gauges (at scrape time).
    pub fn set_cluster(&self, c: ClusterFigures) {
        let g = &self.cluster;
        g.up.set(i64::from(c.up));
        g.members.set(c.members as i64);
        g.relayed.set(c.relayed as i64);
        g.received.set(c.received as i64);
        g.unrelayed.set(c.unrelayed as i64);
    }

    pub fn route(&self, route: &str) -> Arc<RouteCounters> {
        if let Some(r) = self.routes.get(route) {
            return r.clone();
        }
        self.routes
            .entry(route.to_owned())
            .or_insert_with(|| {
                Arc::new(RouteCounters {
                    route: route.into(),
                    ..RouteCounters::default()
                })
            })
            .clone()
    }

    fn type_label<'a>(&self, route: &str, msg_type: &'a str) -> &'a str {
        // Hot path (every message): a read lookup, no allocation.
        if let Some(set) = self.types.get(route) {
            if set.contains(msg_type) {
                return msg_type;
            }
        }
        let set = self.types.entry(route.to_owned()).or_default();
        if set.contains(msg_type) {
            return msg_type;
        }
        if set.len() < MAX_TYPES_PER_ROUTE {
            set.insert(msg_type.to_owned());
            return msg_type;
        }
        "other"
    }

    pub fn connection_opened(&self, route: &str) {
        self.connections.get_or_create(&l1("route", route)).inc();
        self.connections_opened
            .get_or_create(&l1("route", route))
            .inc();
        self.route(route)
            .connections
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, route: &str, code: u16) {
        self.connections.get_or_create(&l1("route", route)).dec();
        self.connections_closed
            .get_or_create(&l2("route", route, "code", close_code_label(code)))
            .inc();
        self.route(route)
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    pub fn refused(&self, reason: &str) {
        self.refused_upgrades
            .get_or_create(&l1("reason", reason))
            .inc();
    }

    pub fn message_in(&self, route: &str, msg_type: &str) {
        let t = self.type_label(route, msg_type);
        self.messages_in
            .get_or_create(&l2("route", route, "type", t))
            .inc();
        self.route(route)
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of one message type on one route, resolved once.
    fn type_counters(&self, route: &str, msg_type: &str) -> TypeCounters {
        let t = self.type_label(route, msg_type);
        TypeCounters {
            msg_type: msg_type.into(),
            inbound: self
                .messages_in
                .get_or_create(&l2("route", route, "type", t))
                .clone(),
            outbound: self
                .messages_out
                .get_or_create(&l2("route", route, "type", t))
                .clone(),
        }
    }

    pub fn request_started(&self, route: &str) {
        self.route(route).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame written to a client; error frames are counted by code too.
    pub fn message_out(&self, route: &str, msg_type: &str, error_code: Option<&str>) {
        let t = self.type_label(route, msg_type);
        self.messages_out
            .get_or_create(&l2("route", route, "type", t))
            .inc();
        let counters = self.route(route);
        counters.messages_out.fetch_add(1, Ordering::Relaxed);
        if let Some(code) = error_code {
            self.errors
                .get_or_create(&l2("route", route, "code", error_code_label(code)))
                .inc();
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn request_finished(&self, route: &str, took: Duration) {
        let took = took.as_secs_f64();
        if let Some(h) = self.request_histograms.get(route) {
            h.observe(took);
            return;
        }
        let h = self
            .request_seconds
            .get_or_create(&l1("route", route))
            .clone();
        h.observe(took);
        self.request_histograms.insert(route.to_owned(), h);
    }

    pub fn rate_limited(&self, route: &str, scope: &str) {
        self.rate_limited
            .get_or_create(&l2("route", route, "scope", scope))
            .inc();
    }

    pub fn outbound_dropped(&self) {
        self.outbound_dropped.inc();
    }

    pub fn bridge_invalid(&self) {
        self.bridge_invalid.inc();
    }

    pub fn bridge_refused(&self) {
        self.bridge_refused.inc();
    }

    /// A size bound refused something; `bound` is one of a fixed set of names.
    pub fn bound_hit(&self, bound: &'static str) {
        self.bound_hits.get_or_create(&l1("bound", bound)).inc();
    }

    pub fn credit_reclaimed(&self) {
        self.credits_reclaimed.inc();
    }

    pub fn set_held_request_bytes(&self, bytes: usize) {
        self.held_request_bytes.set(bytes as i64);
    }

    /// Bytes queued for clients changed by `delta`.
    pub fn outbound_bytes(&self, delta: i64) {
        self.outbound_bytes.inc_by(delta);
    }

    /// Forgets the per-route entries of routes no longer served (`keep`
    /// says which are), so route churn cannot grow the registry.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        self.routes.retain(|r, _| keep(r));
        self.types.retain(|r, _| keep(r));
        self.request_histograms.retain(|r, _| keep(r));
    }

    pub fn set_breaker(&self, route: &str, state: i64) {
        self.breaker_state
            .get_or_create(&l1("route", route))
            .set(state);
    }

    /// Replaces the per-service worker gauges (services that disappeared go to 0).
    pub fn set_workers(&self, per_service: &[(String, i64, i64)]) {
        self.workers_live.clear();
        self.worker_in_flight.clear();
        for (service, live, in_flight) in per_service {
            self.workers_live
                .get_or_create(&l1("service", service))
                .set(*live);
            self.worker_in_flight
                .get_or_create(&l1("service", service))
                .set(*in_flight);
        }
    }

    /// Records the routes file the router started with (not a reload).
    pub fn config_started(&self, status: ConfigStatus) {
        let mut slot = self.config.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(ConfigStatus {
            reloads: 0,
            failed_reloads: 0,
            ..status
        });
    }

    /// Records a reload of the routes file (applied or rejected).
    pub fn config_reloaded(&self, status: ConfigStatus) {
        let result = if status.ok { "success" } else { "failure" };
        self.reloads.get_or_create(&l1("result", result)).inc();
        let mut slot = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let (reloads, failed) = slot.as_ref().map_or((0, 0), |s| {
            (s.reloads + 1, s.failed_reloads + u64::from(!status.ok))
        });
        let merged = if status.ok {
            ConfigStatus {
                reloads,
                failed_reloads: failed,
                ..status
            }
        } else {
            // A rejected file leaves the running routes: keep their load time and count.
            match slot.as_ref() {
                Some(prev) => ConfigStatus {
                    ok: false,
                    error: status.error,
                    reloads,
                    failed_reloads: failed,
                    ..prev.clone()
                },
                None => ConfigStatus {
                    reloads,
                    failed_reloads: failed,
                    ..status
                },
            }
        };
        *slot = Some(merged);
    }

    pub fn config_status(&self) -> Option<ConfigStatus> {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn routes_counters(&self) -> Vec<(String, Arc<RouteCounters>)> {
        let mut v: Vec<_> = self
            .routes
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Invariant: writing into a String cannot fail.
        encode(&mut out, &self.registry).expect("encoding into a String");
        out
    }
}

/// One route's message counters, as a session counts them: the registry
/// is asked once per route and message type, then every message is an
/// atomic add on the handles kept here (no label strings built, no map
/// looked up). Each session holds one for what it reads and one for what
/// it writes; the per-type handles are made on first use, at most
/// [`RouteMeter::MAX_KEPT`] of them (further types take the registry's
/// path, counted alike).
///
/// A session keeps counting into the handles of its route even if a
/// reload drops the route from `/stats` meanwhile; the Prometheus series
/// are the same ones either way.
pub struct RouteMeter {
    metrics: Arc<Metrics>,
    counters: Arc<RouteCounters>,
    /// Made on the first message of the session: an idle session has none.
    kept: Vec<TypeCounters>,
}

struct TypeCounters {
    msg_type: Box<str>,
    inbound: Counter,
    outbound: Counter,
}

impl RouteMeter {
    /// Distinct message types a meter keeps handles for.
    pub const MAX_KEPT: usize = 8;

    pub fn new(metrics: Arc<Metrics>, route: &str) -> Self {
        Self {
            counters: metrics.route(route),
            metrics,
            kept: Vec::new(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn kept(&mut self, msg_type: &str) -> Option<&TypeCounters> {
        let at = match self.kept.iter().position(|k| &*k.msg_type == msg_type) {
            Some(at) => at,
            None if self.kept.len() < Self::MAX_KEPT => {
                let made = self.metrics.type_counters(&self.counters.route, msg_type);
                self.kept.push(made);
                self.kept.len() - 1
            }
            None => return None,
        };
        Some(&self.kept[at])
    }

    /// A frame read from the client.
    pub fn message_in(&mut self, msg_type: &str) {
        match self.kept(msg_type) {
            Some(k) => {
                k.inbound.inc();
            }
            None => return self.metrics.message_in(&self.counters.route, msg_type),
        }
        self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame written to the client that the session writes once (its
    /// welcome) or rarely (an error): counted through the registry, so an
    /// idle session keeps no handles.
    pub fn once_out(&self, msg_type: &str, error_code: Option<&str>) {
        self.metrics
            .message_out(&self.counters.route, msg_type, error_code);
    }

    /// A request went to the bridge.
    pub fn request_started(&self) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame written to the client; error frames are counted by code too.
    pub fn message_out(&mut self, msg_type: &str, error_code: Option<&str>) {
        if error_code.is_some() {
            // Rare: the registry's path, which labels the code as well.
            return self.once_out(msg_type, error_code);
        }
        match self.kept(msg_type) {
            Some(k) => {
                k.outbound.inc();
            }
            None => return self.once_out(msg_type, None),
        }
        self.counters.messages_out.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_worker_chosen_codes_do_not_grow_the_labels() {
        assert_eq!(close_code_label(1000), "1000");
        assert_eq!(close_code_label(1011), "1011");
        assert_eq!(close_code_label(3123), "3xxx");
        assert_eq!(close_code_label(4999), "4xxx");
        assert_eq!(close_code_label(2000), "other");
        assert_eq!(error_code_label("timeout"), "timeout");
        assert_eq!(error_code_label("invalid_image_42"), "other");
        let m = Metrics::new();
        for i in 0..500 {
            m.message_out("/ws", "error", Some(&format!("made_up_{i}")));
            m.connection_closed("/ws", 4000 + i);
        }
        let text = m.render();
        assert_eq!(text.matches("code=\"other\"").count(), 1, "{text}");
        assert_eq!(text.matches("code=\"4xxx\"").count(), 1, "{text}");
    }

    #[test]
    fn request_durations_go_to_the_routes_series_and_churn_is_forgotten() {
        let m = Metrics::new();
        for (route, ms) in [("/kept", 3), ("/kept", 5), ("/gone", 7)] {
            m.request_finished(route, Duration::from_millis(ms));
        }
        let text = m.render();
        let count = |route: &str| {
            let series = format!("router_request_duration_seconds_count{{route=\"{route}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&series));
            line.and_then(|l| l[series.len()..].trim().parse::<u64>().ok())
        };
        assert_eq!(
            (count("/kept"), count("/gone")),
            (Some(2), Some(1)),
            "{text}"
        );
        m.retain_routes(|r| r == "/kept");
        let kept: Vec<String> = m
            .request_histograms
            .iter()
            .map(|e| e.key().clone())
            .collect();
        assert_eq!(kept, ["/kept"]);
    }

    #[test]
    fn client_types_are_capped() {
        let m = Metrics::new();
        for i in 0..(MAX_TYPES_PER_ROUTE + 10) {
            m.message_in("/ws", &format!("t{i}"));
        }
        let text = m.render();
        assert!(text.contains(r#"type="other""#));
        assert!(!text.contains(&format!("t{}\"", MAX_TYPES_PER_ROUTE + 5)));
    }

    #[test]
    fn a_meter_counts_what_the_registry_counts() {
        // The same traffic through a session's meter and through the
        // registry's own path must render the same series and totals,
        // including types beyond the meter's kept handles and errors.
        let by_meter = Arc::new(Metrics::new());
        let by_registry = Metrics::new();
        let mut inbound = RouteMeter::new(by_meter.clone(), "/ws");
        let mut outbound = RouteMeter::new(by_meter.clone(), "/ws");
        for round in 0..3 {
            for i in 0..(RouteMeter::MAX_KEPT + 4) {
                let t = format!("t{i}");
                inbound.message_in(&t);
                by_registry.message_in("/ws", &t);
                outbound.message_out(&t, None);
                by_registry.message_out("/ws", &t, None);
            }
            let code = if round == 0 { "timeout" } else { "bad_request" };
            outbound.message_out("error", Some(code));
            by_registry.message_out("/ws", "error", Some(code));
            inbound.request_started();
            by_registry.request_started("/ws");
        }
        let lines = |m: &Metrics| {
            let mut l: Vec<String> = m.render().lines().map(str::to_owned).collect();
            l.sort();
            l
        };
        assert_eq!(lines(&by_meter), lines(&by_registry));
        let (a, b) = (by_meter.route("/ws"), by_registry.route("/ws"));
        for (x, y) in [
            (&a.messages_in, &b.messages_in),
            (&a.messages_out, &b.messages_out),
            (&a.requests, &b.requests),
            (&a.errors, &b.errors),
        ] {
            assert_eq!(x.load(Ordering::Relaxed), y.load(Ordering::Relaxed));
        }
        assert_eq!(a.messages_in.load(Ordering::Relaxed), 36);
        assert_eq!(a.errors.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::new();
        m.connection_opened("/ws");
        m.message_out("/ws", "error", Some("timeout"));
        m.request_finished("/ws", Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains("router_connections{route=\"/ws\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("router_errors_total{route=\"/ws\",code=\"timeout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("router_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn failed_reloads_keep_the_running_config_and_agree_with_the_counter() {
        let m = Metrics::new();
        let reloads =
            |m: &Metrics, result: &str| m.reloads.get_or_create(&l1("result", result)).get();
        let ok = ConfigStatus {
            ok: true,
            path: "r.json".into(),
            loaded_at_unix_ms: 1,
            routes: 4,
            error: None,
            reloads: 0,
            failed_reloads: 0,
        };
        m.config_started(ok.clone());
        let s = m.config_status().unwrap();
        assert_eq!(
            (s.reloads, reloads(&m, "success")),
            (0, 0),
            "the start is no reload"
        );
        m.config_reloaded(ConfigStatus {
            ok: false,
            error: Some("bad".into()),
            loaded_at_unix_ms: 2,
            ..ok.clone()
        });
        let s = m.config_status().unwrap();
        assert!(!s.ok);
        assert_eq!(
            (s.routes, s.loaded_at_unix_ms, s.failed_reloads, s.reloads),
            (4, 1, 1, 1)
        );
        assert_eq!(s.error.as_deref(), Some("bad"));
        assert_eq!((reloads(&m, "success"), reloads(&m, "failure")), (0, 1));
        m.config_reloaded(ConfigStatus {
            loaded_at_unix_ms: 3,
            ..ok
        });
        let s = m.config_status().unwrap();
        assert_eq!((s.ok, s.reloads, s.failed_reloads), (true, 2, 1));
        assert_eq!(
            s.reloads,
            reloads(&m, "success") + reloads(&m, "failure"),
            "/stats and /metrics count the same reloads"
        );
    }
}
