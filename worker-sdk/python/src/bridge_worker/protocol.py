"""The bridge protocol: every message as a dataclass, and its MessagePack codec.

This module is the Python twin of the Rust ``bridge-proto`` crate and must
produce the same bytes. A message is one MessagePack map: ``v`` (the
protocol version), ``kind`` (the message name), then the fields of that kind
in the order they are declared here (which is the order of the structs in
``bridge-proto/src/messages.rs``). Optional fields are left out of the map
when they are ``None``; byte fields are MessagePack ``bin``; strings are
``str``; ``data`` fields hold JSON values only (no ``bin``, no ``ext``,
string keys). The golden vectors under ``bridge-proto/vectors`` pin this down
and the test suite checks every one of them.

Decoding reads ``v`` and ``kind`` first (so a peer speaking another version
gets a :class:`DecodeError` with ``rejection == "version"`` rather than a
confusing field error), ignores fields it does not know, and checks the type
of every field it does know, naming the field at fault. Decoders accept
versions :data:`MIN_PROTOCOL_VERSION` to :data:`PROTOCOL_VERSION` (1 and 2
differ only in their handshake, so the message bodies are the same);
encoders write :data:`PROTOCOL_VERSION` unless told otherwise.

Version 2 authenticates with a challenge instead of a secret in ``hello``:
a router with a secret answers the hello with :class:`Challenge` and the
worker answers with :class:`Auth` carrying :func:`auth_proof` of the nonce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgpack

PROTOCOL_VERSION = 2
"""The value of ``v`` in every message this side encodes."""
MIN_PROTOCOL_VERSION = 1
"""The oldest version the decoders accept."""

AUTH_DOMAIN = b"bridge-proto/2 auth\x00"
"""Prefix of the message a proof authenticates (``bridge_proto::auth::DOMAIN``)."""
NONCE_LEN = 32
"""Bytes of a challenge nonce."""
PROOF_LEN = 32
"""Bytes of a proof (one SHA-256 output)."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def auth_proof(secret: str | bytes, nonce: bytes) -> bytes:
    """The proof a worker that knows ``secret`` sends for ``nonce``:
    HMAC-SHA256 with the secret's UTF-8 bytes as key over ``AUTH_DOMAIN + nonce``."""
    return hmac.new(_key(secret), AUTH_DOMAIN + bytes(nonce), hashlib.sha256).digest()


def verify_proof(secret: str | bytes, nonce: bytes, candidate: bytes) -> bool:
    """Whether ``candidate`` is the proof for ``nonce`` under ``secret`` (constant-time comparison)."""
    return hmac.compare_digest(auth_proof(secret, nonce), bytes(candidate))


Json = Any
"""A JSON value: ``None``, ``bool``, ``int``, ``float``, ``str``, a list of
JSON values, or a dict with ``str`` keys and JSON values."""

Rejection = Literal["header", "version", "unknown_kind", "body"]


class DecodeError(ValueError):
    """A frame that is not a valid message of the expected direction.

    ``rejection`` says which stage refused it: ``header`` (not a map with an
    integer ``v`` and a string ``kind``), ``version`` (another protocol
    version), ``unknown_kind`` (no such message in this direction) or
    ``body`` (a field is missing or has the wrong type; ``field`` names it).
    """

    def __init__(self, rejection: Rejection, detail: str, *, kind: str | None = None, field: str | None = None) -> None:
        where = f"{kind}.{field}" if kind and field else kind or ""
        super().__init__(f"{rejection}: {where + ': ' if where else ''}{detail}")
        self.rejection: Rejection = rejection
        self.kind = kind
        self.field = field


class EncodeError(TypeError):
    """A message whose fields cannot go on the wire (e.g. ``data`` that is not JSON)."""


MAX_DEPTH = 127
"""Deepest nesting of arrays and maps inside a ``value`` field (PROTOCOL.md §16)."""


# Field metadata: the width of an unsigned integer field (u16/u32/u64 in Rust).
def _uint(bits: int, *, optional: bool = False) -> Any:
    if optional:
        return field(default=None, metadata={"uint": bits})
    return field(metadata={"uint": bits})


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every message; ``KIND`` is the wire ``kind``."""

    KIND: ClassVar[str] = ""


# ----- router -> worker ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """Answer to a valid ``hello``: the worker is registered."""

    KIND: ClassVar[str] = "welcome"
    router_id: str
    heartbeat_ms: int = _uint(64)
    liveness: int = _uint(32)
    max_frame_bytes: int | None = _uint(64, optional=True)
    """The largest frame the router accepts from this worker; a bigger one
    closes the worker's connection. ``None`` from older routers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(Message):
    """Answer to a ``hello`` when the router has a secret: prove you know it
    with :class:`Auth` (:func:`auth_proof` of ``nonce``)."""

    KIND: ClassVar[str] = "challenge"
    nonce: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Message):
    """The router will not (or no longer) talk to this worker.

    ``reconnect`` true: re-create the socket and say hello again; false:
    retrying will not help (bad secret, unsupported version).
    """

    KIND: ClassVar[str] = "goodbye"
    reason: str
    reconnect: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Liveness signal, sent both ways every ``heartbeat_ms``."""

    KIND: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Message):
    """A client request that expects replies; exactly one terminal answer is owed."""

    KIND: ClassVar[str] = "request"
    cid: str
    conn: str
    route: str
    service: str
    msg_type: str
    id: Json
    data: Json
    timeout_ms: int = _uint(64)
    deadline_ms: int = _uint(64)
    attempt: int = _uint(32)
    claims: Json | None = None
    """Verified token claims of the connection, when the route uses auth."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event(Message):
    """A client message without ``id``: no reply expected."""

    KIND: ClassVar[str] = "event"
    conn: str
    route: str
    service: str
    msg_type: str
    data: Json


@dataclass(frozen=True, slots=True, kw_only=True)
class Binary(Message):
    """A binary frame from a client on a (non-raw) route."""

    KIND: ClassVar[str] = "binary"
    conn: str
    route: str
    service: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Raw(Message):
    """A WebSocket frame of a raw route, passed unchanged (both directions)."""

    KIND: ClassVar[str] = "raw"
    conn: str
    binary: bool
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect(Message):
    """A client connected to a route this worker serves."""

    KIND: ClassVar[str] = "connect"
    conn: str
    route: str
    service: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    remote: str
    claims: Json | None = None
    #: The client's verified TLS certificate (mutual TLS): ``{"subject": "CN=…"}``.
    client_cert: dict[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect(Message):
    """A client connection closed (``code`` 1006 when it dropped without a close frame)."""

    KIND: ClassVar[str] = "disconnect"
    conn: str
    route: str
    service: str
    code: int = _uint(16)
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    """Stop a request; the worker still answers it (with ``error{code: "cancelled"}``).

    ``reason``: ``client``, ``disconnected``, ``timeout`` or ``shutdown``.
    """

    KIND: ClassVar[str] = "cancel"
    cid: str
    reason: str


# ----- worker -> router ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First message on a new socket: registers the worker."""

    KIND: ClassVar[str] = "hello"
    worker_id: str
    services: list[str]
    capacity: int = _uint(32)
    sdk: str
    msg_types: list[str] | None = None
    """The client message types the worker has handlers for (requests and
    fire-and-forget messages); ``None`` (not sent) when it cannot tell."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth(Message):
    """Answer to a :class:`Challenge`: the proof that the worker knows the secret."""

    KIND: ClassVar[str] = "auth"
    proof: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply(Message):
    """A partial (``done`` false) or final (``done`` true) reply to a request.

    ``msg_type`` ``None`` means the request's own type.
    """

    KIND: ClassVar[str] = "reply"
    cid: str
    done: bool
    msg_type: str | None = None
    data: Json


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply(Message):
    """The final answer to a request when it failed."""

    KIND: ClassVar[str] = "error"
    cid: str
    code: str
    message: str
    retryable: bool
    retry_after_ms: int | None = _uint(64, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Push(Message):
    """An unsolicited JSON message to one connection."""

    KIND: ClassVar[str] = "push"
    conn: str
    msg_type: str
    data: Json


@dataclass(frozen=True, slots=True, kw_only=True)
class PushBinary(Message):
    """An unsolicited binary frame to one connection."""

    KIND: ClassVar[str] = "push_binary"
    conn: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(Message):
    """Close a client connection (code 1000, or 3000-4999 for applications)."""

    KIND: ClassVar[str] = "close"
    conn: str
    code: int = _uint(16)
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Message):
    """Subscribe a connection to a topic."""

    KIND: ClassVar[str] = "subscribe"
    conn: str
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(Message):
    """Unsubscribe a connection from a topic."""

    KIND: ClassVar[str] = "unsubscribe"
    conn: str
    topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish(Message):
    """Publish to every client subscribed to a topic (over the worker's socket)."""

    KIND: ClassVar[str] = "publish"
    topic: str
    msg_type: str
    data: Json


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Message):
    """The worker is stopping: send it no new work."""

    KIND: ClassVar[str] = "bye"
    reason: str


# ----- pub/sub ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication(Message):
    """Payload frame of a PUB/SUB publication ``[topic, payload]``."""

    KIND: ClassVar[str] = "publication"
    msg_type: str
    data: Json


ToWorker = Welcome | Challenge | Goodbye | Heartbeat | Request | Event | Binary | Raw | Connect | Disconnect | Cancel
FromWorker = (
    Hello
    | Auth
    | Heartbeat
    | Reply
    | ErrorReply
    | Push
    | PushBinary
    | Raw
    | Close
    | Subscribe
    | Unsubscribe
    | Publish
    | Bye
)

TO_WORKER: Mapping[str, type[Message]] = {
    c.KIND: c
    for c in (Welcome, Challenge, Goodbye, Heartbeat, Request, Event, Binary, Raw, Connect, Disconnect, Cancel)
}
"""Router -> worker message classes by ``kind``."""
FROM_WORKER: Mapping[str, type[Message]] = {
    c.KIND: c
    for c in (
        Hello,
        Auth,
        Heartbeat,
        Reply,
        ErrorReply,
        Push,
        PushBinary,
        Raw,
        Close,
        Subscribe,
        Unsubscribe,
        Publish,
        Bye,
    )
}
"""Worker -> router message classes by ``kind``."""
PUBLICATION: Mapping[str, type[Message]] = {Publication.KIND: Publication}


# ----- field checks -------------------------------------------------------------


class _Bad(Exception):
    """A field value of the wrong shape; ``path`` locates it inside the field."""

    def __init__(self, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path


def _check_str(v: Any) -> None:
    if type(v) is not str:
        raise _Bad(f"expected a string, found {_describe(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        # Only the decoder's surrogateescape produces these: the bytes were not UTF-8.
        raise _Bad("string is not valid UTF-8") from None


def _check_bool(v: Any) -> None:
    if type(v) is not bool:
        raise _Bad(f"expected a boolean, found {_describe(v)}")


def _check_bytes(v: Any) -> None:
    if type(v) is not bytes:
        raise _Bad(f"expected bytes (bin), found {_describe(v)}")


def _check_uint(bits: int) -> Any:
    limit = 1 << bits

    def check(v: Any) -> None:
        if type(v) is not int or not 0 <= v < limit:
            raise _Bad(f"expected an integer in 0..{limit - 1}, found {_describe(v)}")

    return check


def _check_json(v: Any, path: str = "", depth: int = 0) -> None:
    if v is None or type(v) in (bool, int):
        return
    if type(v) is float:
        if not math.isfinite(v):
            raise _Bad(f"{v} is not a JSON number", path)
        return
    if type(v) is str:
        try:
            _check_str(v)
        except _Bad as e:
            raise _Bad(e.detail, path) from None
        return
    # Exact types: msgpack's ExtType is a tuple subclass and must not pass as a list.
    if type(v) in (list, tuple, dict) and depth >= MAX_DEPTH:
        raise _Bad(f"nested deeper than {MAX_DEPTH} levels", path)
    if type(v) in (list, tuple):
        for i, item in enumerate(v):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if type(v) is dict:
        for k, item in v.items():
            if type(k) is not str:
                raise _Bad(f"object key {k!r} is not a string", path)
            _check_json(item, f"{path}.{k}", depth + 1)
        return
    raise _Bad(f"{_describe(v)} is not a JSON value", path)


def _check_str_map(v: Any) -> None:
    if not isinstance(v, dict):
        raise _Bad(f"expected a map of strings, found {_describe(v)}")
    for k, item in v.items():
        _check_str(k)
        try:
            _check_str(item)
        except _Bad as e:
            raise _Bad(e.detail, f".{k}") from None


def _check_str_list(v: Any) -> None:
    if not isinstance(v, (list, tuple)):
        raise _Bad(f"expected a list of strings, found {_describe(v)}")
    for i, item in enumerate(v):
        try:
            _check_str(item)
        except _Bad as e:
            raise _Bad(e.detail, f"[{i}]") from None


def _describe(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return "bytes"
    if isinstance(v, msgpack.ExtType):
        return f"a MessagePack ext (type {v.code})"
    if type(v) is int:
        return str(v)
    return type(v).__name__


_CHECKS = {
    "str": _check_str,
    "bool": _check_bool,
    "bytes": _check_bytes,
    "Json": _check_json,
    "dict[str, str]": _check_str_map,
    "list[str]": _check_str_list,
}


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    check: Any
    optional: bool


def _schema(cls: type[Message]) -> tuple[_Field, ...]:
    out = []
    for f in dataclasses.fields(cls):
        annotation = str(f.type)
        optional = annotation.endswith(" | None")
        base = annotation.removesuffix(" | None")
        check = _check_uint(f.metadata["uint"]) if "uint" in f.metadata else _CHECKS[base]
        out.append(_Field(f.name, check, optional))
    return tuple(out)


_SCHEMAS: dict[type[Message], tuple[_Field, ...]] = {
    c: _schema(c) for table in (TO_WORKER, FROM_WORKER, PUBLICATION) for c in table.values()
}


# ----- codec --------------------------------------------------------------------


def encode(msg: Message, *, version: int = PROTOCOL_VERSION) -> bytes:
    """Encodes any message (with ``v`` = ``version``); raises :class:`EncodeError`
    if a field has the wrong shape."""
    wire: dict[str, Any] = {"v": version, "kind": msg.KIND}
    for f in _SCHEMAS[type(msg)]:
        value = getattr(msg, f.name)
        if value is None and f.optional:
            continue
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        try:
            f.check(value)
        except _Bad as e:
            raise EncodeError(f"{msg.KIND}.{f.name}{e.path}: {e.detail}") from None
        wire[f.name] = value
    return msgpack.packb(wire, use_bin_type=True)  # type: ignore[no-any-return]


def _encode_in(table: Mapping[str, type[Message]], msg: Message) -> bytes:
    if table.get(msg.KIND) is not type(msg):
        raise EncodeError(f"{type(msg).__name__} is not a message of this direction")
    return encode(msg)


def encode_to_worker(msg: ToWorker) -> bytes:
    """Encodes a router -> worker message."""
    return _encode_in(TO_WORKER, msg)


def encode_from_worker(msg: FromWorker) -> bytes:
    """Encodes a worker -> router message."""
    return _encode_in(FROM_WORKER, msg)


def encode_publication(msg: Publication) -> bytes:
    """Encodes the payload frame of a publication (the topic is the frame before it)."""
    return _encode_in(PUBLICATION, msg)


def _decode(table: Mapping[str, type[Message]], frame: bytes) -> tuple[int, Message]:
    try:
        wire = msgpack.unpackb(
            frame,
            raw=False,
            # Checked below with a field name, rather than failing the whole frame here.
            strict_map_key=False,
            unicode_errors="surrogateescape",
            timestamp=0,
        )
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise DecodeError("header", f"not a MessagePack value: {e}") from None
    if not isinstance(wire, dict):
        raise DecodeError("header", f"expected a map, found {_describe(wire)}")
    v, kind = wire.get("v"), wire.get("kind")
    if type(v) is not int or v < 0:
        raise DecodeError("header", "`v` is missing or not an unsigned integer")
    if type(kind) is not str:
        raise DecodeError("header", "`kind` is missing or not a string")
    if not MIN_PROTOCOL_VERSION <= v <= PROTOCOL_VERSION:
        raise DecodeError(
            "version",
            f"unsupported protocol version {v} (this side speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
            kind=kind,
        )
    cls = table.get(kind)
    if cls is None:
        raise DecodeError("unknown_kind", "no such message in this direction", kind=kind)
    values: dict[str, Any] = {}
    for f in _SCHEMAS[cls]:
        value = wire.get(f.name)
        if f.name not in wire or (value is None and f.optional):
            if not f.optional:
                raise DecodeError("body", "missing field", kind=kind, field=f.name)
            values[f.name] = None
            continue
        try:
            f.check(value)
        except _Bad as e:
            raise DecodeError("body", e.detail, kind=kind, field=f.name + e.path) from None
        values[f.name] = value
    return v, cls(**values)


def decode_to_worker(frame: bytes) -> ToWorker:
    """Decodes a router -> worker message of any supported version; raises :class:`DecodeError`."""
    return _decode(TO_WORKER, frame)[1]  # type: ignore[return-value]


def decode_to_worker_versioned(frame: bytes) -> tuple[int, ToWorker]:
    """Decodes a router -> worker message and tells its version."""
    return _decode(TO_WORKER, frame)  # type: ignore[return-value]


def decode_from_worker(frame: bytes) -> FromWorker:
    """Decodes a worker -> router message of any supported version; raises :class:`DecodeError`."""
    return _decode(FROM_WORKER, frame)[1]  # type: ignore[return-value]


def decode_from_worker_versioned(frame: bytes) -> tuple[int, FromWorker]:
    """Decodes a worker -> router message and tells its version."""
    return _decode(FROM_WORKER, frame)  # type: ignore[return-value]


def decode_publication(frame: bytes) -> Publication:
    """Decodes the payload frame of a publication; raises :class:`DecodeError`."""
    return _decode(PUBLICATION, frame)[1]  # type: ignore[return-value]


# ----- fast paths of the worker's hot loop ------------------------------------------
#
# The same bytes and the same verdicts as the generic codec above (tests compare
# them on the golden vectors and on random values), with fewer steps for the
# two messages a busy worker handles most: ``request`` in, ``reply`` out.

_U32 = 1 << 32
_U64 = 1 << 64
_NoneType = type(None)
_SCALARS = frozenset((str, int, bool, _NoneType))


def _json_ok(v: Any, depth: int = 0) -> bool:
    """Whether ``v`` passes :func:`_check_json`, except that strings are not
    checked for lone surrogates (the strict UTF-8 codec of the caller does that)."""
    t = type(v)
    if t in _SCALARS:
        return True
    if t is float:
        return math.isfinite(v)
    if depth >= MAX_DEPTH:
        return False
    if t is dict:
        for k, item in v.items():
            if type(k) is not str:
                return False
            ti = type(item)
            if ti not in _SCALARS and not _json_ok(item, depth + 1):
                return False
        return True
    if t is list or t is tuple:
        for item in v:
            ti = type(item)
            if ti not in _SCALARS and not _json_ok(item, depth + 1):
                return False
        return True
    return False


def decode_request_fast(frame: bytes) -> Request | None:
    """The :class:`Request` in ``frame`` when it is a well-formed request, else
    ``None`` (then :func:`decode_to_worker` gives the message or the exact error).

    Strings are decoded as strict UTF-8 here, so a string that is not UTF-8
    sends the frame down the generic path, which names the field.
    """
    try:
        m = msgpack.unpackb(frame, raw=False, strict_map_key=False, timestamp=0)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    if type(m) is not dict or m.get("kind") != "request":
        return None
    v = m.get("v")
    if type(v) is not int or not MIN_PROTOCOL_VERSION <= v <= PROTOCOL_VERSION:
        return None
    cid, conn, route, service, msg_type = (
        m.get("cid"),
        m.get("conn"),
        m.get("route"),
        m.get("service"),
        m.get("msg_type"),
    )
    if (
        type(cid) is not str
        or type(conn) is not str
        or type(route) is not str
        or type(service) is not str
        or type(msg_type) is not str
    ):
        return None
    timeout_ms, deadline_ms, attempt = m.get("timeout_ms"), m.get("deadline_ms"), m.get("attempt")
    if (
        type(timeout_ms) is not int
        or not 0 <= timeout_ms < _U64
        or type(deadline_ms) is not int
        or not 0 <= deadline_ms < _U64
        or type(attempt) is not int
        or not 0 <= attempt < _U32
    ):
        return None
    if "id" not in m or "data" not in m:
        return None
    rid, data, claims = m["id"], m["data"], m.get("claims")
    if not (_json_ok(rid) and _json_ok(data) and _json_ok(claims)):
        return None
    return Request(
        cid=cid,
        conn=conn,
        route=route,
        service=service,
        msg_type=msg_type,
        id=rid,
        data=data,
        timeout_ms=timeout_ms,
        deadline_ms=deadline_ms,
        attempt=attempt,
        claims=claims,
    )


def encode_reply_fast(packer: msgpack.Packer, cid: str, done: bool, msg_type: str | None, data: Json) -> bytes | None:
    """The bytes of ``Reply(cid=cid, done=done, msg_type=msg_type, data=data)``,
    packed with ``packer`` (``use_bin_type=True``, not shared between threads),
    or ``None`` when a field has the wrong shape (:func:`encode_from_worker`
    then raises the error that names it)."""
    if type(cid) is not str or not _json_ok(data):
        return None
    if msg_type is None:
        wire = {"v": PROTOCOL_VERSION, "kind": "reply", "cid": cid, "done": done, "data": data}
    elif type(msg_type) is str:
        wire = {"v": PROTOCOL_VERSION, "kind": "reply", "cid": cid, "done": done, "msg_type": msg_type, "data": data}
    else:
        return None
    try:
        return packer.pack(wire)  # type: ignore[no-any-return]
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
        return None


def request_cid(frame: bytes) -> str | None:
    """The ``cid`` of a frame that does not decode but is a map whose ``kind`` is
    ``request`` and whose ``cid`` is a string (``None`` otherwise): such a request
    is still owed a terminal message (``bad_request``) so its credit comes back."""
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=False, unicode_errors="surrogateescape", timestamp=0)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    if not isinstance(raw, dict) or raw.get("kind") != "request":
        return None
    cid = raw.get("cid")
    if type(cid) is not str:
        return None
    try:
        cid.encode("utf-8")
    except UnicodeEncodeError:  # the bytes were not UTF-8: not a string on the wire
        return None
    return cid
