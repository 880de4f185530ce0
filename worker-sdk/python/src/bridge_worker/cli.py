"""A ready-made command line for worker scripts, matching the Rust example workers.

``main(worker)`` parses ``--bridge-endpoint``, ``--publish-endpoint``,
``--service`` (repeatable; replaces the worker's services), ``--capacity``,
``--id``, ``--grace-period`` and ``--log-level`` (defaults from
``BRIDGE_ENDPOINT``, ``PUBLISH_ENDPOINT`` and ``LOG_LEVEL``), logs to stderr,
runs the worker until SIGTERM/SIGINT (graceful stop, exit 0), and prints one
line to stdout when a router first welcomes it::

    {"event":"registered","worker_id":"...","services":[...]}

Exit status: 0 after a stop, 1 when the router refused the worker, 2 for a
bad command line or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import default_worker_id
from .errors import ConfigError, WorkerRejected, WorkerStopped
from .worker import Worker


def build_parser(worker: Worker, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of :func:`main`, with the worker's configuration as defaults."""
    c = worker.config
    p = argparse.ArgumentParser(description=description)
    # Like the Rust examples: `<program>-<pid>` unless the worker was given an id.
    default_id = f"{Path(p.prog).stem}-{os.getpid()}" if c.worker_id == default_worker_id() else c.worker_id
    p.add_argument(
        "--bridge-endpoint", default=c.endpoint, help="router bridge endpoint [BRIDGE_ENDPOINT] (%(default)s)"
    )
    p.add_argument(
        "--publish-endpoint",
        default=c.publish_endpoint,
        help="router publication endpoint [PUBLISH_ENDPOINT] (%(default)s)",
    )
    p.add_argument(
        "--service",
        action="append",
        dest="services",
        metavar="NAME",
        help=f"service to serve; repeat for several (default: {', '.join(c.services)})",
    )
    p.add_argument("--capacity", type=int, default=c.capacity, help="max requests in flight (%(default)s)")
    p.add_argument("--id", dest="worker_id", default=default_id, help="worker id for logs and /routes (%(default)s)")
    p.add_argument(
        "--grace-period",
        type=float,
        default=c.grace_period,
        help="seconds to finish in-flight work on stop (%(default)s)",
    )
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="[LOG_LEVEL] (%(default)s)")
    return p


def configure(worker: Worker, args: argparse.Namespace) -> None:
    """Applies parsed arguments to the worker's configuration."""
    c = worker.config
    c.endpoint = args.bridge_endpoint
    c.publish_endpoint = args.publish_endpoint
    if args.services:
        c.services = list(args.services)
    c.capacity = args.capacity
    c.worker_id = args.worker_id
    c.grace_period = args.grace_period


async def serve(worker: Worker, *, announce: bool = True) -> None:
    """Runs ``worker`` with signal handling, printing the ``registered`` line on the first welcome."""

    async def announce_registration() -> None:
        try:
            await worker.wait_registered()
        except WorkerStopped:
            return
        line = {"event": "registered", "worker_id": worker.config.worker_id, "services": worker.config.services}
        print(json.dumps(line, separators=(",", ":")), flush=True)

    announcer = asyncio.create_task(announce_registration()) if announce else None
    try:
        await worker.run(handle_signals=True)
    finally:
        if announcer is not None:
            announcer.cancel()


def main(worker: Worker, argv: Sequence[str] | None = None, *, description: str | None = None) -> None:
    """Parses the command line, runs the worker until a signal, and exits."""
    args = build_parser(worker, description).parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    configure(worker, args)
    try:
        worker.config.validate()
        asyncio.run(serve(worker))
    except ConfigError as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkerRejected as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
