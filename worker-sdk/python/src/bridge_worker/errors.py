"""Errors of the SDK: the failure of one request (:class:`HandlerError`), a
message over the router's frame limit (:class:`PayloadTooLarge`), why a worker
stopped (:class:`WorkerRejected`, :class:`SecretRequired`), a worker that no
longer sends (:class:`WorkerStopped`), a publisher without a router session
(:class:`NotConnected`) and an unusable configuration (:class:`ConfigError`)."""

from __future__ import annotations

from collections.abc import Iterable

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
        """No handler for this message type (quoted in backticks, as the router and the Rust SDK quote it)."""
        return cls(codes.UNKNOWN_TYPE, f"this worker has no handler for message type `{msg_type}`")


# The unknown_type answers of the worker, word for word those of the Rust SDK
# (worker-sdk/src/handler.rs): a client gets the same text from either.


def no_request_handler(msg_type: str, requests: Iterable[str], events: Iterable[str]) -> HandlerError:
    """The ``unknown_type`` error for a request of ``msg_type`` without a request handler."""
    hint = "is handled as a fire-and-forget message (send it without an `id`)" if msg_type in events else None
    return _unknown(msg_type, "requests", requests, hint)


def no_event_handler(msg_type: str, requests: Iterable[str], events: Iterable[str]) -> HandlerError:
    """The ``unknown_type`` error for a fire-and-forget message of ``msg_type`` without an event handler."""
    hint = "is handled as a request (send it with an `id`)" if msg_type in requests else None
    return _unknown(msg_type, "fire-and-forget messages", events, hint)


def no_binary_handler() -> HandlerError:
    """The ``unknown_type`` error for a binary frame on a worker without a binary handler."""
    return HandlerError(codes.UNKNOWN_TYPE, "this worker has no handler for binary frames")


def _unknown(msg_type: str, what: str, handled: Iterable[str], hint: str | None) -> HandlerError:
    listed = ", ".join(f"`{t}`" for t in sorted(set(handled))) or "none"
    message = f"this worker has no handler for {what} of type `{msg_type}`; {what} it handles: {listed}"
    if hint is not None:
        message += f"; `{msg_type}` {hint}"
    return HandlerError(codes.UNKNOWN_TYPE, message)


class PayloadTooLarge(HandlerError):
    """A message bigger than the largest frame the router accepts
    (``max_frame_bytes`` of its welcome); it was not sent, since the router
    would close the connection on it.

    Raised by the worker's operations (``push``, ``publish``, ``send_raw``,
    ...) and by :meth:`Context.send_partial` (after the SDK has answered the
    request ``payload_too_large``). As a :class:`HandlerError` it fails the
    request of a handler that does not catch it, with code ``payload_too_large``.
    """

    def __init__(self, kind: str, size: int, limit: int) -> None:
        super().__init__(
            codes.PAYLOAD_TOO_LARGE, f"{kind} of {size} bytes exceeds the router's frame limit of {limit} bytes"
        )
        self.kind = kind
        self.size = size
        self.limit = limit


class WorkerRejected(Exception):
    """The router said ``goodbye{reconnect: false}``: retrying will not help
    (wrong secret, unsupported protocol version, bad hello)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"the router at {endpoint} refused this worker: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class SecretRequired(WorkerRejected):
    """The router challenged the worker for the shared secret and the worker
    has none: set ``BRIDGE_SECRET`` (or the ``secret`` setting)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint, "the router requires a bridge secret: set BRIDGE_SECRET")
        self.args = (f"the router at {endpoint} requires a bridge secret: set BRIDGE_SECRET",)


class NotConnected(ConnectionError):
    """A :class:`~bridge_worker.Publisher` had no registered session with the
    router within its timeout: the publication was not sent."""

    def __init__(self, endpoint: str, waited: float) -> None:
        super().__init__(f"not connected to the router at {endpoint} within {waited:g} s")
        self.endpoint = endpoint
        self.waited = waited


class WorkerStopped(RuntimeError):
    """The worker is not running (never started, or stopped): nothing can be sent."""

    def __init__(self) -> None:
        super().__init__("the worker is not running")


class ConfigError(ValueError):
    """A worker configuration that cannot work; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid worker configuration: " + "; ".join(problems))
        self.problems = problems
