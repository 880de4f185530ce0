"""What a handler knows about the message it handles: :class:`Context` for a
request (correlation id, deadline, cancellation, streamed replies) and
:class:`EventContext` for everything that gets no reply (events, binary and
raw frames, connects, disconnects).

Both offer the worker's operations on their own connection;
:attr:`Context.worker` / :attr:`EventContext.worker` reach any other one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import protocol as wire
from .errors import HandlerError
from .handlers import Frame, Partial
from .protocol import Json

if TYPE_CHECKING:
    from .session import Session
    from .worker import Worker


class _ConnectionOps:
    """The worker's operations, bound to one connection and to the router
    session its message came from: what they send goes to that router."""

    __slots__ = ("_session", "_conn")

    def __init__(self, session: Session, conn: str) -> None:
        self._session = session
        self._conn = conn

    @property
    def worker(self) -> Worker:
        """The worker, to reach other connections."""
        return self._session.worker

    @property
    def connection_id(self) -> str:
        """The id of the client connection."""
        return self._conn

    async def push(self, msg_type: str, data: Json = None) -> None:
        """Pushes a JSON message ``{"type": msg_type, "data": data}`` to this connection."""
        await self._session.send(wire.Push(conn=self._conn, msg_type=msg_type, data=data))

    async def push_binary(self, data: bytes) -> None:
        """Pushes a binary frame to this connection."""
        await self._session.send(wire.PushBinary(conn=self._conn, data=bytes(data)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Closes this connection (code 1000, or 3000-4999 for applications)."""
        await self._session.send(wire.Close(conn=self._conn, code=code, reason=reason))

    async def subscribe(self, topic: str) -> None:
        """Subscribes this connection to a topic."""
        await self._session.send(wire.Subscribe(conn=self._conn, topic=topic))

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribes this connection from a topic."""
        await self._session.send(wire.Unsubscribe(conn=self._conn, topic=topic))

    async def publish(self, topic: str, msg_type: str, data: Json = None) -> None:
        """Publishes to every client subscribed to ``topic`` (see :meth:`Worker.publish`)."""
        await self._session.worker.publish(topic, msg_type, data)


class Context(_ConnectionOps):
    """Everything about one request, given to its handler.

    The SDK sends exactly one terminal message per request. Once it is sent
    (final reply, error, cancellation, deadline), anything else sent for the
    request is dropped.

    Cancellation: when the router cancels the request (the client sent
    ``cancel``, disconnected, the router timed out or is stopping) or its
    deadline passes, the SDK answers the router at once and cancels the
    handler's task, so the handler sees :class:`asyncio.CancelledError` at its
    next ``await`` (use ``try/finally`` to clean up). Code that cannot be
    interrupted, such as a blocking call in a sync handler running in a thread,
    should poll :attr:`cancelled` or wait on :meth:`wait_cancelled`.
    """

    __slots__ = ("_req", "_deadline", "_claims", "_cancel_event", "_cancel_reason", "_done")

    def __init__(self, session: Session, request: wire.Request, deadline: float, claims: Json | None) -> None:
        self._session = session
        self._conn = request.conn
        self._req = request
        self._deadline = deadline
        self._claims = claims
        # Made on first use: most handlers never look at it, and a request
        # costs a few microseconds less without it (what must stay true:
        # once cancelled, an event made later is made set).
        self._cancel_event: asyncio.Event | None = None
        self._cancel_reason: str | None = None
        self._done = False

    def __repr__(self) -> str:
        # Leaves out the client id and claims: they may be user data.
        return (
            f"Context(correlation_id={self.correlation_id!r}, connection_id={self.connection_id!r}, "
            f"route={self.route!r}, msg_type={self.msg_type!r}, attempt={self.attempt})"
        )

    @property
    def correlation_id(self) -> str:
        """The router's correlation id of this request (join logs on it)."""
        return self._req.cid

    @property
    def route(self) -> str:
        """The route pattern the connection matched (e.g. ``/ws/vision``)."""
        return self._req.route

    @property
    def service(self) -> str:
        """The service the request was routed to."""
        return self._req.service

    @property
    def msg_type(self) -> str:
        """The client's message type."""
        return self._req.msg_type

    @property
    def client_id(self) -> Json:
        """The client's own request id, as it sent it (string or number)."""
        return self._req.id

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2.. when the router retries."""
        return self._req.attempt

    @property
    def claims(self) -> Json | None:
        """Verified token claims of the connection, when the route uses auth (from the
        request, or else from the connection's ``connect`` to this worker)."""
        return self._claims

    @property
    def deadline(self) -> float:
        """When the router gives up on this request, in event-loop time
        (``loop.time()``): receive time + the request's ``timeout_ms``."""
        return self._deadline

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once passed)."""
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    @property
    def cancelled(self) -> bool:
        """Whether the request was cancelled or timed out (safe to read from any thread)."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str | None:
        """Why it was cancelled: ``client``, ``disconnected``, ``timeout``, ``shutdown``
        (the router's reasons), ``deadline`` (the SDK's own timer) or ``None``."""
        return self._cancel_reason

    @property
    def cancel_event(self) -> asyncio.Event:
        """Set when the request is cancelled (for ``asyncio.wait`` with other work).
        Read it on the worker's event loop thread."""
        event = self._cancel_event
        if event is None:
            # Published before the reason is read; _mark_cancelled writes the
            # reason before it reads the event: one of the two sets it.
            event = self._cancel_event = asyncio.Event()
            if self._cancel_reason is not None:
                event.set()
        return event

    async def wait_cancelled(self) -> None:
        """Returns when the request is cancelled."""
        await self.cancel_event.wait()

    @property
    def done(self) -> bool:
        """Whether the request's terminal message has been sent."""
        return self._done

    async def send_partial(self, data: Json = None, msg_type: str | None = None) -> None:
        """Streams a partial (``done: false``) reply.

        ``msg_type`` names the reply's type (e.g. ``THOUGHT``); by default it is
        the request's. ``data`` may also be a :class:`Partial`. Waits while the
        worker's outbound queue is full. Once the request has ended (terminal
        message sent, cancelled, past its deadline), partial replies are
        dropped. A partial reply bigger than the router's frame limit ends the
        request: the SDK answers it ``payload_too_large``, cancels the handler
        and raises :class:`~bridge_worker.PayloadTooLarge`.
        """
        if isinstance(data, Partial):
            data, msg_type = data.data, data.msg_type
        await self._session.send_partial(
            self, wire.Reply(cid=self.correlation_id, done=False, msg_type=msg_type, data=data)
        )

    # The SDK's side of the request's life, used by the worker.

    def _mark_cancelled(self, reason: str) -> None:
        if self._cancel_reason is None:
            self._cancel_reason = reason
            if self._cancel_event is not None:
                self._cancel_event.set()

    def _take_terminal(self) -> bool:
        """True exactly once: the caller sends the request's terminal message."""
        if self._done:
            return False
        self._done = True
        return True


class EventContext(_ConnectionOps):
    """Everything about a message that gets no reply: a fire-and-forget
    event, a binary or raw frame, a connect or a disconnect.

    Messages of one connection are handled one at a time, in arrival order;
    different connections are handled concurrently.
    """

    __slots__ = ("_route", "_service", "_msg_type", "_claims")

    def __init__(
        self, session: Session, conn: str, route: str, service: str, msg_type: str | None, claims: Json | None
    ) -> None:
        super().__init__(session, conn)
        self._route = route
        self._service = service
        self._msg_type = msg_type
        self._claims = claims

    def __repr__(self) -> str:
        return f"EventContext(connection_id={self.connection_id!r}, route={self.route!r}, msg_type={self.msg_type!r})"

    @property
    def route(self) -> str:
        """The route pattern the connection matched; empty for raw frames
        before this worker saw the connection's ``connect``."""
        return self._route

    @property
    def service(self) -> str:
        """The service the message was routed to (empty like :attr:`route`)."""
        return self._service

    @property
    def msg_type(self) -> str | None:
        """The client's message type, for fire-and-forget events."""
        return self._msg_type

    @property
    def claims(self) -> Json | None:
        """Verified token claims of the connection, when known to this worker."""
        return self._claims

    async def send_raw(self, frame: Frame) -> None:
        """Sends a frame unchanged to this connection (raw routes)."""
        await self._session.send(wire.Raw(conn=self._conn, binary=frame.binary, payload=frame.payload))

    async def send_error(self, error: HandlerError) -> None:
        """Tells the client that the message being handled failed, since it has no
        reply to carry the error: the client gets an error frame without ``id`` with
        ``error``'s code and message (a ``push`` of type ``error``, PROTOCOL.md §5).
        A fire-and-forget message or a binary frame that cannot be acted on should
        get one rather than be dropped silently."""
        await self._session.send(
            wire.Push(conn=self._conn, msg_type="error", data={"code": error.code, "message": error.message})
        )
