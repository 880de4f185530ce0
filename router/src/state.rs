//! State shared by the HTTP handlers and the sessions.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bridge::BridgeHandle, hub::Hub, policy::runtime::Runtimes, routes::RouteTable,
    settings::Settings,
};

pub struct AppState {
    pub settings: Settings,
    /// The current route table; replaced whole on reload.
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub hub: Arc<Hub>,
    pub bridge: BridgeHandle,
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
        routes: watch::Receiver<Arc<RouteTable>>,
        hub: Arc<Hub>,
        bridge: BridgeHandle,
    ) -> Self {
        Self {
            settings,
            routes,
            hub,
            bridge,
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
        self.routes.borrow().clone()
    }
}
