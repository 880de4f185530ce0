//! A session without a socket: parked when its connection drops, claimed
//! by the connection that resumes it (README, "Resume").
//!
//! [`SessionState`] is everything of a session that outlives its socket:
//! its claim on shared tables ([`Attachment`]: the hub entry that keeps
//! receiving replies, topics, the route slot, the bridge connection), its
//! outbound queue, its inbound state and its writer (the `seq` counter and
//! the frames kept for a replay). Parking moves it into the
//! [`ParkingLot`](crate::resume::ParkingLot) and starts a task that ends it
//! when its TTL passes, when it outgrows its bounds, on shutdown or when
//! its route is removed; ending it drops the attachment, which tells the
//! workers `disconnect` and cancels what is still in flight.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

use super::{guard::Attachment, inbound::Inbound, writer::Writer, Bridge, Ending, Env};
use crate::{
    hub::ConnShared,
    metrics::Metrics,
    resume::{ParkingLot, Refusal, Ticket},
    routes::{ResumePolicy, RouteTable},
};

/// What of a session outlives its socket.
pub(crate) struct SessionState<B: Bridge> {
    pub attachment: Attachment<B>,
    pub shared: Arc<ConnShared>,
    pub inbound: Inbound,
    pub writer: Writer,
    pub outbound: crate::outbox::OutboxRx,
}

impl<B: Bridge> SessionState<B> {
    /// Bytes a parked session holds: frames kept for the replay and replies
    /// queued while it was away.
    pub fn held_bytes(&self) -> usize {
        self.writer.kept_bytes() + self.shared.queued_bytes()
    }

    /// Ends the session for good (its attachment's `Drop` does the rest).
    pub fn end(mut self, ending: Ending) {
        self.attachment.ended(ending);
    }
}

/// The lot sessions of this router park in.
pub(crate) type Lot<B> = ParkingLot<SessionState<B>>;

/// Parks `state` (its socket dropped) for `policy.ttl`, or ends it when the
/// budget cannot take it.
pub(crate) fn park<B: Bridge>(env: &Env<B>, mut state: SessionState<B>, policy: ResumePolicy) {
    let id = state.shared.id.0.to_string();
    let route = state.inbound.route().path.clone();
    // A parked session holds no connection: its places under the route's
    // cap and MAX_CONNECTIONS go back (the connection that resumes it
    // brings its own).
    drop(state.attachment.take_slots());
    if state.held_bytes() > policy.max_bytes {
        // Already over what a parked session may hold.
        env.lot.retire(&id, Refusal::Overflow);
        env.metrics.resume_ended("overflow");
        state.end(Ending::new(1008, "session outgrew its resume bounds"));
        return;
    }
    // While nobody reads, the queue may hold what the resume bounds keep.
    state.shared.set_bounds(
        policy.max_frames,
        policy.max_bytes.saturating_sub(state.writer.kept_bytes()),
    );
    let kill = state.shared.kill.clone();
    match env.lot.park(&id, state, policy.max_bytes, policy.ttl) {
        Ok(ticket) => {
            info!(
                ttl_ms = policy.ttl.as_millis() as u64,
                "connection lost: session parked for a resume"
            );
            env.metrics.resume_parked();
            let waiting = wait(
                env.lot.clone(),
                env.metrics.clone(),
                id,
                route,
                ticket,
                kill,
                env.draining.clone(),
                env.registry.subscribe(),
            );
            env.tracker.spawn(waiting.in_current_span());
        }
        Err(state) => {
            info!("connection lost: no room to park the session (RESUME_MAX_BYTES); ending it");
            env.metrics.resume_ended("overflow");
            state.end(Ending::new(
                1008,
                "no room to keep the session for a resume",
            ));
        }
    }
}

/// Waits for a parked session's client; ends the session if it does not come.
#[allow(clippy::too_many_arguments)] // one task's inputs, each used once
async fn wait<B: Bridge>(
    lot: Arc<Lot<B>>,
    metrics: Arc<Metrics>,
    id: String,
    route: String,
    ticket: Ticket,
    kill: CancellationToken,
    draining: CancellationToken,
    mut routes: watch::Receiver<Arc<RouteTable>>,
) {
    let route_removed = async {
        loop {
            if routes.borrow_and_update().get(&route).is_none() {
                return;
            }
            if routes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    let (why, ending) = tokio::select! {
        _ = ticket.claimed.cancelled() => return,
        _ = tokio::time::sleep_until(ticket.deadline) => {
            (Refusal::Expired, Ending::new(1001, "session not resumed within its resume TTL"))
        }
        _ = kill.cancelled() => {
            (Refusal::Overflow, Ending::new(1008, "session outgrew its resume bounds while parked"))
        }
        _ = draining.cancelled() => {
            (Refusal::UnknownSession, Ending::new(1001, "server shutting down"))
        }
        _ = route_removed => (Refusal::UnknownSession, Ending::new(1012, "route removed")),
    };
    if let Some(state) = lot.end(&id, why) {
        info!(reason = %ending.reason, "parked session ended");
        metrics.resume_ended(ended_label(&ending));
        state.end(ending);
    }
}

/// The metric label of a parked session's end.
fn ended_label(ending: &Ending) -> &'static str {
    match ending.code {
        1008 => "overflow",
        1012 => "route_removed",
        _ if ending.reason.starts_with("server") => "shutdown",
        _ => "expired",
    }
}
