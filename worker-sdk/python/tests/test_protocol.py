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


def test_auth_proof_matches_the_documented_vector_and_the_auth_vector() -> None:
    nonce = bytes(range(32))
    proof = wire.auth_proof("s3cret", nonce)
    # PROTOCOL.md §14 and bridge_proto::auth's test.
    assert proof.hex() == "6786618e992b7788501a39bf91ea5fcfc87c1b71ad060647d5df98b1b95512f3"
    assert len(proof) == wire.PROOF_LEN
    assert wire.verify_proof(b"s3cret", nonce, proof)
    assert not wire.verify_proof("wrong", nonce, proof)
    assert not wire.verify_proof("s3cret", bytes(32), proof)
    assert not wire.verify_proof("s3cret", nonce, proof[:31])
    # The golden `auth` vector answers the golden `challenge` vector.
    challenge = wire.decode_to_worker((VECTORS / "to_worker" / "challenge.msgpack").read_bytes())
    auth = wire.decode_from_worker((VECTORS / "from_worker" / "auth.msgpack").read_bytes())
    assert isinstance(challenge, wire.Challenge) and isinstance(auth, wire.Auth)
    assert len(challenge.nonce) == wire.NONCE_LEN
    assert auth.proof == wire.auth_proof("s3cret", challenge.nonce)


def test_versions_1_and_2_decode_and_others_are_refused() -> None:
    for v in (1, 2):
        frame = wire.encode(wire.Heartbeat(), version=v)
        assert wire.decode_to_worker_versioned(frame) == (v, wire.Heartbeat())
        assert wire.decode_from_worker_versioned(frame) == (v, wire.Heartbeat())
    assert wire.encode(wire.Heartbeat())[3] == 2, "v: 2 by default"
    for v in (0, 3):
        with pytest.raises(wire.DecodeError) as err:
            wire.decode_to_worker(wire.encode(wire.Heartbeat(), version=v))
        assert err.value.rejection == "version" and f"version {v}" in str(err.value)


def test_hello_has_no_secret_any_more() -> None:
    assert "secret" not in wire.Hello.__dataclass_fields__
    frame = wire.encode(wire.Hello(worker_id="w", services=["s"], capacity=1, sdk="x"))
    assert b"secret" not in frame


def test_request_cid_reads_broken_requests_only() -> None:
    import msgpack

    assert wire.request_cid(msgpack.packb({"v": 2, "kind": "request", "cid": "c1"})) == "c1"
    assert wire.request_cid(msgpack.packb({"v": 2, "kind": "request", "cid": "c2", "data": b"\x00"})) == "c2"
    for bad in (
        {"v": 2, "kind": "request", "cid": 5},
        {"v": 2, "kind": "request", "cid": b"c"},
        {"v": 2, "kind": "event", "cid": "c"},
        {"v": 2, "cid": "c"},
        ["request", "c"],
    ):
        assert wire.request_cid(msgpack.packb(bad, use_bin_type=True)) is None, bad
    assert wire.request_cid(b"") is None
    assert wire.request_cid(b"\xc1") is None
    # A cid whose bytes are not UTF-8 is not a string.
    bad_utf8 = b"\x83\xa1v\x02\xa4kind\xa7request\xa3cid\xa2\xff\xfe"
    assert wire.request_cid(bad_utf8) is None
