"""A stand-in for the router's bridge side: a real pyzmq ROUTER socket bound on
a free loopback port, driven step by step by the test (the Python twin of
``worker-sdk/tests/fake_router/mod.rs``).

Like the real router it can have a secret (then :meth:`FakeRouter.handshake`
answers the hello with a ``challenge`` and checks the ``auth`` with
:func:`bridge_worker.protocol.verify_proof`) and a frame limit
(``max_frame_bytes`` in its welcome). Every wait is bounded by :data:`WAIT`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import zmq
import zmq.asyncio

from bridge_worker import protocol as wire

WAIT = 10.0
"""Upper bound on any single wait for the worker, in seconds."""


class FakeRouter:
    def __init__(
        self,
        *,
        secret: str | None = None,
        max_frame_bytes: int | None = None,
        bind: str = "tcp://127.0.0.1:*",
        sockopts: dict[int, int] | None = None,
    ) -> None:
        self.secret = secret
        self.max_frame_bytes = max_frame_bytes
        self._ctx = zmq.asyncio.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Options the connections take over from the socket at bind (e.g. ZMTP heartbeats).
        for option, value in (sockopts or {}).items():
            self.sock.setsockopt(option, value)
        self.sock.bind(bind)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[bytes] = []
        """Every payload frame received so far (to check what never crossed the wire)."""

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()

    def ever_received(self, needle: bytes) -> bool:
        return any(needle in frame for frame in self.received)

    async def recv_raw(self, timeout: float = WAIT) -> tuple[bytes, bytes, wire.FromWorker]:
        """Next message from any worker, heartbeats included, with its payload frame.
        Every message must be protocol version 2."""
        parts = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        assert len(parts) == 2, f"expected [identity, payload], got {len(parts)} frames"
        ident, frame = parts
        v, msg = wire.decode_from_worker_versioned(frame)
        assert v == wire.PROTOCOL_VERSION, msg
        self.received.append(frame)
        return ident, frame, msg

    async def recv(self, timeout: float = WAIT) -> tuple[bytes, wire.FromWorker]:
        """Next message that is not a heartbeat."""
        while True:
            ident, _, msg = await self.recv_raw(timeout)
            if not isinstance(msg, wire.Heartbeat):
                return ident, msg

    async def recv_for(self, cid: str) -> wire.FromWorker:
        """Next non-heartbeat message, which must be for request ``cid``."""
        _, msg = await self.recv()
        assert getattr(msg, "cid", None) == cid, f"unexpected message {msg!r}"
        return msg

    async def send(self, ident: bytes, msg: wire.ToWorker, *, version: int = wire.PROTOCOL_VERSION) -> None:
        await self.send_bytes(ident, wire.encode(msg, version=version))

    async def send_bytes(self, ident: bytes, payload: bytes) -> None:
        await self.sock.send_multipart([ident, payload])

    async def expect_hello(self) -> tuple[bytes, wire.Hello]:
        ident, msg = await self.recv()
        assert isinstance(msg, wire.Hello), f"expected hello, got {msg!r}"
        return ident, msg

    async def challenge(self, ident: bytes, nonce: bytes) -> wire.Auth:
        """Sends ``challenge{nonce}`` and returns the ``auth`` that answers it; a
        hello resent meanwhile gets the same challenge again, as from the real router."""
        await self.send(ident, wire.Challenge(nonce=nonce))
        while True:
            sender, msg = await self.recv()
            if isinstance(msg, wire.Auth):
                assert sender == ident, "auth from another socket"
                return msg
            assert isinstance(msg, wire.Hello) and sender == ident, f"expected auth, got {msg!r}"
            await self.send(ident, wire.Challenge(nonce=nonce))

    async def welcome(self, ident: bytes, heartbeat_ms: int = 60_000, liveness: int = 3) -> None:
        await self.send(
            ident,
            wire.Welcome(
                router_id="fake-router",
                heartbeat_ms=heartbeat_ms,
                liveness=liveness,
                max_frame_bytes=self.max_frame_bytes,
            ),
        )

    async def goodbye(self, ident: bytes, reason: str, reconnect: bool) -> None:
        await self.send(ident, wire.Goodbye(reason=reason, reconnect=reconnect))

    async def handshake(self, heartbeat_ms: int = 60_000, liveness: int = 3) -> tuple[bytes, wire.Hello]:
        """Waits for a hello, challenges it when the router has a secret (checking the
        proof), and welcomes the worker."""
        ident, hello = await self.expect_hello()
        if self.secret is not None:
            nonce = fresh_nonce()
            auth = await self.challenge(ident, nonce)
            assert wire.verify_proof(self.secret, nonce, auth.proof), "the worker's proof does not verify"
        await self.welcome(ident, heartbeat_ms, liveness)
        return ident, hello

    async def request(self, ident: bytes, cid: str, msg_type: str, data: Any = None, timeout_ms: int = 30_000) -> None:
        await self.send(ident, request(cid, msg_type, data, timeout_ms))

    async def cancel(self, ident: bytes, cid: str, reason: str = "client") -> None:
        await self.send(ident, wire.Cancel(cid=cid, reason=reason))


def fresh_nonce() -> bytes:
    """32 random bytes, like the router's nonces."""
    return os.urandom(wire.NONCE_LEN)


def request(cid: str, msg_type: str, data: Any = None, timeout_ms: int = 30_000) -> wire.Request:
    return wire.Request(
        cid=cid,
        conn="conn-1",
        route="/ws/test",
        service="svc",
        msg_type=msg_type,
        id=f"client-{cid}",
        data=data,
        timeout_ms=timeout_ms,
        deadline_ms=0,
        attempt=1,
    )


def is_terminal(msg: wire.FromWorker) -> bool:
    return isinstance(msg, wire.ErrorReply) or (isinstance(msg, wire.Reply) and msg.done)
