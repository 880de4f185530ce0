//! Live policy state per route: the breaker, the connection count and the
//! shared rate limiters. Keyed by route pattern, so it outlives reloads of
//! the routes file; limiters are rebuilt when their policy changes.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use dashmap::DashMap;

use super::{
    breaker::Breaker,
    ratelimit::{IpLimiter, Limiter, RateLimitPolicy},
};

/// Rate limiters shared by every connection of a route.
#[derive(Debug)]
pub struct RouteLimits {
    policy: RateLimitPolicy,
    /// New connections per client IP.
    pub connections: IpLimiter,
    /// Messages over the whole route.
    pub messages: Limiter,
}

impl RouteLimits {
    fn new(policy: RateLimitPolicy) -> Self {
        Self {
            policy,
            connections: IpLimiter::per_minute(
                policy.connections_per_minute,
                policy.connection_burst,
            ),
            messages: Limiter::per_second(
                policy.route_messages_per_second,
                policy.route_messages_per_second,
            ),
        }
    }
}

/// The fields of a policy the route's shared limiters are built from.
fn shared_fields(p: &RateLimitPolicy) -> (u32, u32, u32) {
    (
        p.connections_per_minute,
        p.connection_burst,
        p.route_messages_per_second,
    )
}

#[derive(Debug)]
pub struct RouteRuntime {
    pub breaker: Arc<Breaker>,
    connections: AtomicUsize,
    limits: Mutex<Arc<RouteLimits>>,
}

impl RouteRuntime {
    fn new() -> Self {
        Self {
            breaker: Arc::new(Breaker::default()),
            connections: AtomicUsize::new(0),
            limits: Mutex::new(Arc::new(RouteLimits::new(RateLimitPolicy::DEFAULT))),
        }
    }

    /// The route's limiters for this policy, rebuilt only if a field they
    /// use changed (a reload that changes per-connection limits keeps the
    /// route's per-IP and route-wide state).
    pub fn limits(&self, policy: &RateLimitPolicy) -> Arc<RouteLimits> {
        // One pointer swap under the lock: poisoning cannot leave it half-done.
        let mut slot = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if shared_fields(&slot.policy) != shared_fields(policy) {
            *slot = Arc::new(RouteLimits::new(*policy));
        }
        slot.clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Takes a connection slot if fewer than `max` are taken.
    pub fn try_connect(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }
}

/// A connection counted against its route's limit; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<RouteRuntime>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// All routes' runtime state.
#[derive(Debug, Default)]
pub struct Runtimes(DashMap<String, Arc<RouteRuntime>>);

impl Runtimes {
    pub fn get(&self, route: &str) -> Arc<RouteRuntime> {
        if let Some(r) = self.0.get(route) {
            return r.clone();
        }
        self.0
            .entry(route.to_owned())
            .or_insert_with(|| Arc::new(RouteRuntime::new()))
            .clone()
    }

    pub fn peek(&self, route: &str) -> Option<Arc<RouteRuntime>> {
        self.0.get(route).map(|r| r.clone())
    }

    /// Forgets the state of routes that are gone (`keep` says which stay)
    /// once no connection uses it, so route churn cannot grow the map.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        self.0.retain(|route, r| keep(route) || r.connections() > 0);
    }

    /// Drops idle per-IP entries of every route (run periodically).
    pub fn evict_idle(&self) {
        for r in self.0.iter() {
            let limits = r.limits.lock().unwrap_or_else(|p| p.into_inner()).clone();
            limits.connections.evict_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_and_freed() {
        let rt = Runtimes::default();
        let r = rt.get("/ws");
        let a = r.try_connect(2).unwrap();
        let _b = r.try_connect(2).unwrap();
        assert!(r.try_connect(2).is_none());
        drop(a);
        assert_eq!(r.connections(), 1);
        assert!(r.try_connect(2).is_some());
        assert!(Arc::ptr_eq(&rt.get("/ws").breaker, &r.breaker));
    }

    #[test]
    fn gone_routes_are_forgotten_once_unused() {
        let rt = Runtimes::default();
        let slot = rt.get("/gone").try_connect(1).unwrap();
        rt.get("/kept");
        rt.retain_routes(|r| r == "/kept");
        assert!(rt.peek("/gone").is_some(), "still has a connection");
        drop(slot);
        rt.retain_routes(|r| r == "/kept");
        assert!(rt.peek("/gone").is_none());
        assert!(rt.peek("/kept").is_some());
    }

    #[test]
    fn limits_follow_the_policy() {
        let r = Runtimes::default().get("/ws");
        let p = RateLimitPolicy::DEFAULT;
        let a = r.limits(&p);
        assert!(Arc::ptr_eq(&a, &r.limits(&p)));
        let per_connection_only = RateLimitPolicy {
            messages_per_second: 1,
            message_burst: 1,
            close_after_rejections: 1,
            ..p
        };
        assert!(
            Arc::ptr_eq(&a, &r.limits(&per_connection_only)),
            "per-connection fields do not reset the route's shared limiters"
        );
        let changed = RateLimitPolicy {
            connection_burst: 1,
            ..p
        };
        assert!(!Arc::ptr_eq(&a, &r.limits(&changed)));
    }
}
