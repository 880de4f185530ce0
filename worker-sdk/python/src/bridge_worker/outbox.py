"""The queue between everything that sends and the one task that writes the socket."""

from __future__ import annotations

import asyncio
import collections


class Outbox:
    """Frames waiting for the session's writer, in order.

    ``put`` waits while ``limit`` frames are queued (back-pressure on
    handlers); ``put_nowait`` never waits, for messages that must not be held
    back or must keep their place (terminal answers, heartbeats, bye), which
    bounds the overshoot by the capacity plus a few control messages.

    A frame may come with an ``ack`` future, resolved ``True`` once the
    writer has handed the frame to the socket and ``False`` if the outbox is
    closed first (the session ended): senders that must know (the publisher)
    wait on it.
    """

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[tuple[bytes, asyncio.Future[bool] | None]] = collections.deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self.closed = False

    async def put(self, frame: bytes, ack: asyncio.Future[bool] | None = None) -> None:
        while len(self._items) >= self._limit and not self.closed:
            self._room.clear()
            await self._room.wait()
        self.put_nowait(frame, ack)

    def put_nowait(self, frame: bytes, ack: asyncio.Future[bool] | None = None) -> None:
        if self.closed:
            resolve_ack(ack, False)
            return
        self._items.append((frame, ack))
        self._readable.set()
        self._flushed.clear()

    async def get(self) -> tuple[bytes, asyncio.Future[bool] | None]:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self._limit:
            self._room.set()
        return item

    def sent(self) -> None:
        """The writer handed the last frame it got to the socket."""
        if not self._items:
            self._flushed.set()

    async def flushed(self) -> None:
        await self._flushed.wait()

    def close(self) -> None:
        """Drops what is queued and releases waiting senders (their frames are dropped)."""
        self.closed = True
        for _, ack in self._items:
            resolve_ack(ack, False)
        self._items.clear()
        self._room.set()
        self._flushed.set()


def resolve_ack(ack: asyncio.Future[bool] | None, sent: bool) -> None:
    if ack is not None and not ack.done():
        ack.set_result(sent)
