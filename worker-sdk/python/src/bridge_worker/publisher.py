"""Publishing to topics from any process, over the router's PUB/SUB endpoint.

A :class:`Publisher` connects a ZeroMQ PUB socket to ``PUBLISH_ENDPOINT`` and
sends each publication as two frames: ``[topic (UTF-8), payload]`` where the
payload is a MessagePack ``publication`` message. The router delivers it to
every client subscribed to the topic.

PUB/SUB drops what is sent before the subscription reaches the publisher
(ZeroMQ's "slow joiner"): a publisher that has just connected loses its first
messages for a few milliseconds, and nothing tells it when it stops losing
them. Keep a publisher open for the life of the process; for messages that
must not be lost, or that must follow a ``subscribe`` in order, publish over
the worker's own socket with :meth:`Worker.publish` instead.
"""

from __future__ import annotations

import os
from types import TracebackType

import zmq
import zmq.asyncio

from . import protocol as wire
from .config import DEFAULT_PUBLISH_ENDPOINT, ENV_PUBLISH_ENDPOINT
from .protocol import Json


class Publisher:
    """A PUB socket connected to the router's publication endpoint.

    Usable as an async context manager::

        async with Publisher() as pub:
            await pub.publish("prices", "price_update", {"symbol": "ACME", "price": 101.25})

    ``endpoint`` defaults to ``PUBLISH_ENDPOINT`` (``tcp://127.0.0.1:5556``).
    """

    def __init__(self, endpoint: str | None = None, *, context: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint or os.environ.get(ENV_PUBLISH_ENDPOINT, "").strip() or DEFAULT_PUBLISH_ENDPOINT
        self._own_context = context is None
        self._context = context or zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PUB)
        # Publications are not worth blocking a process exit for.
        self._socket.setsockopt(zmq.LINGER, 100)
        self._socket.connect(self.endpoint)

    async def publish(self, topic: str, msg_type: str, data: Json = None) -> None:
        """Sends ``{"type": msg_type, "topic": topic, "data": data}`` to the topic's subscribers."""
        payload = wire.encode_publication(wire.Publication(msg_type=msg_type, data=data))
        await self._socket.send_multipart([topic.encode("utf-8"), payload])

    def close(self) -> None:
        """Closes the socket (and the context this publisher created)."""
        if not self._socket.closed:
            self._socket.close()
            if self._own_context:
                self._context.term()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
