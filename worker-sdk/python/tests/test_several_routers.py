"""A worker on several routers (``BRIDGE_ENDPOINT`` as a comma-separated list):
the list's parsing, one session per router against fake routers (where each
message goes, the capacity they share, a refusal), and the real router twice
over: requests through each, a publication through the first live one, one
router killed and restarted under the worker, and ``--processes`` with a list."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import EXAMPLES, Client, Harness, Router, eventually, running
from fake_router import WAIT, FakeRouter, is_terminal, request

from bridge_worker import ConfigError, Context, EventContext, State, Worker, WorkerConfig, WorkerRejected, cli
from bridge_worker import protocol as wire
from bridge_worker.config import parse_endpoints

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]

# ----- the list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp://127.0.0.1:5555", ["tcp://127.0.0.1:5555"]),
        (" ipc:///tmp/a.sock ", ["ipc:///tmp/a.sock"]),
        ("tcp://127.0.0.1:1,tcp://127.0.0.1:2", ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]),
        (
            " ipc:///tmp/b.sock , tcp://10.0.0.1:1 ,ipc:///tmp/a.sock",
            ["ipc:///tmp/b.sock", "tcp://10.0.0.1:1", "ipc:///tmp/a.sock"],
        ),
    ],
)
def test_endpoint_lists_are_parsed_in_order(value: str, expected: list[str]) -> None:
    assert parse_endpoints(value) == expected
    assert WorkerConfig(["svc"], endpoint=value).endpoints() == expected


@pytest.mark.parametrize(
    ("value", "problems"),
    [
        ("", ["endpoint '' is not a ZeroMQ endpoint"]),
        ("nonsense", ["endpoint 'nonsense' is not a ZeroMQ endpoint"]),
        ("tcp://127.0.0.1:1,", ["entry 2 is empty"]),
        (",tcp://127.0.0.1:1", ["entry 1 is empty"]),
        ("tcp://127.0.0.1:1, ,tcp://127.0.0.1:2", ["entry 2 is empty"]),
        (
            "tcp://127.0.0.1:1,tcp://127.0.0.1:2, tcp://127.0.0.1:1",
            ["entry 3 ('tcp://127.0.0.1:1') names a router already listed"],
        ),
        (
            "tcp://127.0.0.1:1,udp://x:1,,tcp://127.0.0.1:1",
            ["entry 2 ('udp://x:1') is not a ZeroMQ endpoint", "entry 3 is empty", "entry 4 ('tcp://127.0.0.1:1')"],
        ),
    ],
)
def test_bad_endpoint_lists_name_every_bad_entry(value: str, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_endpoints(value)
    assert len(err.value.problems) == len(problems), err.value.problems
    for problem, needle in zip(err.value.problems, problems, strict=True):
        assert needle in problem, (problem, needle)
    # validate() reports them with every other problem.
    with pytest.raises(ConfigError) as err:
        WorkerConfig(["svc"], endpoint=value, capacity=0).validate()
    assert len(err.value.problems) == len(problems) + 1, err.value.problems


def test_the_list_comes_from_the_environment_and_the_command_line() -> None:
    c = WorkerConfig.from_env(["svc"], {"BRIDGE_ENDPOINT": "tcp://127.0.0.1:1, tcp://127.0.0.1:2"})
    assert c.endpoints() == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    w = Worker(["svc"], secret=None)
    args = cli.build_parser(w).parse_args(["--bridge-endpoint", "ipc:///tmp/a.sock,ipc:///tmp/b.sock"])
    cli.configure(w, args)
    w.config.validate()
    assert w.config.endpoints() == ["ipc:///tmp/a.sock", "ipc:///tmp/b.sock"]


# ----- one worker, two fake routers --------------------------------------------------------


def make_worker(routers: list[FakeRouter], **settings: Any) -> Worker:
    settings.setdefault("worker_id", "py-multi")
    settings.setdefault("secret", None)
    settings.setdefault("grace_period", 2.0)
    settings.setdefault("linger", 0.1)
    # No hello resend during the handshakes (it would put a second hello where a test expects something else).
    settings.setdefault("backoff_initial", 2.0)
    return Worker(["svc"], endpoint=",".join(r.endpoint for r in routers), **settings)


@contextlib.asynccontextmanager
async def serving(routers: list[FakeRouter], w: Worker) -> AsyncIterator[list[bytes]]:
    """Runs ``w`` with every router's handshake done; yields each router's identity of it."""
    task = asyncio.create_task(w.run())
    try:
        idents = []
        for r in routers:
            ident, hello = await r.handshake()
            assert hello.capacity == w.config.capacity  # every router is told the whole capacity
            idents.append(ident)
        await asyncio.wait_for(w.wait_registered(len(routers)), WAIT)
        assert [s.state for _, s in w.router_statuses] == [State.REGISTERED] * len(routers)
        yield idents
    finally:
        w.stop(grace=0.5)
        await asyncio.wait_for(task, WAIT)


def run(test: Any, n: int = 2) -> None:
    async def main() -> None:
        routers = [FakeRouter() for _ in range(n)]
        try:
            await test(routers)
        finally:
            for r in routers:
                r.close()

    asyncio.run(main())


def connect(conn: str) -> wire.Connect:
    return wire.Connect(
        conn=conn, route="/ws/test", path="/ws/test", service="svc", params={}, query={}, headers={}, remote="127.0.0.1"
    )


async def next_kind(router: FakeRouter, kind: type[Any]) -> Any:
    _, msg = await router.recv()
    assert isinstance(msg, kind), msg
    return msg


def test_each_message_goes_to_its_router() -> None:
    async def test(routers: list[FakeRouter]) -> None:
        a, b = routers
        w = make_worker(routers)
        connected = asyncio.Event()

        @w.handler("echo")
        async def echo(ctx: Context, data: Any) -> Any:
            await ctx.push("note", data)  # to the connection's router: the request's
            return data

        @w.handler("publish")
        async def publish(ctx: Context, data: Any) -> Any:
            await ctx.publish("t", "news", data)  # to the first live router
            return data

        @w.on_connect
        async def on_connect(ctx: EventContext, info: wire.Connect) -> None:
            connected.set()

        async with serving(routers, w) as (ia, ib):
            for router, ident, value in ((a, ia, "via a"), (b, ib, "via b")):
                await router.request(ident, f"c-{value}", "echo", value)
                assert await next_kind(router, wire.Push) == wire.Push(conn="conn-1", msg_type="note", data=value)
                assert await router.recv_for(f"c-{value}") == wire.Reply(cid=f"c-{value}", done=True, data=value)

            # A publication made while serving b's request goes to a, the first router.
            await b.request(ib, "p1", "publish", 1)
            assert await b.recv_for("p1") == wire.Reply(cid="p1", done=True, data=1)
            assert await next_kind(a, wire.Publish) == wire.Publish(topic="t", msg_type="news", data=1)

            # worker.push to a connection b announced goes to b only; to one never
            # seen, to both (the router without it drops it).
            await b.send(ib, connect("conn-b"))
            await asyncio.wait_for(connected.wait(), WAIT)
            await w.push("conn-b", "hi", 1)
            await w.push("conn-unknown", "hi", 2)
            assert await next_kind(b, wire.Push) == wire.Push(conn="conn-b", msg_type="hi", data=1)
            assert await next_kind(b, wire.Push) == wire.Push(conn="conn-unknown", msg_type="hi", data=2)
            assert await next_kind(a, wire.Push) == wire.Push(conn="conn-unknown", msg_type="hi", data=2)

            # a goes away (goodbye{reconnect: true}): publications go through b meanwhile.
            await a.goodbye(ia, "restarting", reconnect=True)
            await eventually(lambda: w.router_statuses[0][1].state is State.CONNECTING, what="a's session lost")
            assert w.status.state is State.REGISTERED  # still serving b
            await w.publish("t", "news", 2)
            assert await next_kind(b, wire.Publish) == wire.Publish(topic="t", msg_type="news", data=2)
            # a welcomes it again: publications are back on a.
            await a.handshake()
            await asyncio.wait_for(w.wait_registered(3), WAIT)
            await w.publish("t", "news", 3)
            assert await next_kind(a, wire.Publish) == wire.Publish(topic="t", msg_type="news", data=3)

    run(test)


def test_routers_share_the_capacity() -> None:
    async def test(routers: list[FakeRouter]) -> None:
        a, b = routers
        w = make_worker(routers, capacity=2)
        release = asyncio.Event()
        started: list[str] = []

        @w.handler("hold")
        async def hold(ctx: Context, data: Any) -> Any:
            started.append(ctx.correlation_id)
            await release.wait()
            return data

        async with serving(routers, w) as (ia, ib):
            await a.request(ia, "a1", "hold", "a1")
            await a.request(ia, "a2", "hold", "a2")
            await eventually(lambda: started == ["a1", "a2"], what="a's requests started")
            # b's requests wait for the slots a's hold (each router may send 2); one
            # whose deadline passes meanwhile is answered timeout without ever starting.
            await b.request(ib, "b1", "hold", "b1")
            await b.send(ib, request("b2", "hold", "late", timeout_ms=100))
            b2 = await b.recv_for("b2")
            assert isinstance(b2, wire.ErrorReply) and b2.code == "timeout", b2
            assert started == ["a1", "a2"]
            release.set()
            assert await a.recv_for("a1") == wire.Reply(cid="a1", done=True, data="a1")
            assert await a.recv_for("a2") == wire.Reply(cid="a2", done=True, data="a2")
            assert await b.recv_for("b1") == wire.Reply(cid="b1", done=True, data="b1")
            assert started == ["a1", "a2", "b1"]

    run(test)


def test_a_refusal_by_one_router_stops_the_worker() -> None:
    async def test(routers: list[FakeRouter]) -> None:
        a, b = routers
        w = make_worker(routers)
        task = asyncio.create_task(w.run())
        ia, _ = await a.handshake()
        ib, _ = await b.expect_hello()
        # a must have taken its welcome before b refuses: a session still in
        # its handshake when the worker stops has no session to say bye on.
        await eventually(lambda: w.router_statuses[0][1].state is State.REGISTERED, what="a registered")
        await b.goodbye(ib, "authentication failed: wrong bridge secret", reconnect=False)
        with pytest.raises(WorkerRejected) as err:
            await asyncio.wait_for(task, WAIT)
        assert err.value.endpoint == b.endpoint
        assert isinstance((await a.recv())[1], wire.Bye)  # a was told, gracefully
        assert w.status.state is State.STOPPED

    run(test)


def test_a_lost_router_abandons_only_its_own_requests() -> None:
    async def test(routers: list[FakeRouter]) -> None:
        a, b = routers
        w = make_worker(routers)
        reasons: list[str | None] = []
        release = asyncio.Event()

        @w.handler("hold")
        async def hold(ctx: Context, data: Any) -> Any:
            try:
                await release.wait()
            finally:
                reasons.append(ctx.cancel_reason)
            return data

        async with serving(routers, w) as (ia, ib):
            await a.request(ia, "a1", "hold", "a")
            await b.request(ib, "b1", "hold", "b")
            await a.goodbye(ia, "restarting", reconnect=True)
            await eventually(lambda: reasons == ["lost"], what="a's request abandoned")
            release.set()
            msg = await b.recv_for("b1")
            assert is_terminal(msg) and msg == wire.Reply(cid="b1", done=True, data="b")

    run(test)


# ----- the real router, twice ---------------------------------------------------------------


def _free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_one_worker_serves_two_real_routers(harness: Harness) -> None:
    bridge_a = _free_tcp_endpoint()  # a is restarted on the same endpoint
    a = harness.router(bridge_a)
    b = harness.router()
    w = Worker(
        ["py-main"],
        endpoint=f"{a.bridge}, {b.bridge}",
        worker_id="py-multi",
        secret=None,
        grace_period=2.0,
        linger=0.2,
    )
    published: list[Any] = []

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    @w.handler("publish")
    async def publish(ctx: Context, data: Any) -> Any:
        published.append(data)
        await ctx.publish("news", "story", data)
        return data

    async def served(router: Router, value: Any) -> None:
        async with Client.connect(router.url("/ws/main")) as c:
            assert (await c.call("echo", value))["data"] == value

    def pushes(c: Client) -> list[Any]:
        return [f["data"] for f in c.frames if isinstance(f, dict) and f.get("topic") == "news"]

    async def main() -> None:
        async with running(w):
            await asyncio.wait_for(w.wait_registered(2), 10)
            await served(a, "through a")
            await served(b, "through b")
            assert [x["id"] for x in await asyncio.to_thread(a.workers, "py-main")] == ["py-multi"]
            assert [x["id"] for x in await asyncio.to_thread(b.workers, "py-main")] == ["py-multi"]

            async with Client.connect(a.url("/ws/main")) as on_a, Client.connect(b.url("/ws/main")) as on_b:
                for c in (on_a, on_b):
                    await c.send({"type": "subscribe", "id": "s", "data": {"topic": "news"}})
                    await c.next(lambda f: isinstance(f, dict) and f.get("type") == "subscribed")
                # Asked through b, published through a (the first live router): b's
                # subscriber would have the publication before the reply had b got it.
                assert (await on_b.call("publish", 1))["data"] == 1
                await on_a.next(lambda f: isinstance(f, dict) and f.get("topic") == "news")
                assert pushes(on_b) == []
                # A second one, asked through a: a's subscriber gets both, once each, in order.
                assert (await on_a.call("publish", 2))["data"] == 2
                await on_a.next(lambda f: isinstance(f, dict) and f.get("topic") == "news" and f["data"] == 2)
                assert pushes(on_a) == [] and pushes(on_b) == [] and published == [1, 2]

                # Kill a: b serves on, with no error, while and after the worker notices.
                async with Client.connect(b.url("/ws/main")) as load:

                    async def keep_asking() -> int:
                        n = 0
                        while w.router_statuses[0][1].state is not State.CONNECTING or n < 20:
                            frame = await load.call("echo", n)
                            assert frame.get("done") and frame.get("data") == n, frame
                            n += 1
                            await asyncio.sleep(0.025)  # pacing under the route's 100 messages/s
                        return n

                    asking = asyncio.create_task(keep_asking())
                    a.proc.signal(signal.SIGKILL)
                    await a.proc.wait_async(10)
                    assert await asyncio.wait_for(asking, 20) >= 20
                assert w.status.state is State.REGISTERED
                # Publications now go through b.
                assert (await on_b.call("publish", 3))["data"] == 3
                got = await on_b.next(lambda f: isinstance(f, dict) and f.get("topic") == "news")
                assert got["data"] == 3 and published == [1, 2, 3]

            # a again, on the same bridge endpoint: the worker comes back to it.
            registrations = w.status.registrations
            a2 = await asyncio.to_thread(harness.router, bridge_a)
            await asyncio.wait_for(w.wait_registered(registrations + 1), 20)
            assert w.router_statuses[0][1].state is State.REGISTERED
            await served(a2, "through a again")
            await served(b, "through b still")

    asyncio.run(main())


def test_a_pool_of_processes_on_two_routers(harness: Harness) -> None:
    a = harness.router()
    b = harness.router()
    pool = harness.spawn(
        "automation pool",
        [
            sys.executable,
            str(EXAMPLES / "automation_worker.py"),
            "--bridge-endpoint",
            f"{a.bridge},{b.bridge}",
            "--processes",
            "2",
            "--id",
            "pool",
        ],
        env={"PYTHONUNBUFFERED": "1"},
    )
    line = json.loads(pool.wait_stdout(lambda line: '"registered"' in line, timeout=20))
    assert line["processes"] == 2

    async def main() -> None:
        for router in (a, b):
            pool_there = functools.partial(lambda r: len(r.workers("automation")) == 2, router)
            await eventually(pool_there, what="both processes on each router")
            assert sorted(x["id"] for x in router.workers("automation")) == ["pool-1", "pool-2"]
            async with Client.connect(router.url("/ws/automation")) as c:
                assert (await c.call("echo", {"x": 1}))["data"] == {"x": 1}
        pool.signal(signal.SIGTERM)
        assert await pool.wait_async(15) == 0

    asyncio.run(main())
