"""The queue between everything that sends and the socket's writer.

Every frame of a session goes through one :class:`Outbox`, in order. The
session's socket pump (:mod:`~bridge_worker.pump`) empties it once per
event-loop turn, so the replies of all the requests that finished in one turn
leave in one batch.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class Outbox:
    """Frames waiting for the socket, in order, bounded in count and in bytes.

    ``put`` waits while ``limit`` frames or ``max_bytes`` bytes are queued
    (back-pressure on handlers and pushes); ``put_nowait`` never waits, for
    messages that must not be held back or must keep their place (terminal
    answers, heartbeats, bye). What ``put_nowait`` may add beyond the bounds
    is bounded too: one terminal answer per request in flight (at most the
    worker's capacity, each at most the router's frame limit) and a few
    control messages. Nothing is dropped while the outbox is open.

    A frame may come with an ``ack`` future, resolved ``True`` once the
    writer has handed the frame to the socket and ``False`` if the outbox is
    closed first (the session ended): senders that must know (the publisher)
    wait on it.

    ``on_ready``, when set, is called (on the loop thread) each time a frame
    is queued: the pump uses it to schedule one flush per loop turn.
    """

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self._items: collections.deque[tuple[bytes, asyncio.Future[bool] | None]] = collections.deque()
        self._limit = limit
        self._max_bytes = max_bytes
        self._bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self.closed = False
        self.on_ready: Callable[[], None] | None = None
        self.expected = False
        """Set when a frame is likely to be queued by a callback already scheduled
        (a request task's first step): the pump then schedules its flush once it
        has dispatched the frames it read, behind those callbacks."""

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the frames waiting."""
        return self._bytes

    def _full(self) -> bool:
        return len(self._items) >= self._limit or (self._max_bytes is not None and self._bytes >= self._max_bytes)

    async def put(self, frame: bytes, ack: asyncio.Future[bool] | None = None) -> None:
        while self._full() and not self.closed:
            self._room.clear()
            await self._room.wait()
        self.put_nowait(frame, ack)

    def put_nowait(self, frame: bytes, ack: asyncio.Future[bool] | None = None) -> None:
        if self.closed:
            resolve_ack(ack, False)
            return
        self._items.append((frame, ack))
        self._bytes += len(frame)
        if not self._readable.is_set():
            self._readable.set()
        if self._flushed.is_set():
            self._flushed.clear()
        if self.on_ready is not None:
            self.on_ready()

    def peek(self) -> bytes | None:
        """The oldest frame, left in place (``None``: empty); :meth:`pop_sent` once it is on the socket."""
        return self._items[0][0] if self._items else None

    def pop_sent(self) -> None:
        """The frame :meth:`peek` gave is on the socket: drops it and tells its sender."""
        frame, ack = self._items.popleft()
        self._bytes -= len(frame)
        if ack is not None:
            resolve_ack(ack, True)
        if not self._room.is_set() and not self._full():
            self._room.set()
        if not self._items:
            self._readable.clear()
            self._flushed.set()

    async def get(self) -> tuple[bytes, asyncio.Future[bool] | None]:
        """Takes the oldest frame, waiting for one (a writer that awaits rather than a pump)."""
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._bytes -= len(item[0])
        if not self._full():
            self._room.set()
        return item

    def sent(self) -> None:
        """The writer handed the last frame it got with :meth:`get` to the socket."""
        if not self._items:
            self._flushed.set()

    async def flushed(self) -> None:
        await self._flushed.wait()

    def close(self) -> None:
        """Drops what is queued and releases waiting senders (their frames are dropped)."""
        self.closed = True
        self.on_ready = None
        for _, ack in self._items:
            resolve_ack(ack, False)
        self._items.clear()
        self._bytes = 0
        self._room.set()
        self._flushed.set()


def resolve_ack(ack: asyncio.Future[bool] | None, sent: bool) -> None:
    if ack is not None and not ack.done():
        ack.set_result(sent)
