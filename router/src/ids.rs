//! Identifiers: correlation ids for requests, session ids for connections.
//!
//! Both are ULIDs: 48 bits of milliseconds then 80 random bits, rendered as
//! 26 Crockford base-32 characters. They sort by creation time and are unique
//! across routers without coordination, so logs of several routers and of the
//! workers can be joined and ordered on them.

use std::fmt;

/// A router correlation id (one per client request).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(pub String);

/// A connection (session) id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub String);

impl Cid {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string())
    }
}

impl ConnId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string())
    }
}

impl Default for Cid {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for ConnId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_time_sortable() {
        let a = Cid::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = Cid::new();
        assert_ne!(a, b);
        assert!(a < b, "{a} should sort before {b}");
        assert_eq!(a.0.len(), 26);
    }
}
