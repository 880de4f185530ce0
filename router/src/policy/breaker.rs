//! Circuit breaker, one per route (README, policies).
//!
//! closed → open after `failure_threshold` consecutive failures → after
//! `open_for`, half-open: exactly one probe request goes through → closed on
//! its success, open again on its failure. While open (and while the probe
//! is out) requests fail fast with `circuit_open` and nothing reaches the
//! bridge.
//!
//! The thresholds are passed in on every call rather than stored, so a
//! reloaded routes file applies to the running breaker at once.

use std::{sync::Mutex, time::Duration};

use serde::Serialize;
use tokio::time::Instant;

/// Breaker settings of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before a probe is let through.
    pub open_for: Duration,
}

impl BreakerPolicy {
    pub const DEFAULT: BreakerPolicy = BreakerPolicy {
        failure_threshold: 5,
        open_for: Duration::from_secs(10),
    };
}

/// The state, as shown in `/routes` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_out: bool },
}

/// Admission ticket: whether this request is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Normal,
    Probe,
}

/// How a request ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither (cancelled by the client, connection gone): a probe ending
    /// this way frees the probe slot without deciding anything.
    Neutral,
}

#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section is a single state assignment: a poisoned
        // lock still holds a consistent state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request through, or says how long until one may try.
    pub fn admit(&self, now: Instant, policy: &BreakerPolicy) -> Result<Admit, Duration> {
        let mut s = self.lock();
        match *s {
            Inner::Closed { .. } => Ok(Admit::Normal),
            Inner::Open { until } if now >= until => {
                *s = Inner::HalfOpen { probe_out: true };
                Ok(Admit::Probe)
            }
            Inner::Open { until } => Err(until - now),
            Inner::HalfOpen { probe_out: false } => {
                *s = Inner::HalfOpen { probe_out: true };
                Ok(Admit::Probe)
            }
            // Another request is probing; try again about when it may be done.
            Inner::HalfOpen { probe_out: true } => Err(policy.open_for.min(Duration::from_secs(1))),
        }
    }

    /// Records how an admitted request ended.
    pub fn record(&self, admit: Admit, outcome: Outcome, now: Instant, policy: &BreakerPolicy) {
        let mut s = self.lock();
        let open = Inner::Open {
            until: now + policy.open_for,
        };
        match (admit, outcome) {
            (Admit::Probe, Outcome::Success) => *s = Inner::Closed { failures: 0 },
            (Admit::Probe, Outcome::Failure) => *s = open,
            (Admit::Probe, Outcome::Neutral) => {
                if matches!(*s, Inner::HalfOpen { .. }) {
                    *s = Inner::HalfOpen { probe_out: false };
                }
            }
            (Admit::Normal, Outcome::Success) => {
                if let Inner::Closed { failures } = &mut *s {
                    *failures = 0;
                }
            }
            (Admit::Normal, Outcome::Failure) => {
                if let Inner::Closed { failures } = &mut *s {
                    *failures += 1;
                    if *failures >= policy.failure_threshold.max(1) {
                        *s = open;
                    }
                }
            }
            (Admit::Normal, Outcome::Neutral) => {}
        }
    }

    /// While open: how long until a probe may go. Never changes the state.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match *self.lock() {
            Inner::Open { until } if now < until => Some(until - now),
            _ => None,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BreakerPolicy = BreakerPolicy {
        failure_threshold: 3,
        open_for: Duration::from_millis(100),
    };

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let b = Breaker::default();
        let t = Instant::now();
        for _ in 0..2 {
            b.record(Admit::Normal, Outcome::Failure, t, &P);
        }
        b.record(Admit::Normal, Outcome::Success, t, &P);
        for _ in 0..2 {
            b.record(Admit::Normal, Outcome::Failure, t, &P);
        }
        assert_eq!(
            b.state(t),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.record(Admit::Normal, Outcome::Failure, t, &P);
        assert_eq!(b.state(t), BreakerState::Open);
        let wait = b.admit(t + Duration::from_millis(40), &P).unwrap_err();
        assert_eq!(wait, Duration::from_millis(60));
    }

    #[test]
    fn half_open_lets_one_probe_and_its_outcome_decides() {
        let b = Breaker::default();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(Admit::Normal, Outcome::Failure, t, &P);
        }
        let later = t + Duration::from_millis(100);
        assert_eq!(b.admit(later, &P), Ok(Admit::Probe));
        assert!(b.admit(later, &P).is_err(), "only one probe at a time");
        b.record(Admit::Probe, Outcome::Failure, later, &P);
        assert_eq!(b.state(later), BreakerState::Open);

        let later = later + Duration::from_millis(100);
        assert_eq!(b.admit(later, &P), Ok(Admit::Probe));
        b.record(Admit::Probe, Outcome::Neutral, later, &P);
        assert_eq!(
            b.admit(later, &P),
            Ok(Admit::Probe),
            "a neutral end frees the probe slot"
        );
        b.record(Admit::Probe, Outcome::Success, later, &P);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert_eq!(b.admit(later, &P), Ok(Admit::Normal));
    }

    #[test]
    fn late_normal_outcomes_do_not_disturb_an_open_breaker() {
        let b = Breaker::default();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(Admit::Normal, Outcome::Failure, t, &P);
        }
        b.record(Admit::Normal, Outcome::Success, t, &P);
        assert_eq!(b.state(t), BreakerState::Open);
    }

    // ----- on paused time, at each edge -------------------------------------------

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A breaker opened now by `P.failure_threshold` failures.
    fn opened_now() -> Breaker {
        let b = Breaker::default();
        for _ in 0..P.failure_threshold {
            b.record(Admit::Normal, Outcome::Failure, Instant::now(), &P);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
        b
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_threshold_failure_and_not_one_before() {
        let b = Breaker::default();
        for _ in 1..P.failure_threshold {
            b.record(Admit::Normal, Outcome::Failure, Instant::now(), &P);
        }
        tokio::time::advance(ms(1_000)).await;
        assert_eq!(b.state(Instant::now()), BreakerState::Closed, "one short");
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Normal));
        assert_eq!(b.retry_after(Instant::now()), None);
        b.record(Admit::Normal, Outcome::Failure, Instant::now(), &P);
        assert_eq!(b.state(Instant::now()), BreakerState::Open, "the threshold");
    }

    #[tokio::test(start_paused = true)]
    async fn while_open_requests_are_told_how_long_until_the_probe() {
        let b = opened_now();
        // What the session turns into `circuit_open` with `retry_after_ms`.
        assert_eq!(b.admit(Instant::now(), &P), Err(P.open_for));
        assert_eq!(b.retry_after(Instant::now()), Some(P.open_for));
        tokio::time::advance(ms(40)).await;
        assert_eq!(b.admit(Instant::now(), &P), Err(ms(60)));
        assert_eq!(b.retry_after(Instant::now()), Some(ms(60)));
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_exactly_at_open_for_and_lets_one_probe_through() {
        let b = opened_now();
        tokio::time::advance(P.open_for - ms(1)).await;
        assert_eq!(b.state(Instant::now()), BreakerState::Open, "1 ms before");
        assert_eq!(b.retry_after(Instant::now()), Some(ms(1)));
        assert_eq!(b.admit(Instant::now(), &P), Err(ms(1)));
        tokio::time::advance(ms(1)).await;
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::HalfOpen,
            "at open_for"
        );
        assert_eq!(b.retry_after(Instant::now()), None);
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe));
        // While the probe is out, everyone else waits (at most a second).
        for _ in 0..3 {
            assert_eq!(b.admit(Instant::now(), &P), Err(P.open_for.min(ms(1_000))));
        }
        tokio::time::advance(ms(10_000)).await;
        assert!(
            b.admit(Instant::now(), &P).is_err(),
            "however long it takes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_success_closes_and_counts_failures_afresh() {
        let b = opened_now();
        tokio::time::advance(P.open_for).await;
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe));
        b.record(Admit::Probe, Outcome::Success, Instant::now(), &P);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Normal));
        for _ in 1..P.failure_threshold {
            b.record(Admit::Normal, Outcome::Failure, Instant::now(), &P);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Closed, "from zero");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_failure_reopens_for_open_for_from_its_end() {
        let b = opened_now();
        tokio::time::advance(P.open_for).await;
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe));
        tokio::time::advance(ms(30)).await; // the probe takes 30 ms
        b.record(Admit::Probe, Outcome::Failure, Instant::now(), &P);
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
        assert_eq!(b.admit(Instant::now(), &P), Err(P.open_for));
        tokio::time::advance(P.open_for - ms(1)).await;
        assert_eq!(b.admit(Instant::now(), &P), Err(ms(1)), "1 ms before");
        tokio::time::advance(ms(1)).await;
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe), "at open_for");
    }

    #[tokio::test(start_paused = true)]
    async fn a_neutral_probe_frees_the_slot_without_deciding() {
        let b = opened_now();
        tokio::time::advance(P.open_for).await;
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe));
        assert!(b.admit(Instant::now(), &P).is_err());
        b.record(Admit::Probe, Outcome::Neutral, Instant::now(), &P);
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen, "undecided");
        assert_eq!(b.admit(Instant::now(), &P), Ok(Admit::Probe), "slot free");
        assert!(b.admit(Instant::now(), &P).is_err(), "and taken again");
    }
}
