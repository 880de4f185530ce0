"""The :class:`Worker`: handler registry, its sessions with one or several
routers, the operations on connections and topics, status and graceful stop.

The work of one router session (hello, heartbeats, liveness, reconnects,
request dispatch, event queues) is in :mod:`~bridge_worker.session`. A worker
has one :class:`~bridge_worker.session.Session` per endpoint of its
``endpoint`` setting (a comma-separated list names several routers), and
this module decides what they share and where a message goes:

- A reply, partial reply or error goes to the session its request came from;
  so does anything a handler sends through its context (``ctx.push``,
  ``ctx.subscribe``, ...) for its own connection.
- :meth:`Worker.push`, :meth:`Worker.subscribe` and the other operations on a
  connection go to the router the connection lives on: the session that
  brought its ``connect``, events or frames. A connection the worker has only
  seen in requests, or not at all, gets the message on every live session:
  connection ids are unique across routers, and a router drops a message for
  a connection it does not have.
- A publication goes to the first live session in list order (none live: to
  the first session, which drops it like a single router that is down).
- Capacity is the worker's, not each router's: every router is told the whole
  ``capacity``, and with several routers one semaphore shared by the sessions
  keeps at most ``capacity`` handlers running. Why: ``capacity`` sizes what
  this process can do at once (its thread pool, a model, memory), which does
  not grow with the number of routers; announcing it whole to each router
  lets any one of them use all of it while the others are quiet, where a
  split would strand it. A request that arrives while the other routers'
  requests hold every slot waits for one, with its deadline and cancellation
  running; the routers' credits bound that wait to (routers - 1) x capacity
  requests. The Rust SDK does the same.
- The worker's :attr:`Worker.status` sums up its sessions': registered while
  any is, welcomes counted over all of them, the smallest frame limit any
  router announced. :attr:`Worker.router_statuses` has each session's own.
- A router that refuses the worker for good (a wrong secret, another protocol
  version) stops the whole worker, gracefully on the other routers, and
  :meth:`Worker.run` raises that refusal: the same configuration goes to
  every router, so a refusal is a mistake to fix, not a router to skip.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

from . import protocol as wire
from .config import WorkerConfig
from .errors import WorkerStopped
from .handlers import Frame, Style, style_of
from .protocol import Json
from .session import MAX_KNOWN_CONNECTIONS, SDK_NAME, SDK_VERSION, Session
from .status import State, Status

__all__ = ["Worker", "State", "Status", "SDK_NAME", "SDK_VERSION"]

log = logging.getLogger("bridge_worker")

H = TypeVar("H", bound=Callable[..., Any])

MAX_MSG_TYPES = 256
"""Most message types a ``hello`` may announce (PROTOCOL.md, ``hello``)."""
MAX_MSG_TYPE_LEN = 128
"""Longest message type a client may send, in bytes: a handler for a longer one could never be called."""


@dataclass(frozen=True, slots=True)
class _Handler:
    fn: Callable[..., Any]
    style: Style


class Worker:
    """A worker serving one or more services of the router, or of several routers.

    Register handlers with the decorators, then ``await worker.run()`` (or use
    :func:`bridge_worker.cli.main` for a ready-made command line). A worker
    runs once.

    Example::

        worker = Worker(["chat"])

        @worker.handler("echo")
        async def echo(ctx: Context, data):
            return data

    ``services`` and keyword settings override :class:`WorkerConfig` fields
    (``capacity``, ``worker_id``, ``endpoint``, ...); endpoints and the secret
    default to ``BRIDGE_ENDPOINT``, ``PUBLISH_ENDPOINT`` and ``BRIDGE_SECRET``.
    An ``endpoint`` that lists several routers, comma-separated, makes the
    worker serve each of them, with one session per router (see the module
    documentation for what goes where).
    """

    def __init__(
        self, services: list[str] | str | None = None, *, config: WorkerConfig | None = None, **settings: Any
    ) -> None:
        if isinstance(services, str):
            services = [services]
        if config is None:
            config = WorkerConfig.from_env(list(services or []))
        elif services is not None:
            config.services = list(services)
        for name, value in settings.items():
            if name not in WorkerConfig.__dataclass_fields__:
                raise TypeError(f"unknown worker setting {name!r}")
            setattr(config, name, value)
        self.config = config
        self._requests: dict[str, _Handler] = {}
        self._events: dict[str, _Handler] = {}
        self._kinds: dict[str, _Handler] = {}  # connect, disconnect, binary, raw
        self._status = Status(State.CONNECTING, 0, None)
        self._status_waiters: list[asyncio.Future[None]] = []
        self._started = False
        self._sessions: list[Session] = []
        # Which session each connection lives on; None with a single router.
        self._directory: dict[str, Session] | None = None
        self._stop = asyncio.Event()
        self._stop_deadline: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Set by Publisher: registers with no services and capacity 0.
        self._publisher_session = False
        # A ZeroMQ context to use instead of one of its own (not terminated here).
        self._zmq_context: zmq.asyncio.Context | None = None
        # The context the pyzmq transport uses: made on first use (a worker on
        # the zmtp transport starts no libzmq thread).
        self._zctx: zmq.Context[Any] | None = None
        # Packs final replies on the loop thread (never shared with other threads).
        self._packer = msgpack.Packer(use_bin_type=True)

    # ----- registration ---------------------------------------------------------

    def handler(self, msg_type: str) -> Callable[[H], H]:
        """Registers the request handler of ``msg_type``: ``fn(ctx: Context, data)``.

        ``fn`` may be a coroutine function (its return value is the final
        reply), an async generator (yields are partial replies, a yielded
        :class:`Reply` is the final one), or a plain function or generator,
        which runs in the worker's thread pool. Raise :class:`HandlerError`
        to fail the request.

        The worker announces the types of its handlers to the router in its
        ``hello``: they show in the router's ``GET /routes``.
        """
        self._check_type(msg_type)
        return self._register(self._requests, msg_type, allow_generators=True)

    def event(self, msg_type: str) -> Callable[[H], H]:
        """Registers the handler of fire-and-forget messages (no ``id``) of
        ``msg_type``: ``fn(ctx: EventContext, data)``."""
        self._check_type(msg_type)
        return self._register(self._events, msg_type, allow_generators=False)

    def _check_type(self, msg_type: str) -> None:
        """Refuses a type no client could send, or one too many to announce."""
        if not 1 <= len(msg_type.encode("utf-8")) <= MAX_MSG_TYPE_LEN:
            raise ValueError(f"message type {msg_type!r}: a type is 1 to {MAX_MSG_TYPE_LEN} bytes")
        if msg_type not in self.msg_types and len(self.msg_types) >= MAX_MSG_TYPES:
            raise ValueError(f"a worker may announce at most {MAX_MSG_TYPES} message types")

    @property
    def msg_types(self) -> list[str]:
        """The message types this worker has handlers for (requests and
        fire-and-forget messages together, sorted): what its ``hello`` announces."""
        return sorted(set(self._requests) | set(self._events))

    def on_connect(self, fn: H) -> H:
        """Registers ``fn(ctx: EventContext, info: protocol.Connect)``, called when a
        client connects (path, params, query, headers, remote address, claims)."""
        return self._register(self._kinds, "connect", allow_generators=False)(fn)

    def on_disconnect(self, fn: H) -> H:
        """Registers ``fn(ctx: EventContext, info: protocol.Disconnect)``, called when
        a client connection closes (close code and reason)."""
        return self._register(self._kinds, "disconnect", allow_generators=False)(fn)

    def on_binary(self, fn: H) -> H:
        """Registers ``fn(ctx: EventContext, data: bytes)`` for binary frames from clients."""
        return self._register(self._kinds, "binary", allow_generators=False)(fn)

    def on_raw(self, fn: H) -> H:
        """Registers ``fn(ctx: EventContext, frame: Frame)`` for frames of raw routes;
        answer with :meth:`EventContext.send_raw`."""
        return self._register(self._kinds, "raw", allow_generators=False)(fn)

    def _register(self, table: dict[str, _Handler], key: str, *, allow_generators: bool) -> Callable[[H], H]:
        def decorate(fn: H) -> H:
            if key in table:
                raise ValueError(f"a handler for {key!r} is already registered")
            style = style_of(fn)
            if not allow_generators and style in (Style.ASYNC_GEN, Style.SYNC_GEN):
                raise TypeError(f"{key!r}: generator handlers are only allowed for requests")
            table[key] = _Handler(fn, style)
            return fn

        return decorate

    # ----- operations (from handlers or any task on the worker's loop) ------------

    async def push(self, conn: str, msg_type: str, data: Json = None) -> None:
        """Sends a JSON message ``{"type": msg_type, "data": data}`` to one client connection.

        Like every operation here it only queues the message (waiting while
        the queue is full): it returns before the router has it, and
        messages queued while the worker is reconnecting are dropped (the
        connections they address belonged to the lost router session).
        With several routers it goes to the router the connection lives on.
        Raises :class:`WorkerStopped` when the worker is not running.
        """
        await self._send(wire.Push(conn=conn, msg_type=msg_type, data=data), conn)

    async def push_binary(self, conn: str, data: bytes) -> None:
        """Sends a binary frame to one client connection."""
        await self._send(wire.PushBinary(conn=conn, data=bytes(data)), conn)

    async def send_raw(self, conn: str, frame: Frame) -> None:
        """Sends a frame unchanged to a client of a raw route."""
        await self._send(wire.Raw(conn=conn, binary=frame.binary, payload=frame.payload), conn)

    async def close(self, conn: str, code: int = 1000, reason: str = "") -> None:
        """Closes a client connection (code 1000, or 3000-4999 for applications)."""
        await self._send(wire.Close(conn=conn, code=code, reason=reason), conn)

    async def subscribe(self, conn: str, topic: str) -> None:
        """Subscribes a client connection to a topic (at the router it lives on)."""
        await self._send(wire.Subscribe(conn=conn, topic=topic), conn)

    async def unsubscribe(self, conn: str, topic: str) -> None:
        """Unsubscribes a client connection from a topic."""
        await self._send(wire.Unsubscribe(conn=conn, topic=topic), conn)

    async def publish(self, topic: str, msg_type: str, data: Json = None) -> None:
        """Publishes to every client subscribed to ``topic``.

        This goes over the worker's own socket, so it is ordered with the
        worker's other messages (a ``subscribe`` sent before it takes effect
        first); a :class:`~bridge_worker.Publisher` has no such ordering.
        With several routers it goes to ONE of them, the first live one in
        list order (routers joined by ``CLUSTER_URL`` relay it to the
        others): the ordering holds for messages that went to that router.
        """
        await self._send(wire.Publish(topic=topic, msg_type=msg_type, data=data), None)

    def _check_running(self) -> None:
        if self._status.state is State.STOPPED or not self._started:
            raise WorkerStopped()

    async def _send(self, msg: wire.FromWorker, conn: str | None) -> None:
        """Queues ``msg``: about connection ``conn``, or a publication (``None``)."""
        frame = wire.encode_from_worker(msg)
        self._check_running()
        sessions = self._sessions
        if len(sessions) == 1:
            await sessions[0].send_frame(msg.KIND, frame)
            return
        directory = self._directory
        target = self._publication_session() if conn is None else directory.get(conn) if directory else None
        if target is not None:
            await target.send_frame(msg.KIND, frame)
            return
        # A connection seen only in requests, or not at all: every live router
        # (the ones that do not have it drop it).
        live = [s for s in sessions if s.live] or sessions[:1]
        for s in live:
            s.check_size(msg.KIND, frame)
        for s in live:
            await s.send_frame(msg.KIND, frame)

    def _publication_session(self) -> Session:
        """The session a publication goes through: the first live one in list order,
        else the first (which drops it, like a single router that is down)."""
        sessions = self._sessions
        for s in sessions:
            if s.live:
                return s
        return sessions[0]

    # ----- which router a connection lives on (several routers) ---------------------

    def _note_connection(self, conn: str, session: Session) -> None:
        directory = self._directory
        if directory is not None and (len(directory) < MAX_KNOWN_CONNECTIONS or conn in directory):
            directory[conn] = session

    def _forget_connection(self, conn: str, session: Session) -> None:
        directory = self._directory
        if directory is not None and directory.get(conn) is session:
            del directory[conn]

    def _forget_connections(self, session: Session) -> None:
        """``session`` lost its router: the connections it brought are gone."""
        directory = self._directory
        if directory:
            for conn in [c for c, s in directory.items() if s is session]:
                del directory[conn]

    # ----- status and stop -------------------------------------------------------

    @property
    def status(self) -> Status:
        """The worker's current status. With several routers it sums up their
        sessions': registered while any of them is, ``registrations`` counted over
        all of them, ``router_id`` of the last welcome, the smallest frame limit."""
        return self._status

    @property
    def router_statuses(self) -> list[tuple[str, Status]]:
        """Each router session's endpoint and status, in list order (empty before :meth:`run`)."""
        return [(s.endpoint, s.status) for s in self._sessions]

    async def wait_registered(self, registrations: int = 1) -> Status:
        """Waits until routers have welcomed the worker ``registrations`` times
        in total; raises :class:`WorkerStopped` if it stops first."""
        while True:
            if self._status.registrations >= registrations:
                return self._status
            if self._status.state is State.STOPPED:
                raise WorkerStopped()
            waiter = asyncio.get_running_loop().create_future()
            self._status_waiters.append(waiter)
            await waiter

    def _set_status(self, status: Status) -> None:
        if status == self._status:
            return
        self._status = status
        waiters, self._status_waiters = self._status_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _session_changed(self, changed: Session) -> None:
        """Derives the worker's status from its sessions' after ``changed``'s changed."""
        sessions = self._sessions
        if len(sessions) == 1:
            self._set_status(changed.status)
            return
        states = {s.status.state for s in sessions}
        if State.STOPPING in states:
            state = State.STOPPING
        elif State.REGISTERED in states:
            state = State.REGISTERED
        else:
            state = State.CONNECTING
        registrations = sum(s.status.registrations for s in sessions)
        # A new welcome names the router; otherwise the last welcome's stays.
        router_id = changed.status.router_id if registrations != self._status.registrations else self._status.router_id
        limits = [s.status.max_frame_bytes for s in sessions if s.status.max_frame_bytes is not None]
        self._set_status(Status(state, registrations, router_id, min(limits) if limits else None))

    def stop(self, grace: float | None = None) -> None:
        """Asks the worker to stop gracefully: ``bye``, finish in-flight work
        within ``grace`` seconds (default: ``config.grace_period``), close.
        Returns at once; :meth:`run` returns when the worker has stopped.
        Calling it again with a shorter grace shortens the wait (0: answer
        in-flight requests with a retryable ``worker_error`` now). Call it from the worker's
        event loop thread.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.grace_period if grace is None else grace)
        if self._stop_deadline is None or deadline < self._stop_deadline:
            self._stop_deadline = deadline
        self._stop.set()
        for s in self._sessions:
            s.wake()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second %s: abandoning in-flight work", sig.name)
            self.stop(grace=0)
        else:
            log.info("%s: stopping gracefully", sig.name)
            self.stop()

    # ----- run -------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Connects, registers and serves until :meth:`stop` (or SIGTERM/SIGINT
        with ``handle_signals``: the first stops gracefully, a second one
        abandons in-flight work). Reconnects on its own, to each router on its own.

        Raises :class:`ConfigError` for an unusable configuration and
        :class:`WorkerRejected` when a router refuses the worker for good.
        """
        if self._publisher_session:
            self.config._validate_publisher()
        else:
            self.config.validate()
        if self._started:
            raise RuntimeError("a Worker runs once; create a new one")
        endpoints = self.config.endpoints()
        several = len(endpoints) > 1
        # The worker's capacity, shared by its routers' sessions (see the module docs).
        slots = asyncio.Semaphore(self.config.capacity) if several and self.config.capacity > 0 else None
        self._started = True
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.capacity + 4, thread_name_prefix="bridge-worker-handler"
        )
        self._sessions = [Session(self, endpoint, slots) for endpoint in endpoints]
        self._directory = {} if several else None
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._zctx = self._zmq_context
        log.info(
            "worker %s starting: services %s, capacity %d, router%s %s, transport %s",
            self.config.worker_id,
            self.config.services,
            self.config.capacity,
            "s" if several else "",
            ", ".join(endpoints),
            self.config.transport,
        )
        try:
            if several:
                await self._run_sessions()
            else:
                await self._sessions[0].run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            for s in self._sessions:
                s.abandon_all()
            self._executor.shutdown(wait=False, cancel_futures=True)
            zctx = self._zctx
            if zctx is not None and self._zmq_context is None:
                # term() waits for lingering sockets to flush: keep it off the loop.
                await asyncio.to_thread(zctx.term)
            for s in self._sessions:
                s.status = replace(s.status, state=State.STOPPED)
            self._set_status(replace(self._status, state=State.STOPPED))
            log.info("worker %s stopped", self.config.worker_id)

    def _zmq(self) -> zmq.Context[Any]:
        """The ZeroMQ context of the pyzmq transport (the one given, or one of its own, made now)."""
        if self._zctx is None:
            self._zctx = zmq.asyncio.Context()
        return self._zctx

    async def _run_sessions(self) -> None:
        """Runs every router's session until all have ended; the first refusal stops the others."""
        tasks = [asyncio.create_task(s.run(), name=f"bridge-session {s.endpoint}") for s in self._sessions]
        refusal: BaseException | None = None
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    await next_done
                except Exception as e:
                    if refusal is None:
                        refusal = e
                        log.error("a router session failed (%s): stopping the others", e)
                        self.stop()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if refusal is not None:
            raise refusal
