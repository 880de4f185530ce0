//! Rate limits (README, policies), on governor's GCRA limiters.
//!
//! - per connection: messages (text and binary frames) per second, with a burst;
//! - per client IP and route: new connections per minute, with a burst;
//! - optionally per route: messages per second across all its connections.
//!
//! Keyed limiters hold one entry per client IP; [`IpLimiter::evict_idle`]
//! drops entries that have refilled (they carry no information), so the map
//! does not grow with the number of distinct clients ever seen.
//!
//! The limiters read tokio's clock ([`TokioClock`]), like the broker and the
//! breaker, so tests on paused time check them exactly at their edges.

use std::{net::IpAddr, num::NonZeroU32, time::Duration};

use governor::{
    clock::Clock,
    middleware::NoOpMiddleware,
    state::{keyed::DashMapStateStore, InMemoryState, NotKeyed},
    Quota, RateLimiter,
};

/// tokio's monotonic clock for governor: time since the limiter was made.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;
type KeyedLimiter =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, TokioClock, NoOpMiddleware<Duration>>;

/// Rate-limit settings of a route (0 disables that limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// Sustained messages per second per connection.
    pub messages_per_second: u32,
    /// Messages a connection may send at once above the sustained rate.
    pub message_burst: u32,
    /// New connections per minute from one IP address to this route.
    pub connections_per_minute: u32,
    /// Connections one IP may open at once above the sustained rate.
    pub connection_burst: u32,
    /// Sustained messages per second over the whole route.
    pub route_messages_per_second: u32,
    /// Consecutive rejected messages after which a connection is closed (1008).
    pub close_after_rejections: u32,
}

impl RateLimitPolicy {
    pub const DEFAULT: RateLimitPolicy = RateLimitPolicy {
        messages_per_second: 100,
        message_burst: 200,
        connections_per_minute: 600,
        connection_burst: 200,
        route_messages_per_second: 0,
        close_after_rejections: 50,
    };
}

fn quota(per: Duration, count: u32, burst: u32) -> Option<Quota> {
    let count = NonZeroU32::new(count)?;
    let period = per / count.get();
    let burst = NonZeroU32::new(burst.max(1))?;
    Quota::with_period(period.max(Duration::from_nanos(1))).map(|q| q.allow_burst(burst))
}

/// A limiter over one stream of events (a connection's messages, a route's
/// messages). `None` inside means unlimited.
#[derive(Debug)]
pub struct Limiter(Option<DirectLimiter>);

impl Limiter {
    pub fn per_second(rate: u32, burst: u32) -> Self {
        Self(
            quota(Duration::from_secs(1), rate, burst)
                .map(|q| RateLimiter::direct_with_clock(q, TokioClock::default())),
        )
    }

    /// `Ok` if the event may happen now, else how long until it may.
    pub fn check(&self) -> Result<(), Duration> {
        let Some(l) = &self.0 else { return Ok(()) };
        l.check()
            .map_err(|not_until| not_until.wait_time_from(l.clock().now()))
    }
}

/// New connections per client IP.
#[derive(Debug)]
pub struct IpLimiter(Option<KeyedLimiter>);

impl IpLimiter {
    pub fn per_minute(rate: u32, burst: u32) -> Self {
        Self(
            quota(Duration::from_secs(60), rate, burst)
                .map(|q| RateLimiter::dashmap_with_clock(q, TokioClock::default())),
        )
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(l) = &self.0 else { return Ok(()) };
        l.check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(l.clock().now()))
    }

    /// Forgets addresses whose allowance has fully refilled.
    pub fn evict_idle(&self) {
        if let Some(l) = &self.0 {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    pub fn tracked(&self) -> usize {
        self.0.as_ref().map_or(0, |l| l.len())
    }
}

/// Rounds a wait up to whole milliseconds (never 0: "retry now" would be a lie).
pub fn retry_after_ms(wait: Duration) -> u64 {
    (wait.as_micros().div_ceil(1000) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refusal_with_a_wait_that_is_exact() {
        // 10/s: one slot every 100 ms, burst 3.
        let l = Limiter::per_second(10, 3);
        for _ in 0..3 {
            assert!(l.check().is_ok());
        }
        assert_eq!(l.check().unwrap_err(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(
            l.check().unwrap_err(),
            Duration::from_millis(1),
            "1 ms before the slot"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.check().is_ok(), "exactly at the slot");
        assert!(l.check().is_err(), "and only one");
        // A full refill after burst × period.
        tokio::time::advance(Duration::from_millis(300)).await;
        for _ in 0..3 {
            assert!(l.check().is_ok());
        }
        assert!(l.check().is_err());
        assert_eq!(retry_after_ms(Duration::from_micros(1)), 1);
    }

    #[test]
    fn zero_means_unlimited() {
        let l = Limiter::per_second(0, 0);
        for _ in 0..10_000 {
            assert!(l.check().is_ok());
        }
        let ip = IpLimiter::per_minute(0, 0);
        assert!(ip.check("127.0.0.1".parse().unwrap()).is_ok());
        assert_eq!(ip.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ips_are_limited_separately_and_idle_ones_evicted() {
        // 60/min: one slot a second, burst 2.
        let l = IpLimiter::per_minute(60, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(l.check(a).is_ok());
        assert!(l.check(a).is_ok());
        assert_eq!(l.check(a).unwrap_err(), Duration::from_secs(1));
        assert!(l.check(b).is_ok());
        assert_eq!(l.tracked(), 2);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(l.check(a).is_err(), "1 ms before the slot");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.check(a).is_ok(), "exactly at the slot");
        // Still tracked until both have fully refilled.
        l.evict_idle();
        assert_eq!(l.tracked(), 2);
        tokio::time::advance(Duration::from_secs(3)).await;
        l.evict_idle();
        assert_eq!(l.tracked(), 0);
    }
}
