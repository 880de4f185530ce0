//! Stable error codes.
//!
//! These strings are public API: clients switch on them, workers send them.
//! Never rename one; add new ones instead.

/// The client sent something that is not a valid message (bad JSON, no `type`).
pub const BAD_REQUEST: &str = "bad_request";
/// No handler for this message type (on the route or at the worker).
pub const UNKNOWN_TYPE: &str = "unknown_type";
/// The message exceeds the route's size limit.
pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
/// Too many messages; `retry_after_ms` says when to try again.
pub const RATE_LIMITED: &str = "rate_limited";
/// The route's circuit breaker is open; `retry_after_ms` says when it may close.
pub const CIRCUIT_OPEN: &str = "circuit_open";
/// No live worker serves the route's service.
pub const NO_WORKERS: &str = "no_workers";
/// The request's deadline passed before its final reply.
pub const TIMEOUT: &str = "timeout";
/// The worker failed: it reported an error, sent an invalid reply, or was lost
/// while the request was in flight.
pub const WORKER_ERROR: &str = "worker_error";
/// Too many requests in flight on this connection, or the router is saturated.
pub const OVERLOADED: &str = "overloaded";
/// Missing or invalid credentials.
pub const UNAUTHORIZED: &str = "unauthorized";
/// The request was cancelled (by the client's `cancel`, or because its
/// connection closed). Workers answer a `cancel` with this code.
pub const CANCELLED: &str = "cancelled";
/// A bug or resource failure inside the router.
pub const INTERNAL: &str = "internal";
/// A `resume` could not be served; `error.reason` says why (`unknown_session`,
/// `expired`, `bad_token`, `gap`, `attached`, `overflow`). The connection goes
/// on as the fresh session of its `welcome`.
pub const RESUME_FAILED: &str = "resume_failed";

/// Every code the router itself uses (others come from workers).
pub const ALL: [&str; 13] = [
    BAD_REQUEST,
    UNKNOWN_TYPE,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    CIRCUIT_OPEN,
    NO_WORKERS,
    TIMEOUT,
    WORKER_ERROR,
    OVERLOADED,
    UNAUTHORIZED,
    CANCELLED,
    INTERNAL,
    RESUME_FAILED,
];

/// Whether `code` is a well-formed error code: 1 to 64 characters of
/// lowercase ASCII letters, digits and `_`, starting with a letter.
pub fn is_valid_code(code: &str) -> bool {
    let bytes = code.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_validation() {
        for (code, ok) in [
            ("timeout", true),
            ("worker_error", true),
            ("e2", true),
            ("", false),
            ("Timeout", false),
            ("2fast", false),
            ("with space", false),
            ("dash-ed", false),
        ] {
            assert_eq!(is_valid_code(code), ok, "{code:?}");
        }
        assert!(!is_valid_code(&"a".repeat(65)));
    }
}
