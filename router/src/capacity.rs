//! How many clients the router takes, so that it stays healthy when full.
//!
//! Every connection costs a file descriptor, and a process that runs out of
//! them cannot accept anything: not a health probe, not a metrics scrape.
//! The router therefore budgets its descriptors (README, "Capacity"):
//!
//! - at start the soft descriptor limit is raised to the hard one;
//! - [`reserve_for`] descriptors are kept back from sessions: a quarter of
//!   them for HTTP connections that have not upgraded (health probes,
//!   scrapes, upgrade handshakes, refusals), the rest for the router's own
//!   files (ZeroMQ listeners and worker connections, the routes-file
//!   watcher, TLS files, logs, the runtime's own descriptors) and for
//!   connections closed for room that have not finished closing;
//! - [`Capacity`] caps the WebSocket sessions at `MAX_CONNECTIONS` (by
//!   default the limit minus the reserve); an upgrade above it is answered
//!   `503 at_capacity` from the reserve, and `/ready` says "not ready" until
//!   the count falls to the low-water mark, so a load balancer sends new
//!   clients elsewhere meanwhile.
//!
//! Connections that never upgrade are bounded by the listener
//! (`listener::tracker`): past the HTTP share of the reserve, the oldest of
//! them is closed to make room for a new one.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;

/// Descriptors kept back from sessions for a given descriptor limit: an
/// eighth of it, at least 64 and at most 512.
pub fn reserve_for(descriptor_limit: u64) -> usize {
    (descriptor_limit / 8).clamp(64, 512) as usize
}

/// The default session cap for a descriptor limit (at least 1).
pub fn default_max_connections(descriptor_limit: u64) -> usize {
    (descriptor_limit as usize)
        .saturating_sub(reserve_for(descriptor_limit))
        .max(1)
}

/// The process's descriptor limit, before and after [`raise_descriptor_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The soft limit the process started with.
    pub initial: u64,
    /// The soft limit in force now.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one. An error leaves the
/// limit as it was (the caller logs it and goes on with that).
pub fn raise_descriptor_limit() -> Result<DescriptorLimit, std::io::Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (initial, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // An unlimited hard limit is not a number the kernel takes for
    // descriptors (nr_open caps it); stay at the soft limit then.
    let target = if hard == RLIM_INFINITY { initial } else { hard };
    if target > initial {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(DescriptorLimit {
        initial,
        soft,
        hard,
    })
}

/// The soft descriptor limit in force, if it can be read.
pub fn descriptor_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// What a client refused for capacity is told to wait before trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The router-wide cap on WebSocket sessions, with the hysteresis that
/// `/ready` reports.
#[derive(Debug)]
pub struct Capacity {
    max: usize,
    low_water: usize,
    state: Mutex<State>,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    sessions: usize,
    /// Set when the cap is reached, cleared at the low-water mark.
    full: bool,
}

impl Capacity {
    /// A cap of `max` sessions (at least 1); "full" ends at 95 % of it.
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Self {
            max,
            low_water: max - max.div_ceil(20),
            state: Mutex::new(State::default()),
            refused: AtomicU64::new(0),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn low_water(&self) -> usize {
        self.low_water
    }

    pub fn sessions(&self) -> usize {
        self.lock().sessions
    }

    /// True from the moment the cap is reached until the session count is
    /// back at the low-water mark.
    pub fn is_full(&self) -> bool {
        self.lock().full
    }

    /// Upgrades refused because the router was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes a session slot, or `None` (and "full") at the cap.
    pub fn try_admit(self: &Arc<Self>) -> Option<SessionPermit> {
        let mut s = self.lock();
        if s.sessions >= self.max {
            s.full = true;
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        s.sessions += 1;
        Some(SessionPermit(self.clone()))
    }

    /// A session that passed every check has started: at the cap, the
    /// router is full. (A permit taken and given back by an upgrade that a
    /// later check refuses must not mark it full: anyone could flip
    /// `/ready` that way.)
    fn started(&self) {
        let mut s = self.lock();
        if s.sessions >= self.max {
            s.full = true;
        }
    }

    fn release(&self) {
        let mut s = self.lock();
        s.sessions = s.sessions.saturating_sub(1);
        if s.sessions <= self.low_water {
            s.full = false;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two integers updated together; a panic elsewhere
        // cannot leave them half-written, so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One session counted against the router's cap; dropping it frees the slot.
#[derive(Debug)]
pub struct SessionPermit(Arc<Capacity>);

impl SessionPermit {
    /// The upgrade passed every check: the session starts.
    pub fn started(&self) {
        self.0.started();
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// At most one log line per interval for an event that can repeat
/// thousands of times a second (accept errors, refusals when full); the
/// line carries how many were not logged.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Records one event. `Some(n)` when this one should be logged, `n`
    /// being the events since the last logged one that were not.
    pub fn hit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(last) if now < last + self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let skipped = std::mem::take(&mut s.1);
                s.0 = Some(now);
                Some(skipped)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_an_eighth_within_bounds() {
        for (limit, reserve, max) in [
            (256, 64, 192),
            (1024, 128, 896),
            (20_000, 512, 19_488),
            (1_048_576, 512, 1_048_064),
            (10, 64, 1),
        ] {
            assert_eq!(reserve_for(limit), reserve, "limit {limit}");
            assert_eq!(default_max_connections(limit), max, "limit {limit}");
        }
    }

    #[test]
    fn full_at_the_cap_until_the_low_water_mark() {
        let cap = Capacity::new(40);
        assert_eq!(cap.low_water(), 38);
        let admit = || {
            let p = cap.try_admit().unwrap();
            p.started();
            p
        };
        let mut permits: Vec<_> = (0..39).map(|_| admit()).collect();
        assert!(!cap.is_full());
        // A permit that a later check gives back does not mark it full.
        drop(cap.try_admit().unwrap());
        assert!(!cap.is_full(), "an upgrade refused after admission");
        permits.push(admit());
        assert!(cap.is_full(), "the 40th session fills it");
        assert!(cap.try_admit().is_none());
        assert_eq!((cap.sessions(), cap.refused()), (40, 1));
        permits.pop();
        assert!(cap.is_full(), "39 is above the low-water mark");
        permits.pop();
        assert!(!cap.is_full(), "38 is the low-water mark");
        assert!(cap.try_admit().is_some(), "room again");
        drop(permits);
        assert_eq!(cap.sessions(), 0);
    }

    #[test]
    fn a_cap_of_one_has_a_low_water_of_zero() {
        let cap = Capacity::new(0);
        assert_eq!((cap.max(), cap.low_water()), (1, 0));
        let p = cap.try_admit().unwrap();
        p.started();
        assert!(cap.is_full() && cap.try_admit().is_none());
        drop(p);
        assert!(!cap.is_full());
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_logging_counts_what_it_skipped() {
        let t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.hit(), Some(0));
        for _ in 0..99 {
            assert_eq!(t.hit(), None);
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(t.hit(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(t.hit(), Some(100));
        assert_eq!(t.hit(), None);
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_one() {
        let l = raise_descriptor_limit().unwrap();
        assert!(l.soft >= l.initial);
        assert!(l.soft == l.hard || l.hard == nix::sys::resource::RLIM_INFINITY);
        assert_eq!(descriptor_limit(), Some(l.soft));
    }
}
