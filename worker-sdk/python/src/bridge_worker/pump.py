"""The one owner of a session's ZeroMQ socket once the router has welcomed it.

The :class:`Pump` is driven by the event loop's readiness callback on the
socket's file descriptor, not by a task awaiting one future per frame: each
wake-up reads every frame that is ready (up to ``max_batch``, then the loop
runs others before the next batch) and hands each one to ``on_frame``; then
it writes everything queued in the outbox, the replies of that batch
included, with non-blocking sends. Frames queued from elsewhere (a handler's
partial reply, a push, a heartbeat) ask for one flush per loop turn through
:attr:`Outbox.on_ready`.

What must stay true (ZeroMQ's descriptor only signals *changes* of the
socket's state, and any send, receive or ``EVENTS`` read may consume that
signal): every run ends by reading ``EVENTS``, and runs again itself, without
waiting for the descriptor, while a frame can still be read or a queued frame
can be written.

The session ends through :attr:`Pump.ended`: ``False`` (lost: a receive or
send failed, or ``on_frame`` raised :class:`SessionEnd`), ``True`` (the
caller's graceful end) or an exception ``on_frame`` raised (the router
refused the worker, or a bug), which the session re-raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq

from .outbox import Outbox

log = logging.getLogger("bridge_worker")

_POLLIN = zmq.POLLIN
_POLLOUT = zmq.POLLOUT
_NOBLOCK = zmq.NOBLOCK
_EVENTS = zmq.EVENTS


class SessionEnd(Exception):
    """Raised by ``on_frame``: the session is over and the worker should reconnect."""


class SessionOutcome:
    """What every pump shares: the loop time of the last frame received
    (liveness) and the session's outcome, set once (the first wins)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_seen = loop.time()
        """Loop time of the last frame received (liveness)."""
        self.ended: asyncio.Future[bool] = loop.create_future()

    def end(self, outcome: bool | BaseException) -> None:
        """Ends the session (the first outcome wins)."""
        if self.ended.done():
            return
        if isinstance(outcome, BaseException):
            self.ended.set_exception(outcome)
        else:
            self.ended.set_result(outcome)


class Pump(SessionOutcome):
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        outbox: Outbox,
        on_frame: Callable[[bytes], None],
        *,
        max_batch: int = 256,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        super().__init__(self._loop)
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._outbox = outbox
        self._on_frame = on_frame
        self._max_batch = max_batch
        self._scheduled = False
        self._running = False
        self._reading = True
        self._stopped = False

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._run)
        self._outbox.on_ready = self._schedule
        self._schedule()

    def stop(self) -> None:
        """Detaches from the socket and the outbox (the socket stays open)."""
        self._reading = False
        self._stopped = True
        self._loop.remove_reader(self._fd)
        if self._outbox.on_ready == self._schedule:
            self._outbox.on_ready = None
        self.end(False)

    def stop_reading(self) -> None:
        """Frames that arrive from now on are left unread; queued frames are still written."""
        self._reading = False

    def _schedule(self) -> None:
        if not self._scheduled and not self._running:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        self._running = True
        sock = self._sock
        try:
            if self._reading:
                on_frame = self._on_frame
                n = 0
                while n < self._max_batch:
                    try:
                        frame = sock.recv(_NOBLOCK)
                    except zmq.Again:
                        break
                    n += 1
                    try:
                        on_frame(frame)
                    except SessionEnd:
                        self._reading = False
                        self.end(False)
                        break
                    except BaseException as e:
                        self._reading = False
                        self.end(e)
                        break
                if n:
                    self.last_seen = self._loop.time()
            outbox = self._outbox
            while True:
                out = outbox.peek()
                if out is None:
                    break
                try:
                    sock.send(out, _NOBLOCK)
                except zmq.Again:
                    break  # the pipe is full: EVENTS says when it has room
                outbox.pop_sent()
            events = cast(int, sock.getsockopt(_EVENTS))
        except zmq.ZMQError as e:
            log.warning("socket to the router failed: %s", e)
            self._reading = False
            self.end(False)
            return
        finally:
            self._running = False
        if outbox.expected:
            outbox.expected = False
            self._schedule()
        elif (events & _POLLIN and self._reading) or (events & _POLLOUT and outbox.peek() is not None):
            self._schedule()
