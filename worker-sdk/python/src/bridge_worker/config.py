"""Worker settings, with defaults taken from the environment.

Environment lookups go through a mapping argument so tests can pass a dict
instead of changing the process environment.

The bridge endpoint may be a comma-separated list of routers' endpoints: the
worker then keeps one session with each (:func:`parse_endpoints`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

DEFAULT_BRIDGE_ENDPOINT = "tcp://127.0.0.1:5555"
"""Where the router binds its ROUTER socket by default."""
DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"
"""Where the router binds its SUB socket by default."""
DEFAULT_CAPACITY = 16

ENV_BRIDGE_ENDPOINT = "BRIDGE_ENDPOINT"
ENV_PUBLISH_ENDPOINT = "PUBLISH_ENDPOINT"
ENV_BRIDGE_SECRET = "BRIDGE_SECRET"
ENV_BRIDGE_TRANSPORT = "BRIDGE_TRANSPORT"

TRANSPORTS = ("zmtp", "pyzmq")
"""The values of :attr:`WorkerConfig.transport`."""
DEFAULT_TRANSPORT = "zmtp"

_ENDPOINT = re.compile(r"(tcp|ipc|inproc)://.+")


def _env(env: Mapping[str, str], key: str) -> str | None:
    # Empty counts as unset, so `BRIDGE_SECRET=` disables the secret rather than
    # sending "". The value itself is used exactly as given (the router and the
    # Rust SDK do not strip it either: a secret may contain spaces).
    value = env.get(key, "")
    return value if value.strip() else None


def parse_endpoints(value: str) -> list[str]:
    """The router endpoints a bridge endpoint setting names, in order.

    ``"tcp://a:5555"`` is one router; ``"tcp://a:5555, tcp://b:5555"`` two (each
    entry trimmed). Raises :class:`ConfigError` listing every bad entry: an
    empty one (``"a,,b"``, a trailing comma), one that is not a ZeroMQ
    endpoint, one listed twice (a router listed twice would get two sessions
    of this worker, and twice its capacity).
    """
    problems = _endpoint_problems(value)
    if problems:
        raise ConfigError(problems)
    return [entry.strip() for entry in value.split(",")]


def _endpoint_problems(value: str) -> list[str]:
    """What :func:`parse_endpoints` would refuse in ``value``, each naming its entry."""
    entries = [entry.strip() for entry in value.split(",")]
    if len(entries) == 1:
        if not _ENDPOINT.fullmatch(entries[0]):
            return [f"endpoint {value!r} is not a ZeroMQ endpoint (tcp://, ipc:// or inproc://)"]
        return []
    problems = []
    seen: set[str] = set()
    for position, entry in enumerate(entries, start=1):
        if not entry:
            problems.append(f"endpoint list {value!r}: entry {position} is empty")
        elif not _ENDPOINT.fullmatch(entry):
            problems.append(
                f"endpoint list {value!r}: entry {position} ({entry!r}) is not a ZeroMQ endpoint"
                " (tcp://, ipc:// or inproc://)"
            )
        elif entry in seen:
            problems.append(f"endpoint list {value!r}: entry {position} ({entry!r}) names a router already listed")
        else:
            seen.add(entry)
    return problems


def default_worker_id() -> str:
    """A worker id distinct per process on one host."""
    return f"python-worker-{os.getpid()}"


@dataclass
class WorkerConfig:
    """Everything a worker needs besides its handlers.

    The timing fields have defaults that match the team contract and rarely
    need changing. Durations are in seconds.
    """

    services: list[str]
    """Services (route names) this worker serves."""
    endpoint: str = DEFAULT_BRIDGE_ENDPOINT
    """ZeroMQ endpoint of the router's ROUTER socket (``BRIDGE_ENDPOINT``), or a
    comma-separated list of several routers' endpoints: the worker then keeps one
    session with each (see :meth:`endpoints`)."""
    publish_endpoint: str = DEFAULT_PUBLISH_ENDPOINT
    """ZeroMQ endpoint of the router's SUB socket (``PUBLISH_ENDPOINT``), which only a router
    without a secret binds. Kept for the command line; :class:`Publisher` uses ``endpoint``."""
    worker_id: str = field(default_factory=default_worker_id)
    """Name announced in ``hello`` (for logs and ``/routes``; need not be unique)."""
    capacity: int = DEFAULT_CAPACITY
    """Max requests in flight; announced in ``hello`` and enforced locally."""
    secret: str | None = field(default=None, repr=False)
    """Shared secret (``BRIDGE_SECRET``): the worker proves it knows it when the
    router challenges it; never sent, never logged."""
    grace_period: float = 10.0
    """How long a graceful stop waits for in-flight work before abandoning it."""
    backoff_initial: float = 0.1
    """First reconnect / hello-resend delay."""
    backoff_max: float = 5.0
    """Cap of the exponential reconnect / hello-resend delay."""
    handshake_timeout: float = 5.0
    """A socket that gets no ``welcome`` within this time is re-created."""
    linger: float = 1.0
    """On a graceful stop, how long the socket may take to flush its last messages."""
    outbound_queue: int = 1024
    """Messages queued for the socket before senders wait (back-pressure)."""
    outbound_bytes: int = 64 << 20
    """Bytes queued for the socket before senders wait (back-pressure), whatever
    the count. Terminal answers never wait, so the queue may exceed this by at
    most one answer per request in flight."""
    connection_queue: int = 1024
    """Per-connection queue of events (binary, raw, event, connect, disconnect);
    events beyond it are dropped and logged."""
    transport: str = DEFAULT_TRANSPORT
    """How the worker talks to the router (``BRIDGE_TRANSPORT``): ``"zmtp"``, the
    SDK's own ZMTP 3 connection on the event loop (tcp:// and ipc://; any other
    endpoint uses pyzmq), or ``"pyzmq"``, a libzmq DEALER socket. The same
    bridge protocol either way; ``zmtp`` costs fewer wake-ups per request."""

    @classmethod
    def from_env(cls, services: list[str], env: Mapping[str, str] | None = None) -> WorkerConfig:
        """Defaults, with endpoints and secret from ``env`` (the process environment by default)."""
        env = os.environ if env is None else env
        return cls(
            services=list(services),
            endpoint=_env(env, ENV_BRIDGE_ENDPOINT) or DEFAULT_BRIDGE_ENDPOINT,
            publish_endpoint=_env(env, ENV_PUBLISH_ENDPOINT) or DEFAULT_PUBLISH_ENDPOINT,
            secret=_env(env, ENV_BRIDGE_SECRET),
            transport=(_env(env, ENV_BRIDGE_TRANSPORT) or DEFAULT_TRANSPORT).strip().lower(),
        )

    def endpoints(self) -> list[str]:
        """The routers' endpoints, in list order (one for a plain endpoint); raises
        :class:`ConfigError` naming each bad entry."""
        return parse_endpoints(self.endpoint)

    def validate(self) -> None:
        """Raises :class:`ConfigError` listing every problem at once."""
        self._check(publisher=False)

    def _validate_publisher(self) -> None:
        """Like :meth:`validate` for a publisher session: no services, capacity 0."""
        self._check(publisher=True)

    def _check(self, *, publisher: bool) -> None:
        problems = _endpoint_problems(self.endpoint)
        if not _ENDPOINT.fullmatch(self.publish_endpoint):
            problems.append(
                f"publish_endpoint {self.publish_endpoint!r} is not a ZeroMQ endpoint (tcp://, ipc:// or inproc://)"
            )
        if self.transport not in TRANSPORTS:
            problems.append(f"transport {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        if not self.worker_id.strip():
            problems.append("worker_id is empty")
        if publisher:
            if self.services or self.capacity != 0:
                problems.append("a publisher session registers with no services and capacity 0")
        else:
            if not self.services:
                problems.append("no services: a worker must serve at least one")
            if any(not s.strip() for s in self.services):
                problems.append("a service name is empty")
            if not 1 <= self.capacity <= 0xFFFF_FFFF:
                problems.append(f"capacity {self.capacity} is not in 1..4294967295")
        if not 0 < self.backoff_initial <= self.backoff_max:
            problems.append(f"backoff must satisfy 0 < initial ({self.backoff_initial}) <= max ({self.backoff_max})")
        for name in ("handshake_timeout",):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("grace_period", "linger"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        for name in ("outbound_queue", "outbound_bytes", "connection_queue"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise ConfigError(problems)
