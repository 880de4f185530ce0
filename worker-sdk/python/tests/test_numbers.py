"""Every JSON number comes back exactly as sent through the router and a
Python SDK worker: random doubles in shortest and 17-digit form, integers at
the edges of i64/u64 and of exact doubles, and strings that need escaping.
The Rust SDK's side of the same check is ``tests/tests/numbers.rs``."""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct
from typing import Any

import pytest
from conftest import Client, Harness, running

from bridge_worker import Context, Worker

# Each test once per worker transport (conftest.py, `transport`).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("transport")]


def bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def random_double(rng: random.Random) -> float:
    while True:
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            return x


async def echo_raw(client: Client, id: str, data_json: str) -> Any:
    """Sends ``data_json`` (JSON text, as written) as `echo` data; returns the
    reply's data as Python's exact JSON parser reads it."""
    await client.send(f'{{"type":"echo","id":"{id}","data":{data_json}}}')
    _, terminal = await client.terminal(id)
    assert terminal.get("done") is True and "error" not in terminal, terminal
    return terminal["data"]


def echo_worker(router: Any) -> Worker:
    w = Worker(["py-main"], endpoint=router.bridge, worker_id="numbers")

    @w.handler("echo")
    async def echo(ctx: Context, data: Any) -> Any:
        return data

    return w


def test_doubles_come_back_bit_for_bit(harness: Harness) -> None:
    router = harness.router()
    seed = random.randrange(1 << 63)
    rng = random.Random(seed)
    values = [random_double(rng) if i % 2 == 0 else rng.random() for i in range(2000)]
    texts = [t for v in values for t in (repr(v), f"{v:.16e}")]

    async def main() -> Any:
        async with running(echo_worker(router)), Client.connect(router.url("/ws/main")) as c:
            assert await echo_raw(c, "reported", "0.11312789811552293") == 0.11312789811552293
            return await echo_raw(c, "random", "[" + ",".join(texts) + "]")

    got = asyncio.run(main())
    assert len(got) == len(texts)
    for i, (g, text) in enumerate(zip(got, texts, strict=True)):
        assert isinstance(g, float), f"seed {seed}: {text} came back as {g!r}"
        assert bits(g) == bits(values[i // 2]), f"seed {seed}: {text} came back as {g!r}"


def test_integers_at_the_edges_and_unicode_come_back_unchanged(harness: Harness) -> None:
    router = harness.router()
    cases = [
        "9007199254740992",
        "-9007199254740992",
        "9007199254740993",
        "18446744073709551615",
        "-9223372036854775808",
        "9223372036854775807",
        "0",
        "-0.0",
        "1.0",
        "5e-324",
        "1.7976931348623157e308",
        '"é😀\\u0000\\"\\\\ \\u2028"',
        '{"nested":[1,2.5,{"k":-1e-7}]}',
    ]

    async def main() -> None:
        async with running(echo_worker(router)), Client.connect(router.url("/ws/main")) as c:
            for i, case in enumerate(cases):
                got = await echo_raw(c, f"c{i}", case)
                want = json.loads(case)
                assert got == want and type(got) is type(want), f"{case} came back as {got!r}"
                if isinstance(want, float):
                    assert bits(got) == bits(want), f"{case} came back as {got!r}"

    asyncio.run(main())
