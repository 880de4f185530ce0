"""A session's connection to one router: the seam between the session and the
socket library.

A :class:`Link` is one connection's life (what one DEALER socket was): the
session says ``hello`` through :meth:`Link.send_nowait`, reads the answers
with :meth:`Link.recv` until it is welcomed, then hands the link to a pump
(:meth:`Link.pump`: something with the interface of
:class:`~bridge_worker.pump.Pump`, which delivers received frames to the
session's dispatch and writes its outbox), and closes it with
:meth:`Link.close`. Everything else in the SDK (hello, auth, heartbeats,
credits, cancel, deadlines, streaming, several routers, reconnect with
backoff) is the same on either link.

Two links:

- :class:`ZmtpLink` (transport ``zmtp``, the default): the SDK's own ZMTP 3
  DEALER (:mod:`~bridge_worker.zmtp`) on an asyncio connection, tcp:// or
  ipc://. Its I/O happens on the event loop's thread: a request costs one
  wake-up of the loop (the socket readable), and replies are written from the
  loop with one ``write`` per loop turn. No libzmq thread, no cross-thread
  signalling.
- :class:`PyzmqLink` (transport ``pyzmq``): a libzmq DEALER driven by the
  readiness-driven :class:`~bridge_worker.pump.Pump`. Every request wakes
  libzmq's I/O thread and then the loop; every reply the other way round.
  Also what an inproc:// endpoint always uses (ZMTP has no inproc).

Differences a user can see: a ZMTP link notices a router that closes the
connection at once (pyzmq reconnects underneath and the heartbeats notice),
and it connects again every 100 ms while the router is not there, within the
handshake timeout (libzmq's reconnect interval).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

import zmq

from . import zmtp
from .outbox import Outbox
from .pump import Pump, SessionEnd, SessionOutcome

log = logging.getLogger("bridge_worker")

RECONNECT_INTERVAL = 0.1
"""Seconds between connection attempts of a ZMTP link while the router is not there."""
MAX_EARLY_FRAMES = 16
"""Frames (hellos) a ZMTP link keeps while it is not connected; more are dropped,
as a full DEALER pipe would refuse them."""
WRITE_HIGH_WATER = 1 << 20
"""Bytes the connection's write buffer may hold before the pump stops taking
frames from the outbox (the outbox then holds them, bounded in bytes, and its
senders wait): at most this plus one write's frames are in the kernel's way."""
WRITE_CHUNK = 256 << 10
"""The pump writes the outbox in chunks of about this many bytes, and checks
for back-pressure between chunks."""


class LinkLost(Exception):
    """The connection failed (a receive failed, the router closed it, or it broke ZMTP)."""


class PumpLike(Protocol):
    """What the session needs of a pump (:class:`~bridge_worker.pump.Pump` or :class:`ZmtpPump`)."""

    last_seen: float
    ended: asyncio.Future[bool]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stop_reading(self) -> None: ...

    def end(self, outcome: bool | BaseException) -> None: ...


class Link(abc.ABC):
    """One connection to a router, from connect to close."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    @abc.abstractmethod
    def send_nowait(self, frame: bytes) -> None:
        """Sends a handshake frame (hello, auth), or drops it when it cannot be queued now."""

    @abc.abstractmethod
    async def recv(self, until: float, stop: asyncio.Event) -> bytes | None:
        """The next frame, before the pump runs; ``None`` at loop time ``until`` or
        once ``stop`` is set; raises :class:`LinkLost`."""

    @abc.abstractmethod
    def pump(self, outbox: Outbox, on_frame: Callable[[bytes], None]) -> PumpLike:
        """The pump that serves the link once the router has welcomed it."""

    @abc.abstractmethod
    async def close(self, linger: float) -> None:
        """Closes the connection, giving queued frames up to ``linger`` seconds to leave."""


async def first(fut: asyncio.Future[Any], event: asyncio.Event, timeout: float) -> bool:
    """Waits up to ``timeout`` for ``fut`` or ``event``; returns whether ``fut`` is done."""
    if not fut.done() and not event.is_set():
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({fut, waiter}, timeout=max(timeout, 0), return_when="FIRST_COMPLETED")
        finally:
            waiter.cancel()
    return fut.done()


# ----- pyzmq ---------------------------------------------------------------------------


class PyzmqLink(Link):
    """A libzmq DEALER socket (a plain, not zmq.asyncio, socket: the pump and the
    handshake drive it from the loop's readiness callback with non-blocking calls)."""

    def __init__(self, endpoint: str, zctx: zmq.Context[Any], max_frame: int) -> None:
        super().__init__(endpoint)
        sock: zmq.Socket[bytes] = zmq.Socket(zctx, zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Frames from the router are bounded (above any route's maxMessageBytes
        # plus its envelope): a rogue endpoint cannot exhaust the worker's memory.
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        sock.connect(endpoint)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._reader = False
        self._readable: asyncio.Future[None] | None = None

    def send_nowait(self, frame: bytes) -> None:
        # Again: the pipe is full of earlier hellos, the router is not there yet.
        with contextlib.suppress(zmq.Again):
            self._sock.send(frame, zmq.NOBLOCK)

    def _on_fd(self) -> None:
        # Reading EVENTS re-arms the descriptor's signal: always read it.
        readable = self._readable
        if cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN and readable is not None and not readable.done():
            readable.set_result(None)

    async def recv(self, until: float, stop: asyncio.Event) -> bytes | None:
        loop = self._loop
        sock = self._sock
        if not self._reader:
            loop.add_reader(self._fd, self._on_fd)
            self._reader = True
        while True:
            try:
                return sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                raise LinkLost(f"receive failed: {e}") from None
            self._readable = readable = loop.create_future()
            if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                continue
            got = await first(readable, stop, until - loop.time())
            self._readable = None
            if stop.is_set() or not got:
                return None

    def _stop_reader(self) -> None:
        if self._reader:
            self._loop.remove_reader(self._fd)
            self._reader = False

    def pump(self, outbox: Outbox, on_frame: Callable[[bytes], None]) -> PumpLike:
        self._stop_reader()
        return Pump(self._sock, outbox, on_frame)

    async def close(self, linger: float) -> None:
        self._stop_reader()
        # libzmq lingers in its own thread; the context's term() waits for it.
        self._sock.close(linger=int(linger * 1000))


# ----- ZMTP on asyncio -----------------------------------------------------------------


def parse_endpoint(endpoint: str) -> tuple[str, str, int] | tuple[str, str] | None:
    """``("tcp", host, port)`` or ``("ipc", path)`` for an endpoint the ZMTP
    link can connect to; ``None`` for anything else (inproc://, a tcp:// with
    a source address or a name libzmq would resolve differently)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        return None
    if scheme == "ipc":
        if sys.platform == "win32":
            return None  # no asyncio unix sockets there
        # libzmq: ipc://@name is a Linux abstract socket.
        return ("ipc", "\0" + rest[1:] if rest.startswith("@") else rest)
    if scheme != "tcp" or ";" in rest:
        return None
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "*" or not host:
        return None
    return ("tcp", host, int(port_text))


class _Connection(asyncio.Protocol):
    """The asyncio side of one ZMTP connection: parses what comes in, writes what goes out."""

    def __init__(self, link: ZmtpLink) -> None:
        self._link = link
        self._decoder = zmtp.Decoder(link.max_frame)
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.closed = False
        self.lost: asyncio.Future[None] = link._loop.create_future()
        # Set by the link (handshake) or the pump: where messages and events go.
        self.on_messages: Callable[[list[bytes]], None] = link._received
        self.on_writable: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        t.write(zmtp.greeting() + zmtp.ready())

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        was_ready = decoder.ready
        try:
            messages = decoder.feed(data)
        except zmtp.ZmtpError as e:
            self.fail(f"ZMTP violation by the peer: {e}")
            return
        if not was_ready and decoder.ready:
            self._link._peer_ready()
        if messages:
            self.on_messages(messages)
        if decoder.commands:
            commands, decoder.commands = decoder.commands, []
            for name, body in commands:
                if name == b"PING":
                    try:
                        self.write(zmtp.pong(zmtp.ping_context(body)))
                    except zmtp.ZmtpError as e:
                        self.fail(f"ZMTP violation by the peer: {e}")
                        return
                elif name == b"ERROR":
                    self.fail(f"the peer closed the connection with ZMTP ERROR {zmtp.error_reason(body)!r}")
                    return
                # Anything else (a repeated READY, SUBSCRIBE, ...) means nothing to a DEALER.
        if decoder.dropped:
            log.warning("dropped %d multi-part message(s) from the router at %s", decoder.dropped, self._link.endpoint)
            decoder.dropped = 0

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def fail(self, reason: str) -> None:
        """Drops the connection for ``reason`` (logged once by the link)."""
        self._link._fail(reason)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_writable is not None:
            self.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self._link._fail(f"connection lost: {exc}" if exc else "the router closed the connection")


class ZmtpLink(Link):
    """The SDK's own DEALER: one asyncio connection speaking ZMTP 3, NULL mechanism."""

    def __init__(self, endpoint: str, address: tuple[str, str, int] | tuple[str, str], max_frame: int) -> None:
        super().__init__(endpoint)
        self._loop = asyncio.get_running_loop()
        self.max_frame = max_frame
        self._address = address
        self._conn: _Connection | None = None
        self._ready = False
        self._early: list[bytes] = []  # frames sent before the peer's READY
        self._inbox: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: str | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._closed = False
        self._connector = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        """Connects, again every :data:`RECONNECT_INTERVAL` while refused (libzmq's
        way); the greeting and READY follow from :class:`_Connection`."""
        loop = self._loop
        address = self._address
        while not self._closed:
            try:
                if len(address) == 3:
                    _, conn = await loop.create_connection(lambda: _Connection(self), address[1], address[2])
                else:
                    _, conn = await loop.create_unix_connection(lambda: _Connection(self), address[1])
            except OSError as e:
                log.debug("connecting to %s: %s; again in %.0f ms", self.endpoint, e, RECONNECT_INTERVAL * 1000)
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            except Exception as e:  # not the network's doing (a bug, an odd platform): said, and tried again
                log.warning("connecting to %s: %r; again in %.0f ms", self.endpoint, e, RECONNECT_INTERVAL * 1000)
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            if self._closed:
                conn.abort()
            else:
                self._conn = conn
            return

    def _peer_ready(self) -> None:
        """The router's greeting and READY were accepted: the frames held back can go."""
        self._ready = True
        conn = self._conn
        if conn is not None and self._early:
            conn.write(b"".join(zmtp.encode(self._early)))
        self._early.clear()

    def _received(self, messages: list[bytes]) -> None:
        """Frames before the pump took over (the handshake reads them with :meth:`recv`)."""
        self._inbox.extend(messages)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        # Before the pump: the handshake's recv raises it, and the session logs it.
        if not self._closed and self._on_lost is not None:
            self._on_lost(reason)
        self._wake()

    def send_nowait(self, frame: bytes) -> None:
        conn = self._conn
        if self._ready and conn is not None:
            conn.write(b"".join(zmtp.encode((frame,))))
        elif len(self._early) < MAX_EARLY_FRAMES:
            self._early.append(frame)

    async def recv(self, until: float, stop: asyncio.Event) -> bytes | None:
        loop = self._loop
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._failure is not None:
                raise LinkLost(self._failure)
            self._waiter = waiter = loop.create_future()
            got = await first(waiter, stop, until - loop.time())
            self._waiter = None
            if stop.is_set() or not got:
                return None

    def pump(self, outbox: Outbox, on_frame: Callable[[bytes], None]) -> PumpLike:
        conn = self._conn
        assert conn is not None  # invariant: the handshake got a welcome over it
        backlog = list(self._inbox)
        self._inbox.clear()
        return ZmtpPump(self, conn, outbox, on_frame, backlog)

    async def close(self, linger: float) -> None:
        self._closed = True
        self._connector.cancel()
        conn = self._conn
        if conn is None or conn.transport is None:
            return
        if linger <= 0 or conn.closed:
            conn.abort()
            return
        # close() writes what the transport still holds, then closes.
        conn.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(conn.lost), linger)
        except asyncio.TimeoutError:
            conn.abort()
        except asyncio.CancelledError:
            conn.abort()
            raise


class ZmtpPump(SessionOutcome):
    """The pump of a :class:`ZmtpLink` (the interface of :class:`~bridge_worker.pump.Pump`).

    Driven by the connection: each ``data_received`` hands every complete
    frame to ``on_frame`` in one batch, then writes the outbox. Frames queued
    from elsewhere (the replies of handlers that finished later, pushes,
    heartbeats) ask for one write per loop turn through
    :attr:`Outbox.on_ready`. A write takes the outbox's frames in chunks of
    :data:`WRITE_CHUNK` bytes while the connection's buffer is under its high
    water mark (:data:`WRITE_HIGH_WATER`); above it, frames stay in the
    outbox, whose bound in bytes makes senders wait, until the connection
    drains (``resume_writing``).
    """

    def __init__(
        self,
        link: ZmtpLink,
        conn: _Connection,
        outbox: Outbox,
        on_frame: Callable[[bytes], None],
        backlog: list[bytes],
    ) -> None:
        self._loop = link._loop
        super().__init__(self._loop)
        self._link = link
        self._conn = conn
        self._outbox = outbox
        self._on_frame = on_frame
        self._backlog = backlog
        self._scheduled = False
        self._reading = True
        self._stopped = False

    def start(self) -> None:
        conn = self._conn
        conn.on_messages = self._received
        conn.on_writable = self._schedule
        self._link._on_lost = self._lost
        self._outbox.on_ready = self._schedule
        if self._link._failure is not None:
            self._lost(self._link._failure)
        backlog, self._backlog = self._backlog, []
        if backlog:
            # Frames that came with the welcome: dispatched on the next turn, like new ones.
            self._loop.call_soon(self._received, backlog)
        self._schedule()

    def stop(self) -> None:
        """Detaches from the connection and the outbox (the connection stays open)."""
        self._reading = False
        self._stopped = True
        self._conn.on_writable = None
        if self._outbox.on_ready == self._schedule:
            self._outbox.on_ready = None
        self.end(False)

    def stop_reading(self) -> None:
        """Frames that arrive from now on are left unread; queued frames are still written."""
        self._reading = False
        transport = self._conn.transport
        if transport is not None and not self._conn.closed:
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()

    def _lost(self, reason: str) -> None:
        if not self._stopped and not self.ended.done():
            log.warning("connection to the router at %s: %s", self._link.endpoint, reason)
        self._reading = False
        self.end(False)

    def _received(self, frames: list[bytes]) -> None:
        if not self._reading:
            return
        self.last_seen = self._loop.time()
        on_frame = self._on_frame
        try:
            for frame in frames:
                on_frame(frame)
                if not self._reading:
                    break
        except SessionEnd:
            self._reading = False
            self.end(False)
        except BaseException as e:
            self._reading = False
            self.end(e)
        self._flush()
        outbox = self._outbox
        if outbox.expected:
            outbox.expected = False
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self._flush()

    def _flush(self) -> None:
        conn = self._conn
        if self._stopped or conn.closed:
            return
        outbox = self._outbox
        peek = outbox.peek
        pop = outbox.pop_sent
        while not conn.paused:
            frame = peek()
            if frame is None:
                return
            size = len(frame)
            pop()
            if size < 256:
                # The common case: one small reply, one write.
                data = zmtp.frame_header(size) + frame
                nxt = peek()
                if nxt is None:
                    conn.write(data)
                    return
                parts = [data]
                total = len(data)
            else:
                parts = [zmtp.frame_header(size), frame]
                total = size + 9
            while total < WRITE_CHUNK:
                frame = peek()
                if frame is None:
                    break
                size = len(frame)
                pop()
                parts.append(zmtp.frame_header(size))
                parts.append(frame)
                total += size + 9
            if total <= WRITE_CHUNK:
                conn.write(b"".join(parts))
            else:
                transport = conn.transport
                if transport is None or conn.closed:
                    return
                transport.writelines(parts)
