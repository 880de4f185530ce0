"""The hot path against a fake router: requests read in batches, handlers that
finish without awaiting, replies written in batches, the codec's fast paths
and the outbox's bounds. What must hold: one terminal answer per request, in
the order the handlers finished, the same bytes as the generic codec."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from fake_router import WAIT, FakeRouter, is_terminal, request

from bridge_worker import Context, HandlerError, Worker
from bridge_worker import protocol as wire
from bridge_worker.outbox import Outbox

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def make_worker(router: FakeRouter, **settings: Any) -> Worker:
    settings.setdefault("worker_id", "py-test")
    settings.setdefault("secret", None)
    settings.setdefault("grace_period", 2.0)
    settings.setdefault("linger", 0.1)
    settings.setdefault("capacity", 1000)
    return Worker(["svc"], endpoint=router.endpoint, **settings)


@contextlib.asynccontextmanager
async def serving(router: FakeRouter, w: Worker) -> AsyncIterator[bytes]:
    task = asyncio.create_task(w.run())
    try:
        ident, _ = await router.handshake()
        await asyncio.wait_for(w.wait_registered(), WAIT)
        yield ident
    finally:
        w.stop(grace=0.5)
        await asyncio.wait_for(task, WAIT)


def run(test: Any) -> None:
    async def main() -> None:
        r = FakeRouter()
        try:
            await test(r)
        finally:
            r.close()

    asyncio.run(main())


def test_a_burst_is_answered_once_each_in_order_with_cancel_and_deadline() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        seen: list[str] = []

        @w.handler("now")
        async def now(ctx: Context, data: Any) -> Any:
            return data  # never awaits

        @w.handler("fail")
        async def fail(ctx: Context, data: Any) -> Any:
            raise HandlerError("nope", "refused")

        @w.handler("wait")
        async def wait(ctx: Context, data: Any) -> Any:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append(ctx.cancel_reason or "")
                assert ctx.cancel_event.is_set()  # made after the cancel: made set
                raise

        async with serving(router, w) as ident:
            # One burst: the worker reads it in batches, answers each in order.
            frames = [wire.encode(request(f"n{i}", "now", i)) for i in range(300)]
            frames.insert(100, wire.encode(request("w1", "wait", None, timeout_ms=30_000)))
            frames.insert(200, wire.encode(request("w2", "wait", None, timeout_ms=150)))
            frames.insert(250, wire.encode(request("f1", "fail")))
            for f in frames:
                await router.send_bytes(ident, f)
            answers: dict[str, wire.FromWorker] = {}
            order: list[str] = []
            while len(answers) < 302:  # all but w1, which waits
                _, msg = await router.recv()
                assert is_terminal(msg), msg
                cid = msg.cid  # type: ignore[union-attr]
                assert cid not in answers, f"second terminal for {cid}"
                answers[cid] = msg
                order.append(cid)
            assert [c for c in order if c.startswith("n")] == [f"n{i}" for i in range(300)]
            assert all(answers[f"n{i}"] == wire.Reply(cid=f"n{i}", done=True, data=i) for i in range(300))
            assert isinstance(answers["f1"], wire.ErrorReply) and answers["f1"].code == "nope"
            assert isinstance(answers["w2"], wire.ErrorReply) and answers["w2"].code == "timeout"
            # Cancel of one that already answered: ignored; of one waiting: one answer.
            await router.cancel(ident, "n5")
            await router.cancel(ident, "w1")
            assert await router.recv_for("w1") == wire.ErrorReply(
                cid="w1", code="cancelled", message="request cancelled (client)", retryable=False
            )
            await router.request(ident, "after", "now", "x")
            assert await router.recv_for("after") == wire.Reply(cid="after", done=True, data="x")
            assert sorted(seen) == ["client", "deadline"]

    run(test)


def test_streaming_and_thread_handlers_keep_their_order() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)

        @w.handler("stream")
        async def stream(ctx: Context, data: Any) -> AsyncIterator[Any]:
            for i in range(data):
                yield i

        @w.handler("sync")
        def sync(ctx: Context, data: Any) -> Any:
            return data * 2

        async with serving(router, w) as ident:
            await router.request(ident, "s", "stream", 50)
            await router.request(ident, "t", "sync", 21)
            got: dict[str, list[wire.FromWorker]] = {"s": [], "t": []}
            while not (got["s"] and is_terminal(got["s"][-1]) and got["t"]):
                _, msg = await router.recv()
                got[msg.cid].append(msg)  # type: ignore[union-attr]
            assert [m.data for m in got["s"]] == [*range(50), None]  # type: ignore[union-attr]
            assert got["t"] == [wire.Reply(cid="t", done=True, data=42)]

    run(test)


def test_a_reply_that_is_not_json_is_one_worker_error() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)

        @w.handler("bad")
        async def bad(ctx: Context, data: Any) -> Any:
            return {"x": float("nan")} if data == "nan" else {1: "int key"}

        async with serving(router, w) as ident:
            for cid in ("nan", "key"):
                await router.request(ident, cid, "bad", cid)
                msg = await router.recv_for(cid)
                assert isinstance(msg, wire.ErrorReply) and msg.code == "worker_error", msg

    run(test)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1 << 40, -(1 << 63), (1 << 64) - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.1, -0.0, 1e308, 5e-324, math.pi, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return "".join(rng.choice("aé✓\U0001f600\x00 ") for _ in range(rng.randrange(6)))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}


def test_fast_codec_paths_give_the_generic_bytes_and_verdicts() -> None:
    rng = random.Random(17)
    packer = msgpack.Packer(use_bin_type=True)
    for _ in range(2000):
        data = _random_json(rng)
        msg_type = rng.choice([None, "THOUGHT"])
        generic = wire.encode_from_worker(wire.Reply(cid="c", done=True, msg_type=msg_type, data=data))
        assert wire.encode_reply_fast(packer, "c", True, msg_type, data) == generic
        req = wire.Request(
            cid="c",
            conn="k",
            route="/r",
            service="s",
            msg_type="t",
            id=rng.choice([1, "a", None]),
            data=data,
            timeout_ms=5,
            deadline_ms=0,
            attempt=1,
            claims=rng.choice([None, {"sub": "u"}]),
        )
        frame = wire.encode(req)
        fast = wire.decode_request_fast(frame)
        assert fast == wire.decode_to_worker(frame)
        # Floats come back bit for bit.
        assert msgpack.packb(fast.data if fast else None) == msgpack.packb(data)
    # Not JSON, or not UTF-8: no fast answer (the generic path names the fault).
    for bad in (float("inf"), b"bytes", {1: 2}, "\udcff", msgpack.ExtType(1, b"")):
        assert wire.encode_reply_fast(packer, "c", True, None, bad) is None
        with pytest.raises((wire.EncodeError, UnicodeEncodeError)):
            wire.encode_from_worker(wire.Reply(cid="c", done=True, data=bad))
    ok = msgpack.unpackb(wire.encode(request("c", "t", "x")))
    for change in ({"data": b"\x00"}, {"cid": 5}, {"attempt": 1 << 32}, {"v": 9}, {"kind": "event"}):
        frame = msgpack.packb({**ok, **change}, use_bin_type=True)
        assert wire.decode_request_fast(frame) is None
    invalid_utf8 = msgpack.packb({**ok, "route": "/r"}, use_bin_type=True).replace(b"/r", b"\xff\xfe")
    assert wire.decode_request_fast(invalid_utf8) is None
    with pytest.raises(wire.DecodeError, match="route"):
        wire.decode_to_worker(invalid_utf8)


def test_outbox_is_bounded_in_bytes_and_keeps_order() -> None:
    async def main() -> None:
        box = Outbox(limit=100, max_bytes=10)
        await box.put(b"123456")
        await box.put(b"7890")  # 10 bytes: full by bytes, not by count
        blocked = asyncio.create_task(box.put(b"late"))
        await asyncio.sleep(0)
        assert not blocked.done() and box.queued_bytes == 10
        box.put_nowait(b"terminal")  # never waits, never dropped
        ready: list[bytes] = []
        box.on_ready = lambda: ready.append(b"!")
        sent = []
        while (frame := box.peek()) is not None:
            sent.append(frame)
            box.pop_sent()
            await asyncio.sleep(0)
        await asyncio.wait_for(blocked, 1)
        while (frame := box.peek()) is not None:
            sent.append(frame)
            box.pop_sent()
        assert sent == [b"123456", b"7890", b"terminal", b"late"]
        assert ready == [b"!"] and box.queued_bytes == 0
        await asyncio.wait_for(box.flushed(), 1)

    asyncio.run(main())
