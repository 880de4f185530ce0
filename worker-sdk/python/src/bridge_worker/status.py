"""What a worker (and each of its router sessions) reports about itself."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """Where the worker is in its life."""

    CONNECTING = "connecting"
    """Connecting or saying hello; no router has welcomed the current socket."""
    REGISTERED = "registered"
    """Welcomed by the router and serving."""
    STOPPING = "stopping"
    """``bye`` sent; finishing in-flight requests."""
    STOPPED = "stopped"


@dataclass(frozen=True)
class Status:
    """A snapshot of the worker's state (or of one router session's)."""

    state: State
    registrations: int
    """How many times a router has welcomed this worker (2 after the first re-registration)."""
    router_id: str | None
    """The ``router_id`` of the last welcome."""
    max_frame_bytes: int | None = None
    """The largest frame the router of the last welcome accepts, if it said; bigger messages are not sent."""
