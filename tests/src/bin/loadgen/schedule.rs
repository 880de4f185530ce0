//! The open loop's send schedule and the pacer that releases it.
//!
//! Slot `s` (0, 1, 2, …) of a run is due at `start + s / rate` and belongs to
//! connection `s mod n` as its message number `s / n`: one schedule for the
//! whole run, so the connections' sends interleave evenly. A message's
//! *intended* send time is its slot's time, whatever the timers did; latency
//! counted from it includes every delay the server caused (coordinated
//! omission corrected), and the load generator's own delay is measured apart
//! (`send_lag_us` in the summary).
//!
//! The [`Pacer`] hands slots to the connections through one [`Gate`] each.
//! It runs on its own OS thread ([`pace_on_thread`]): `std::thread::sleep`
//! wakes within microseconds of the slot, where tokio's timer wheel has a
//! 1 ms resolution and rounds every deadline up, which put about 1 ms of the
//! tool's own lag into every open-loop latency. [`pace_with_timer`] drives
//! the same pacer with tokio's timer: for tests under paused time, and
//! `--pacer timer` to show that lag.
//!
//! Times are integers: the rate is held in thousandths of a message per
//! second and slot times are exact nanoseconds, so a slot's time and "is it
//! due" always agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Nanoseconds per second times thousandths per message.
const NS_MILLI: u128 = 1_000_000_000_000;

/// When each message of a run is due.
#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    /// Messages per second of the whole run, in thousandths.
    rate_milli: u128,
    connections: u64,
    /// Slots due before the end of the schedule.
    slots: u64,
}

impl Schedule {
    /// `rate` messages per second over all `connections`, from `start` for
    /// every slot before `end`.
    pub fn new(
        start: Instant,
        rate: f64,
        connections: usize,
        end: Instant,
    ) -> Result<Self, String> {
        if !(rate.is_finite() && rate >= 0.001) {
            return Err(format!(
                "rate must be at least 0.001 per second, got {rate}"
            ));
        }
        if connections == 0 {
            return Err("a schedule needs at least one connection".into());
        }
        let rate_milli = (rate * 1000.0).round() as u128;
        let span = end.saturating_duration_since(start).as_nanos();
        // Slot s starts before `end` when floor(s * NS_MILLI / rate) < span,
        // i.e. s * NS_MILLI < span * rate.
        let slots = u64::try_from((span * rate_milli).div_ceil(NS_MILLI))
            .map_err(|_| "the schedule has more than 2^64 slots".to_owned())?;
        Ok(Self {
            start,
            rate_milli,
            connections: connections as u64,
            slots,
        })
    }

    /// Slots in the whole schedule.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// When slot `s` is due.
    pub fn slot_time(&self, s: u64) -> Instant {
        let ns = u128::from(s) * NS_MILLI / self.rate_milli;
        // Invariant: a slot before `end` lies within u64 nanoseconds
        // (584 years) of the start; later slots are never asked for.
        self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// How many slots are due at `now` (slot times `<= now`), at most all.
    pub fn due_by(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        let elapsed = now.duration_since(self.start).as_nanos();
        // floor(s * NS_MILLI / rate) <= elapsed  <=>  s * NS_MILLI < (elapsed + 1) * rate.
        let due = ((elapsed + 1) * self.rate_milli).div_ceil(NS_MILLI);
        u64::try_from(due).unwrap_or(u64::MAX).min(self.slots)
    }

    /// Of the first `slots` slots, how many belong to connection `conn`.
    pub fn slots_of(&self, conn: usize, slots: u64) -> u64 {
        (slots + self.connections - 1 - conn as u64) / self.connections
    }

    /// When message `k` of connection `conn` is due.
    pub fn message_time(&self, conn: usize, k: u64) -> Instant {
        self.slot_time(k * self.connections + conn as u64)
    }
}

/// How many of its messages one connection may send so far.
#[derive(Debug, Default)]
pub struct Gate {
    released: AtomicU64,
    wake: Notify,
}

impl Gate {
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Waits until more than `k` messages are released.
    pub async fn wait_beyond(&self, k: u64) {
        // `notify_one` keeps a permit when nobody waits, so a release
        // between the check and the wait is not lost.
        while self.released() <= k {
            self.wake.notified().await;
        }
    }

    fn release(&self, count: u64) {
        self.released.store(count, Ordering::Release);
        self.wake.notify_one();
    }
}

/// Opens each connection's gate as its slots come due.
#[derive(Debug)]
pub struct Pacer {
    schedule: Arc<Schedule>,
    gates: Arc<[Gate]>,
    released: u64,
}

impl Pacer {
    pub fn new(schedule: Arc<Schedule>, gates: Arc<[Gate]>) -> Self {
        assert_eq!(
            gates.len() as u64,
            schedule.connections,
            "one gate per connection"
        );
        Self {
            schedule,
            gates,
            released: 0,
        }
    }

    /// Releases every slot due at `now`; returns when the next one is due,
    /// or `None` once all are released.
    pub fn release(&mut self, now: Instant) -> Option<Instant> {
        let due = self.schedule.due_by(now);
        if due > self.released {
            let n = self.gates.len() as u64;
            if due - self.released >= n {
                for (i, gate) in self.gates.iter().enumerate() {
                    gate.release(self.schedule.slots_of(i, due));
                }
            } else {
                for s in self.released..due {
                    let i = (s % n) as usize;
                    self.gates[i].release(self.schedule.slots_of(i, due));
                }
            }
            self.released = due;
        }
        (self.released < self.schedule.slots).then(|| self.schedule.slot_time(self.released))
    }
}

/// Which clock wakes the pacer (`--pacer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PacerKind {
    /// A dedicated thread sleeping with the OS's high-resolution timers.
    Thread,
    /// tokio's timer (1 ms resolution: up to ~2 ms of the tool's own lag).
    Timer,
}

/// Runs the pacer with tokio's timer until every slot is released.
pub async fn pace_with_timer(mut pacer: Pacer) {
    while let Some(next) = pacer.release(Instant::now()) {
        tokio::time::sleep_until(next).await;
    }
}

/// Runs the pacer on its own thread until every slot is released.
pub fn pace_on_thread(mut pacer: Pacer) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("loadgen-pacer".into())
        .spawn(move || {
            // Linux delays a sleeper's wake-up by up to its timer slack
            // (50 µs by default) to batch wake-ups; 1 µs is what we want.
            // Without it the pacer still works, only less precisely.
            let _ = nix::sys::prctl::set_timerslack(1_000);
            while let Some(next) = pacer.release(Instant::now()) {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slots_fall_at_start_plus_s_over_rate() {
        let t0 = Instant::now();
        // 3 per second: slots at 0, 333 333 333 ns, 666 666 666 ns, 1 s, …
        let s = Schedule::new(t0, 3.0, 2, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(s.slots(), 6);
        assert_eq!(s.slot_time(0), t0);
        assert_eq!(s.slot_time(1), t0 + Duration::from_nanos(333_333_333));
        assert_eq!(s.slot_time(3), t0 + Duration::from_secs(1));
        // Connection 1 has the odd slots.
        assert_eq!(s.message_time(1, 0), s.slot_time(1));
        assert_eq!(s.message_time(1, 2), s.slot_time(5));
        assert_eq!(s.message_time(0, 2), s.slot_time(4));
    }

    #[test]
    fn a_slot_is_due_exactly_at_its_time() {
        let t0 = Instant::now();
        for rate in [1.0, 3.0, 7.5, 1000.0, 12_345.678] {
            let s = Schedule::new(t0, rate, 3, t0 + Duration::from_secs(3)).unwrap();
            for k in 0..s.slots().min(500) {
                let at = s.slot_time(k);
                assert_eq!(s.due_by(at), k + 1, "rate {rate}, slot {k}");
                if at > t0 {
                    let before = at - Duration::from_nanos(1);
                    assert_eq!(s.due_by(before), k, "rate {rate}, slot {k}");
                }
            }
        }
        let s = Schedule::new(t0 + ms(5), 10.0, 1, t0 + ms(500)).unwrap();
        assert_eq!(s.due_by(t0), 0, "nothing before the start");
        assert_eq!(s.due_by(t0 + Duration::from_secs(60)), s.slots(), "capped");
    }

    #[test]
    fn the_schedule_ends_before_its_end() {
        let t0 = Instant::now();
        let count = |rate, span_ms| {
            Schedule::new(t0, rate, 1, t0 + ms(span_ms))
                .unwrap()
                .slots()
        };
        assert_eq!(
            count(1000.0, 1000),
            1000,
            "slot 1000 is at the end, not before it"
        );
        assert_eq!(count(1000.0, 1001), 1001);
        assert_eq!(count(3.0, 1000), 3);
        assert_eq!(count(0.5, 4000), 2);
        assert_eq!(count(10.0, 0), 0);
        assert!(Schedule::new(t0, 0.0, 1, t0 + ms(1)).is_err());
        assert!(Schedule::new(t0, f64::NAN, 1, t0 + ms(1)).is_err());
        assert!(Schedule::new(t0, 1.0, 0, t0 + ms(1)).is_err());
    }

    #[test]
    fn each_connection_gets_every_nth_slot() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 100.0, 4, t0 + ms(100)).unwrap();
        for released in 0..=10u64 {
            let per_conn: Vec<u64> = (0..4).map(|i| s.slots_of(i, released)).collect();
            let expected: Vec<u64> = (0..4u64)
                .map(|i| (0..released).filter(|sl| sl % 4 == i).count() as u64)
                .collect();
            assert_eq!(per_conn, expected, "after {released} slots");
        }
    }

    #[test]
    fn the_pacer_releases_what_is_due_and_says_when_next() {
        let t0 = Instant::now();
        let schedule = Arc::new(Schedule::new(t0, 1000.0, 3, t0 + ms(10)).unwrap());
        let gates: Arc<[Gate]> = (0..3).map(|_| Gate::default()).collect();
        let mut pacer = Pacer::new(schedule, gates.clone());
        let released = || gates.iter().map(Gate::released).collect::<Vec<_>>();
        assert_eq!(pacer.release(t0), Some(t0 + ms(1)));
        assert_eq!(released(), [1, 0, 0]);
        // Late by 1.5 ms: slots 1 and 2 both go.
        assert_eq!(
            pacer.release(t0 + Duration::from_micros(2500)),
            Some(t0 + ms(3))
        );
        assert_eq!(released(), [1, 1, 1]);
        // Very late: everything due is released to every connection at once.
        assert_eq!(pacer.release(t0 + ms(8)), Some(t0 + ms(9)));
        assert_eq!(released(), [3, 3, 3]);
        assert_eq!(pacer.release(t0 + ms(9)), None);
        assert_eq!(released(), [4, 3, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_pacer_ends_at_the_last_slot_and_wakes_waiters() {
        let t0 = Instant::now();
        let schedule = Arc::new(Schedule::new(t0, 200.0, 2, t0 + ms(1000)).unwrap());
        let gates: Arc<[Gate]> = (0..2).map(|_| Gate::default()).collect();
        let pacer = tokio::spawn(pace_with_timer(Pacer::new(schedule.clone(), gates.clone())));
        // Connection 1's 100th message (slot 199) is the last one, at 995 ms.
        gates[1].wait_beyond(99).await;
        assert_eq!(Instant::now() - t0, ms(995));
        assert_eq!(gates[0].released(), 100);
        pacer.await.unwrap();
        assert_eq!(
            Instant::now() - t0,
            ms(995),
            "the pacer ends with its last slot"
        );
    }
}
