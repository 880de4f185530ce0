"""Publishing to topics from any process, over the router's bridge endpoint.

A :class:`Publisher` is a session of its own at the router, run by the same
machinery as a :class:`~bridge_worker.Worker`: a DEALER socket connected to
``BRIDGE_ENDPOINT`` that registers with a ``hello`` listing **no services and
capacity 0** (so the router sends it no requests), proves the shared secret
(``BRIDGE_SECRET``) when the router challenges it, heartbeats, notices a dead
router and reconnects with backoff. Each publication is a
``publish{topic, msg_type, data}`` message on that socket, so a router with a
secret only takes publications from processes that know it.

Delivery: :meth:`Publisher.publish` returns once the publication is on the
socket of a registered session. While the publisher is (re)connecting it
waits, up to the publisher's ``timeout`` (5 s), then raises
:class:`~bridge_worker.NotConnected`; a publication bigger than the router's
frame limit raises :class:`~bridge_worker.PayloadTooLarge`. It never drops a
publication without saying so, but the router does not acknowledge
publications: one written just before the router died is lost with it.
Publications of one publisher reach the router in order; for messages that
must follow a ``subscribe`` of a worker in order, publish over that worker's
socket with :meth:`Worker.publish`.

With a comma-separated list of endpoints the publisher keeps a session with
each router and sends each publication through ONE of them: the first live
one in list order (routers joined by ``CLUSTER_URL`` relay it to the others'
subscribers). With none live it waits, as with a single router that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from types import TracebackType
from typing import Any

import zmq.asyncio

from . import protocol as wire
from .config import WorkerConfig
from .errors import NotConnected, WorkerStopped
from .protocol import Json
from .worker import State, Status, Worker

DEFAULT_TIMEOUT = 5.0
"""Seconds :meth:`Publisher.start` and each :meth:`Publisher.publish` wait for a registered session."""


class Publisher:
    """A publisher session with the router.

    Usable as an async context manager, which starts the session (waiting
    until the router has registered it) and closes it::

        async with Publisher() as pub:
            await pub.publish("prices", "price_update", {"symbol": "ACME", "price": 101.25})

    ``endpoint`` (one router, or a comma-separated list of several: each
    publication then goes through the first live one in list order) defaults
    to ``BRIDGE_ENDPOINT`` (``tcp://127.0.0.1:5555``) and
    ``secret`` to ``BRIDGE_SECRET``, as for a worker. ``settings`` are other
    :class:`WorkerConfig` timing fields (``backoff_initial``, ``backoff_max``,
    ``handshake_timeout``, ``linger``) or ``transport`` (``BRIDGE_TRANSPORT``;
    ``context``, a ZeroMQ context, is only used by the ``pyzmq`` transport). Without the context manager, the first
    :meth:`publish` starts the session; call :meth:`aclose` (or :meth:`close`)
    when done.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        secret: str | None = None,
        publisher_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        **settings: Any,
    ) -> None:
        config = WorkerConfig.from_env([])
        config.capacity = 0
        config.worker_id = publisher_id or f"python-publisher-{os.getpid()}"
        if endpoint:
            config.endpoint = endpoint
        if secret is not None:
            config.secret = secret
        for name, value in settings.items():
            if name not in (
                "backoff_initial",
                "backoff_max",
                "handshake_timeout",
                "linger",
                "outbound_queue",
                "outbound_bytes",
                "transport",
            ):
                raise TypeError(f"unknown publisher setting {name!r}")
            setattr(config, name, value)
        self.endpoint = config.endpoint
        self.timeout = timeout
        self._worker = Worker(config=config)
        self._worker._publisher_session = True
        self._worker._zmq_context = context
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> Status:
        """The session's status (registered, reconnecting, ...)."""
        return self._worker.status

    async def start(self) -> None:
        """Starts the session if needed and waits until the router has registered it
        (raises :class:`NotConnected` after ``timeout``, :class:`WorkerRejected` when
        refused, e.g. for a wrong or missing secret)."""
        self._ensure_started()
        await self._wait_registered(asyncio.get_running_loop().time() + self.timeout)

    async def publish(self, topic: str, msg_type: str, data: Json = None) -> None:
        """Sends ``{"type": msg_type, "topic": topic, "data": data}`` to the topic's
        subscribers; returns once the ``publish`` message is on the socket of a
        registered session (waiting up to ``timeout`` while reconnecting).

        Raises :class:`NotConnected` (no session within ``timeout``),
        :class:`PayloadTooLarge` (over the router's frame limit),
        :class:`WorkerRejected` (the router refused the publisher),
        :class:`WorkerStopped` (closed), :class:`protocol.EncodeError` (``data``
        is not JSON).
        """
        frame = wire.encode_from_worker(wire.Publish(topic=topic, msg_type=msg_type, data=data))
        self._ensure_started()
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            await self._wait_registered(deadline)
            session = self._worker._publication_session()
            session.check_size(wire.Publish.KIND, frame)
            if await session.send_confirmed(frame):
                return
            # The session ended as the frame was handed over: wait for the next one.

    def close(self) -> None:
        """Asks the session to stop (``bye``); returns at once. Use :meth:`aclose`
        to wait until it has. Call it from the publisher's event loop."""
        if self._task is None or self._task.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # the loop that ran the session is gone, and the session with it
        self._worker.stop(grace=0)

    async def aclose(self) -> None:
        """Stops the session and waits until its socket is closed."""
        self.close()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def __aenter__(self) -> Publisher:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._worker.run(), name="bridge-publisher")

    async def _wait_registered(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        assert task is not None  # invariant: _ensure_started ran
        while True:
            if task.done():
                task.result()  # the router's refusal (WorkerRejected) or a bad configuration
                raise WorkerStopped()
            state = self._worker.status.state
            if state is State.REGISTERED:
                return
            if state in (State.STOPPING, State.STOPPED):
                raise WorkerStopped()
            left = deadline - loop.time()
            if left <= 0:
                raise NotConnected(self.endpoint, self.timeout)
            waiter = loop.create_future()
            self._worker._status_waiters.append(waiter)
            try:
                await asyncio.wait({waiter, task}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
