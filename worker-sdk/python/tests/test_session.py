"""The worker's and the publisher's wire behaviour against a fake router (a real
pyzmq ROUTER socket played by the test): the version-2 handshake
(challenge/auth, the secret never on the wire), the router's frame limit,
undecodable requests, cancelled requests, and publisher sessions. No router
binary needed."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from conftest import EXAMPLES, Harness
from fake_router import WAIT, FakeRouter, fresh_nonce, is_terminal

from bridge_worker import (
    Context,
    NotConnected,
    PayloadTooLarge,
    Publisher,
    SecretRequired,
    State,
    Worker,
    WorkerRejected,
    WorkerStopped,
)
from bridge_worker import protocol as wire

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]

SECRET = "s3cret-\u2713-never-on-the-wire"
# No hello resend during the short handshakes of these tests (a resend is legal
# but would put a second hello in the middle of what a test expects).
SLOW_RESEND: dict[str, Any] = {"backoff_initial": 2.0, "backoff_max": 5.0}


def make_worker(router: FakeRouter, **settings: Any) -> Worker:
    settings.setdefault("worker_id", "py-test")
    settings.setdefault("secret", None)  # not from the environment
    settings.setdefault("grace_period", 2.0)
    settings.setdefault("linger", 0.1)
    return Worker(["svc"], endpoint=router.endpoint, **settings)


@contextlib.asynccontextmanager
async def started(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        if not task.done():
            worker.stop(grace=0.5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, WAIT)


def run(test: Callable[[FakeRouter], Awaitable[None]], **router: Any) -> None:
    async def main() -> None:
        r = FakeRouter(**router)
        try:
            await test(r)
        finally:
            r.close()

    asyncio.run(main())


async def next_other_than_hello(router: FakeRouter) -> tuple[bytes, wire.FromWorker]:
    while True:
        ident, msg = await router.recv()
        if not isinstance(msg, wire.Hello):
            return ident, msg


# ----- handshake -------------------------------------------------------------------


def test_the_secret_is_proved_never_sent() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router, secret=SECRET, **SLOW_RESEND)

        @w.handler("echo")
        async def echo(ctx: Context, data: Any) -> Any:
            return data

        async with started(w) as task:
            ident, raw, hello = await router.recv_raw()
            assert isinstance(hello, wire.Hello)
            assert SECRET.encode() not in raw, "the hello carries the secret"
            assert "secret" not in msgpack.unpackb(raw), "the hello has a secret field"
            assert msgpack.unpackb(raw)["v"] == 2

            nonce = fresh_nonce()
            auth = await router.challenge(ident, nonce)
            expected = hmac.new(SECRET.encode(), b"bridge-proto/2 auth\x00" + nonce, "sha256").digest()
            assert auth.proof == expected == wire.auth_proof(SECRET, nonce)
            # A repeated challenge (hello resent before the auth arrived) is answered again.
            again = await router.challenge(ident, nonce)
            assert again.proof == auth.proof

            await router.welcome(ident)
            await asyncio.wait_for(w.wait_registered(), WAIT)
            await router.request(ident, "e1", "echo", "in")
            assert await router.recv_for("e1") == wire.Reply(cid="e1", done=True, data="in")
            w.stop()
            _, bye = await router.recv()
            assert isinstance(bye, wire.Bye)
            await asyncio.wait_for(task, WAIT)
        assert not router.ever_received(SECRET.encode()), "the secret crossed the wire"

    run(test)


def test_the_fake_router_s_secret_handshake_registers_the_worker() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router, secret=SECRET, **SLOW_RESEND)
        async with started(w):
            await router.handshake()
            status = await asyncio.wait_for(w.wait_registered(), WAIT)
            assert status.state is State.REGISTERED

    run(test, secret=SECRET)


def test_a_challenge_without_a_secret_stops_the_worker_with_a_clear_error() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        async with started(w) as task:
            ident, _ = await router.expect_hello()
            await router.send(ident, wire.Challenge(nonce=fresh_nonce()))
            with pytest.raises(SecretRequired) as err:
                await asyncio.wait_for(task, WAIT)
        assert isinstance(err.value, WorkerRejected)
        assert "requires a bridge secret: set BRIDGE_SECRET" in str(err.value)
        assert router.endpoint in str(err.value)

    run(test)


def test_a_wrong_secret_is_refused_for_good() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router, secret="wrong", **SLOW_RESEND)
        async with started(w) as task:
            ident, _ = await router.expect_hello()
            nonce = fresh_nonce()
            auth = await router.challenge(ident, nonce)
            assert not wire.verify_proof(SECRET, nonce, auth.proof)
            await router.goodbye(ident, "invalid bridge secret", reconnect=False)
            with pytest.raises(WorkerRejected) as err:
                await asyncio.wait_for(task, WAIT)
        assert err.value.reason == "invalid bridge secret"
        assert not router.ever_received(b"wrong")

    run(test)


def test_an_old_router_s_version_1_goodbye_is_shown_and_final() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        async with started(w) as task:
            ident, _ = await router.expect_hello()
            reason = "unsupported protocol version 2 (this router speaks 1)"
            await router.send(ident, wire.Goodbye(reason=reason, reconnect=False), version=1)
            with pytest.raises(WorkerRejected) as err:
                await asyncio.wait_for(task, WAIT)
        assert err.value.reason == reason

    run(test)


def test_an_answer_in_an_unsupported_version_is_final() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        async with started(w) as task:
            ident, _ = await router.expect_hello()
            await router.send(ident, wire.Goodbye(reason="v3 only", reconnect=True), version=3)
            with pytest.raises(WorkerRejected) as err:
                await asyncio.wait_for(task, WAIT)
        assert "version 3" in err.value.reason

    run(test)


# ----- frame limit -------------------------------------------------------------------

LIMIT = 1024
BIG = "x" * 2000


def test_replies_over_the_frame_limit_become_payload_too_large() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        stopped: asyncio.Queue[str] = asyncio.Queue()

        @w.handler("big")
        async def big(ctx: Context, data: Any) -> str:
            return BIG

        @w.handler("big_partial")
        async def big_partial(ctx: Context, data: Any) -> Any:
            await ctx.send_partial("small")
            try:
                await ctx.send_partial(BIG)
            except PayloadTooLarge:
                await stopped.put("refused")
            try:
                await ctx.send_partial("after")  # the request is over: dropped
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await stopped.put("cancelled")
                raise
            return "not sent"

        @w.handler("push_big")
        async def push_big(ctx: Context, data: Any) -> str:
            try:
                await ctx.push("big", BIG)
            except PayloadTooLarge as e:
                return e.message
            return "sent?"

        @w.handler("echo")
        async def echo(ctx: Context, data: Any) -> Any:
            return data

        def too_large(msg: wire.FromWorker) -> None:
            assert isinstance(msg, wire.ErrorReply), msg
            assert (msg.code, msg.retryable) == ("payload_too_large", False)
            assert msg.message.startswith("reply of ")
            assert msg.message.endswith(" bytes exceeds the router's frame limit of 1024 bytes"), msg.message

        async with started(w):
            ident, _ = await router.handshake()
            status = await asyncio.wait_for(w.wait_registered(), WAIT)
            assert status.max_frame_bytes == LIMIT

            await router.request(ident, "b1", "big")
            too_large(await router.recv_for("b1"))

            await router.request(ident, "b2", "big_partial")
            assert await router.recv_for("b2") == wire.Reply(cid="b2", done=False, data="small")
            too_large(await router.recv_for("b2"))
            assert await asyncio.wait_for(stopped.get(), WAIT) == "refused"
            assert await asyncio.wait_for(stopped.get(), WAIT) == "cancelled", "the handler is stopped"
            await router.request(ident, "e1", "echo", 1)
            _, msg = await router.recv()
            assert getattr(msg, "cid", None) == "e1", f"stray message {msg!r}"

            # A push over the limit raises to its caller, never sent.
            await router.request(ident, "p1", "push_big")
            msg = await router.recv_for("p1")
            assert isinstance(msg, wire.Reply) and msg.data.startswith("push of "), msg
            assert msg.data.endswith("exceeds the router's frame limit of 1024 bytes")
            with pytest.raises(PayloadTooLarge) as err:
                await w.publish("t", "m", BIG)
            assert (err.value.code, err.value.limit) == ("payload_too_large", LIMIT)
            await w.publish("t", "m", 1)
            _, msg = await router.recv()
            assert msg == wire.Publish(topic="t", msg_type="m", data=1)
        assert all(len(f) <= LIMIT for f in router.received), "a frame over the limit was sent"

    run(test, max_frame_bytes=LIMIT)


# ----- undecodable requests ------------------------------------------------------------


def test_an_undecodable_request_with_a_readable_cid_gets_bad_request() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)

        @w.handler("echo")
        async def echo(ctx: Context, data: Any) -> Any:
            return data

        async with started(w):
            ident, _ = await router.handshake()
            await asyncio.wait_for(w.wait_registered(), WAIT)

            # Most fields missing.
            await router.send_bytes(ident, msgpack.packb({"v": 2, "kind": "request", "cid": "u1"}))
            msg = await router.recv_for("u1")
            assert isinstance(msg, wire.ErrorReply)
            assert (msg.code, msg.retryable) == ("bad_request", False)
            assert msg.message.startswith("the request could not be decoded: "), msg.message
            # `data` holding a MessagePack bin, which has no JSON form.
            fields = {k: getattr(_req("u2"), k) for k in wire.Request.__dataclass_fields__}
            frame = msgpack.packb({"v": 2, "kind": "request", **fields, "data": b"\x00"}, use_bin_type=True)
            await router.send_bytes(ident, frame)
            msg = await router.recv_for("u2")
            assert isinstance(msg, wire.ErrorReply) and msg.code == "bad_request"
            # Without a readable cid there is nothing to answer: dropped.
            await router.send_bytes(ident, b"\xc1")
            await router.send_bytes(ident, msgpack.packb({"v": 2, "kind": "request", "cid": 7}))
            await router.send_bytes(ident, msgpack.packb({"v": 2, "kind": "event", "cid": "x"}))
            # An unsupported version is never answered.
            await router.send_bytes(ident, msgpack.packb({"v": 3, "kind": "request", "cid": "v3"}))
            await router.request(ident, "e1", "echo", 1)
            _, msg = await router.recv()
            assert getattr(msg, "cid", None) == "e1", f"stray message {msg!r}"

    run(test)


def _req(cid: str) -> wire.Request:
    from fake_router import request

    return request(cid, "echo", None)


# ----- cancellation ----------------------------------------------------------------------


def test_nothing_is_sent_for_a_cancelled_request_after_its_terminal() -> None:
    async def test(router: FakeRouter) -> None:
        w = make_worker(router)
        done: asyncio.Queue[str] = asyncio.Queue()

        @w.handler("stubborn")
        async def stubborn(ctx: Context, data: Any) -> str:
            # Ignores its cancellation and keeps streaming, then returns a value.
            for i in range(20):
                with contextlib.suppress(asyncio.CancelledError):
                    await ctx.send_partial(i)
                    await asyncio.sleep(0.005)
            await done.put("finished")
            return "late final reply"

        @w.handler("echo")
        async def echo(ctx: Context, data: Any) -> Any:
            return data

        async with started(w):
            ident, _ = await router.handshake()
            await router.request(ident, "s1", "stubborn")
            assert await router.recv_for("s1") == wire.Reply(cid="s1", done=False, data=0)
            await router.cancel(ident, "s1")
            while True:
                # Partials already on their way before the cancel may still come.
                msg = await router.recv_for("s1")
                if is_terminal(msg):
                    assert isinstance(msg, wire.ErrorReply) and msg.code == "cancelled", msg
                    break
            assert await asyncio.wait_for(done.get(), WAIT) == "finished"
            await router.request(ident, "e1", "echo", 1)
            _, msg = await router.recv()
            assert getattr(msg, "cid", None) == "e1", f"late message {msg!r}"

    run(test)


# ----- message types: announced, and messages without a handler answered ----------------------


def test_hello_announces_the_handler_types_and_unhandled_messages_are_answered() -> None:
    async def test(router: FakeRouter) -> None:
        worker = make_worker(router)

        @worker.handler("ask")
        async def ask(ctx: Context, data: Any) -> Any:
            return data

        @worker.event("note")
        async def note(ctx: Any, data: Any) -> None:
            return None

        async with started(worker):
            ident, hello = await router.handshake()
            assert hello.msg_types == ["ask", "note"]
            await router.send(
                ident, wire.Event(conn="conn-1", route="/ws/test", service="svc", msg_type="ask", data=None)
            )
            await router.send(ident, wire.Binary(conn="conn-1", route="/ws/test", service="svc", data=b"\x01"))
            await router.request(ident, "r1", "note")
            answers = []
            for _ in range(3):
                _, msg = await router.recv()
                answers.append(msg)
            pushes = [m for m in answers if isinstance(m, wire.Push)]
            # The client sees these as error frames without id (the router converts them).
            assert pushes == [
                wire.Push(
                    conn="conn-1",
                    msg_type="error",
                    data={
                        "code": "unknown_type",
                        "message": "this worker has no handler for fire-and-forget messages of type `ask`; "
                        "fire-and-forget messages it handles: `note`; "
                        "`ask` is handled as a request (send it with an `id`)",
                    },
                ),
                wire.Push(
                    conn="conn-1",
                    msg_type="error",
                    data={"code": "unknown_type", "message": "this worker has no handler for binary frames"},
                ),
            ]
            [refused] = [m for m in answers if isinstance(m, wire.ErrorReply)]
            assert (refused.cid, refused.code, refused.message) == (
                "r1",
                "unknown_type",
                "this worker has no handler for requests of type `note`; requests it handles: `ask`; "
                "`note` is handled as a fire-and-forget message (send it without an `id`)",
            )

    run(test)


def test_handler_types_no_client_could_send_are_refused() -> None:
    worker = Worker(["svc"], secret=None)
    with pytest.raises(ValueError, match="1 to 128 bytes"):
        worker.handler("")
    with pytest.raises(ValueError, match="1 to 128 bytes"):
        worker.event("é" * 65)  # 130 bytes of UTF-8
    worker.handler("t" * 128)(lambda ctx, data: data)
    assert worker.msg_types == ["t" * 128]


# ----- publisher --------------------------------------------------------------------------


def make_publisher(router: FakeRouter, **settings: Any) -> Publisher:
    options: dict[str, Any] = {"secret": None, "linger": 0.1, **SLOW_RESEND, **settings}
    return Publisher(router.endpoint, publisher_id="py-pub", **options)


def test_publisher_registers_with_no_services_proves_the_secret_and_publishes() -> None:
    async def test(router: FakeRouter) -> None:
        pub = make_publisher(router, secret=SECRET)
        _, (_, hello) = await asyncio.gather(pub.start(), router.handshake())
        assert (hello.worker_id, hello.services, hello.capacity) == ("py-pub", [], 0)
        assert hello.msg_types is None, "a publisher session announces no message types"
        assert pub.status.state is State.REGISTERED
        await pub.publish("room:1", "message", {"n": 1})
        await pub.publish("room:2", "other", [1, 2])
        _, msg = await router.recv()
        assert msg == wire.Publish(topic="room:1", msg_type="message", data={"n": 1})
        _, msg = await router.recv()
        assert msg == wire.Publish(topic="room:2", msg_type="other", data=[1, 2])
        await pub.aclose()
        _, msg = await router.recv()
        assert isinstance(msg, wire.Bye)
        with pytest.raises(WorkerStopped):
            await pub.publish("room:1", "message", 2)
        assert not router.ever_received(SECRET.encode())

    run(test, secret=SECRET)


def test_publisher_as_a_context_manager_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(router: FakeRouter) -> None:
        monkeypatch.setenv("BRIDGE_ENDPOINT", router.endpoint)
        monkeypatch.setenv("BRIDGE_SECRET", SECRET)
        pub = Publisher(publisher_id="env-pub", **SLOW_RESEND)
        assert pub.endpoint == router.endpoint

        async def use() -> None:
            async with pub:
                await pub.publish("t", "m", "hi")

        await asyncio.gather(use(), router.handshake())
        _, msg = await router.recv()
        assert msg == wire.Publish(topic="t", msg_type="m", data="hi")
        _, msg = await router.recv()
        assert isinstance(msg, wire.Bye)

    run(test, secret=SECRET)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_publishing_without_a_router_fails_within_the_bound() -> None:
    async def main() -> None:
        pub = Publisher(f"tcp://127.0.0.1:{_free_port()}", secret=None, timeout=0.3)
        started_at = time.monotonic()
        with pytest.raises(NotConnected) as err:
            await pub.publish("t", "m", 1)
        assert err.value.waited == 0.3
        assert time.monotonic() - started_at < 5
        await asyncio.wait_for(pub.aclose(), WAIT)

    asyncio.run(main())


def test_publisher_waits_for_a_restarted_router() -> None:
    async def main() -> None:
        first = FakeRouter()
        pub = make_publisher(first, backoff_initial=0.02, backoff_max=0.2)
        try:
            await asyncio.gather(pub.start(), first.handshake(heartbeat_ms=100))
            await pub.publish("t", "m", 1)
            _, msg = await first.recv()
            assert msg == wire.Publish(topic="t", msg_type="m", data=1)
            endpoint = first.endpoint
            first.close()
            deadline = time.monotonic() + WAIT
            while pub.status.state is not State.CONNECTING:  # it notices the silence
                assert time.monotonic() < deadline, "the lost router went unnoticed"
                await asyncio.sleep(0.01)
            second = FakeRouter(bind=endpoint)
            try:
                await asyncio.gather(pub.publish("t", "m", 2), second.handshake())
                _, msg = await next_other_than_hello(second)
                assert msg == wire.Publish(topic="t", msg_type="m", data=2)
                assert pub.status.registrations >= 2
                await pub.aclose()
            finally:
                second.close()
        finally:
            await pub.aclose()

    asyncio.run(main())


def test_a_publication_over_the_frame_limit_is_refused() -> None:
    async def test(router: FakeRouter) -> None:
        pub = make_publisher(router)
        await asyncio.gather(pub.start(), router.handshake())
        with pytest.raises(PayloadTooLarge) as err:
            await pub.publish("t", "m", "x" * 1000)
        assert err.value.limit == 512 and err.value.size > 1000
        assert err.value.message.endswith("exceeds the router's frame limit of 512 bytes")
        await pub.publish("t", "m", "small")
        _, msg = await router.recv()
        assert msg == wire.Publish(topic="t", msg_type="m", data="small")
        await pub.aclose()

    run(test, max_frame_bytes=512)


def test_a_publisher_with_a_wrong_or_missing_secret_is_refused() -> None:
    async def test(router: FakeRouter) -> None:
        pub = make_publisher(router, secret="wrong")

        async def refuse() -> None:
            ident, _ = await router.expect_hello()
            await router.challenge(ident, fresh_nonce())
            await router.goodbye(ident, "invalid bridge secret", reconnect=False)

        results = await asyncio.gather(pub.start(), refuse(), return_exceptions=True)
        assert isinstance(results[0], WorkerRejected) and results[0].reason == "invalid bridge secret", results

        pub = make_publisher(router)

        async def challenge() -> None:
            ident, _ = await router.expect_hello()
            await router.send(ident, wire.Challenge(nonce=fresh_nonce()))

        results = await asyncio.gather(pub.start(), challenge(), return_exceptions=True)
        assert isinstance(results[0], SecretRequired), results

    run(test)


# ----- the raw example worker (no SDK) -------------------------------------------------------


def test_raw_echo_worker_speaks_version_2(harness: Harness) -> None:
    async def test(router: FakeRouter) -> None:
        proc = harness.spawn(
            "raw_echo_worker.py",
            [
                sys.executable,
                str(EXAMPLES / "raw_echo_worker.py"),
                "--bridge-endpoint",
                router.endpoint,
                "--service",
                "svc",
                "--id",
                "raw-1",
            ],
            env={"BRIDGE_SECRET": SECRET, "PYTHONUNBUFFERED": "1"},
        )
        ident, hello = await router.handshake()  # checks the proof
        assert (hello.worker_id, hello.services, hello.msg_types) == ("raw-1", ["svc"], ["echo", "sleep"])
        await proc.wait_stdout_async(lambda line: '"registered"' in line, timeout=WAIT)

        await router.request(ident, "e1", "echo", {"text": "h\u00e9llo"})
        _, msg = await next_other_than_hello(router)
        assert msg == wire.Reply(cid="e1", done=True, data={"text": "h\u00e9llo"})
        # A request that does not decode, with a readable cid.
        await router.send_bytes(ident, msgpack.packb({"v": 2, "kind": "request", "cid": "u1"}))
        msg = await router.recv_for("u1")
        assert isinstance(msg, wire.ErrorReply) and msg.code == "bad_request", msg
        # A reply over the router's frame limit.
        await router.request(ident, "b1", "echo", "x" * 2000)
        msg = await router.recv_for("b1")
        assert isinstance(msg, wire.ErrorReply) and msg.code == "payload_too_large", msg
        # Cancel answers `cancelled`.
        await router.request(ident, "s1", "sleep", {"ms": 60_000})
        await router.cancel(ident, "s1")
        msg = await router.recv_for("s1")
        assert isinstance(msg, wire.ErrorReply) and msg.code == "cancelled", msg
        # A fire-and-forget message it cannot handle is answered with an error push.
        await router.send(ident, wire.Event(conn="c1", route="/r", service="svc", msg_type="echo", data=None))
        _, msg = await next_other_than_hello(router)
        assert msg == wire.Push(
            conn="c1",
            msg_type="error",
            data={
                "code": "unknown_type",
                "message": "this worker has no handler for fire-and-forget messages of type `echo`",
            },
        )

        proc.signal(signal.SIGTERM)
        _, msg = await router.recv()
        assert isinstance(msg, wire.Bye), msg
        assert await proc.wait_async(WAIT) == 0
        assert not router.ever_received(SECRET.encode())
        assert not any(SECRET in line for line in proc.stderr), "the secret was logged"

    run(test, secret=SECRET, max_frame_bytes=1024)


def test_raw_echo_worker_without_a_secret_stops_when_challenged(harness: Harness) -> None:
    async def test(router: FakeRouter) -> None:
        proc = harness.spawn(
            "raw_echo_worker.py",
            [sys.executable, str(EXAMPLES / "raw_echo_worker.py"), "--bridge-endpoint", router.endpoint],
            env={"BRIDGE_SECRET": "", "PYTHONUNBUFFERED": "1"},
        )
        ident, _ = await router.expect_hello()
        await router.send(ident, wire.Challenge(nonce=fresh_nonce()))
        assert await proc.wait_async(WAIT) == 1
        assert any("set BRIDGE_SECRET" in line for line in proc.stderr), proc.tail()

    run(test)
