"""Errors of the SDK: the failure of one request (:class:`HandlerError`), why
a worker stopped (:class:`WorkerRejected`), a worker that no longer sends
(:class:`WorkerStopped`) and an unusable configuration (:class:`ConfigError`)."""

from __future__ import annotations

from . import codes


class HandlerError(Exception):
    """The failure of one request, raised by a handler.

    The SDK sends it as the request's terminal ``error`` and the router passes
    ``code`` and ``message`` on to the client. ``code`` is a stable snake_case
    string the client can switch on (see :mod:`bridge_worker.codes`; workers
    may add their own); a malformed code is replaced by ``worker_error``.
    ``retryable`` tells the router another attempt on another worker may succeed;
    ``retry_after_ms`` tells the client when to try again (e.g. with ``overloaded``).

    Any other exception raised by a handler becomes ``worker_error`` with a
    generic message (the exception itself is logged, never sent: it may hold
    internals the client must not see).
    """

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return (
            f"HandlerError({self.code!r}, {self.message!r}, retryable={self.retryable}, "
            f"retry_after_ms={self.retry_after_ms})"
        )

    @classmethod
    def bad_request(cls, message: str) -> HandlerError:
        """The client sent data this handler cannot use."""
        return cls(codes.BAD_REQUEST, message)

    @classmethod
    def worker_error(cls, message: str) -> HandlerError:
        """The handler itself failed."""
        return cls(codes.WORKER_ERROR, message)

    @classmethod
    def transient(cls, message: str) -> HandlerError:
        """A failure that another attempt may not hit (``worker_error``, retryable)."""
        return cls(codes.WORKER_ERROR, message, retryable=True)

    @classmethod
    def overloaded(cls, message: str) -> HandlerError:
        """The worker is too busy for this request (retryable)."""
        return cls(codes.OVERLOADED, message, retryable=True)

    @classmethod
    def unauthorized(cls, message: str) -> HandlerError:
        """The caller is not allowed to do this."""
        return cls(codes.UNAUTHORIZED, message)

    @classmethod
    def cancelled(cls, message: str) -> HandlerError:
        """The work was cancelled."""
        return cls(codes.CANCELLED, message)

    @classmethod
    def timeout(cls, message: str) -> HandlerError:
        """The request's deadline passed."""
        return cls(codes.TIMEOUT, message)

    @classmethod
    def unknown_type(cls, msg_type: str) -> HandlerError:
        """No handler for this message type."""
        return cls(codes.UNKNOWN_TYPE, f"this worker has no handler for message type {msg_type!r}")


class WorkerRejected(Exception):
    """The router said ``goodbye{reconnect: false}``: retrying will not help
    (wrong secret, unsupported protocol version, bad hello)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"the router at {endpoint} refused this worker: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class WorkerStopped(RuntimeError):
    """The worker is not running (never started, or stopped): nothing can be sent."""

    def __init__(self) -> None:
        super().__init__("the worker is not running")


class ConfigError(ValueError):
    """A worker configuration that cannot work; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid worker configuration: " + "; ".join(problems))
        self.problems = problems
