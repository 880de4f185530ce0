"""ZMTP 3 framing for the SDK's own transport (:mod:`~bridge_worker.transport`):
the DEALER side of ZeroMQ's wire protocol, in pure Python, with no I/O.

What the router speaks (PROTOCOL.md §1): ZMTP 3 (rfc.zeromq.org 23/ZMTP and
37/ZMTP) with the NULL mechanism and the ``READY`` command. A connection is

- a 64-byte greeting each way: signature ``FF 00*8 7F``, version (major,
  minor), mechanism name padded with zeros to 20 bytes, as-server, 31 zeros;
  this side sends version 3.1, ``NULL``, as-server 0;
- a ``READY`` command each way, with the properties ``Socket-Type`` (this
  side ``DEALER``; the peer must say ``ROUTER``) and ``Identity`` (empty: the
  router chooses every peer's routing id);
- then frames: a flags byte (``0x01`` MORE, ``0x02`` LONG, ``0x04`` COMMAND;
  the other bits must be zero), the body's size in 1 byte or, LONG, in 8
  bytes big-endian, the body.

:class:`Decoder` takes the bytes as they come (split anywhere) and returns
complete messages. Nothing is allocated from a length the peer announced: a
frame over the decoder's bound is refused from its header, before any of its
body is buffered, and the buffer only ever holds bytes that arrived. Every
violation raises :class:`ZmtpError` with a sentence that says what the peer
did; the connection is then dropped (and the session reconnects).

The bridge protocol's messages are single frames (PROTOCOL.md §2): a
multi-part message is counted in :attr:`Decoder.dropped` and dropped whole,
without keeping its parts. Commands after ``READY`` are queued in
:attr:`Decoder.commands` for the connection to act on (``PING`` is answered
``PONG``, ``ERROR`` ends the connection, others are ignored).
"""

from __future__ import annotations

from collections.abc import Iterable

SIGNATURE_START = 0xFF
SIGNATURE_END = 0x7F
GREETING_SIZE = 64
VERSION = (3, 1)
MECHANISM = b"NULL"

MORE = 0x01
LONG = 0x02
COMMAND = 0x04
_RESERVED = 0xFF & ~(MORE | LONG | COMMAND)

MAX_COMMAND = 64 << 10
"""Largest command body accepted (a READY with metadata is a few hundred bytes)."""
MAX_PING_CONTEXT = 16
"""ZMTP 3.1: a PING's context is at most 16 bytes; a PONG echoes it."""


class ZmtpError(Exception):
    """The peer broke ZMTP (or is not a ROUTER speaking NULL): drop the connection."""


def greeting(version: tuple[int, int] = VERSION) -> bytes:
    """This side's 64-byte greeting: NULL mechanism, not as-server."""
    return (
        bytes((SIGNATURE_START, 0, 0, 0, 0, 0, 0, 0, 0, SIGNATURE_END, version[0], version[1]))
        + MECHANISM.ljust(20, b"\0")
        + b"\0"  # as-server
        + bytes(31)
    )


def command(name: bytes, body: bytes = b"") -> bytes:
    """One command frame: ``name`` (1 to 255 bytes) and its data."""
    if not 1 <= len(name) <= 255:
        raise ValueError(f"command name {name!r}: 1 to 255 bytes")
    payload = bytes((len(name),)) + name + body
    return frame_header(len(payload), COMMAND) + payload


def properties(props: Iterable[tuple[bytes, bytes]]) -> bytes:
    """ZMTP metadata: each name (1 byte of size) and value (4 bytes of size, big-endian)."""
    out = bytearray()
    for name, value in props:
        if not 1 <= len(name) <= 255:
            raise ValueError(f"property name {name!r}: 1 to 255 bytes")
        out += bytes((len(name),)) + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command; raises :class:`ZmtpError` when it is cut short."""
    props: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        size = data[pos]
        pos += 1
        if size == 0 or pos + size + 4 > end:
            raise ZmtpError("the peer's READY has a malformed property")
        name = data[pos : pos + size]
        pos += size
        value_size = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if pos + value_size > end:
            raise ZmtpError(f"the peer's READY property {name.decode('ascii', 'replace')} is cut short")
        props[name.lower()] = data[pos : pos + value_size]
        pos += value_size
    return props


def ready(socket_type: bytes = b"DEALER", identity: bytes = b"") -> bytes:
    """This side's READY command."""
    return command(b"READY", properties(((b"Socket-Type", socket_type), (b"Identity", identity))))


def pong(context: bytes) -> bytes:
    return command(b"PONG", context[:MAX_PING_CONTEXT])


_SHORT_HEADERS = [bytes((0, n)) for n in range(256)]


def frame_header(size: int, flags: int = 0) -> bytes:
    """The flags byte and size of a frame of ``size`` bytes (LONG when over 255)."""
    if size < 256:
        return _SHORT_HEADERS[size] if flags == 0 else bytes((flags, size))
    return bytes((flags | LONG,)) + size.to_bytes(8, "big")


def encode(frames: Iterable[bytes]) -> list[bytes]:
    """The bytes to write for single-frame messages ``frames``, in order."""
    parts: list[bytes] = []
    append = parts.append
    for frame in frames:
        size = len(frame)
        append(_SHORT_HEADERS[size] if size < 256 else b"\x02" + size.to_bytes(8, "big"))
        append(frame)
    return parts


# Decoder states.
_GREETING = 0
_READY = 1
_TRAFFIC = 2


class Decoder:
    """Parses what the peer sends, from its greeting on.

    ``max_frame`` bounds a data frame's body and a multi-part message's total;
    ``peer_types`` are the socket types accepted in the peer's READY.
    """

    def __init__(self, max_frame: int, peer_types: frozenset[bytes] = frozenset((b"ROUTER",))) -> None:
        self.max_frame = max_frame
        self.peer_types = peer_types
        self.peer_version: tuple[int, int] | None = None
        self.peer_properties: dict[bytes, bytes] | None = None
        """The peer's READY metadata (names lower-cased), once it came."""
        self.commands: list[tuple[bytes, bytes]] = []
        """Commands after READY (name, data), for the caller to take and act on."""
        self.dropped = 0
        """Multi-part messages dropped (the bridge protocol has none)."""
        self._state = _GREETING
        self._buf = bytearray()
        self._need = GREETING_SIZE  # bytes the buffer must hold before parsing is worth it
        self._multipart = False  # inside a multi-part message (being dropped)
        self._multipart_bytes = 0

    @property
    def ready(self) -> bool:
        """Whether the peer's greeting and READY have come (and were accepted)."""
        return self._state == _TRAFFIC

    def feed(self, data: bytes) -> list[bytes]:
        """Takes the next bytes from the peer; returns the messages they complete.

        Raises :class:`ZmtpError` at the first violation (the decoder is then
        unusable: drop the connection).
        """
        buf = self._buf
        messages: list[bytes] = []
        if buf:
            buf += data
            if len(buf) < self._need:
                return messages
            # Parsed through a view, so each frame is copied once, out of the buffer.
            with memoryview(buf) as view:
                pos = self._parse(view, len(buf), messages)
            del buf[:pos]
        elif len(data) < self._need:
            buf += data
            return messages
        else:
            # Nothing buffered: frames are sliced straight out of ``data``.
            pos = self._parse(data, len(data), messages)
            if pos < len(data):
                buf += data[pos:]
        return messages

    def _parse(self, view: bytes | memoryview, n: int, messages: list[bytes]) -> int:
        pos = 0
        if self._state != _TRAFFIC:
            pos = self._handshake(view, pos, n)
        if self._state == _TRAFFIC:
            pos = self._traffic(view, pos, n, messages)
        return pos

    def _handshake(self, view: bytes | memoryview, pos: int, n: int) -> int:
        """Parses the greeting and the READY command; returns the position after them."""
        if self._state == _GREETING:
            if n - pos < GREETING_SIZE:
                self._need = GREETING_SIZE
                return pos
            self._check_greeting(bytes(view[pos : pos + GREETING_SIZE]))
            pos += GREETING_SIZE
            self._state = _READY
            self._need = 2
        # The first frame after the greeting must be the peer's READY.
        header = _header(view, pos, n)
        if header is None:
            self._need = 9
            return pos
        flags, size, hdr = header
        if not flags & COMMAND:
            raise ZmtpError("the peer sent a message before its READY command")
        if flags & (_RESERVED | MORE):
            raise ZmtpError(f"the peer sent a frame with invalid flags 0x{flags:02x}")
        if size > MAX_COMMAND:
            raise ZmtpError(f"the peer announced a command of {size} bytes (at most {MAX_COMMAND})")
        end = pos + hdr + size
        if end > n:
            self._need = end - pos
            return pos
        name, body = _command(bytes(view[pos + hdr : end]))
        if name != b"READY":
            raise ZmtpError(f"the peer sent {_show(name)} before READY")
        props = parse_properties(body)
        socket_type = props.get(b"socket-type")
        if socket_type is None:
            raise ZmtpError("the peer's READY has no Socket-Type")
        if socket_type not in self.peer_types:
            raise ZmtpError(
                f"the peer is a {_show(socket_type)} socket, not a "
                + " or ".join(t.decode() for t in sorted(self.peer_types))
                + " (is this endpoint a router's bridge endpoint?)"
            )
        self.peer_properties = props
        self._state = _TRAFFIC
        self._need = 2
        return end

    def _check_greeting(self, g: bytes) -> None:
        if g[0] != SIGNATURE_START or g[9] != SIGNATURE_END:
            raise ZmtpError("the peer's greeting has no ZMTP signature (is this endpoint a ZeroMQ socket?)")
        major, minor = g[10], g[11]
        if major < 3:
            raise ZmtpError(f"the peer speaks ZMTP {major}.{minor}; ZMTP 3.0 or later is needed")
        mechanism = g[12:32]
        if mechanism != MECHANISM.ljust(20, b"\0"):
            raise ZmtpError(
                f"the peer uses the security mechanism {_show(mechanism.rstrip(bytes(1)))}, not NULL"
                " (the router supports no CURVE or PLAIN)"
            )
        self.peer_version = (major, minor)

    def _traffic(self, view: bytes | memoryview, pos: int, n: int, messages: list[bytes]) -> int:
        """Parses frames from ``pos``; appends complete messages; returns where it stopped."""
        max_frame = self.max_frame
        append = messages.append
        while True:
            left = n - pos
            if left < 2:
                self._need = 2
                return pos
            flags = view[pos]
            if flags & LONG:
                if left < 9:
                    self._need = 9
                    return pos
                size = int.from_bytes(view[pos + 1 : pos + 9], "big")
                hdr = 9
            else:
                size = view[pos + 1]
                hdr = 2
            if flags & _RESERVED:
                raise ZmtpError(f"the peer sent a frame with invalid flags 0x{flags:02x}")
            if flags & COMMAND:
                if flags & MORE:
                    raise ZmtpError("the peer sent a command with the MORE flag")
                if size > MAX_COMMAND:
                    raise ZmtpError(f"the peer announced a command of {size} bytes (at most {MAX_COMMAND})")
            elif size > max_frame or (self._multipart and self._multipart_bytes + size > max_frame):
                raise ZmtpError(f"the peer announced a frame of {size} bytes (at most {max_frame})")
            end = pos + hdr + size
            if end > n:
                self._need = end - pos
                return pos
            if flags == 0 and not self._multipart:
                # The common case: a single-frame message.
                append(view[pos + 2 : end] if view.__class__ is bytes else bytes(view[pos + 2 : end]))
            elif flags & COMMAND:
                self.commands.append(_command(bytes(view[pos + hdr : end])))
            elif flags & MORE:
                # A part of a multi-part message: counted, not kept.
                self._multipart = True
                self._multipart_bytes += size
            elif self._multipart:
                self._multipart = False
                self._multipart_bytes = 0
                self.dropped += 1
            else:
                append(bytes(view[pos + hdr : end]))
            pos = end


def _header(view: bytes | memoryview, pos: int, n: int) -> tuple[int, int, int] | None:
    """(flags, size, header length) of the frame at ``pos``, or ``None`` when not all there."""
    if n - pos < 2:
        return None
    flags = view[pos]
    if flags & LONG:
        if n - pos < 9:
            return None
        return flags, int.from_bytes(view[pos + 1 : pos + 9], "big"), 9
    return flags, view[pos + 1], 2


def _command(payload: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command frame's body."""
    if not payload:
        raise ZmtpError("the peer sent an empty command")
    size = payload[0]
    if size == 0 or 1 + size > len(payload):
        raise ZmtpError("the peer sent a command with a malformed name")
    return payload[1 : 1 + size], payload[1 + size :]


def ping_context(data: bytes) -> bytes:
    """The context of a PING's data (after its 2-byte TTL), to echo in the PONG."""
    if len(data) < 2:
        raise ZmtpError("the peer sent a PING without its TTL")
    return data[2 : 2 + MAX_PING_CONTEXT]


def error_reason(data: bytes) -> str:
    """The reason of an ERROR command."""
    if not data:
        return ""
    return data[1 : 1 + data[0]].decode("utf-8", "replace")


def _show(name: bytes) -> str:
    return repr(name.decode("ascii", "replace"))
