//! What a session holds in the router's shared tables, released by `Drop`.
//!
//! A live session has an entry in the hub (with its topics), a connection at
//! the bridge (its home worker, its requests in flight), a slot in its
//! route's connection count and in the router-wide cap, and a place in the
//! connection gauges. An
//! [`Attachment`] takes all of them when the session starts and gives them
//! back when it is dropped: at the normal end of the session, but also when
//! the session panics or its future is dropped (a runtime shutting down, an
//! aborted task), so none of them can leak.
//!
//! The bridge must hear of the end: its `disconnect` cancels the requests
//! still in flight at their workers and tells the home worker. `Drop`
//! cannot wait, so it queues the command without waiting; when the bounded
//! queue is full, a task on the sessions' tracker sends it with an awaited
//! send. Shutdown waits for that tracker before it stops the bridge, so the
//! command is delivered even then.

use std::sync::{atomic::Ordering, Arc};

use tokio_util::task::TaskTracker;
use tracing::{info, warn, Span};

use super::{Bridge, Ending, Env};
use crate::{
    broker::Command,
    capacity::SessionPermit,
    hub::{ConnShared, Registration},
    metrics::Metrics,
    policy::runtime::ConnectionSlot,
};

/// A session's claim on shared state; see the module documentation.
pub(crate) struct Attachment<B: Bridge> {
    shared: Arc<ConnShared>,
    /// The hub entry and its topics (unregistered when dropped).
    registration: Option<Registration>,
    /// Its places under the route's cap and the router's.
    slots: Option<(ConnectionSlot, SessionPermit)>,
    bridge: B,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
    /// How the session ended, once it knows.
    ending: Option<Ending>,
    /// The session's span, entered while the attachment is released.
    span: Span,
}

impl<B: Bridge> Attachment<B> {
    /// Registers the connection in the hub and counts it as open.
    pub fn new(
        env: &Env<B>,
        shared: Arc<ConnShared>,
        slots: (ConnectionSlot, SessionPermit),
        span: Span,
    ) -> Self {
        let registration = env.hub.attach(shared.clone());
        env.metrics.connection_opened(&shared.route);
        Self {
            shared,
            registration: Some(registration),
            slots: Some(slots),
            bridge: env.bridge.clone(),
            tracker: env.tracker.clone(),
            metrics: env.metrics.clone(),
            ending: None,
            span,
        }
    }

    /// Records how the session ended (the code the bridge and metrics get).
    /// Gives up the places under the route's cap and the router's (a
    /// parked session holds no connection).
    pub fn take_slots(&mut self) -> Option<(ConnectionSlot, SessionPermit)> {
        self.slots.take()
    }

    /// Takes the places of the connection that resumed the session.
    pub fn put_slots(&mut self, slots: Option<(ConnectionSlot, SessionPermit)>) {
        self.slots = slots;
    }

    pub fn ended(&mut self, ending: Ending) {
        self.ending = Some(ending);
    }
}

impl<B: Bridge> Drop for Attachment<B> {
    fn drop(&mut self) {
        let _entered = self.span.enter();
        let ending = self.ending.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                Ending::new(1011, "session failed")
            } else {
                Ending::new(1006, "session ended without a close")
            }
        });
        drop(self.slots.take());
        let route = &self.shared.route;
        self.metrics.connection_closed(route, ending.code);
        if self.shared.dropped.load(Ordering::Relaxed) > 0 {
            self.metrics.outbound_dropped();
            if self.shared.over_bytes.load(Ordering::Relaxed) {
                self.metrics.bound_hit("outbound_bytes");
            }
        }
        // Out of the hub first: from here nothing new is delivered to the
        // connection or recorded in its in-flight map.
        drop(self.registration.take());
        let cids = self.shared.drain_inflight();
        let cmd = Command::Disconnect {
            conn: self.shared.id.clone(),
            code: ending.code,
            reason: ending.reason.clone(),
            cids,
        };
        if let Err(cmd) = self.bridge.try_send(cmd) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let bridge = self.bridge.clone();
                    self.tracker
                        .spawn_on(async move { bridge.send(cmd).await }, &rt);
                }
                // Only when a session is dropped outside any runtime (the
                // runtime itself is gone): the bridge is gone with it.
                Err(_) => warn!("no runtime left to tell the bridge of the disconnect"),
            }
        }
        if matches!(ending.code, 1000 | 1001 | 1005 | 1006 | 1012) {
            info!(code = ending.code, reason = %ending.reason, "connection closed");
        } else {
            info!(code = ending.code, reason = %ending.reason, "connection closed by policy or error");
        }
    }
}
