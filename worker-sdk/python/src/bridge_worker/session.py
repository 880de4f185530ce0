"""One router session of a worker: its socket from hello to close, again after
each loss, and everything that belongs to that router.

A :class:`~bridge_worker.Worker` given one bridge endpoint runs one
:class:`Session`; given a comma-separated list, one per router, each on its
own: hello, challenge and auth, heartbeats, liveness, backoff and reconnects.
What a router sent stays with its session: requests are answered (replies,
partials, errors, ``cancelled``, ``timeout``) on the session they came from,
event queues and the connections' ``connect`` info are per session, and a
lost router abandons only its own session's requests and queues.

Shape of one socket's life:

- The session connects a NEW DEALER socket, says ``hello`` (again every
  backoff step until welcomed; a router with a secret answers
  ``challenge{nonce}``, and the session answers each one with
  ``auth{proof}``, never sending the secret itself), then serves: the
  link's pump (:mod:`~bridge_worker.transport`: the SDK's own ZMTP
  connection, or a pyzmq socket and :class:`~bridge_worker.pump.Pump`) reads
  every ready frame per wake-up of the loop and writes the outbox (everything
  else queues frames in it) once per loop turn; one task sends heartbeats.
  A closed connection (ZMTP), a router silent for ``heartbeat_ms *
  liveness``, a ``goodbye{reconnect: true}`` or no welcome within the
  handshake timeout ends the socket; the session waits an exponential
  backoff with jitter and starts again.
- Requests run as one task each (eager on Python 3.12+: a handler that never
  awaits answers inside the dispatch) and get exactly one terminal message: the
  handler's final reply or error, ``cancelled`` after the router's
  ``cancel``, ``timeout`` when the deadline passes. When a socket is lost,
  its requests are abandoned without answer: the router that sent them has
  already failed them (or is gone), and a new socket could not answer them.
- Messages without an answer (event, binary, raw, connect, disconnect) run in
  one sequential queue per connection, so their order is kept.
- No frame bigger than the router's limit (``max_frame_bytes`` of its
  welcome) is sent: a final or partial reply over it becomes the request's
  terminal ``payload_too_large`` error; any other message over it raises
  :class:`PayloadTooLarge` to its sender.
- A request that does not decode but whose ``cid`` can be read is answered
  ``bad_request``, so its credit comes back.
- A stop sends ``bye``, lets in-flight work finish within the grace period,
  answers whatever is left with ``worker_error`` (retryable, so the router
  may retry it elsewhere), flushes and closes. Requests that cross the
  ``bye`` are refused the same way.

Capacity with several routers: every router is told the worker's full
``capacity``, and the worker's ``slots`` (one semaphore shared by its
sessions) keep at most ``capacity`` handlers running; a request beyond waits
for a slot with its deadline and cancellation running (see
:class:`~bridge_worker.Worker`). With one router there are no slots: the
router's credits alone bound the handlers, as before lists existed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import codes
from . import protocol as wire
from .backoff import Backoff
from .context import Context, EventContext
from .errors import (
    HandlerError,
    PayloadTooLarge,
    SecretRequired,
    WorkerRejected,
    WorkerStopped,
    no_binary_handler,
    no_event_handler,
    no_request_handler,
)
from .handlers import Frame, Partial, Reply, Style, as_final, run_event, run_request
from .outbox import Outbox
from .protocol import Json
from .pump import SessionEnd
from .status import State, Status
from .transport import Link, LinkLost, PumpLike, PyzmqLink, ZmtpLink, parse_endpoint

if TYPE_CHECKING:
    from .worker import Worker, _Handler

log = logging.getLogger("bridge_worker")

SDK_VERSION = "0.1.0"
SDK_NAME = f"worker-sdk-python/{SDK_VERSION}"
"""Announced in ``hello`` as ``sdk``."""

MAX_KNOWN_CONNECTIONS = 100_000
"""Connections whose ``connect`` is remembered (claims, route of raw frames);
beyond this, new ones are not cached."""
# Largest frame accepted from a router (ZMQ_MAXMSGSIZE, or the ZMTP link's
# bound): above any route's maxMessageBytes (at most 64 MiB) plus its envelope.
MAX_INBOUND_FRAME = 128 << 20
MAX_TIMEOUT = 7 * 24 * 3600.0
"""Upper bound on a request's timeout, in seconds (a hostile ``timeout_ms`` stays harmless)."""

# Python 3.12+: a request's task runs eagerly, inside the dispatch, until its
# handler first suspends; one that never does finishes there, its reply in the
# same batch as the request. Earlier versions schedule the task (one loop turn).
_EAGER_TASKS = sys.version_info >= (3, 12)


@dataclass(slots=True)
class _InFlight:
    ctx: Context
    task: asyncio.Task[None]
    timer: asyncio.TimerHandle | None


class Session:
    """The worker's session with one router (one endpoint of its list)."""

    def __init__(self, worker: Worker, endpoint: str, slots: asyncio.Semaphore | None) -> None:
        self.worker = worker
        self.endpoint = endpoint
        """The router's bridge endpoint."""
        self.status = Status(State.CONNECTING, 0, None)
        """This session's own status (the worker's sums up all of its sessions')."""
        self._config = worker.config
        self._requests = worker._requests
        self._events = worker._events
        self._kinds = worker._kinds
        self._stop = worker._stop
        self._packer = worker._packer
        self._capacity = worker.config.capacity
        self._slots = slots
        executor = worker._executor
        assert executor is not None  # invariant: run() makes it before any session
        self._executor = executor
        # The coroutine a request runs: with slots, it first waits for one.
        self._runner = self._run_request if slots is None else self._run_in_slot
        self._backoff = Backoff(worker.config.backoff_initial, worker.config.backoff_max)
        self._outbox: Outbox | None = None
        self._inflight: dict[str, _InFlight] = {}
        # Requests whose deadline timer is not armed yet (see _start_request).
        self._unarmed: list[_InFlight] = []
        # The loop of the socket's life: asyncio.get_running_loop() costs a
        # getpid() system call per call before Python 3.12, once per request here.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[str, wire.Connect] = {}
        self._queues: dict[str, collections.deque[Callable[[], Awaitable[None]]]] = {}
        self._queue_tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()  # progress while draining (work finished, stop shortened)
        self._router_id: str | None = None
        # Timing and frame limit of the current socket, from its (latest) welcome.
        self._beat_every = 1.0
        self._silence_limit = 3.0
        self._max_frame: int | None = None
        # The ZMTP link's address of the endpoint; None: a pyzmq socket.
        self._zmtp_address = parse_endpoint(endpoint) if self._config.transport == "zmtp" else None
        if self._config.transport == "zmtp" and self._zmtp_address is None:
            log.info("endpoint %s: not a tcp://host:port or ipc:// endpoint, using the pyzmq transport", endpoint)

    def __repr__(self) -> str:
        return f"Session(endpoint={self.endpoint!r}, state={self.status.state.value})"

    @property
    def live(self) -> bool:
        """Whether the router has welcomed this session's current socket."""
        return self._outbox is not None

    def _set_status(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        self.worker._session_changed(self)

    # ----- sending ---------------------------------------------------------------------

    def check_size(self, kind: str, frame: bytes) -> None:
        """Raises :class:`PayloadTooLarge` for a frame this router would not accept."""
        limit = self._max_frame
        if limit is not None and len(frame) > limit:
            raise PayloadTooLarge(kind, len(frame), limit)

    async def send(self, msg: wire.FromWorker) -> None:
        """Queues a message that is not about a request (push, close, subscribe, ...)."""
        await self.send_frame(msg.KIND, wire.encode_from_worker(msg))

    async def send_frame(self, kind: str, frame: bytes) -> None:
        """Queues ``frame`` (a ``kind`` message) for this router, waiting while the
        outbox is full; dropped (logged) while the session is not registered."""
        self.worker._check_running()
        self.check_size(kind, frame)
        outbox = self._outbox
        if outbox is None:
            log.debug("not registered with %s: %s message dropped", self.endpoint, kind)
            return
        await outbox.put(frame)

    async def send_partial(self, ctx: Context, msg: wire.Reply) -> None:
        """A partial reply of request ``ctx``; one over the frame limit ends the request."""
        if ctx.done:
            log.debug("request %s already ended: partial reply dropped", ctx.correlation_id)
            return
        frame = wire.encode_from_worker(msg)
        self.worker._check_running()
        limit = self._max_frame
        if limit is not None and len(frame) > limit:
            log.warning(
                "request %s: partial reply of %d bytes exceeds the frame limit of %d; answering payload_too_large",
                ctx.correlation_id,
                len(frame),
                limit,
            )
            entry = self._inflight.get(ctx.correlation_id)
            self._terminate(ctx, _too_large(ctx.correlation_id, len(frame), limit))
            if entry is not None:
                entry.task.cancel()
            raise PayloadTooLarge("reply", len(frame), limit)
        if self._outbox is None:
            log.debug("not registered: partial reply dropped")
            return
        await self._outbox.put(frame)

    async def send_confirmed(self, frame: bytes) -> bool:
        """Queues ``frame`` and waits until the writer has handed it to the socket of a
        registered session (``True``), or the session ended first (``False``)."""
        outbox = self._outbox
        if outbox is None:
            return False
        ack: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await outbox.put(frame, ack)
        return await ack

    def _send_nowait(self, frame: bytes) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(frame)

    def wake(self) -> None:
        """Makes a draining session look at its work again (the stop was shortened)."""
        self._wake.set()

    # ----- the socket's life -----------------------------------------------------------

    async def run(self) -> None:
        """Connects, serves and reconnects until the worker stops; raises
        :class:`WorkerRejected` when this router refuses the worker for good."""
        first = True
        while not self._stop.is_set():
            if not first:
                delay = self._backoff.next_delay()
                log.info("reconnecting to %s in %.0f ms", self.endpoint, delay * 1000)
                if await _wait_event(self._stop, delay):
                    break
            first = False
            await self._socket_life()

    def _open_link(self) -> Link:
        """A new connection to the router, on the configured transport."""
        if self._zmtp_address is not None:
            return ZmtpLink(self.endpoint, self._zmtp_address, MAX_INBOUND_FRAME)
        return PyzmqLink(self.endpoint, self.worker._zmq(), MAX_INBOUND_FRAME)

    async def _socket_life(self) -> None:
        self._loop = asyncio.get_running_loop()
        link = self._open_link()
        graceful = False
        try:
            welcome = await self._handshake(link)
            if welcome is None:
                return
            self._backoff.reset()
            if self._router_id is not None and self._router_id != welcome.router_id:
                # Another router process: the connections we knew are gone.
                self._conns.clear()
            self._router_id = welcome.router_id
            self._set_timing(welcome)
            outbox = self._outbox = Outbox(self._config.outbound_queue, self._config.outbound_bytes)
            pump = link.pump(outbox, self._dispatch)
            pump.start()
            beats = asyncio.create_task(self._beat(outbox), name="bridge-heartbeat")
            self._set_status(
                state=State.REGISTERED,
                registrations=self.status.registrations + 1,
                router_id=welcome.router_id,
            )
            log.info(
                "registered with router %s at %s (heartbeat %d ms, liveness %d, frame limit %s)",
                welcome.router_id,
                self.endpoint,
                welcome.heartbeat_ms,
                welcome.liveness,
                welcome.max_frame_bytes,
            )
            try:
                graceful = await self._serve(pump)
                if graceful:
                    try:
                        await asyncio.wait_for(outbox.flushed(), self._config.linger)
                    except asyncio.TimeoutError:
                        log.warning("could not flush the last messages within %.1f s", self._config.linger)
            finally:
                beats.cancel()
                pump.stop()
                outbox.close()
                self._outbox = None
                self.abandon_all()
                self.worker._forget_connections(self)
                if not self._stop.is_set():
                    self._set_status(state=State.CONNECTING)
        finally:
            await link.close(self._config.linger if graceful else 0)

    async def _handshake(self, link: Link) -> wire.Welcome | None:
        """Says hello every backoff step until welcomed; ``None``: give this socket up."""
        loop = asyncio.get_running_loop()
        worker = self.worker
        hello = wire.encode_from_worker(
            wire.Hello(
                worker_id=self._config.worker_id,
                services=list(self._config.services),
                capacity=self._config.capacity,
                sdk=SDK_NAME,
                # What the router shows its routes accept; a publisher session has no types.
                msg_types=None if worker._publisher_session else worker.msg_types,
            )
        )
        give_up = loop.time() + self._config.handshake_timeout
        while True:
            link.send_nowait(hello)
            step_end = min(loop.time() + self._backoff.next_delay(), give_up)
            while True:
                try:
                    frame = await link.recv(step_end, self._stop)
                except LinkLost as e:
                    log.warning("connection to the router at %s failed: %s", self.endpoint, e)
                    return None
                if self._stop.is_set():
                    return None
                if frame is None:
                    break
                try:
                    msg: wire.ToWorker | None = wire.decode_to_worker(frame)
                except wire.DecodeError as e:
                    log.warning("undecodable answer to hello (%d bytes): %s", len(frame), e)
                    if e.rejection == "version":
                        # The router speaks another version: retrying would only repeat it.
                        raise WorkerRejected(self.endpoint, str(e)) from None
                    msg = None
                if isinstance(msg, wire.Welcome):
                    return msg
                if isinstance(msg, wire.Challenge):
                    # Answered every time: the router repeats its challenge when
                    # our hello was resent before the auth arrived.
                    if not self._config.secret:
                        log.error("the router requires a bridge secret: set BRIDGE_SECRET")
                        raise SecretRequired(self.endpoint)
                    log.debug("challenged by the router; proving the secret")
                    auth = wire.encode_from_worker(wire.Auth(proof=wire.auth_proof(self._config.secret, msg.nonce)))
                    link.send_nowait(auth)
                    continue
                if isinstance(msg, wire.Goodbye):
                    if not msg.reconnect:
                        log.error("router at %s refused this worker: %s", self.endpoint, msg.reason)
                        raise WorkerRejected(self.endpoint, msg.reason)
                    log.info("router at %s said goodbye before welcoming: %s", self.endpoint, msg.reason)
                    return None
                if msg is not None:
                    log.debug("ignoring a %s message that came before the welcome", msg.KIND)
            if loop.time() >= give_up:
                log.warning(
                    "no welcome from %s within %.1f s; re-creating the socket",
                    self.endpoint,
                    self._config.handshake_timeout,
                )
                return None

    def _set_timing(self, welcome: wire.Welcome) -> None:
        """Heartbeat timing and frame limit from a welcome (the first or a later one)."""
        # A heartbeat_ms of 0 would spin; 1 ms is already absurd but harmless.
        self._beat_every = max(welcome.heartbeat_ms, 1) / 1000
        self._silence_limit = self._beat_every * max(welcome.liveness, 1)
        self._max_frame = welcome.max_frame_bytes
        if self.status.max_frame_bytes != welcome.max_frame_bytes:
            self._set_status(max_frame_bytes=welcome.max_frame_bytes)

    async def _beat(self, outbox: Outbox) -> None:
        frame = wire.encode_from_worker(wire.Heartbeat())
        while True:
            await asyncio.sleep(self._beat_every)
            outbox.put_nowait(frame)

    async def _serve(self, pump: PumpLike) -> bool:
        """Serves until the socket's session ends; ``True`` after a graceful stop. The
        pump reads and writes the socket; this watches the router's liveness and the stop."""
        loop = asyncio.get_running_loop()
        drained = asyncio.create_task(self._drain_on_stop(), name="bridge-drain")

        def on_drained(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            pump.stop_reading()
            error = task.exception()
            pump.end(error if error is not None else True)

        drained.add_done_callback(on_drained)

        # One timer per silence period, not one per frame: it re-arms itself
        # from the time of the last frame the pump saw.
        watchdog: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal watchdog
            silent_until = pump.last_seen + self._silence_limit
            if loop.time() >= silent_until:
                log.warning("router at %s silent for %.1f s: declaring it dead", self.endpoint, self._silence_limit)
                pump.end(False)
            else:
                watchdog = loop.call_at(silent_until, watch)

        watchdog = loop.call_at(pump.last_seen + self._silence_limit, watch)
        try:
            return await pump.ended
        finally:
            if watchdog is not None:
                watchdog.cancel()
            drained.cancel()

    # ----- incoming messages -------------------------------------------------------

    def _dispatch(self, frame: bytes) -> None:
        req = wire.decode_request_fast(frame)
        if req is not None:
            self._start_request(req)
            return
        try:
            msg = wire.decode_to_worker(frame)
        except wire.DecodeError as e:
            self._undecodable(frame, e)
            return
        if isinstance(msg, wire.Heartbeat):
            return
        if isinstance(msg, wire.Welcome):
            # The answer to a resent hello: only the timing may change.
            self._set_timing(msg)
        elif isinstance(msg, wire.Request):
            self._start_request(msg)
        elif isinstance(msg, wire.Cancel):
            self._cancel_request(msg.cid, msg.reason)
        elif isinstance(msg, wire.Goodbye):
            if not msg.reconnect:
                log.error("router at %s refused this worker: %s", self.endpoint, msg.reason)
                raise WorkerRejected(self.endpoint, msg.reason)
            log.info("router at %s said goodbye: %s; reconnecting", self.endpoint, msg.reason)
            raise SessionEnd()
        elif isinstance(msg, wire.Challenge):
            log.debug("ignoring a challenge after the welcome")
        elif isinstance(msg, wire.Connect):
            if len(self._conns) < MAX_KNOWN_CONNECTIONS or msg.conn in self._conns:
                self._conns[msg.conn] = msg
            self._queue_event("connect", msg.conn, msg, msg.route, msg.service)
        elif isinstance(msg, wire.Disconnect):
            self._queue_event("disconnect", msg.conn, msg, msg.route, msg.service)
            self._conns.pop(msg.conn, None)
            self.worker._forget_connection(msg.conn, self)
        elif isinstance(msg, wire.Event):
            self._queue_event("event", msg.conn, msg.data, msg.route, msg.service, msg.msg_type)
        elif isinstance(msg, wire.Binary):
            self._queue_event("binary", msg.conn, msg.data, msg.route, msg.service)
        elif isinstance(msg, wire.Raw):
            # A raw frame does not say its route: the connection's `connect` did, if we got it.
            known = self._conns.get(msg.conn)
            route, service = (known.route, known.service) if known else ("", "")
            self._queue_event("raw", msg.conn, Frame(msg.binary, msg.payload), route, service)

    def _undecodable(self, frame: bytes, e: wire.DecodeError) -> None:
        """Logs a frame that does not decode; answers ``bad_request`` to a request whose ``cid`` is readable."""
        cid = wire.request_cid(frame) if e.rejection != "version" else None
        if cid is None:
            log.warning("undecodable message from the router (%d bytes): %s", len(frame), e)
            return
        if cid in self._inflight:
            log.warning("undecodable duplicate of request %s, which is in flight: ignored", cid)
            return
        log.warning("request %s does not decode (%d bytes): answering bad_request: %s", cid, len(frame), e)
        err = wire.ErrorReply(
            cid=cid,
            code=codes.BAD_REQUEST,
            message=f"the request could not be decoded: {e}",
            retryable=False,
        )
        answer = self._within_limit(cid, wire.encode_from_worker(err))
        if answer is not None:
            self._send_nowait(answer)

    def _within_limit(self, cid: str, frame: bytes) -> bytes | None:
        """``frame`` (a terminal message of request ``cid``) if the router accepts its
        size, else the ``payload_too_large`` error that replaces it (``None``: not even that fits)."""
        limit = self._max_frame
        if limit is None or len(frame) <= limit:
            return frame
        log.warning(
            "request %s: reply of %d bytes exceeds the frame limit of %d; answering payload_too_large",
            cid,
            len(frame),
            limit,
        )
        replacement = wire.encode_from_worker(_too_large(cid, len(frame), limit))
        if len(replacement) > limit:
            log.warning("request %s: even the payload_too_large answer exceeds the frame limit; dropped", cid)
            return None
        return replacement

    def _start_request(self, req: wire.Request) -> None:
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
        if req.cid in self._inflight:
            log.warning("request %s is already in flight here: duplicate ignored", req.cid)
            return
        connect = self._conns.get(req.conn)
        deadline = loop.time() + min(req.timeout_ms / 1000, MAX_TIMEOUT)
        claims = req.claims if req.claims is not None else connect.claims if connect else None
        ctx = Context(self, req, deadline, claims)
        handler = self._requests.get(req.msg_type)
        if handler is None:
            log.debug("request %s: no handler for its type", req.cid)
            self._terminate(ctx, _error(req.cid, no_request_handler(req.msg_type, self._requests, self._events)))
            return
        if self._stop.is_set():
            # Crossed our bye: retryable, so the router can send it elsewhere.
            self._terminate(ctx, _error(req.cid, HandlerError.transient("the worker is stopping")))
            return
        if len(self._inflight) >= self._capacity:
            # The router keeps to the announced capacity; this only guards against a confused one.
            log.warning("request %s beyond capacity %d: refused", req.cid, self._capacity)
            self._terminate(ctx, _error(req.cid, HandlerError.overloaded("the worker is at capacity")))
            return
        coro = self._runner(ctx, handler, req.data)
        if _EAGER_TASKS:
            task = asyncio.Task(coro, loop=loop, name=f"request {req.cid}", eager_start=True)  # type: ignore[call-arg]
            if task.done():
                return  # finished without suspending: its terminal message is queued
        else:
            task = loop.create_task(coro, name=f"request {req.cid}")
            # The task's first step runs on the next loop turn. A handler that
            # does not suspend finishes there: its deadline timer would only be
            # armed and cancelled (and, on uvloop, closed: one more loop turn per
            # request), and its reply would wait for yet another turn to be
            # written. So the timer is armed after the first steps of this turn's
            # tasks, only for those still running, and the pump is asked to flush
            # behind those steps, in the same turn.
            entry = _InFlight(ctx, task, None)
            self._inflight[req.cid] = entry
            if not self._unarmed:
                loop.call_soon(self._arm_timers, True)
            self._unarmed.append(entry)
            if self._outbox is not None:
                self._outbox.expected = True
            return
        timer = loop.call_at(ctx.deadline, self._cancel_request, req.cid, "deadline")
        self._inflight[req.cid] = _InFlight(ctx, task, timer)

    def _arm_timers(self, first: bool, entries: list[_InFlight] | None = None) -> None:
        """Arms the deadline timers of requests started without one, once their
        tasks' first steps have run: a first pass runs behind the first task of a
        batch, and leaves those not done to a second pass, behind the rest."""
        if entries is None:
            entries, self._unarmed = self._unarmed, []
        inflight = self._inflight
        running = [e for e in entries if not e.task.done() and inflight.get(e.ctx.correlation_id) is e]
        if not running:
            return
        loop = asyncio.get_running_loop()
        if first:
            loop.call_soon(self._arm_timers, False, running)
            return
        cancel = self._cancel_request
        for e in running:
            if e.timer is None:
                e.timer = loop.call_at(e.ctx.deadline, cancel, e.ctx.correlation_id, "deadline")

    async def _run_in_slot(self, ctx: Context, handler: _Handler, data: Json) -> None:
        """Runs the request once it holds one of the worker's slots (several routers
        share its capacity). Waiting counts against its deadline and ends with its
        cancellation like the handler would; the slot is free again before the next
        loop turn writes the terminal message, so the router's next request finds it."""
        slots = self._slots
        assert slots is not None  # invariant: only the runner when there are slots
        await slots.acquire()
        try:
            await self._run_request(ctx, handler, data)
        finally:
            slots.release()

    async def _run_request(self, ctx: Context, handler: _Handler, data: Json) -> None:
        try:
            if handler.style is Style.ASYNC:
                # The common case without the generic runner's extra coroutine.
                value = await handler.fn(ctx, data)
                if not isinstance(value, (Reply, Partial)):
                    self._terminate_reply(ctx, None, value)
                    return
                reply = as_final(value)
            else:
                reply = await run_request(handler.fn, handler.style, ctx, data, self._executor)
            self._terminate_reply(ctx, reply.msg_type, reply.data)
            return
        except HandlerError as e:
            msg = _error(ctx.correlation_id, e)
        except asyncio.CancelledError:
            # Whoever cancelled the task has answered for it, except when the
            # handler's own code raised CancelledError: answer that here.
            self._terminate(ctx, _error(ctx.correlation_id, HandlerError.cancelled("the handler was cancelled")))
            raise
        except Exception:
            log.exception("handler of request %s (%s) failed", ctx.correlation_id, ctx.msg_type)
            msg = _error(ctx.correlation_id, HandlerError.worker_error("the worker's handler failed unexpectedly"))
        self._terminate(ctx, msg)

    def _terminate_reply(self, ctx: Context, msg_type: str | None, data: Json) -> None:
        """Sends the final reply of a request (the hot path of :meth:`_terminate`)."""
        frame = wire.encode_reply_fast(self._packer, ctx.correlation_id, True, msg_type, data)
        if frame is None:
            # Not JSON, or a bad type: the generic encoder names the fault.
            self._terminate(ctx, wire.Reply(cid=ctx.correlation_id, done=True, msg_type=msg_type, data=data))
            return
        self._terminate_frame(ctx, frame)

    def _cancel_request(self, cid: str, reason: str) -> None:
        entry = self._inflight.get(cid)
        if entry is None:
            log.debug("cancel for request %s, which is not in flight here", cid)
            return
        entry.ctx._mark_cancelled(reason)
        if reason == "deadline":
            log.warning("request %s passed its deadline", cid)
            err = HandlerError.timeout("the request's deadline passed before the worker finished")
        else:
            log.debug("request %s cancelled (%s)", cid, reason)
            err = HandlerError.cancelled(f"request cancelled ({reason})")
        self._terminate(entry.ctx, _error(cid, err))
        entry.task.cancel()

    def _terminate(self, ctx: Context, msg: wire.FromWorker) -> None:
        """Sends the request's terminal message, unless one was sent already."""
        if ctx._done:
            return
        try:
            encoded = wire.encode_from_worker(msg)
        except wire.EncodeError as e:
            log.error("request %s: final reply cannot be encoded: %s", ctx.correlation_id, e)
            encoded = wire.encode_from_worker(
                _error(ctx.correlation_id, HandlerError.worker_error("the worker produced a reply that is not JSON"))
            )
        self._terminate_frame(ctx, encoded)

    def _terminate_frame(self, ctx: Context, encoded: bytes) -> None:
        """Queues ``encoded``, the request's terminal message, unless one was sent already."""
        if not ctx._take_terminal():
            return
        entry = self._inflight.pop(ctx.correlation_id, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
        frame = self._within_limit(ctx.correlation_id, encoded)
        if frame is not None:
            self._send_nowait(frame)
        if self._stop.is_set():
            self._wake.set()

    def _queue_event(
        self, kind: str, conn: str, payload: Any, route: str, service: str, msg_type: str | None = None
    ) -> None:
        """Queues the handler of a message that gets no answer behind the connection's earlier ones."""
        self.worker._note_connection(conn, self)
        handler = self._events.get(msg_type) if msg_type is not None else self._kinds.get(kind)
        job: Callable[[], Awaitable[None]]
        if handler is not None:
            known = self._conns.get(conn)
            ectx = EventContext(self, conn, route, service, msg_type, known.claims if known else None)
            job = functools.partial(run_event, handler.fn, handler.style, (ectx, payload), self._executor)
        elif msg_type is not None or kind == "binary":
            # The client would never learn that its message went nowhere: answer it.
            what = f"{kind} of type {msg_type}" if msg_type is not None else kind
            log.info("no handler for %s on connection %s: answering unknown_type", what, conn)
            if msg_type is not None:
                error = no_event_handler(msg_type, self._requests, self._events)
            else:
                error = no_binary_handler()
            job = functools.partial(self._answer_without_id, conn, error)
        else:
            log.debug("no handler for %s on connection %s: dropped", kind, conn)
            return

        queue = self._queues.get(conn)
        if queue is None:
            queue = self._queues[conn] = collections.deque([job])
            self._queue_tasks[conn] = asyncio.create_task(self._drain_queue(conn, queue), name=f"connection {conn}")
        elif len(queue) >= self._config.connection_queue:
            log.warning("event queue of connection %s full: %s dropped", conn, kind)
        else:
            queue.append(job)

    async def _answer_without_id(self, conn: str, error: HandlerError) -> None:
        """Tells the client that a message without request id failed: a ``push`` of
        type ``error``, which the router turns into an error frame without ``id``
        (PROTOCOL.md, ``push``). Runs in the connection's queue, in order."""
        with contextlib.suppress(WorkerStopped):
            await self.send(wire.Push(conn=conn, msg_type="error", data={"code": error.code, "message": error.message}))

    async def _drain_queue(self, conn: str, queue: collections.deque[Callable[[], Awaitable[None]]]) -> None:
        try:
            while queue:
                job = queue.popleft()
                try:
                    await job()
                except Exception:
                    log.exception("event handler for connection %s failed; the worker carries on", conn)
        finally:
            # No await between the last emptiness check and this: a job queued meanwhile is impossible.
            if self._queues.get(conn) is queue:
                del self._queues[conn]
                del self._queue_tasks[conn]
            self._wake.set()

    # ----- stop and loss -------------------------------------------------------------

    async def _drain_on_stop(self) -> None:
        """After a stop: ``bye``, wait for in-flight work within the grace period, answer the rest."""
        await self._stop.wait()
        loop = asyncio.get_running_loop()
        self._set_status(state=State.STOPPING)
        self._send_nowait(wire.encode_from_worker(wire.Bye(reason="worker stopping")))
        log.info("stopping: %d request(s) in flight from %s", len(self._inflight), self.endpoint)
        while self._inflight or self._queue_tasks:
            deadline = self.worker._stop_deadline
            assert deadline is not None  # invariant: set by stop() with the event
            left = deadline - loop.time()
            if left <= 0:
                break
            self._wake.clear()
            await _wait_event(self._wake, left)
        if self._inflight:
            log.warning("grace period over: abandoning %d request(s)", len(self._inflight))
        for cid, entry in list(self._inflight.items()):
            entry.ctx._mark_cancelled("shutdown")
            err = HandlerError.transient("the worker stopped before finishing the request")
            self._terminate(entry.ctx, _error(cid, err))
            entry.task.cancel()
        for task in self._queue_tasks.values():
            task.cancel()

    def abandon_all(self) -> None:
        """Drops every request and event queue without answering (the socket is gone)."""
        if self._inflight:
            log.warning(
                "connection to the router at %s lost: %d request(s) abandoned", self.endpoint, len(self._inflight)
            )
        for entry in self._inflight.values():
            entry.ctx._mark_cancelled("lost")
            entry.ctx._take_terminal()
            if entry.timer is not None:
                entry.timer.cancel()
            entry.task.cancel()
        self._inflight.clear()
        for task in self._queue_tasks.values():
            task.cancel()
        self._queues.clear()
        self._queue_tasks.clear()


def _error(cid: str, e: HandlerError) -> wire.ErrorReply:
    code = e.code
    if not codes.is_valid_code(code):
        log.warning("handler error code %r is not snake_case; sending worker_error", code)
        code = codes.WORKER_ERROR
    return wire.ErrorReply(
        cid=cid, code=code, message=e.message, retryable=e.retryable, retry_after_ms=e.retry_after_ms
    )


def _too_large(cid: str, size: int, limit: int) -> wire.ErrorReply:
    """The terminal error that replaces a reply of ``size`` bytes the router would not accept."""
    return wire.ErrorReply(
        cid=cid,
        code=codes.PAYLOAD_TOO_LARGE,
        message=f"reply of {size} bytes exceeds the router's frame limit of {limit} bytes",
        retryable=False,
    )


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits up to ``timeout`` seconds for ``event``; returns whether it is set."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), max(timeout, 0))
    return event.is_set()
