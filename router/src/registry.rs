//! The live route table: the routes file's routes plus, with dynamic
//! routing, routes that workers registered. Published whole on a `watch`
//! channel; readers (the upgrade handler, sessions) take `Arc` snapshots and
//! never hold a borrow across `.await`.
//!
//! Dynamic routing (`ENABLE_DYNAMIC_ROUTING=true`): a worker whose hello
//! names a service that is a path (starts with `/`) and that no file route
//! covers gets a route with that path as pattern and service, with the
//! file's default policies. The broker removes it once no worker has served it
//! for the liveness period. A file route with the same pattern always wins.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::routes::{Pattern, Route, RouteTable};

/// Default of `MAX_DYNAMIC_ROUTES`.
pub const DEFAULT_MAX_DYNAMIC: usize = 256;

struct Inner {
    file: RouteTable,
    dynamic: BTreeMap<String, Route>,
}

/// What a new routes file changed, by route pattern.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.modified.is_empty()
    }
}

pub struct RouteRegistry {
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<RouteTable>>,
    dynamic_enabled: bool,
    /// Most dynamic routes at once: workers cannot grow the table without
    /// bound.
    max_dynamic: usize,
}

/// The registry already holds its maximum of dynamic routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("at most {0} dynamic routes may be registered")]
pub struct DynamicRoutesFull(pub usize);

impl RouteRegistry {
    pub fn new(file: RouteTable, dynamic_enabled: bool) -> Self {
        let (tx, _) = watch::channel(Arc::new(file.clone()));
        Self {
            inner: Mutex::new(Inner {
                file,
                dynamic: BTreeMap::new(),
            }),
            tx,
            dynamic_enabled,
            max_dynamic: DEFAULT_MAX_DYNAMIC,
        }
    }

    /// Sets the most dynamic routes held at once.
    pub fn with_max_dynamic(mut self, max: usize) -> Self {
        self.max_dynamic = max;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section replaces whole values: a poisoned lock still
        // holds a consistent state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<RouteTable> {
        self.tx.borrow().clone()
    }

    fn publish(&self, inner: &Inner) {
        let mut routes: Vec<Route> = inner.file.routes().iter().map(|r| (**r).clone()).collect();
        routes.extend(
            inner
                .dynamic
                .values()
                .filter(|d| inner.file.get(&d.path).is_none())
                .cloned(),
        );
        let table = RouteTable::with_defaults(routes, inner.file.defaults().clone());
        self.tx.send_replace(Arc::new(table));
    }

    /// Installs a new routes file; returns what changed.
    pub fn replace_file(&self, file: RouteTable) -> Changes {
        let mut inner = self.lock();
        let old = &inner.file;
        let mut changes = Changes::default();
        for r in file.routes() {
            match old.get(&r.path) {
                None => changes.added.push(r.path.clone()),
                Some(o) if **o != **r => changes.modified.push(r.path.clone()),
                Some(_) => {}
            }
        }
        for r in old.routes() {
            if file.get(&r.path).is_none() {
                changes.removed.push(r.path.clone());
            }
        }
        inner.file = file;
        self.publish(&inner);
        changes
    }

    /// A worker serves `service`: registers it as a route if it is a path
    /// that no route covers. Returns whether a route was added.
    pub fn add_dynamic(&self, service: &str) -> Result<bool, DynamicRoutesFull> {
        if !self.dynamic_enabled || !service.starts_with('/') {
            return Ok(false);
        }
        let mut inner = self.lock();
        if inner.dynamic.contains_key(service) || inner.file.get(service).is_some() {
            return Ok(false);
        }
        if Pattern::parse(service).is_err() {
            return Ok(false);
        }
        if inner.dynamic.len() >= self.max_dynamic {
            warn!(
                route = service,
                max = self.max_dynamic,
                "dynamic route refused: the limit is reached"
            );
            return Err(DynamicRoutesFull(self.max_dynamic));
        }
        let mut route = inner.file.defaults().route(service, service);
        route.dynamic = true;
        inner.dynamic.insert(service.to_owned(), route);
        info!(route = service, "dynamic route registered by a worker");
        self.publish(&inner);
        Ok(true)
    }

    /// The last worker of `service` is gone: drops its dynamic route, if any.
    pub fn remove_dynamic(&self, service: &str) -> bool {
        let mut inner = self.lock();
        if inner.dynamic.remove(service).is_none() {
            return false;
        }
        info!(
            route = service,
            "dynamic route removed: its last worker is gone"
        );
        self.publish(&inner);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_routes;

    #[test]
    fn changes_are_reported_by_pattern() {
        let reg = RouteRegistry::new(
            parse_routes(r#"{"routes":[{"path":"/a"},{"path":"/b"}]}"#).unwrap(),
            false,
        );
        let changes = reg.replace_file(
            parse_routes(r#"{"routes":[{"path":"/a","maxInFlight":3},{"path":"/c"}]}"#).unwrap(),
        );
        assert_eq!(
            changes,
            Changes {
                added: vec!["/c".into()],
                removed: vec!["/b".into()],
                modified: vec!["/a".into()],
            }
        );
        assert!(reg.current().get("/b").is_none());
    }

    #[test]
    fn dynamic_routes_come_and_go_and_never_shadow_the_file() {
        let file = || parse_routes(r#"{"routes":[{"path":"/ws"}]}"#).unwrap();
        let off = RouteRegistry::new(file(), false);
        assert_eq!(off.add_dynamic("/ws/new"), Ok(false));
        let reg = RouteRegistry::new(file(), true).with_max_dynamic(2);
        let mut rx = reg.subscribe();
        assert_eq!(reg.add_dynamic("chat"), Ok(false), "not a path");
        assert_eq!(reg.add_dynamic("/ws"), Ok(false), "the file has it");
        assert_eq!(reg.add_dynamic("/ws/new"), Ok(true));
        assert_eq!(reg.add_dynamic("/ws/other"), Ok(true));
        assert_eq!(reg.add_dynamic("/ws/third"), Err(DynamicRoutesFull(2)));
        assert!(reg.remove_dynamic("/ws/other"));
        assert!(rx.has_changed().unwrap());
        let table = rx.borrow_and_update().clone();
        let route = table.find("/ws/new").unwrap().route;
        assert!(route.dynamic);
        assert_eq!(route.service, "/ws/new");
        assert!(reg.remove_dynamic("/ws/new"));
        assert!(reg.current().find("/ws/new").is_none());
        assert!(!reg.remove_dynamic("/ws/new"));
    }
}
