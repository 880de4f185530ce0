//! Errors of the SDK: what a handler returns when a request fails
//! ([`HandlerError`]), why a worker stopped ([`WorkerError`]), why a message
//! could not be queued ([`SendError`]) and what is wrong with a configuration
//! ([`ConfigError`]).

use bridge_proto::codes;

/// The failure of one request, sent to the router as a terminal `error`
/// and passed on to the client as `{"error": {"code", "message"}}`.
///
/// `code` is a stable snake_case string the client can switch on (see
/// [`bridge_proto::codes`] for the shared ones; workers may add their own).
/// A code that is not well-formed is replaced by `worker_error` when sent.
/// `retryable` tells the router another attempt on another worker may succeed;
/// `retry_after_ms` tells the client when to try again (e.g. with
/// `overloaded`). The message must not contain secrets or payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// Stable snake_case error code.
    pub code: String,
    /// Human-readable sentence for the client.
    pub message: String,
    /// Whether another attempt (on another worker) might succeed.
    pub retryable: bool,
    /// When the client may try again, if the worker knows.
    pub retry_after_ms: Option<u64>,
}

impl HandlerError {
    /// A non-retryable error with a custom code.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
            retry_after_ms: None,
        }
    }

    /// Marks the error as retryable (or not).
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Tells the client when it may try again.
    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after_ms = Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The client sent data this handler cannot use (`bad_request`).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(codes::BAD_REQUEST, message)
    }

    /// The handler itself failed (`worker_error`).
    pub fn worker_error(message: impl Into<String>) -> Self {
        Self::new(codes::WORKER_ERROR, message)
    }

    /// A failure that another attempt may not hit (`worker_error`, retryable).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::worker_error(message).with_retryable(true)
    }

    /// The worker is too busy for this request (`overloaded`, retryable).
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(codes::OVERLOADED, message).with_retryable(true)
    }

    /// The caller is not allowed to do this (`unauthorized`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(codes::UNAUTHORIZED, message)
    }

    /// The work was cancelled (`cancelled`).
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(codes::CANCELLED, message)
    }

    /// The request's deadline passed (`timeout`).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(codes::TIMEOUT, message)
    }

    /// No handler for this message type (`unknown_type`). The type is
    /// quoted in backticks, as the router and the Python SDK quote it.
    pub fn unknown_type(msg_type: &str) -> Self {
        Self::new(
            codes::UNKNOWN_TYPE,
            format!("this worker has no handler for message type `{msg_type}`"),
        )
    }
}

impl From<serde_json::Error> for HandlerError {
    /// Most JSON errors inside a handler come from reading the request's
    /// `data` into a typed struct, which is the client's fault.
    fn from(e: serde_json::Error) -> Self {
        Self::bad_request(format!("invalid data: {e}"))
    }
}

impl From<SendError> for HandlerError {
    /// A handler that gives up because a message could not be sent fails its
    /// request: `payload_too_large` for a message over the router's frame
    /// limit (another attempt would fail the same way), otherwise a
    /// retryable `worker_error`.
    fn from(e: SendError) -> Self {
        match e {
            SendError::TooLarge { .. } => Self::new(codes::PAYLOAD_TOO_LARGE, e.to_string()),
            SendError::Stopped | SendError::NotConnected => Self::transient(e.to_string()),
        }
    }
}

/// A message could not be handed to the worker's socket task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The worker has stopped (or was never run); nothing will be sent.
    #[error("the worker has stopped")]
    Stopped,
    /// The encoded message is bigger than the largest frame the router
    /// accepts (`max_frame_bytes` of its welcome); it was not sent, since
    /// the router would close the connection on it.
    #[error("message of {size} bytes exceeds the router's frame limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded message.
        size: usize,
        /// The router's limit.
        limit: u64,
    },
    /// No router session was registered when the message reached the
    /// socket, so it was dropped (only reported to senders that wait for
    /// the socket, like [`Publisher::publish`](crate::Publisher::publish)).
    #[error("not registered with a router; the message was dropped")]
    NotConnected,
}

/// A worker configuration that cannot work; lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker configuration: {}", problems.join("; "))]
pub struct ConfigError {
    /// One sentence per problem.
    pub problems: Vec<String>,
}

/// Why [`Worker::run`](crate::Worker::run) returned an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The router said `goodbye{reconnect: false}` (wrong secret,
    /// unsupported version, ...), or answered in a protocol version this SDK
    /// does not speak: retrying will not help.
    #[error("the router at {endpoint} refused this worker: {reason}")]
    Rejected {
        /// The router endpoint that refused.
        endpoint: String,
        /// The router's reason.
        reason: String,
    },
    /// The router challenged the worker for the shared secret and the worker
    /// has none: set `BRIDGE_SECRET` (or [`WorkerBuilder::secret`](crate::WorkerBuilder::secret)).
    #[error("the router at {endpoint} requires a bridge secret: set BRIDGE_SECRET")]
    SecretRequired {
        /// The router endpoint that asked for it.
        endpoint: String,
    },
    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
    /// The socket task ended abnormally (a bug: it panicked or was aborted).
    #[error("the worker's socket task failed: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_set_code_and_retryable() {
        for (e, code, retryable) in [
            (HandlerError::bad_request("x"), "bad_request", false),
            (HandlerError::worker_error("x"), "worker_error", false),
            (HandlerError::transient("x"), "worker_error", true),
            (HandlerError::overloaded("x"), "overloaded", true),
            (HandlerError::cancelled("x"), "cancelled", false),
            (HandlerError::timeout("x"), "timeout", false),
            (HandlerError::unknown_type("nope"), "unknown_type", false),
            (HandlerError::unauthorized("x"), "unauthorized", false),
            (
                HandlerError::new("my_code", "x").with_retryable(true),
                "my_code",
                true,
            ),
        ] {
            assert_eq!(e.code, code);
            assert_eq!(e.retryable, retryable, "{code}");
        }
    }

    #[test]
    fn send_errors_fail_the_request_with_the_right_code() {
        let too_big: HandlerError = SendError::TooLarge {
            size: 20,
            limit: 10,
        }
        .into();
        assert_eq!(
            (too_big.code.as_str(), too_big.retryable),
            ("payload_too_large", false)
        );
        assert!(too_big.message.contains("20 bytes"), "{}", too_big.message);
        let stopped: HandlerError = SendError::Stopped.into();
        assert_eq!(
            (stopped.code.as_str(), stopped.retryable),
            ("worker_error", true)
        );
    }

    #[test]
    fn json_errors_are_bad_requests() {
        let err = serde_json::from_str::<u32>("\"x\"").unwrap_err();
        let e: HandlerError = err.into();
        assert_eq!(e.code, "bad_request");
        assert!(e.message.starts_with("invalid data"), "{}", e.message);
    }

    #[test]
    fn config_error_lists_problems() {
        let e = ConfigError {
            problems: vec!["a is bad".into(), "b is bad".into()],
        };
        assert_eq!(
            e.to_string(),
            "invalid worker configuration: a is bad; b is bad"
        );
    }
}
