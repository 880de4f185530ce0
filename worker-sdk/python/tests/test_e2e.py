"""End to end against the real router binary, with the worker running in the
test's own event loop (so tests can watch what its handlers see) and
WebSocket clients on the router's public side."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from conftest import Client, Harness, Router, eventually, running

from bridge_worker import (
    Context,
    EventContext,
    HandlerError,
    Publisher,
    Reply,
    SecretRequired,
    State,
    Worker,
    WorkerRejected,
    protocol,
)

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def make_worker(router: Router, service: str = "py-main", **settings: Any) -> Worker:
    settings.setdefault("worker_id", "py-test")
    settings.setdefault("grace_period", 2.0)
    if router.publish:
        settings.setdefault("publish_endpoint", router.publish)
    return Worker([service], endpoint=router.bridge, **settings)


def state_of(w: Worker) -> State:
    return w.status.state  # a call, so type checkers do not carry the value across awaits


def is_error(frame: dict[str, Any], code: str) -> bool:
    return frame.get("type") == "error" and frame.get("done") is True and frame["error"]["code"] == code


def test_requests_streams_and_errors(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router)

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    @w.handler("whoami")
    async def whoami(ctx: Context, data: Any) -> dict[str, Any]:
        return {
            "cid": ctx.correlation_id,
            "conn": ctx.connection_id,
            "route": ctx.route,
            "service": ctx.service,
            "msg_type": ctx.msg_type,
            "client_id": ctx.client_id,
            "attempt": ctx.attempt,
            "remaining": ctx.remaining(),
            "claims": ctx.claims,
        }

    @w.handler("stream")
    async def stream(ctx: Context, data: Any) -> AsyncIterator[Any]:
        for i in range(data["n"]):
            yield {"i": i}
        yield Reply({"n": data["n"]}, "stream_done")

    @w.handler("steps")
    async def steps(ctx: Context, data: Any) -> Reply:
        await ctx.send_partial({"text": "hmm"}, "THOUGHT")
        await ctx.send_partial({"p": 0.5})
        return Reply({"ok": True}, "OUTPUT")

    @w.handler("fail")
    async def fail(ctx: Context, data: Any) -> None:
        raise HandlerError("custom_code", "a sentence for the client")

    @w.handler("bad_code")
    async def bad_code(ctx: Context, data: Any) -> None:
        raise HandlerError("Not Snake", "kept message")

    @w.handler("crash")
    async def crash(ctx: Context, data: Any) -> None:
        raise RuntimeError("internal detail the client must not see")

    @w.handler("not_json")
    async def not_json(ctx: Context, data: Any) -> Any:
        return {"raw": b"bytes"}

    async def main() -> None:
        async with running(w), Client.connect(router.url("/ws/main")) as c:
            data = {"a": [1, -2, 3.5, "é ✓", None, True], "nested": {"k": {}}}
            f = await c.call("echo", data)
            assert (f["type"], f["data"], f["done"]) == ("echo", data, True)

            id = await c.request("whoami", id=42)
            _, f = await c.terminal(id)
            info = f["data"]
            assert f["correlation_id"] == info["cid"]
            assert info["conn"] == c.welcome["data"]["session_id"]
            assert (info["route"], info["service"], info["msg_type"]) == ("/ws/main", "py-main", "whoami")
            assert (info["client_id"], info["attempt"], info["claims"]) == (42, 1, None)
            assert 0 < info["remaining"] <= 30

            id = await c.request("stream", {"n": 3})
            partials, final = await c.terminal(id)
            assert [p["data"] for p in partials] == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert all(p["type"] == "stream" and p["done"] is False for p in partials)
            assert (final["type"], final["data"]) == ("stream_done", {"n": 3})

            id = await c.request("steps")
            partials, final = await c.terminal(id)
            assert [(p["type"], p["data"]) for p in partials] == [("THOUGHT", {"text": "hmm"}), ("steps", {"p": 0.5})]
            assert (final["type"], final["data"]) == ("OUTPUT", {"ok": True})

            f = await c.call("fail")
            assert f["error"] == {"code": "custom_code", "message": "a sentence for the client"}
            f = await c.call("bad_code")
            assert f["error"] == {"code": "worker_error", "message": "kept message"}
            f = await c.call("crash")
            assert is_error(f, "worker_error") and "internal detail" not in f["error"]["message"]
            f = await c.call("not_json")
            assert is_error(f, "worker_error")
            f = await c.call("no_such_type")
            assert is_error(f, "unknown_type")

    asyncio.run(main())


def test_connection_operations_and_publications(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router)
    events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    @w.on_connect
    async def on_connect(ctx: EventContext, info: protocol.Connect) -> None:
        await events.put(("connect", info))

    @w.on_disconnect
    async def on_disconnect(ctx: EventContext, info: protocol.Disconnect) -> None:
        await events.put(("disconnect", info))

    @w.on_binary
    async def on_binary(ctx: EventContext, data: bytes) -> None:
        await ctx.push_binary(data[::-1])

    @w.event("note")
    def note(ctx: EventContext, data: Any) -> None:  # sync: runs in the thread pool
        events.put_nowait(("event", ctx.msg_type, ctx.route, data))

    @w.handler("poke")
    async def poke(ctx: Context, data: Any) -> str:
        await ctx.push("poked", {"n": 1})
        return "ok"

    @w.handler("join")
    async def join(ctx: Context, data: Any) -> None:
        await ctx.subscribe(data["topic"])

    @w.handler("leave")
    async def leave(ctx: Context, data: Any) -> None:
        await ctx.unsubscribe(data["topic"])

    @w.handler("say")
    async def say(ctx: Context, data: Any) -> None:
        await ctx.publish(data["topic"], "said", data["text"])

    @w.handler("kick")
    async def kick(ctx: Context, data: Any) -> str:
        await ctx.close(4001, "kicked")
        return "closing"

    async def next_event(kind: str) -> tuple[Any, ...]:
        while True:
            item = await asyncio.wait_for(events.get(), 10)
            if item[0] == kind:
                return item

    async def main() -> None:
        async with running(w):
            async with Client.connect(router.url("/ws/main?lang=fr")) as c:
                conn = c.welcome["data"]["session_id"]
                _, info = await next_event("connect")
                assert (info.conn, info.path, info.route, info.query) == (conn, "/ws/main", "/ws/main", {"lang": "fr"})
                assert "host" in info.headers

                f = await c.call("poke")
                assert f["data"] == "ok"
                push = await c.next(lambda f: isinstance(f, dict) and f.get("type") == "poked")
                assert push["data"] == {"n": 1} and "id" not in push

                await c.send(b"\x01\x02\x03")
                assert await c.next(lambda f: isinstance(f, bytes)) == b"\x03\x02\x01"

                await c.send({"type": "note", "data": {"x": 1}})
                assert await next_event("event") == ("event", "note", "/ws/main", {"x": 1})

                # A subscribe and a publish over the worker's socket stay in order.
                await c.call("join", {"topic": "room:1"})
                await c.call("say", {"topic": "room:1", "text": "hi"})
                said = await c.next(lambda f: isinstance(f, dict) and f.get("type") == "said")
                assert (said["topic"], said["data"]) == ("room:1", "hi")
                await c.call("leave", {"topic": "room:1"})

                # A Publisher (a publisher session on the bridge endpoint) reaches a client
                # that subscribed itself; nothing is lost to a slow joiner any more.
                await c.send({"type": "subscribe", "id": "s1", "data": {"topic": "news"}})
                await c.next(lambda f: isinstance(f, dict) and f.get("type") == "subscribed")
                async with Publisher(router.bridge, secret=None) as pub:
                    await pub.publish("news", "flash", {"headline": "ok"})
                    got = await c.next(lambda f: isinstance(f, dict) and f.get("type") == "flash")
                    assert (got["topic"], got["data"]) == ("news", {"headline": "ok"})

            _, info = await next_event("disconnect")
            assert (info.conn, info.code) == (conn, 1000)

            async with Client.connect(router.url("/ws/main")) as c2:
                conn2 = c2.welcome["data"]["session_id"]
                await c2.request("kick")
                with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                    await c2.next(lambda f: False, 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            while True:
                _, info = await next_event("disconnect")
                if info.conn == conn2:
                    break
            assert info.code == 4001

    asyncio.run(main())


def test_cancel_and_disconnect_reach_the_handler_and_free_the_credit(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router, capacity=1)
    started: asyncio.Queue[str] = asyncio.Queue()
    stopped: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    @w.handler("wait")
    async def wait(ctx: Context, data: Any) -> None:
        await started.put(ctx.correlation_id)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await stopped.put((ctx.correlation_id, ctx.cancel_reason))
            raise

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    async def main() -> None:
        async with running(w), Client.connect(router.url("/ws/main")) as c:
            id = await c.request("wait")
            cid = await asyncio.wait_for(started.get(), 10)
            await c.send({"type": "cancel", "data": {"id": id}})
            _, terminal = await c.terminal(id)
            assert is_error(terminal, "cancelled")
            assert await asyncio.wait_for(stopped.get(), 10) == (cid, "client")
            # Capacity 1: this is only served if the cancelled request gave its credit back.
            assert (await c.call("echo", 1))["data"] == 1
            assert c.frames_for(id) == [], "a second terminal frame for the cancelled request"

            async with Client.connect(router.url("/ws/main")) as other:
                await other.request("wait")
                cid = await asyncio.wait_for(started.get(), 10)
            assert await asyncio.wait_for(stopped.get(), 10) == (cid, "disconnected")
            assert (await c.call("echo", 2))["data"] == 2

    asyncio.run(main())


def test_deadline_cancels_the_handler(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router, "py-short", capacity=1)
    stopped: asyncio.Queue[str | None] = asyncio.Queue()

    @w.handler("wait")
    async def wait(ctx: Context, data: Any) -> None:
        assert ctx.remaining() <= 0.4
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await stopped.put(ctx.cancel_reason)
            raise

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    async def main() -> None:
        async with running(w), Client.connect(router.url("/ws/short")) as c:
            id = await c.request("wait")
            _, terminal = await c.terminal(id)
            assert is_error(terminal, "timeout")
            assert await asyncio.wait_for(stopped.get(), 10) in ("timeout", "deadline")
            assert (await c.call("echo", "after"))["data"] == "after"
            assert c.frames_for(id) == []

    asyncio.run(main())


def test_blocking_sync_handlers_run_in_threads(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router, capacity=4)

    @w.handler("block")
    def block(ctx: Context, data: Any) -> str:
        time.sleep(data)  # a blocking call, e.g. a model
        return "unblocked"

    @w.handler("count")
    def count(ctx: Context, data: Any) -> Iterator[Any]:
        for i in range(data):
            time.sleep(0.01)
            yield i
        yield Reply("counted")

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    async def main() -> None:
        async with running(w), Client.connect(router.url("/ws/main")) as c:
            slow = await c.request("block", 1.5)
            started = time.monotonic()
            assert (await c.call("echo", "fast"))["data"] == "fast"
            assert time.monotonic() - started < 1.0, "echo waited for the blocking handler"
            assert c.frames_for(slow) == [], "the blocking handler finished before the echo"
            _, final = await c.terminal(slow)
            assert final["data"] == "unblocked"

            id = await c.request("count", 3)
            partials, final = await c.terminal(id)
            assert [p["data"] for p in partials] == [0, 1, 2] and final["data"] == "counted"

    asyncio.run(main())


def test_graceful_stop(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router, grace_period=5.0)
    release = asyncio.Event()
    started: asyncio.Queue[str] = asyncio.Queue()

    @w.handler("work")
    async def work(ctx: Context, data: Any) -> str:
        await started.put("work")
        await release.wait()
        return "finished"

    @w.handler("forever")
    async def forever(ctx: Context, data: Any) -> None:
        await started.put("forever")
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.create_task(w.run())
        await asyncio.wait_for(w.wait_registered(), 10)
        async with Client.connect(router.url("/ws/main")) as c:
            id = await c.request("work")
            stuck = await c.request("forever")
            for _ in range(2):
                await asyncio.wait_for(started.get(), 10)
            w.stop()
            await asyncio.sleep(0)
            assert state_of(w) is State.STOPPING
            release.set()
            _, final = await c.terminal(id)
            assert final["data"] == "finished", "in-flight work finishes during the grace period"
            w.stop(grace=0)  # shortened: the request still running is answered now
            _, final = await c.terminal(stuck)
            assert is_error(final, "worker_error")
            await asyncio.wait_for(task, 10)
            assert state_of(w) is State.STOPPED
            # The worker is gone: nobody serves the route any more.
            f = await c.call("work")
            assert is_error(f, "no_workers")

    asyncio.run(main())


def _free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_router_restart_under_the_worker(harness: Harness) -> None:
    bridge, publish = _free_tcp_endpoint(), _free_tcp_endpoint()
    routers = [harness.router(bridge, publish)]
    w = make_worker(routers[0])

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    async def echo_through(router: Router, value: Any) -> None:
        async with Client.connect(router.url("/ws/main")) as c:
            assert (await c.call("echo", value))["data"] == value

    async def main() -> None:
        async with running(w):
            await echo_through(routers[0], 0)
            first_router = w.status.router_id
            for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
                # SIGTERM: the router says goodbye{reconnect: true}. SIGKILL: it goes silent.
                routers[-1].proc.signal(sig)
                await routers[-1].proc.wait_async(10)
                routers.append(await asyncio.to_thread(harness.router, bridge, publish))
                status = await asyncio.wait_for(w.wait_registered(n + 1), 20)
                assert status.router_id != first_router
                await echo_through(routers[-1], n)

            # A frozen router goes silent: the worker declares it dead after
            # heartbeat_ms x liveness, and registers again once it thaws.
            frozen = routers[-1]
            frozen.proc.signal(signal.SIGSTOP)
            try:
                await eventually(lambda: w.status.state is State.CONNECTING, what="dead router detected")
            finally:
                frozen.proc.signal(signal.SIGCONT)
            await asyncio.wait_for(w.wait_registered(4), 20)

            # Until its next liveness tick the thawed router still lists the worker's old
            # socket, and a request routed there would be lost: wait for that tick.
            async def one_worker_left() -> bool:
                return len(await asyncio.to_thread(frozen.workers, "py-main")) == 1

            await eventually(one_worker_left, what="old session forgotten")
            await echo_through(frozen, "thawed")

    asyncio.run(main())


def test_wrong_secret_is_refused_for_good(harness: Harness) -> None:
    router = harness.router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--bridge-secret", "s3cr3t")

    async def main() -> None:
        bad = make_worker(router, secret="wrong")
        with pytest.raises(WorkerRejected):
            await asyncio.wait_for(bad.run(), 10)
        missing = make_worker(router, secret=None)
        with pytest.raises(SecretRequired):
            await asyncio.wait_for(missing.run(), 10)
        good = make_worker(router, secret="s3cr3t")
        async with running(good):
            assert good.status.registrations == 1

    asyncio.run(main())


def test_publisher_sessions_prove_the_secret(harness: Harness) -> None:
    router = harness.router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--bridge-secret", "s3cr3t")

    async def main() -> None:
        with pytest.raises(WorkerRejected):
            async with Publisher(router.bridge, secret="wrong"):
                pass
        with pytest.raises(SecretRequired):
            async with Publisher(router.bridge, secret=None):
                pass
        async with Client.connect(router.url("/ws/main")) as c:
            await c.send({"type": "subscribe", "id": "s1", "data": {"topic": "news"}})
            await c.next(lambda f: isinstance(f, dict) and f.get("type") == "subscribed")
            async with Publisher(router.bridge, secret="s3cr3t") as pub:
                await pub.publish("news", "flash", {"n": 1})
                got = await c.next(lambda f: isinstance(f, dict) and f.get("type") == "flash")
                assert (got["topic"], got["data"]) == ("news", {"n": 1})

    asyncio.run(main())


def test_raw_route_frames_pass_unchanged(harness: Harness) -> None:
    router = harness.router()
    w = make_worker(router, "py-raw")

    @w.on_raw
    async def on_raw(ctx: EventContext, frame: Any) -> None:
        await ctx.send_raw(frame)

    async def main() -> None:
        async with running(w), Client.connect(router.url("/ws/raw"), raw=True) as c:
            await c.send('{"not": "an envelope"}')
            assert await c.next(lambda f: True) == {"not": "an envelope"}
            await c.send(b"\x00\xff")
            assert await c.next(lambda f: True) == b"\x00\xff"

    asyncio.run(main())
