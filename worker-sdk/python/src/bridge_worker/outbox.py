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
    """

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self.closed = False

    async def put(self, frame: bytes) -> None:
        while len(self._items) >= self._limit and not self.closed:
            self._room.clear()
            await self._room.wait()
        self.put_nowait(frame)

    def put_nowait(self, frame: bytes) -> None:
        if self.closed:
            return
        self._items.append(frame)
        self._readable.set()
        self._flushed.clear()

    async def get(self) -> bytes:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        frame = self._items.popleft()
        if len(self._items) < self._limit:
            self._room.set()
        return frame

    def sent(self) -> None:
        """The writer handed the last frame it got to the socket."""
        if not self._items:
            self._flushed.set()

    async def flushed(self) -> None:
        await self._flushed.wait()

    def close(self) -> None:
        """Drops what is queued and releases waiting senders (their frames are dropped)."""
        self.closed = True
        self._items.clear()
        self._room.set()
        self._flushed.set()
