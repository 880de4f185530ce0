//! The measured window, what each connection saw, and the percentiles of the
//! summary.

use serde_json::{json, Value};
use tokio::time::Instant;

/// The measured window `[from, to)`, shared by every connection (load
/// starts before it, for the warmup).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub from: Instant,
    pub to: Instant,
}

impl Clock {
    pub fn measuring(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }
}

/// What one connection saw. Durations in nanoseconds.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Round trips counted in the measured window. Closed loop: replies that
    /// arrived in the window, from the write. Open loop: requests whose slot
    /// in the schedule lies in the window, from that slot (so a stalled
    /// server shows as latency, not as fewer requests).
    pub latencies: Vec<u64>,
    /// Open loop: the same round trips from the start of the write.
    pub service: Vec<u64>,
    /// Open loop: how late each of those requests was written after its slot
    /// (the load generator's own lag, plus waiting for a write the server
    /// did not take).
    pub lag: Vec<u64>,
    /// Open loop: requests the schedule gave this connection.
    pub scheduled: u64,
    pub sent: u64,
    /// Failed requests (an error reply, a wrong echo, no reply within the
    /// reply timeout, left unanswered by a connection that failed) and failed
    /// connections (closed by the server, a read or write error, an
    /// unexpected frame) that had no request to fail.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Open loop: requests still waiting for their reply when the wait after
    /// the window ended, sent less than the reply timeout before. Not errors.
    pub in_flight_at_end: u64,
}

impl ConnStats {
    /// Counts `n` errors for one cause.
    pub fn errors(&mut self, n: u64, what: impl Into<String>) {
        self.errors += n;
        if n > 0 && self.first_error.is_none() {
            self.first_error = Some(what.into());
        }
    }

    pub fn error(&mut self, what: impl Into<String>) {
        self.errors(1, what);
    }

    /// Adds another connection's outcome to this one.
    pub fn merge(&mut self, other: ConnStats) {
        self.latencies.extend(other.latencies);
        self.service.extend(other.service);
        self.lag.extend(other.lag);
        self.scheduled += other.scheduled;
        self.sent += other.sent;
        self.in_flight_at_end += other.in_flight_at_end;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50/p90/p99/p99.9/max/mean in microseconds (nearest rank on the sorted samples).
pub fn percentiles(samples: &mut [u64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        round3(samples[rank - 1] as f64 / 1000.0)
    };
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0;
    json!({
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round3(samples[n - 1] as f64 / 1000.0),
        "mean": round3(mean),
        "samples": n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&mut s);
        assert_eq!(p["p50"], 500.0);
        assert_eq!(p["p99"], 990.0);
        assert_eq!(p["p999"], 999.0);
        assert_eq!(p["max"], 1000.0);
        assert_eq!(percentiles(&mut []), Value::Null);
    }

    #[test]
    fn merged_stats_add_up_and_keep_the_first_error() {
        let mut all = ConnStats::default();
        let mut a = ConnStats {
            latencies: vec![1, 2],
            scheduled: 3,
            sent: 3,
            in_flight_at_end: 1,
            ..ConnStats::default()
        };
        a.errors(2, "first");
        let mut b = ConnStats {
            latencies: vec![3],
            scheduled: 1,
            sent: 1,
            ..ConnStats::default()
        };
        b.error("second");
        all.merge(a);
        all.merge(b);
        all.merge(ConnStats::default());
        assert_eq!(all.latencies, [1, 2, 3]);
        assert_eq!((all.scheduled, all.sent, all.in_flight_at_end), (4, 4, 1));
        assert_eq!(all.errors, 3);
        assert_eq!(all.first_error.as_deref(), Some("first"));
    }
}
