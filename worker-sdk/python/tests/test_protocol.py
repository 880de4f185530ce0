"""The codec against the golden vectors of bridge-proto (PROTOCOL.md §18):
every valid vector decodes to its ``.json`` twin and re-encodes to the same
bytes, the ``.json`` message encodes to those bytes, and every invalid vector
is rejected at the listed stage."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import VECTORS

from bridge_worker import protocol as wire

DECODERS: dict[str, Callable[[bytes], wire.Message]] = {
    "to_worker": wire.decode_to_worker,
    "from_worker": wire.decode_from_worker,
    "publication": wire.decode_publication,
}
TABLES = {"to_worker": wire.TO_WORKER, "from_worker": wire.FROM_WORKER, "publication": wire.PUBLICATION}

if not VECTORS.is_dir():
    pytest.skip(f"golden vectors not found at {VECTORS}", allow_module_level=True)


def _valid_vectors() -> list[tuple[str, Path]]:
    out = [("publication", VECTORS / "publication.msgpack")]
    for direction in ("to_worker", "from_worker"):
        out += [(direction, p) for p in sorted((VECTORS / direction).glob("*.msgpack"))]
    return out


VALID = _valid_vectors()


def _from_json(value: Any) -> Any:
    """The ``.json`` rendering back to Python values (``{"$bin": hex}`` is bytes)."""
    if isinstance(value, dict):
        if list(value) == ["$bin"]:
            return bytes.fromhex(value["$bin"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _fields(msg: wire.Message) -> dict[str, Any]:
    """The message as its wire map (optional fields that are absent left out)."""
    out: dict[str, Any] = {"v": wire.PROTOCOL_VERSION, "kind": msg.KIND}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if value is not None or f.default is dataclasses.MISSING:
            out[f.name] = value
    return out


def test_every_kind_has_a_vector() -> None:
    for direction, table in TABLES.items():
        names = {p.name.split(".")[0] for d, p in VALID if d == direction}
        assert names == set(table), f"{direction}: vectors {sorted(names)} vs kinds {sorted(table)}"


@pytest.mark.parametrize(("direction", "path"), VALID, ids=[f"{d}/{p.name}" for d, p in VALID])
def test_golden_vector(direction: str, path: Path) -> None:
    frame = path.read_bytes()
    expected = _from_json(json.loads(path.with_suffix(".json").read_text(encoding="utf-8")))

    msg = DECODERS[direction](frame)
    assert expected["kind"] == msg.KIND
    assert _fields(msg) == expected
    # Same keys in the same (wire) order, not only equal maps.
    assert list(_fields(msg)) == list(expected)
    assert wire.encode(msg).hex() == frame.hex(), "re-encoding the decoded message changed the bytes"

    # Built from the .json alone, without the decoder, the message encodes to the same bytes.
    cls = TABLES[direction][expected["kind"]]
    built = cls(**{k: v for k, v in expected.items() if k not in ("v", "kind")})
    assert wire.encode(built).hex() == frame.hex()


def _invalid_cases() -> list[dict[str, str]]:
    index = VECTORS / "invalid" / "index.json"
    cases: list[dict[str, str]] = json.loads(index.read_text(encoding="utf-8")) if index.exists() else []
    return cases


INVALID = _invalid_cases()


@pytest.mark.parametrize("case", INVALID, ids=[c["file"] for c in INVALID])
def test_invalid_vector_is_rejected(case: dict[str, str]) -> None:
    frame = (VECTORS / "invalid" / case["file"]).read_bytes()
    with pytest.raises(wire.DecodeError) as err:
        DECODERS[case["direction"]](frame)
    assert err.value.rejection == case["rejection"], f"{case['why']}: {err.value}"


def test_invalid_index_lists_every_file() -> None:
    files = {p.name for p in (VECTORS / "invalid").glob("*.msgpack")}
    assert files == {c["file"] for c in INVALID}


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (wire.Push(conn="c", msg_type="t", data=b"bytes"), "push.data"),
        (wire.Push(conn="c", msg_type="t", data={"k": {1: 2}}), "push.data.k"),
        (wire.Push(conn="c", msg_type="t", data=[float("nan")]), "push.data[0]"),
        (wire.Push(conn="c", msg_type="t", data={1, 2}), "push.data"),
        (wire.Close(conn="c", code=70000, reason=""), "close.code"),
        (wire.Reply(cid=5, done=True, data=None), "reply.cid"),  # type: ignore[arg-type]
        (wire.Hello(worker_id="w", services=["s"], capacity=-1, sdk="x"), "hello.capacity"),
    ],
)
def test_encoder_refuses_what_the_router_would_reject(msg: wire.Message, needle: str) -> None:
    with pytest.raises(wire.EncodeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        wire.encode(msg)


def test_nesting_limit() -> None:
    value: Any = None
    for _ in range(wire.MAX_DEPTH):
        value = [value]
    frame = wire.encode(wire.Push(conn="c", msg_type="t", data=value))
    assert wire.decode_from_worker(frame) == wire.Push(conn="c", msg_type="t", data=value)
    with pytest.raises(wire.EncodeError, match="deeper"):
        wire.encode(wire.Push(conn="c", msg_type="t", data=[value]))


def test_decoder_leniencies() -> None:
    import msgpack

    # Unknown fields of any type are ignored; nil optional fields count as absent;
    # any integer width is accepted; keys in any order.
    frame = msgpack.packb(
        {"extra": b"\x00", "data": 1.5, "msg_type": None, "done": True, "cid": "c", "kind": "reply", "v": 1}
    )
    assert wire.decode_from_worker(frame) == wire.Reply(cid="c", done=True, msg_type=None, data=1.5)
    wide = b"\x83\xa1v\xcf" + (1).to_bytes(8, "big") + b"\xa4kind\xa3bye\xa6reason\xa1r"
    assert wire.decode_from_worker(wide) == wire.Bye(reason="r")


def test_direction_is_checked_on_encode() -> None:
    with pytest.raises(wire.EncodeError):
        wire.encode_to_worker(wire.Hello(worker_id="w", services=["s"], capacity=1, sdk="x"))  # type: ignore[arg-type]
    assert wire.encode_from_worker(wire.Heartbeat()) == wire.encode_to_worker(wire.Heartbeat())
