//! State shared by the HTTP handlers and the sessions.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bridge::{BridgeHandle, Endpoints},
    hub::Hub,
    metrics::Metrics,
    policy::runtime::Runtimes,
    registry::RouteRegistry,
    routes::RouteTable,
    settings::Settings,
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
    ready: AtomicBool,
}

impl AppState {
    pub fn new(
        settings: Settings,
        registry: Arc<RouteRegistry>,
        hub: Arc<Hub>,
        bridge: BridgeHandle,
        endpoints: Endpoints,
        metrics: Arc<Metrics>,
    ) -> Self {
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
            ready: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.is_cancelled()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn route_table(&self) -> Arc<RouteTable> {
        self.registry.current()
    }
}
