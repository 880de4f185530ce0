//! Exponential backoff with jitter, for reconnects and hello resends.
//!
//! Jitter keeps a fleet of workers that lost the same router from knocking
//! on the new one in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `initial` up to `max`, each drawn uniformly from
/// the upper half of the current step (`[step/2, step]`, "equal jitter").
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The next delay; advances the sequence.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let jitter_ns = rng.random_range(0..=half.as_nanos() as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Back to the first step (after a successful registration).
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_jitter_bounds() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(5000));
        let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for (i, step) in steps.into_iter().enumerate() {
            let d = b.next_delay();
            assert!(
                d >= ms(step) / 2 && d <= ms(step),
                "attempt {i}: {d:?} not in [{}, {step}] ms",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "20 draws gave one value: no jitter");
    }
}
