"""The SDK's own ZMTP transport (``bridge_worker.zmtp`` and the ZMTP link of
``bridge_worker.transport``): the codec on its own (bytes split anywhere, long
frames, commands, hostile lengths, bad greetings, peers that are not a
ROUTER), then a worker on the ZMTP link against a peer the test writes byte
by byte (PING answered PONG, nothing sent before the peer's READY, a
violation drops the connection and the worker connects again) and against
libzmq (a ROUTER that sends ZMTP heartbeats, an ipc:// endpoint). The rest of
the suite runs against the real router on both transports (conftest.py,
``transport``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import zmq
from fake_router import WAIT, FakeRouter, is_terminal

from bridge_worker import Context, Worker, zmtp
from bridge_worker import protocol as wire
from bridge_worker.transport import parse_endpoint

pytestmark = pytest.mark.timeout(60)

ROUTER_READY = zmtp.command(b"READY", zmtp.properties([(b"Socket-Type", b"ROUTER"), (b"Identity", b"")]))
MAX = 1 << 20


def router_greeting(version: tuple[int, int] = (3, 0), mechanism: bytes = b"NULL") -> bytes:
    g = bytearray(zmtp.greeting(version))
    g[12:32] = mechanism.ljust(20, b"\0")
    return bytes(g)


def data_frame(body: bytes, flags: int = 0, long: bool = False) -> bytes:
    if long or len(body) > 255:
        return bytes((flags | zmtp.LONG,)) + len(body).to_bytes(8, "big") + body
    return bytes((flags, len(body))) + body


# ----- the codec ---------------------------------------------------------------------


def test_greeting_and_ready_are_what_the_spec_says() -> None:
    g = zmtp.greeting()
    assert len(g) == 64
    assert g[0] == 0xFF and g[1:9] == bytes(8) and g[9] == 0x7F
    assert (g[10], g[11]) == (3, 1)
    assert g[12:32] == b"NULL" + bytes(16)
    assert g[32] == 0 and g[33:] == bytes(31)
    r = zmtp.ready()
    assert r[0] == zmtp.COMMAND and r[1] == len(r) - 2
    name, body = r[3 : 3 + r[2]], r[3 + r[2] :]
    assert name == b"READY"
    assert zmtp.parse_properties(body) == {b"socket-type": b"DEALER", b"identity": b""}
    assert zmtp.encode([b"ab", b"c" * 300]) == [b"\x00\x02", b"ab", b"\x02" + (300).to_bytes(8, "big"), b"c" * 300]


STREAM = (
    router_greeting()
    + ROUTER_READY
    + data_frame(b"hello")
    + data_frame(b"x" * 300)
    + zmtp.command(b"PING", b"\x00\x0actx-1")
    + data_frame(b"part 1", zmtp.MORE)
    + data_frame(b"part 2", zmtp.MORE, long=True)
    + data_frame(b"part 3")
    + data_frame(b"")
    + data_frame(b"small but long", long=True)
    + zmtp.command(b"SUBSCRIBE", b"topic")
    + data_frame(bytes(range(256)) * 300)
)
EXPECTED = [b"hello", b"x" * 300, b"", b"small but long", bytes(range(256)) * 300]
EXPECTED_COMMANDS = [(b"PING", b"\x00\x0actx-1"), (b"SUBSCRIBE", b"topic")]


def feed_all(chunks: list[bytes]) -> zmtp.Decoder:
    d = zmtp.Decoder(MAX)
    got: list[bytes] = []
    for chunk in chunks:
        got += d.feed(chunk)
    assert got == EXPECTED
    assert d.commands == EXPECTED_COMMANDS
    assert d.dropped == 1, "the multi-part message is dropped whole"
    assert d.ready and d.peer_version == (3, 0)
    return d


def test_a_stream_split_at_every_byte_boundary_decodes_the_same() -> None:
    for i in range(len(STREAM) + 1):
        feed_all([STREAM[:i], STREAM[i:]])


def test_a_stream_fed_byte_by_byte_and_in_odd_chunks_decodes_the_same() -> None:
    feed_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    for size in (2, 3, 7, 64, 65, 1000, 4096):
        feed_all([STREAM[i : i + size] for i in range(0, len(STREAM), size)])
    # Three pieces around the frames after the handshake, at every pair of cut points of a window.
    start = 64 + len(ROUTER_READY)
    for i in range(start, start + 40):
        for j in range(i, start + 40):
            feed_all([STREAM[:i], STREAM[i:j], STREAM[j:]])


def test_long_frames_up_to_the_bound_and_not_beyond() -> None:
    handshake = router_greeting() + ROUTER_READY
    d = zmtp.Decoder(70_000)
    body = b"z" * 70_000
    assert d.feed(handshake + data_frame(body)) == [body]
    d = zmtp.Decoder(70_000)
    d.feed(handshake)
    with pytest.raises(zmtp.ZmtpError, match="frame of 70001 bytes"):
        d.feed(data_frame(b"z" * 70_001)[:20])  # refused from the header, before the body
    # A multi-part message over the bound in total is refused too.
    d = zmtp.Decoder(1000)
    d.feed(handshake + data_frame(b"a" * 600, zmtp.MORE))
    with pytest.raises(zmtp.ZmtpError):
        d.feed(data_frame(b"b" * 600))


def test_a_hostile_8_byte_length_is_refused_before_anything_is_buffered() -> None:
    d = zmtp.Decoder(MAX)
    d.feed(router_greeting() + ROUTER_READY)
    header = b"\x02" + (1 << 60).to_bytes(8, "big")
    for cut in range(1, 9):
        d2 = zmtp.Decoder(MAX)
        d2.feed(router_greeting() + ROUTER_READY)
        assert d2.feed(header[:cut]) == []
        with pytest.raises(zmtp.ZmtpError, match="at most"):
            d2.feed(header[cut:])
    with pytest.raises(zmtp.ZmtpError):
        d.feed(header + b"some of the body")
    assert len(d._buf) < 64, "nothing was buffered for the announced body"
    # The same for a command (bounded much lower) and before the READY.
    d = zmtp.Decoder(MAX)
    with pytest.raises(zmtp.ZmtpError, match="command of"):
        d.feed(router_greeting() + b"\x06" + (1 << 62).to_bytes(8, "big"))
    d = zmtp.Decoder(MAX)
    d.feed(router_greeting() + ROUTER_READY)
    with pytest.raises(zmtp.ZmtpError, match="command of"):
        d.feed(b"\x06" + (zmtp.MAX_COMMAND + 1).to_bytes(8, "big"))


@pytest.mark.parametrize(
    ("greeting", "error"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n".ljust(64, b" "), "no ZMTP signature"),
        (router_greeting((2, 0)), "ZMTP 2.0"),
        (router_greeting(mechanism=b"CURVE"), "'CURVE', not NULL"),
        (router_greeting(mechanism=b"PLAIN"), "'PLAIN', not NULL"),
    ],
)
def test_a_bad_greeting_is_refused_with_a_clear_error(greeting: bytes, error: str) -> None:
    d = zmtp.Decoder(MAX)
    assert d.feed(greeting[:63]) == []
    with pytest.raises(zmtp.ZmtpError, match=error):
        d.feed(greeting[63:] + ROUTER_READY)


def test_later_versions_are_accepted() -> None:
    for version in ((3, 0), (3, 1), (4, 0)):
        d = zmtp.Decoder(MAX)
        assert d.feed(router_greeting(version) + ROUTER_READY + data_frame(b"m")) == [b"m"]
        assert d.peer_version == version


@pytest.mark.parametrize(
    ("after_greeting", "error"),
    [
        (zmtp.command(b"READY", zmtp.properties([(b"Socket-Type", b"PUB")])), "'PUB' socket, not a ROUTER"),
        (zmtp.command(b"READY", zmtp.properties([(b"Socket-Type", b"DEALER")])), "'DEALER' socket, not a ROUTER"),
        (zmtp.command(b"READY", zmtp.properties([(b"Identity", b"")])), "no Socket-Type"),
        (zmtp.command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x09ROU"), "cut short"),
        (zmtp.command(b"PING", b"\x00\x01"), "'PING' before READY"),
        (data_frame(b"a message"), "message before its READY"),
        (b"\x04\x00", "empty command"),
        (b"\x04\x03\x09ab", "malformed name"),
    ],
)
def test_a_peer_that_is_not_a_router_or_skips_ready_is_refused(after_greeting: bytes, error: str) -> None:
    d = zmtp.Decoder(MAX)
    with pytest.raises(zmtp.ZmtpError, match=error):
        d.feed(router_greeting() + after_greeting)


def test_reserved_flags_and_commands_with_more_are_refused() -> None:
    for bad in (b"\x08\x01x", b"\x80\x01x", b"\x05\x05\x04PING"):
        d = zmtp.Decoder(MAX)
        d.feed(router_greeting() + ROUTER_READY)
        with pytest.raises(zmtp.ZmtpError, match="flags|MORE"):
            d.feed(bad)


def test_ping_pong_and_error_helpers() -> None:
    assert zmtp.ping_context(b"\x00\x0a" + b"c" * 20) == b"c" * 16
    assert zmtp.pong(b"ctx") == zmtp.command(b"PONG", b"ctx")
    with pytest.raises(zmtp.ZmtpError):
        zmtp.ping_context(b"\x00")
    assert zmtp.error_reason(b"\x05nope!trailing") == "nope!"


def test_endpoints_the_zmtp_link_can_reach() -> None:
    assert parse_endpoint("tcp://127.0.0.1:5555") == ("tcp", "127.0.0.1", 5555)
    assert parse_endpoint("tcp://[::1]:7") == ("tcp", "::1", 7)
    assert parse_endpoint("tcp://localhost:80") == ("tcp", "localhost", 80)
    assert parse_endpoint("ipc:///tmp/x.sock") == ("ipc", "/tmp/x.sock")
    assert parse_endpoint("ipc://@abstract") == ("ipc", "\0abstract")
    # Left to pyzmq: inproc, a source address, no port, a wildcard.
    for other in ("inproc://x", "tcp://eth0;10.0.0.1:5555", "tcp://host", "tcp://*:5555", "tcp://h:0", "tcp://h:x"):
        assert parse_endpoint(other) is None, other


# ----- a worker on the ZMTP link against a peer written by the test --------------------


class RawPeer:
    """A TCP server that accepts the worker's connections; the test speaks ZMTP on them."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def __aenter__(self) -> RawPeer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        while not self.conns.empty():
            self.conns.get_nowait()[1].close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.conns.put((reader, writer))

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conns.get(), WAIT)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    flags = (await asyncio.wait_for(reader.readexactly(1), WAIT))[0]
    size_bytes = await reader.readexactly(8 if flags & zmtp.LONG else 1)
    size = int.from_bytes(size_bytes, "big")
    return flags, await reader.readexactly(size)


async def worker_handshake(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    """Reads the worker's greeting and READY; returns its READY's properties."""
    greeting = await asyncio.wait_for(reader.readexactly(64), WAIT)
    assert greeting == zmtp.greeting()
    flags, body = await read_frame(reader)
    assert flags == zmtp.COMMAND and body[: 1 + body[0]] == b"\x05READY"
    return zmtp.parse_properties(body[6:])


async def closed_by_worker(reader: asyncio.StreamReader) -> bool:
    """Whether the worker closes the connection (EOF or reset) within the bound."""
    try:
        while await asyncio.wait_for(reader.read(65536), WAIT):
            pass
    except ConnectionError:
        pass
    return True


def zmtp_worker(endpoint: str, **settings: Any) -> Worker:
    settings.setdefault("worker_id", "py-zmtp")
    settings.setdefault("secret", None)
    settings.setdefault("linger", 0.1)
    settings.setdefault("backoff_initial", 0.05)
    settings.setdefault("backoff_max", 0.2)
    w = Worker(["svc"], endpoint=endpoint, transport="zmtp", **settings)

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    return w


@contextlib.asynccontextmanager
async def started(w: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(w.run())
    try:
        yield task
    finally:
        w.stop(grace=0.2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def welcome_frame() -> bytes:
    msg = wire.Welcome(router_id="raw", heartbeat_ms=60_000, liveness=3, max_frame_bytes=None)
    return data_frame(wire.encode(msg))


def test_the_worker_answers_ping_with_pong_and_waits_for_the_peer_s_ready() -> None:
    async def test() -> None:
        async with RawPeer() as peer:
            w = zmtp_worker(peer.endpoint)
            async with started(w):
                reader, writer = await peer.accept()
                writer.write(router_greeting())
                props = await worker_handshake(reader)
                assert props == {b"socket-type": b"DEALER", b"identity": b""}
                # Nothing but greeting and READY before the router's READY.
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.readexactly(1), 0.3)
                writer.write(ROUTER_READY)
                flags, hello = await read_frame(reader)
                assert flags == 0 and isinstance(wire.decode_from_worker(hello), wire.Hello)
                writer.write(zmtp.command(b"PING", b"\x00\x64" + b"ping-ctx-0123456"))
                while True:
                    flags, body = await read_frame(reader)
                    if flags == zmtp.COMMAND:
                        break
                    assert isinstance(wire.decode_from_worker(body), wire.Hello)  # a resent hello
                assert body == b"\x04PONG" + b"ping-ctx-0123456"
                # Other commands mean nothing; a request after them is served.
                writer.write(zmtp.command(b"SUBSCRIBE", b"x") + welcome_frame())
                await asyncio.wait_for(w.wait_registered(), WAIT)
                req = wire.encode(
                    wire.Request(
                        cid="c1",
                        conn="k",
                        route="/r",
                        service="svc",
                        msg_type="echo",
                        id="1",
                        data="x" * 400,
                        timeout_ms=5000,
                        deadline_ms=0,
                        attempt=1,
                    )
                )
                writer.write(data_frame(req))
                while True:
                    flags, body = await read_frame(reader)
                    msg = wire.decode_from_worker(body)
                    if isinstance(msg, wire.Reply):
                        break
                assert flags == zmtp.LONG and msg.cid == "c1" and msg.data == "x" * 400 and msg.done
                writer.close()

    run(test)


@pytest.mark.parametrize(
    ("bad", "logged"),
    [
        (router_greeting() + zmtp.command(b"READY", zmtp.properties([(b"Socket-Type", b"PUB")])), "not a ROUTER"),
        (router_greeting(mechanism=b"CURVE"), "not NULL"),
        (b"SSH-2.0-OpenSSH_9.6\r\n".ljust(64, b"\0"), "no ZMTP signature"),
        (router_greeting() + ROUTER_READY + b"\x02" + (1 << 60).to_bytes(8, "big"), "at most"),
        (router_greeting() + ROUTER_READY + b"\x10\x00", "invalid flags"),
        (router_greeting() + ROUTER_READY + zmtp.command(b"ERROR", b"\x07go away"), "ZMTP ERROR 'go away'"),
    ],
    ids=["not-a-router", "curve", "not-zmtp", "hostile-length", "reserved-flags", "error-command"],
)
def test_a_violation_drops_the_connection_and_the_worker_connects_again(
    bad: bytes, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bridge_worker")

    async def test() -> None:
        async with RawPeer() as peer:
            w = zmtp_worker(peer.endpoint)
            async with started(w):
                reader, writer = await peer.accept()
                writer.write(bad)
                assert await closed_by_worker(reader)
                writer.close()
                # Again, after its backoff; this time a real handshake.
                reader, writer = await peer.accept()
                writer.write(router_greeting() + ROUTER_READY)
                await worker_handshake(reader)
                _, hello = await read_frame(reader)
                assert isinstance(wire.decode_from_worker(hello), wire.Hello)
                writer.write(welcome_frame())
                await asyncio.wait_for(w.wait_registered(), WAIT)
                writer.close()

    run(test)
    assert any(logged in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_router_that_closes_the_connection_is_noticed_at_once() -> None:
    async def test() -> None:
        async with RawPeer() as peer:
            # Heartbeats every minute: only the closed connection can tell.
            w = zmtp_worker(peer.endpoint)
            async with started(w):
                reader, writer = await peer.accept()
                writer.write(router_greeting() + ROUTER_READY)
                await worker_handshake(reader)
                await read_frame(reader)
                writer.write(welcome_frame())
                await asyncio.wait_for(w.wait_registered(), WAIT)
                writer.close()
                reader, writer = await peer.accept()
                assert w.status.registrations == 1
                writer.close()

    run(test)


# ----- against libzmq ------------------------------------------------------------------


def test_libzmq_router_heartbeats_are_answered(tmp_path: Path) -> None:
    """A libzmq ROUTER with ZMTP heartbeats PINGs its peers and drops those that
    stay silent past the timeout: the ZMTP link answers every PING, so the
    session outlives many timeouts without a reconnect."""

    async def test() -> None:
        r = FakeRouter(sockopts={zmq.HEARTBEAT_IVL: 30, zmq.HEARTBEAT_TIMEOUT: 100})
        try:
            w = zmtp_worker(r.endpoint, backoff_initial=2.0, backoff_max=5.0)
            async with started(w):
                ident, _ = await r.handshake()  # heartbeat_ms 60 000: no bridge heartbeats
                await asyncio.wait_for(w.wait_registered(), WAIT)
                await asyncio.sleep(1.0)  # ten heartbeat timeouts
                await r.request(ident, "c1", "echo", {"n": 1})
                _, msg = await r.recv()
                assert is_terminal(msg) and getattr(msg, "data", None) == {"n": 1}
                assert w.status.registrations == 1, "the connection was dropped"
        finally:
            r.close()

    run(test)


def test_ipc_endpoints_use_the_zmtp_link(tmp_path: Path) -> None:
    async def test() -> None:
        r = FakeRouter(bind=f"ipc://{tmp_path}/bridge.sock")
        try:
            w = zmtp_worker(r.endpoint)
            async with started(w):
                ident, _ = await r.handshake()
                await asyncio.wait_for(w.wait_registered(), WAIT)
                await r.request(ident, "c1", "echo", "over ipc")
                _, msg = await r.recv()
                assert is_terminal(msg) and getattr(msg, "data", None) == "over ipc"
                assert w._zctx is None, "the zmtp transport made a ZeroMQ context"
        finally:
            r.close()

    run(test)


@pytest.mark.parametrize("transport", ["zmtp", "pyzmq"])
def test_only_the_pyzmq_transport_starts_libzmq(transport: str) -> None:
    async def test() -> None:
        r = FakeRouter()
        try:
            w = Worker(["svc"], endpoint=r.endpoint, transport=transport, secret=None, linger=0.1)
            async with started(w):
                await r.handshake()
                await asyncio.wait_for(w.wait_registered(), WAIT)
                assert (w._zctx is None) == (transport == "zmtp")
        finally:
            r.close()

    run(test)


def test_big_replies_are_written_whole_and_in_order() -> None:
    """Replies bigger than the write chunk and the connection's high water mark
    (back-pressure through pause_writing), interleaved with small ones."""

    async def test() -> None:
        r = FakeRouter()
        try:
            w = zmtp_worker(r.endpoint, capacity=64)
            async with started(w):
                ident, _ = await r.handshake()
                await asyncio.wait_for(w.wait_registered(), WAIT)
                sizes = [10, 3 << 20, 20, 700_000, 1, 2 << 20, 5]
                for i, n in enumerate(sizes):
                    await r.request(ident, f"c{i}", "echo", "y" * n)
                for i, n in enumerate(sizes):
                    msg = await r.recv_for(f"c{i}")
                    assert isinstance(msg, wire.Reply) and msg.data == "y" * n
        finally:
            r.close()

    run(test)
