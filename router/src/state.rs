//! State shared by the HTTP handlers and the sessions.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bridge::{BridgeHandle, Endpoints},
    capacity::{Capacity, LogThrottle},
    hub::Hub,
    listener::Tracker,
    metrics::Metrics,
    policy::runtime::Runtimes,
    registry::RouteRegistry,
    routes::RouteTable,
    session::Lot,
    settings::Settings,
    tls::Tls,
};

pub struct AppState {
    pub settings: Settings,
    /// The live route table (file + dynamic routes).
    pub registry: Arc<RouteRegistry>,
    pub hub: Arc<Hub>,
    pub bridge: BridgeHandle,
    pub endpoints: Endpoints,
    pub metrics: Arc<Metrics>,
    /// Fired when shutdown begins: no new upgrades, sessions drain.
    pub draining: CancellationToken,
    /// Every upgraded session, so shutdown can wait for them (axum does not).
    pub sessions: TaskTracker,
    /// Live policy state per route (breakers, limiters, connection counts).
    pub runtimes: Runtimes,
    /// The router-wide cap on sessions.
    pub capacity: Arc<Capacity>,
    /// Every open TCP connection of the client port.
    pub tracker: Arc<Tracker>,
    /// The soft descriptor limit the budget was derived from.
    pub descriptor_limit: u64,
    /// Refusals at capacity come in floods: one log line a second.
    pub at_capacity_log: LogThrottle,
    /// TLS on the client port, when configured.
    pub tls: Option<Arc<Tls>>,
    /// Sessions whose connection dropped, waiting for a resume.
    pub(crate) lot: Arc<Lot<BridgeHandle>>,
    /// Event-stream sessions, for their POSTs.
    pub sse: Arc<crate::sse::SseRegistry>,
    /// The link to the other routers (`CLUSTER_URL`), if any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Bytes live sessions keep for resumes, all together.
    pub kept: Arc<crate::resume::KeptBudget>,
    ready: AtomicBool,
}

/// What the client port enforces: the connection budget and TLS.
pub struct ClientEdge {
    pub capacity: Arc<Capacity>,
    pub tracker: Arc<Tracker>,
    pub descriptor_limit: u64,
    pub tls: Option<Arc<Tls>>,
}

impl AppState {
    pub fn new(
        settings: Settings,
        registry: Arc<RouteRegistry>,
        hub: Arc<Hub>,
        bridge: BridgeHandle,
        endpoints: Endpoints,
        metrics: Arc<Metrics>,
        edge: ClientEdge,
    ) -> Self {
        let settings_resume_budget =
            usize::try_from(settings.resume_max_bytes).unwrap_or(usize::MAX);
        Self {
            settings,
            registry,
            hub,
            bridge,
            endpoints,
            metrics,
            draining: CancellationToken::new(),
            sessions: TaskTracker::new(),
            runtimes: Runtimes::default(),
            capacity: edge.capacity,
            tracker: edge.tracker,
            descriptor_limit: edge.descriptor_limit,
            at_capacity_log: LogThrottle::new(std::time::Duration::from_secs(1)),
            tls: edge.tls,
            lot: Arc::new(Lot::new(settings_resume_budget)),
            kept: crate::resume::KeptBudget::new(settings_resume_budget),
            sse: Arc::new(crate::sse::SseRegistry::default()),
            cluster: None,
            ready: AtomicBool::new(false),
        }
    }

    /// Joined to other routers through `cluster` (`CLUSTER_URL`).
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Started, not draining, and not full (README, "Capacity").
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.draining.is_cancelled()
            && !self.capacity.is_full()
    }

    /// Whether `/console` is served: `ENABLE_CONSOLE`, or by default when
    /// the router listens on loopback only.
    pub fn console_enabled(&self) -> bool {
        self.settings
            .enable_console
            .unwrap_or_else(|| self.settings.host.is_loopback())
    }

    /// Parked sessions and the bytes they hold.
    pub fn parked_figures(&self) -> (usize, usize) {
        let (mut n, mut bytes) = (0, 0);
        self.lot.for_each_parked(|s| {
            n += 1;
            bytes += s.held_bytes();
        });
        (n, bytes)
    }

    /// The capacity figures for `/metrics` and `/stats`.
    pub fn capacity_figures(&self) -> crate::metrics::CapacityFigures {
        let t = self.tracker.stats();
        crate::metrics::CapacityFigures {
            max_connections: self.capacity.max(),
            sessions: self.capacity.sessions(),
            full: self.capacity.is_full(),
            tcp_open: t.open,
            tcp_pending: t.pending,
            descriptor_limit: self.descriptor_limit,
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn route_table(&self) -> Arc<RouteTable> {
        self.registry.current()
    }
}
