"""bridge_worker: write workers for the WebSocket router in Python.

The router owns every WebSocket; workers connect to it over ZeroMQ and serve
the messages of one or more *services* (routes). A minimal worker::

    from bridge_worker import Worker, cli

    worker = Worker(["chat"])

    @worker.handler("echo")
    async def echo(ctx, data):
        return data

    if __name__ == "__main__":
        cli.main(worker)

Layout:

- :mod:`~bridge_worker.worker`: :class:`Worker` (handlers, its router sessions, what goes where, stop)
- :mod:`~bridge_worker.session`: one router session (hello, heartbeats, reconnects, requests)
- :mod:`~bridge_worker.context`: :class:`Context` / :class:`EventContext` given to handlers
- :mod:`~bridge_worker.handlers`: :class:`Reply`, :class:`Partial`, :class:`Frame`
- :mod:`~bridge_worker.publisher`: :class:`Publisher` (a publisher session for topic publications)
- :mod:`~bridge_worker.protocol`: the wire messages and their MessagePack codec
- :mod:`~bridge_worker.cli`: the command line of example workers
- :mod:`~bridge_worker.config`, :mod:`~bridge_worker.status`, :mod:`~bridge_worker.errors`, :mod:`~bridge_worker.codes`
"""

from . import codes, protocol
from .config import WorkerConfig
from .context import Context, EventContext
from .errors import (
    ConfigError,
    HandlerError,
    NotConnected,
    PayloadTooLarge,
    SecretRequired,
    WorkerRejected,
    WorkerStopped,
)
from .handlers import Frame, Partial, Reply
from .publisher import Publisher
from .worker import SDK_NAME, SDK_VERSION, State, Status, Worker

__version__ = SDK_VERSION

__all__ = [
    "ConfigError",
    "Context",
    "EventContext",
    "Frame",
    "HandlerError",
    "NotConnected",
    "Partial",
    "PayloadTooLarge",
    "Publisher",
    "Reply",
    "SDK_NAME",
    "SecretRequired",
    "State",
    "Status",
    "Worker",
    "WorkerConfig",
    "WorkerRejected",
    "WorkerStopped",
    "codes",
    "protocol",
]
