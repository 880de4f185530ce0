//! The request table: every request the router still owes a terminal frame,
//! and where it is.
//!
//! A request is in exactly one of three places, or gone:
//! - `waiting`: no worker had a free credit; queued in arrival order per
//!   service, at most [`MAX_WAITING`] across all services;
//! - `pending`: sent to one worker, which alone may answer it;
//! - `retrying`: its worker failed before any reply reached the client; the
//!   next attempt is due after a backoff ([`backoff`]).
//!
//! Beside them, the *zombies*: requests the router gave up on (timeout,
//! cancel, disconnect) whose worker still holds their credit until its
//! terminal message or the end of the cancel grace.
//!
//! Each request's data is counted in bytes by a [`Charge`] while the table
//! may still need it (waiting, retrying, or pending with a retry left).
//!
//! Plain data, with the time passed in: the broker arms the timers
//! (deadlines, backoffs, graces) and moves requests between the places here.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::time::delay_queue;

use super::{PeerId, RequestCmd};
use crate::{ids::Cid, policy::breaker::Outcome};

/// Requests that may wait for a free worker credit, across all services.
pub const MAX_WAITING: usize = 10_000;

/// First retry delay; doubled per attempt, plus up to 50% jitter.
pub(super) const RETRY_BASE: Duration = Duration::from_millis(50);

/// How long to wait after attempt `failed` (1 for the first) before the
/// next one. `jitter` is drawn from `[0, 1)` and adds up to half the base.
pub(super) fn backoff(failed: u32, jitter: f64) -> Duration {
    let base = RETRY_BASE * 2u32.saturating_pow(failed - 1);
    base + base.mul_f64(jitter * 0.5)
}

/// Bytes of request data one request holds, counted in a total shared by
/// all of them. Dropping the charge (whatever path the request leaves by)
/// gives the bytes back, so the total cannot drift.
#[derive(Debug)]
pub(super) struct Charge {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl Charge {
    /// The request no longer keeps its data (sent with no retry left).
    pub(super) fn release(&mut self) {
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
pub(super) struct InFlight {
    pub(super) cmd: RequestCmd,
    /// Its data's bytes, while the broker keeps the data.
    pub(super) charge: Charge,
    /// 1 for the first attempt.
    pub(super) attempt: u32,
    /// Its entry in the broker's deadline queue.
    pub(super) deadline: delay_queue::Key,
    /// When that deadline passes: the same for every attempt.
    pub(super) deadline_at: Instant,
    /// The worker that failed the previous attempt (tried last next time).
    pub(super) avoid: Option<PeerId>,
    pub(super) started: Instant,
}

impl InFlight {
    pub(super) fn may_retry(&self) -> bool {
        self.attempt <= self.cmd.retries
    }

    /// Time left before the deadline.
    pub(super) fn left(&self, now: Instant) -> Duration {
        self.deadline_at.saturating_duration_since(now)
    }

    /// Tells the route's breaker how the request ended.
    pub(super) fn record(&self, outcome: Outcome, now: Instant) {
        if let Some(t) = &self.cmd.breaker {
            t.breaker.record(t.admit, outcome, now, &t.policy);
        }
    }
}

/// A request at a worker.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) req: InFlight,
    pub(super) worker: PeerId,
    /// Whether a partial reply reached the client (then no retry: the
    /// client would see the stream twice).
    pub(super) partial_sent: bool,
}

/// A request taken out of the table, and where it was.
#[derive(Debug)]
pub(super) enum Taken {
    Pending(Pending),
    Waiting(InFlight),
    Retrying(InFlight),
}

#[derive(Debug, Default)]
pub(super) struct Requests {
    pending: HashMap<Cid, Pending>,
    waiting: HashMap<Cid, InFlight>,
    /// Arrival order of `waiting`, per service (may hold ids already gone).
    queues: HashMap<String, VecDeque<Cid>>,
    retrying: HashMap<Cid, InFlight>,
    /// Requests the router gave up on (and sent `cancel` for) but the
    /// worker has not finished: they keep their credit until the worker's
    /// terminal message, or until the cancel grace has passed.
    zombies: HashMap<Cid, PeerId>,
    /// Bytes of request data held, the sum of every live [`Charge`].
    held_bytes: Arc<AtomicUsize>,
}

impl Requests {
    /// Counts `bytes` of a new request. `true` with it: the total would
    /// pass `max`, so the request must be refused (dropping the charge
    /// gives the bytes back).
    pub(super) fn charge(&self, bytes: usize, max: usize) -> (Charge, bool) {
        let held = self.held_bytes.load(Ordering::Relaxed);
        let over = held.saturating_add(bytes) > max;
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        let charge = Charge {
            total: self.held_bytes.clone(),
            bytes,
        };
        (charge, over)
    }

    /// Bytes of request data held now.
    pub(super) fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Requests owed a terminal frame.
    pub(super) fn len(&self) -> usize {
        self.pending.len() + self.waiting.len() + self.retrying.len()
    }

    /// Takes a request out of whichever place it is in.
    pub(super) fn take(&mut self, cid: &Cid) -> Option<Taken> {
        if let Some(p) = self.pending.remove(cid) {
            Some(Taken::Pending(p))
        } else if let Some(r) = self.waiting.remove(cid) {
            self.unqueue(&r.cmd.route.service, cid);
            Some(Taken::Waiting(r))
        } else {
            self.retrying.remove(cid).map(Taken::Retrying)
        }
    }

    // ----- waiting ---------------------------------------------------------------

    /// Whether the wait queue holds [`MAX_WAITING`] requests.
    /// Whether any request waits for a credit.
    pub(super) fn any_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub(super) fn waiting_is_full(&self) -> bool {
        self.waiting.len() >= MAX_WAITING
    }

    /// Queues a request until a credit frees (callers check
    /// [`Self::waiting_is_full`] first).
    pub(super) fn wait(&mut self, req: InFlight) {
        let cid = req.cmd.cid;
        self.queues
            .entry(req.cmd.route.service.clone())
            .or_default()
            .push_back(cid);
        self.waiting.insert(cid, req);
    }

    /// The oldest request still waiting for `service`.
    pub(super) fn next_waiting(&mut self, service: &str) -> Option<InFlight> {
        let queue = self.queues.get_mut(service)?;
        while let Some(cid) = queue.pop_front() {
            if let Some(req) = self.waiting.remove(&cid) {
                return Some(req);
            }
            // expired or cancelled meanwhile
        }
        None
    }

    /// Puts back, at the front and in order, requests [`Self::next_waiting`]
    /// gave out that could not go (their home worker is busy).
    pub(super) fn wait_again_first(&mut self, service: &str, set_aside: Vec<InFlight>) {
        if set_aside.is_empty() {
            // The usual case: no key to allocate, only an emptied queue to drop.
            if self.queues.get(service).is_some_and(VecDeque::is_empty) {
                self.queues.remove(service);
            }
            return;
        }
        let queue = self.queues.entry(service.to_owned()).or_default();
        for req in set_aside.into_iter().rev() {
            queue.push_front(req.cmd.cid);
            self.waiting.insert(req.cmd.cid, req);
        }
        if queue.is_empty() {
            self.queues.remove(service);
        }
    }

    /// Every request waiting for `service`, in arrival order (the service
    /// has no worker left).
    pub(super) fn take_waiting_for(&mut self, service: &str) -> Vec<InFlight> {
        let queued = self.queues.remove(service).unwrap_or_default();
        queued
            .into_iter()
            .filter_map(|cid| self.waiting.remove(&cid))
            .collect()
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

    /// Ids in `service`'s arrival queue, `None` if it has none (for tests).
    #[cfg(test)]
    pub(super) fn queue_len(&self, service: &str) -> Option<usize> {
        self.queues.get(service).map(VecDeque::len)
    }

    // ----- pending -----------------------------------------------------------------

    pub(super) fn insert_pending(&mut self, p: Pending) {
        self.pending.insert(p.req.cmd.cid, p);
    }

    /// The request, if `peer` holds it.
    pub(super) fn pending_at(&mut self, cid: &Cid, peer: &PeerId) -> Option<&mut Pending> {
        self.pending.get_mut(cid).filter(|p| p.worker == *peer)
    }

    pub(super) fn take_pending(&mut self, cid: &Cid) -> Option<Pending> {
        self.pending.remove(cid)
    }

    /// Every request `peer` holds.
    pub(super) fn take_pending_of(&mut self, peer: &PeerId) -> Vec<Pending> {
        let lost: Vec<Cid> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == *peer)
            .map(|(c, _)| *c)
            .collect();
        lost.iter()
            .filter_map(|cid| self.pending.remove(cid))
            .collect()
    }

    // ----- retrying ----------------------------------------------------------------

    /// Sets a request aside until its next attempt is due.
    pub(super) fn retry_later(&mut self, req: InFlight) {
        self.retrying.insert(req.cmd.cid, req);
    }

    pub(super) fn take_retrying(&mut self, cid: &Cid) -> Option<InFlight> {
        self.retrying.remove(cid)
    }

    // ----- zombies -----------------------------------------------------------------

    /// The router sent `cancel` for a request at `peer`: it keeps its
    /// credit until the worker's terminal message or the grace's end.
    pub(super) fn add_zombie(&mut self, cid: Cid, peer: PeerId) {
        self.zombies.insert(cid, peer);
    }

    /// The zombie's worker, when its grace is over (`None`: answered in
    /// time, or its worker is gone).
    pub(super) fn take_zombie(&mut self, cid: &Cid) -> Option<PeerId> {
        self.zombies.remove(cid)
    }

    /// Whether `peer` holds the credit of the zombie `cid`.
    pub(super) fn is_zombie_at(&self, cid: &Cid, peer: &PeerId) -> bool {
        self.zombies.get(cid) == Some(peer)
    }

    /// `peer` is gone: its zombies' credits went with it.
    pub(super) fn forget_zombies_of(&mut self, peer: &PeerId) {
        self.zombies.retain(|_, p| p != peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_50ms_doubles_and_adds_at_most_half() {
        let ms = Duration::from_millis;
        for (failed, base) in [(1, 50), (2, 100), (3, 200), (4, 400)] {
            assert_eq!(
                backoff(failed, 0.0),
                ms(base),
                "attempt {failed}, no jitter"
            );
            let most = backoff(failed, 1.0 - f64::EPSILON);
            assert!(
                most <= ms(base) + ms(base / 2),
                "attempt {failed}: {most:?}"
            );
            assert!(
                most > ms(base) + ms(base / 2) - ms(1),
                "attempt {failed}: {most:?}"
            );
        }
    }

    #[test]
    fn a_charge_gives_its_bytes_back_once_whatever_the_path() {
        let table = Requests::default();
        let (mut released, over) = table.charge(100, 250);
        assert!(!over);
        let (dropped, over) = table.charge(100, 250);
        assert!(!over);
        assert_eq!(table.held_bytes(), 200);
        let (refused, over) = table.charge(100, 250);
        assert!(over, "300 > 250");
        drop(refused);
        assert_eq!(table.held_bytes(), 200, "a refused charge holds nothing");
        released.release();
        assert_eq!(table.held_bytes(), 100);
        drop(released);
        assert_eq!(table.held_bytes(), 100, "released, then dropped: once");
        drop(dropped);
        assert_eq!(table.held_bytes(), 0);
    }
}
