"""A ready-made command line for worker scripts, matching the Rust example workers.

``main(worker)`` parses ``--bridge-endpoint``, ``--publish-endpoint``,
``--service`` (repeatable; replaces the worker's services), ``--capacity``,
``--id``, ``--grace-period``, ``--log-level``, ``--transport`` (defaults from
``BRIDGE_ENDPOINT``, ``PUBLISH_ENDPOINT``, ``LOG_LEVEL`` and
``BRIDGE_TRANSPORT``; the bridge endpoint may be a comma-separated list of
several routers'), ``--processes`` and ``--loop``, logs to stderr, runs the worker until SIGTERM/SIGINT
(graceful stop, exit 0), and prints one line to stdout when a router first
welcomes it::

    {"event":"registered","worker_id":"...","services":[...]}

``--processes N`` (N > 1) makes this process a supervisor: it starts N
copies of the same command line, each one worker process with the same
services (the router sees one pool of N workers, each with ``--capacity``),
prints one ``registered`` line once all N are registered (with
``"processes": N`` and their ``"pids"``), forwards SIGTERM and SIGINT to
all of them (the first signal drains, a second abandons in-flight work),
and exits once all have exited. When one exits on its own, the others are
stopped too, and the supervisor exits with that child's failure status (1
when it was killed by a signal). On Linux a child also gets SIGTERM if the
supervisor dies.

``--transport zmtp`` (the default) talks to the router over the SDK's own
ZMTP connection on the event loop, ``--transport pyzmq`` over a libzmq
socket (:mod:`~bridge_worker.transport`).

``--loop auto`` (the default) runs the event loop of ``uvloop`` when it is
installed (the ``fast`` extra), else asyncio's; ``--loop asyncio`` or
``--loop uvloop`` choose.

Exit status: 0 after a stop, 1 when the router refused the worker (or a
child of a supervisor failed), 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from .config import TRANSPORTS, default_worker_id
from .errors import ConfigError, WorkerRejected, WorkerStopped
from .worker import Worker


def build_parser(worker: Worker, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of :func:`main`, with the worker's configuration as defaults."""
    c = worker.config
    p = argparse.ArgumentParser(description=description)
    # Like the Rust examples: `<program>-<pid>` unless the worker was given an id.
    default_id = f"{Path(p.prog).stem}-{os.getpid()}" if c.worker_id == default_worker_id() else c.worker_id
    p.add_argument(
        "--bridge-endpoint",
        default=c.endpoint,
        help="router bridge endpoint, or a comma-separated list of several routers' [BRIDGE_ENDPOINT] (%(default)s)",
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
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=c.transport if c.transport in TRANSPORTS else None,
        help="zmtp: the SDK's own ZMTP connection on the event loop; pyzmq: a libzmq socket"
        " [BRIDGE_TRANSPORT] (%(default)s)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="worker processes to start as one pool, under a supervisor (%(default)s)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (auto), or the one named (%(default)s)",
    )
    return p


ENV_PROCESS = "BRIDGE_WORKER_PROCESS"
"""Set by the supervisor of ``--processes N`` for each child: ``"i/N"`` (i from 1)."""


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
    if args.transport is not None:
        c.transport = args.transport


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
    parser = build_parser(worker, description)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    configure(worker, args)
    child = os.environ.get(ENV_PROCESS)
    if child is not None and args.worker_id != parser.get_default("worker_id"):
        # A chosen id is shared by the pool: each child tells itself apart.
        worker.config.worker_id = f"{args.worker_id}-{child.partition('/')[0]}"
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    factory = _loop_factory(args.loop, parser)
    try:
        worker.config.validate()
        if args.processes > 1 and child is None:
            sys.exit(_run(supervise(args.processes, worker), factory))
        _run(serve(worker), factory)
    except ConfigError as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkerRejected as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def _loop_factory(choice: str, parser: argparse.ArgumentParser) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: uvloop's when installed (or asked for), else asyncio's (``None``)."""
    if choice == "asyncio" or sys.version_info < (3, 11):  # asyncio.Runner(loop_factory) is 3.11+
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            parser.error("--loop uvloop: uvloop is not installed (pip install 'bridge-worker[fast]')")
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def _run(main: Coroutine[Any, Any, Any], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> Any:
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[attr-defined,unused-ignore]
        return runner.run(main)


# ----- --processes N: the supervisor ---------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when the supervisor
    dies (``PR_SET_PDEATHSIG``), resolved before any fork; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


async def supervise(n: int, worker: Worker) -> int:
    """Runs ``n`` copies of this command line as one pool of workers; returns the exit status.

    Each child runs the same program with :data:`ENV_PROCESS` set, so it serves
    rather than supervises. The children are in their own process group: a
    Ctrl-C at a terminal reaches them once, through the supervisor.
    """
    loop = asyncio.get_running_loop()
    log = logging.getLogger("bridge_worker")
    command = [sys.executable, *sys.orig_argv[1:]]
    preexec = _die_with_parent()
    children: list[asyncio.subprocess.Process] = []
    stopping = False
    status = 0

    def forward(sig: signal.Signals) -> None:
        nonlocal stopping
        stopping = True
        log.info("%s: forwarding it to %d worker process(es)", sig.name, len(children))
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    try:
        for i in range(1, n + 1):
            children.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, ENV_PROCESS: f"{i}/{n}"},
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            )
        registered: set[int] = set()

        async def relay(child: asyncio.subprocess.Process) -> None:
            """Forwards a child's stdout, folding the ``registered`` lines into one."""
            assert child.stdout is not None  # invariant: started with stdout=PIPE
            async for raw in child.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                try:
                    event = json.loads(line).get("event")
                except (ValueError, AttributeError):
                    event = None
                if event != "registered":
                    print(line, flush=True)
                    continue
                registered.add(child.pid)
                if len(registered) == n:
                    pool = {
                        "event": "registered",
                        "worker_id": worker.config.worker_id,
                        "services": worker.config.services,
                        "processes": n,
                        "pids": [c.pid for c in children],
                    }
                    print(json.dumps(pool, separators=(",", ":")), flush=True)

        async def watch(child: asyncio.subprocess.Process) -> None:
            nonlocal status
            await asyncio.gather(relay(child), child.wait())
            code = child.returncode
            assert code is not None  # invariant: wait() returned
            if code != 0 and status == 0:
                status = code if code > 0 else 1
            if not stopping:
                log.error("worker process %d exited on its own (status %d): stopping the others", child.pid, code)
                forward(signal.SIGTERM)

        await asyncio.gather(*(watch(c) for c in children))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for child in children:
            if child.returncode is None:
                # Only after an error of the supervisor itself: leave nothing behind.
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
    return status
