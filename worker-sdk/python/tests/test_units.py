"""Unit tests of the pieces that need no router: backoff, configuration,
errors, handler styles and what handlers return."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from bridge_worker import ConfigError, Frame, HandlerError, Partial, Reply, Worker, WorkerConfig, cli, codes
from bridge_worker.backoff import Backoff
from bridge_worker.errors import no_binary_handler, no_event_handler, no_request_handler
from bridge_worker.handlers import Style, run_request, style_of


def test_backoff_doubles_to_the_cap_within_jitter_bounds() -> None:
    b = Backoff(0.1, 5.0, random.Random(7))
    for step in (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0):
        d = b.next_delay()
        assert step / 2 <= d <= step, (step, d)
    b.reset()
    assert b.next_delay() <= 0.1
    assert len({Backoff(0.1, 5.0).next_delay() for _ in range(20)}) > 1, "no jitter"


@pytest.mark.parametrize(
    ("env", "endpoint", "publish", "secret"),
    [
        ({}, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", None),
        (
            {"BRIDGE_ENDPOINT": "tcp://10.0.0.1:1", "PUBLISH_ENDPOINT": "ipc:///tmp/p"},
            "tcp://10.0.0.1:1",
            "ipc:///tmp/p",
            None,
        ),
        ({"BRIDGE_SECRET": "s3"}, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "s3"),
        ({"BRIDGE_SECRET": "", "BRIDGE_ENDPOINT": " "}, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", None),
    ],
)
def test_config_from_env(env: dict[str, str], endpoint: str, publish: str, secret: str | None) -> None:
    c = WorkerConfig.from_env(["echo"], env)
    assert (c.endpoint, c.publish_endpoint, c.secret) == (endpoint, publish, secret)
    c.validate()


def test_config_reports_every_problem_and_hides_the_secret() -> None:
    c = WorkerConfig(services=[], endpoint="nonsense", capacity=0, worker_id=" ", secret="hunter2")
    with pytest.raises(ConfigError) as err:
        c.validate()
    assert len(err.value.problems) == 4, err.value.problems
    assert "hunter2" not in repr(c)


def test_worker_settings_override_config() -> None:
    w = Worker("echo", capacity=3, worker_id="w-1")
    assert (w.config.services, w.config.capacity, w.config.worker_id) == (["echo"], 3, "w-1")
    with pytest.raises(TypeError):
        Worker("echo", capcity=3)


def test_the_transport_comes_from_the_environment_the_command_line_or_a_setting() -> None:
    assert WorkerConfig.from_env(["e"], {}).transport == "zmtp"
    assert WorkerConfig.from_env(["e"], {"BRIDGE_TRANSPORT": " PyZMQ "}).transport == "pyzmq"
    assert WorkerConfig.from_env(["e"], {"BRIDGE_TRANSPORT": ""}).transport == "zmtp"
    with pytest.raises(ConfigError, match="transport 'zeromq' is not one of zmtp, pyzmq"):
        WorkerConfig.from_env(["e"], {"BRIDGE_TRANSPORT": "zeromq"}).validate()
    assert Worker("echo", transport="pyzmq").config.transport == "pyzmq"
    w = Worker("echo")
    w.config.transport = "zmtp"
    parser = cli.build_parser(w)
    assert parser.parse_args([]).transport == "zmtp"
    cli.configure(w, parser.parse_args(["--transport", "pyzmq"]))
    assert w.config.transport == "pyzmq"
    with pytest.raises(SystemExit):
        parser.parse_args(["--transport", "zeromq"])


def test_handler_registration_rules() -> None:
    w = Worker("echo")

    @w.handler("a")
    async def a(ctx: Any, data: Any) -> None: ...

    with pytest.raises(ValueError):
        w.handler("a")(a)

    async def gen(ctx: Any, data: Any) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError):
        w.event("e")(gen)


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        (HandlerError.bad_request("x"), "bad_request", False),
        (HandlerError.worker_error("x"), "worker_error", False),
        (HandlerError.transient("x"), "worker_error", True),
        (HandlerError.overloaded("x"), "overloaded", True),
        (HandlerError.unauthorized("x"), "unauthorized", False),
        (HandlerError.cancelled("x"), "cancelled", False),
        (HandlerError.timeout("x"), "timeout", False),
        (HandlerError.unknown_type("nope"), "unknown_type", False),
        (HandlerError("my_code", "x", retryable=True), "my_code", True),
    ],
)
def test_handler_error_constructors(error: HandlerError, code: str, retryable: bool) -> None:
    assert (error.code, error.retryable) == (code, retryable)


def test_unknown_type_messages_are_word_for_word_the_rust_sdk_s() -> None:
    """The same texts as ``unknown_type_messages`` in ``worker-sdk/src/handler.rs``."""
    requests, events = ["b", "a"], ["note", "a"]
    cases = [
        (
            no_request_handler("x", requests, events),
            "this worker has no handler for requests of type `x`; requests it handles: `a`, `b`",
        ),
        (
            no_request_handler("note", requests, events),
            "this worker has no handler for requests of type `note`; requests it handles: `a`, `b`; "
            "`note` is handled as a fire-and-forget message (send it without an `id`)",
        ),
        (
            no_event_handler("b", requests, events),
            "this worker has no handler for fire-and-forget messages of type `b`; "
            "fire-and-forget messages it handles: `a`, `note`; `b` is handled as a request (send it with an `id`)",
        ),
        (
            no_event_handler("x", [], []),
            "this worker has no handler for fire-and-forget messages of type `x`; "
            "fire-and-forget messages it handles: none",
        ),
        (no_binary_handler(), "this worker has no handler for binary frames"),
        (HandlerError.unknown_type("x"), "this worker has no handler for message type `x`"),
    ]
    for error, message in cases:
        assert (error.code, error.message) == ("unknown_type", message)


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        ("timeout", True),
        ("e2", True),
        ("", False),
        ("Timeout", False),
        ("2fast", False),
        ("a b", False),
        ("dash-ed", False),
        ("a" * 64, True),
        ("a" * 65, False),
        ("ok\n", False),
    ],
)
def test_code_validation(code: str, ok: bool) -> None:
    assert codes.is_valid_code(code) is ok


class _Callable:
    async def __call__(self, ctx: Any, data: Any) -> None: ...


def test_handler_styles() -> None:
    async def coro(ctx: Any, data: Any) -> None: ...

    async def agen(ctx: Any, data: Any) -> AsyncIterator[None]:
        yield None

    def sync(ctx: Any, data: Any) -> None: ...

    def gen(ctx: Any, data: Any) -> Iterator[None]:
        yield None

    assert style_of(coro) is Style.ASYNC
    assert style_of(agen) is Style.ASYNC_GEN
    assert style_of(sync) is Style.SYNC
    assert style_of(gen) is Style.SYNC_GEN
    assert style_of(functools.partial(coro, None)) is Style.ASYNC
    assert style_of(_Callable()) is Style.ASYNC


class _FakeContext:
    """Records partial replies like a Context would send them."""

    def __init__(self) -> None:
        self.partials: list[tuple[Any, str | None]] = []

    async def send_partial(self, data: Any = None, msg_type: str | None = None) -> None:
        if isinstance(data, Partial):
            data, msg_type = data.data, data.msg_type
        self.partials.append((data, msg_type))


def _run(fn: Any) -> tuple[Reply, list[tuple[Any, str | None]]]:
    ctx = _FakeContext()
    with ThreadPoolExecutor(2) as pool:
        reply = asyncio.run(run_request(fn, style_of(fn), ctx, {"n": 2}, pool))  # type: ignore[arg-type]
    return reply, ctx.partials


def test_what_each_style_sends() -> None:
    async def coro(ctx: Any, data: Any) -> Any:
        return data

    async def typed(ctx: Any, data: Any) -> Reply:
        return Reply({"ok": 1}, "OUTPUT")

    async def agen(ctx: Any, data: Any) -> AsyncIterator[Any]:
        for i in range(data["n"]):
            yield {"i": i}
        yield Partial("thinking", "THOUGHT")
        yield Reply("done")
        raise AssertionError("not reached: the generator is closed after its Reply")

    async def agen_no_final(ctx: Any, data: Any) -> AsyncIterator[Any]:
        yield 1

    def sync(ctx: Any, data: Any) -> Any:
        return data["n"] * 10

    def gen(ctx: Any, data: Any) -> Iterator[Any]:
        yield "a"
        yield Reply("b", "FINAL")

    assert _run(coro) == (Reply({"n": 2}), [])
    assert _run(typed) == (Reply({"ok": 1}, "OUTPUT"), [])
    assert _run(agen) == (Reply("done"), [({"i": 0}, None), ({"i": 1}, None), ("thinking", "THOUGHT")])
    assert _run(agen_no_final) == (Reply(None), [(1, None)])
    assert _run(sync) == (Reply(20), [])
    assert _run(gen) == (Reply("b", "FINAL"), [("a", None)])


def test_frames() -> None:
    assert Frame.from_text("hé").as_text() == "hé"
    assert Frame.from_bytes(b"hi").as_text() is None
    assert Frame(False, b"\xff").as_text() is None


def test_outbox_keeps_order_applies_back_pressure_and_releases_on_close() -> None:
    from bridge_worker.outbox import Outbox

    async def main() -> None:
        box = Outbox(limit=2)
        await box.put(b"1")
        await box.put(b"2")
        blocked = asyncio.create_task(box.put(b"3"))
        await asyncio.sleep(0)
        assert not blocked.done(), "put must wait while the queue is full"
        box.put_nowait(b"terminal")  # never waits, keeps its place
        assert [(await box.get())[0], (await box.get())[0]] == [b"1", b"2"]
        await asyncio.wait_for(blocked, 1)
        assert [(await box.get())[0], (await box.get())[0]] == [b"terminal", b"3"]
        box.sent()
        await asyncio.wait_for(box.flushed(), 1)

        loop = asyncio.get_running_loop()
        queued: asyncio.Future[bool] = loop.create_future()
        await box.put(b"a", queued)
        await box.put(b"b")
        waiting: asyncio.Future[bool] = loop.create_future()
        stuck = asyncio.create_task(box.put(b"c", waiting))
        await asyncio.sleep(0)
        box.close()  # the session ended: waiting senders go on, their frames are dropped
        await asyncio.wait_for(stuck, 1)
        # Senders that asked are told their frame never reached the socket.
        assert (await queued, await waiting) == (False, False)
        late: asyncio.Future[bool] = loop.create_future()
        box.put_nowait(b"d", late)
        assert await late is False

    asyncio.run(main())
