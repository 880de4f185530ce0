//! Every accepted TCP connection, counted, and the ones that have not
//! upgraded, oldest first.
//!
//! Sessions are capped by `capacity::Capacity`; what is left to bound is
//! connections that never upgrade: a client (or an attack) that opens TCP
//! connections and sends nothing holds a descriptor each until its
//! handshake deadline. When the open connections exceed the budget (the
//! session cap plus the HTTP share of the reserve), the oldest connection
//! that has not upgraded is closed to make room, so a new one (a health
//! probe, a real client) is served instead of the process running out of
//! descriptors. Upgraded connections are never closed for room: the
//! session cap already accounts for them.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
};

use super::deadline::Deadline;
use crate::metrics::Metrics;

pub struct Tracker {
    budget: usize,
    open: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Connections that have not upgraded, by accept order.
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    by_age: BTreeMap<u64, Weak<Deadline>>,
}

/// The tracker's figures for `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerStats {
    pub open: usize,
    pub pending: usize,
    pub budget: usize,
    pub evicted: u64,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("budget", &self.budget)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// `budget`: open connections allowed before the oldest pending one is
    /// closed for a new one.
    pub fn new(budget: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            budget: budget.max(1),
            open: AtomicUsize::new(0),
            metrics,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// A connection was accepted: returns its id. `make` builds its
    /// deadline from that id; it is tracked as pending until
    /// [`Tracker::upgraded`] or [`Tracker::closed`].
    /// Also returns whether an older connection was expired for room.
    pub(super) fn accepted(
        self: &Arc<Self>,
        make: impl FnOnce(u64) -> Arc<Deadline>,
    ) -> (Arc<Deadline>, bool) {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let mut p = self.lock();
        let id = p.next_id;
        p.next_id += 1;
        let deadline = make(id);
        let mut evicted = false;
        if open > self.budget {
            // Over budget: the oldest connection still without a session
            // goes (never the new one, which may be the probe we are
            // keeping room for). It is removed here, so the next accept
            // picks the next oldest while this one closes.
            if let Some((_, oldest)) = p.by_age.pop_first() {
                if let Some(d) = oldest.upgrade() {
                    d.expire();
                    self.metrics.tcp_evicted();
                    evicted = true;
                }
            }
        }
        p.by_age.insert(id, Arc::downgrade(&deadline));
        (deadline, evicted)
    }

    /// The connection became a session: it no longer counts as pending.
    pub(super) fn upgraded(&self, id: u64) {
        self.lock().by_age.remove(&id);
    }

    /// The connection's socket was dropped.
    pub(super) fn closed(&self, id: u64) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.lock().by_age.remove(&id);
    }

    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            open: self.open.load(Ordering::Acquire),
            pending: self.lock().by_age.len(),
            budget: self.budget,
            evicted: self.metrics.tcp_evicted_total(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A map insert/remove cannot be left half done by a panic elsewhere.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}
