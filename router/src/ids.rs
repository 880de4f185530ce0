//! Identifiers: correlation ids for requests, session ids for connections.
//!
//! Both are ULIDs: 48 bits of milliseconds then 80 random bits, rendered as
//! 26 Crockford base-32 characters. They sort by creation time and are unique
//! across routers without coordination, so logs of several routers and of the
//! workers can be joined and ordered on them.

use std::{fmt, sync::Arc};

/// The length of a ULID's text.
const ULID_LEN: usize = ulid::ULID_LEN;

/// A router correlation id (one per client request), its 26 characters
/// kept inline: a request's id is copied into the in-flight map, the
/// request table and the deadline queue, and a copy allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid([u8; ULID_LEN]);

/// A connection (session) id. Shared text: it goes with every command
/// and request of its session, and a clone is a count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub Arc<str>);

impl Cid {
    pub fn new() -> Self {
        let mut text = [0u8; ULID_LEN];
        ulid::Ulid::new().array_to_str(&mut text);
        Self(text)
    }

    /// The id a worker names in a message. The router hands out only
    /// ULIDs, so text of any other length is no id of ours: `None`.
    pub fn parse(text: &str) -> Option<Self> {
        text.as_bytes().try_into().ok().map(Self)
    }

    pub fn as_str(&self) -> &str {
        // Built from a `str` (`new`'s ASCII or `parse`'s whole text): valid.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// A correlation id goes out (to clients) as its text.
impl serde::Serialize for Cid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({})", self.as_str())
    }
}

impl ConnId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new().to_string().into())
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
        f.write_str(self.as_str())
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
        assert_eq!(a.as_str().len(), 26);
        assert_eq!(ulid::Ulid::from_string(a.as_str()).map(|_| ()), Ok(()));
    }

    #[test]
    fn a_cid_parses_back_and_other_text_is_none() {
        let a = Cid::new();
        assert_eq!(Cid::parse(a.as_str()), Some(a));
        for other in ["", "short", "01ARZ3NDEKTSV4RRFFQ69G5FAVX"] {
            assert_eq!(Cid::parse(other), None, "{other:?}");
        }
        // Any 26 bytes of text are kept as they are (a worker's typo is
        // then simply a request nobody holds).
        let odd = "é".repeat(13);
        assert_eq!(Cid::parse(&odd).map(|c| c.to_string()), Some(odd));
    }
}
