"""Test harness: where things are, child processes (the router, example
workers) watched line by line, WebSocket clients, and an in-process worker.

Nothing here sleeps to wait for readiness: processes are ready when they
print their one stdout line (``listening`` / ``registered``), workers when
``wait_registered`` returns, and every wait has a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from bridge_worker import Worker

HERE = Path(__file__).resolve().parent
PYTHON_SDK = HERE.parent
REPO = HERE.parents[2]
VECTORS = (HERE / "../../../bridge-proto/vectors").resolve()
EXAMPLES = PYTHON_SDK / "examples"


def target_dir() -> Path:
    configured = os.environ.get("CARGO_TARGET_DIR")
    if not configured:
        return REPO / "target"
    path = Path(configured)
    return path if path.is_absolute() else REPO / path


ROUTER_BIN = target_dir() / "debug" / "router"
RUST_ECHO_BIN = target_dir() / "debug" / "examples" / "echo_worker"

# Fast liveness for tests: a dead peer is noticed after 3 x 200 ms.
HEARTBEAT_MS = 200


class Proc:
    """A child process whose stdout and stderr lines are collected by threads
    (so a chatty child never blocks) and can be waited for."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._eof = 0
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, lines), daemon=True)
            for stream, lines in ((self.popen.stdout, self.stdout), (self.popen.stderr, self.stderr))
        ]
        for t in self._drains:
            t.start()

    def _drain(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof += 1
            self._cond.notify_all()

    def wait_stdout(self, predicate: Callable[[str], bool], timeout: float = 10.0, start: int = 0) -> str:
        """The first stdout line from index ``start`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.stdout[start:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof == 2:
                    raise TimeoutError(f"{self.name}: no matching stdout line within {timeout} s\n{self.tail()}")
                self._cond.wait(left)

    async def wait_stdout_async(self, predicate: Callable[[str], bool], timeout: float = 10.0, start: int = 0) -> str:
        return await asyncio.to_thread(self.wait_stdout, predicate, timeout, start)

    def json_line(self, event: str, timeout: float = 10.0, start: int = 0) -> dict[str, Any]:
        line = self.wait_stdout(lambda line: _event_of(line) == event, timeout, start)
        return json.loads(line)  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    async def wait_async(self, timeout: float = 10.0) -> int:
        return await asyncio.to_thread(self.popen.wait, timeout)

    def kill(self) -> None:
        """Kills the process (and its group) if it still runs, and releases its pipes."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        for t in self._drains:
            t.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def tail(self, n: int = 30) -> str:
        return (
            f"--- {self.name} stdout ---\n"
            + "\n".join(self.stdout[-n:])
            + f"\n--- {self.name} stderr ---\n"
            + "\n".join(self.stderr[-n:])
        )


def _event_of(line: str) -> str | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value.get("event") if isinstance(value, dict) else None


class Router:
    """The real router binary, started on ephemeral ports."""

    def __init__(self, proc: Proc, listening: dict[str, Any]) -> None:
        self.proc = proc
        self.http: str = listening["http"]
        self.bridge: str = listening["bridge"]
        # None when the router has a secret: it then binds no PUB/SUB endpoint
        # (publications come through authenticated bridge sessions).
        self.publish: str | None = listening["publish"]

    def url(self, path: str) -> str:
        return f"ws://{self.http}{path}"

    def workers(self, service: str) -> list[dict[str, Any]]:
        """The router's view (``GET /routes``) of the workers serving ``service``."""
        with urllib.request.urlopen(f"http://{self.http}/routes", timeout=5) as resp:
            routes = json.load(resp)["routes"]
        return [w for r in routes if r["service"] == service for w in r["workers"]]


ROUTES: list[dict[str, Any]] = [
    {"path": "/ws/main", "service": "py-main"},
    {"path": "/ws/short", "service": "py-short", "requestTimeoutMs": 400},
    {"path": "/ws/raw", "service": "py-raw", "raw": True},
    {"path": "/ws/automation", "service": "automation", "affinity": True},
    {"path": "/ws/rawworker", "service": "raw-echo"},
    {"path": "/ws/mixed", "service": "mixed"},
    {"path": "/ws", "service": "chat"},
]


class Harness:
    """Starts routers and processes for one test and cleans up after it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []
        self.routes = tmp_path / "routes.json"
        self.routes.write_text(json.dumps({"routes": ROUTES}))

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, env)
        self.procs.append(proc)
        return proc

    def router(
        self,
        bridge: str = "tcp://127.0.0.1:0",
        publish: str = "tcp://127.0.0.1:0",
        *extra: str,
    ) -> Router:
        if not ROUTER_BIN.exists():
            if os.environ.get("BRIDGE_WORKER_REQUIRE_ROUTER"):
                pytest.fail(f"router binary missing at {ROUTER_BIN}")
            pytest.skip(f"router binary not built ({ROUTER_BIN}); run `cargo build -p router`")
        proc = self.spawn(
            "router",
            [
                str(ROUTER_BIN),
                "--port",
                "0",
                "--routes",
                str(self.routes),
                "--bridge-endpoint",
                bridge,
                "--publish-endpoint",
                publish,
                "--heartbeat-ms",
                str(HEARTBEAT_MS),
                "--drain-timeout-ms",
                "500",
                *extra,
            ],
            env={"RUST_LOG": "info"},
        )
        return Router(proc, proc.json_line("listening"))

    def python_example(self, script: str, router: Router, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.spawn(
            script,
            [sys.executable, str(EXAMPLES / script), "--bridge-endpoint", router.bridge, *args],
            env={
                **({"PUBLISH_ENDPOINT": router.publish} if router.publish else {}),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            },
        )

    def cleanup(self, failed: bool) -> None:
        for proc in self.procs:
            proc.kill()
            if failed:
                print(proc.tail(), file=sys.stderr)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


TRANSPORTS = ("zmtp", "pyzmq")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per worker transport (``BRIDGE_TRANSPORT``): the
    in-process workers and publishers read it from the environment, and the
    example workers started as processes inherit it. Modules whose tests
    depend on the transport use it for all their tests
    (``pytestmark = pytest.mark.usefixtures("transport")``)."""
    name: str = request.param
    monkeypatch.setenv("BRIDGE_TRANSPORT", name)
    return name


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    h = Harness(tmp_path)
    yield h
    h.cleanup(request.node.stash.get(_FAILED, False))


class Client:
    """A WebSocket client of a (non-raw) route that keeps every frame it got,
    so tests can wait for one kind while others (pushes) arrive meanwhile."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[Any] = []
        self.welcome: dict[str, Any] = {}
        self._next_id = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, raw: bool = False, ssl: Any = None) -> AsyncIterator[Client]:
        tls = {"ssl": ssl} if ssl is not None else {}
        async with websockets.connect(url, open_timeout=5, close_timeout=2, **tls) as ws:
            client = cls(ws)
            if not raw:
                client.welcome = await client.next(lambda f: isinstance(f, dict) and f.get("type") == "welcome")
            yield client

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def request(self, msg_type: str, data: Any = None, id: Any = None) -> Any:
        """Sends a request; returns its client id."""
        if id is None:
            self._next_id += 1
            id = f"r{self._next_id}"
        await self.send({"type": msg_type, "id": id, "data": data})
        return id

    async def next(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """The first frame (kept or new) matching ``predicate``; it is consumed."""

        async def scan() -> Any:
            i = 0
            while True:
                while i < len(self.frames):
                    if predicate(self.frames[i]):
                        return self.frames.pop(i)
                    i += 1
                raw = await self.ws.recv()
                self.frames.append(json.loads(raw) if isinstance(raw, str) else raw)

        return await asyncio.wait_for(scan(), timeout)

    async def terminal(self, id: Any, timeout: float = 10.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Partial replies of request ``id``, then its terminal frame."""
        partials: list[dict[str, Any]] = []
        while True:
            frame = await self.next(lambda f: isinstance(f, dict) and f.get("id") == id and "seq" in f, timeout)
            if frame.get("done"):
                return partials, frame
            partials.append(frame)

    async def call(self, msg_type: str, data: Any = None, timeout: float = 10.0) -> dict[str, Any]:
        """A request and its terminal frame."""
        id = await self.request(msg_type, data)
        return (await self.terminal(id, timeout))[1]

    def frames_for(self, id: Any) -> list[dict[str, Any]]:
        return [f for f in self.frames if isinstance(f, dict) and f.get("id") == id]


@contextlib.asynccontextmanager
async def running(worker: Worker, timeout: float = 10.0) -> AsyncIterator[asyncio.Task[None]]:
    """Runs ``worker`` in this event loop until the block ends, registered on entry."""
    task = asyncio.create_task(worker.run())
    try:
        waiter = asyncio.create_task(worker.wait_registered())
        done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when="FIRST_COMPLETED")
        if task in done:
            waiter.cancel()
            task.result()
            raise AssertionError("worker.run() returned before registering")
        if waiter not in done:
            waiter.cancel()
            raise AssertionError(f"worker not registered within {timeout} s")
        yield task
    finally:
        if not task.done():
            worker.stop(grace=2.0)
            await asyncio.wait_for(task, timeout)


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Polls ``predicate`` (plain or async) until it holds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    async def holds() -> bool:
        result = predicate()
        return await result if inspect.isawaitable(result) else result

    while not await holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)
