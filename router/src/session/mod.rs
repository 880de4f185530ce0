//! One WebSocket session: from the welcome frame to the close frame.
//!
//! A session owns its socket and is the only writer to it; everything else
//! (bridge replies, pushes, publications) reaches it through the
//! connection's bounded outbound queue in the [`Hub`](crate::hub::Hub), and
//! the writer stamps `seq` in send order.
//!
//! # Layout
//! - [`inbound`]: the inbound state machine. A client frame and the current
//!   time go in; frames to queue and a close come out, and commands go to
//!   the bridge through a [`CommandQueue`]. Plain synchronous code with no
//!   socket and no runtime, unit-tested with plain values.
//! - [`writer`]: the writer: `seq` stamping, encoding, batching, the close
//!   handshake.
//! - [`guard`]: what a session holds in shared tables (its hub entry and
//!   topics, its connection at the bridge), released by `Drop` however the
//!   session ends: a panic or a dropped future cannot leak them.
//! - [`driver`]: the thin async loop that owns the socket, the timers and
//!   the `select!`, and feeds the other three.
//!
//! The session is written against `Stream`/`Sink` of axum WebSocket messages
//! and a [`Bridge`] trait, so tests drive it with channels.

use std::{future::Future, sync::Arc, time::Duration};

use axum::extract::ws::Message;
use futures_util::{Sink, Stream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bridge::{BridgeHandle, Busy},
    broker::Command,
    hub::Hub,
    metrics::Metrics,
    policy::runtime::{ConnectionSlot, RouteRuntime},
    registry::RouteRegistry,
    routes::Route,
    state::AppState,
};

mod driver;
mod guard;
mod inbound;
mod parking;
mod writer;

pub(crate) use parking::Lot;

#[cfg(test)]
mod testkit;

pub use inbound::RouterType;

/// Everything a session needs to start.
pub struct SessionStart {
    pub conn: crate::ids::ConnId,
    pub route: Arc<Route>,
    pub connect: bridge_proto::Connect,
    pub runtime: Arc<RouteRuntime>,
    /// Counts the connection against the route's limit until the session ends.
    pub slot: ConnectionSlot,
    /// The session's place under the router-wide cap; freed with the session.
    pub permit: crate::capacity::SessionPermit,
}

/// Starts a session (attached to the hub, the bridge told) and returns
/// the future that runs it to its end; spawn it as a task of its own.
/// Never panics on client input.
pub fn run<S>(socket: S, app: Arc<AppState>, start: SessionStart) -> impl Future<Output = ()>
where
    S: Socket,
{
    driver::run(socket, Env::of(&app), start)
}

/// A client's connection as the session reads and writes it: a WebSocket,
/// or the HTTP fallback's [`SseSocket`](crate::sse::SseSocket).
pub trait Socket: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin {
    /// The session leaves the socket (its connection was lost, or its owner
    /// resumed it elsewhere) and reads only what the socket has already
    /// taken: a socket that accepts input on the client's behalf (the
    /// fallback answers each POST `202`) stops accepting it here.
    fn stop_input(&mut self) {}
}

impl Socket for axum::extract::ws::WebSocket {}

/// The bounded command channel to the bridge, as the inbound state machine
/// sees it: a send that never waits.
pub trait CommandQueue {
    /// Queues `cmd`, or gives it back when the queue is full (or the bridge
    /// is gone).
    fn try_send(&self, cmd: Command) -> Result<(), Command>;
}

/// The bridge as the driver and the guard see it: also an awaited send for
/// the commands that must not be lost (`connect`, `disconnect`), and a
/// handle that can move into a task.
pub trait Bridge: CommandQueue + Clone + Send + Sync + 'static {
    /// Queues `cmd`, waiting for room.
    fn send(&self, cmd: Command) -> impl Future<Output = ()> + Send;
}

impl CommandQueue for BridgeHandle {
    fn try_send(&self, cmd: Command) -> Result<(), Command> {
        BridgeHandle::try_send(self, cmd).map_err(|Busy(cmd)| *cmd)
    }
}

impl Bridge for BridgeHandle {
    fn send(&self, cmd: Command) -> impl Future<Output = ()> + Send {
        BridgeHandle::send(self, cmd)
    }
}

/// How a session ended: the close code it sent or received, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ending {
    pub code: u16,
    pub reason: String,
}

impl Ending {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// What a session uses of the router: the parts of [`AppState`] it touches,
/// so tests can build one without a bridge socket.
pub(crate) struct Env<B: Bridge> {
    pub hub: Arc<Hub>,
    pub registry: Arc<RouteRegistry>,
    pub metrics: Arc<Metrics>,
    pub bridge: B,
    /// Fired when shutdown begins: the session stops taking requests.
    pub draining: CancellationToken,
    /// The sessions' tracker: a `disconnect` that could not be queued at
    /// once is sent from a task on it, so shutdown waits for it.
    pub tracker: TaskTracker,
    pub client_ping: Duration,
    pub drain_timeout: Duration,
    pub max_outbound_bytes: usize,
    pub rate_limits: bool,
    /// Where dropped sessions wait for a resume.
    pub lot: Arc<Lot<B>>,
    /// What all sessions together may keep for resumes.
    pub kept: Arc<crate::resume::KeptBudget>,
}

impl Env<BridgeHandle> {
    fn of(app: &AppState) -> Self {
        Self {
            hub: app.hub.clone(),
            registry: app.registry.clone(),
            metrics: app.metrics.clone(),
            bridge: app.bridge.clone(),
            draining: app.draining.clone(),
            tracker: app.sessions.clone(),
            client_ping: app.settings.client_ping(),
            drain_timeout: app.settings.drain_timeout(),
            max_outbound_bytes: app.settings.max_outbound_bytes as usize,
            rate_limits: app.settings.enable_rate_limit,
            lot: app.lot.clone(),
            kept: app.kept.clone(),
        }
    }
}
