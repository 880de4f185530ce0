//! Locking shared by the modules whose critical sections are single
//! operations on a map, a queue or a slot: none can leave its data half
//! updated, so a lock poisoned by a panicking thread is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering the data if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
