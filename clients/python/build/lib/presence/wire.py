"""The v1 frame format of PROTOCOL.md: encoding the frames a device or a
client sends, decoding the ones the server sends back.

Every function here is pure: bytes in, bytes or typed values out. Decoding
raises ``DecodeError`` (with the protocol's drop-reason name) for anything
the protocol does not allow, and never anything else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

VERSION = 1
MAX_DATAGRAM = 1200
MAX_ID_LEN = 64
MAX_PAYLOAD_LEN = 64
TAG_LEN = 8
FLAG_ACK = 0x01

KIND_HEARTBEAT, KIND_LEAVE, KIND_QUERY, KIND_STATUS, KIND_ACK, KIND_ERROR = range(6)

LIST_ONLINE, LIST_OFFLINE, LIST_ALL = 0, 1, 2

OFFLINE_REASONS = {0: None, 1: "expired", 2: "left", 3: None, 4: None}
STATES = {0: "online", 3: "suspect", 4: "suspect"}

DROP_REASONS = {
    1: "truncated", 2: "oversized", 3: "unsupported_version", 4: "unknown_kind", 5: "malformed",
    6: "trailing_bytes", 7: "bad_device_id", 8: "payload_too_long", 9: "unexpected_kind", 10: "bad_tag",
    11: "replay", 12: "unknown_key", 13: "over_capacity", 14: "rate_limited", 15: "not_allowed",
    16: "missing_tag", 17: "id_control_char", 18: "stale_query", 256: "events_lost", 257: "snapshots_failed",
}


class DecodeError(ValueError):
    """A datagram the protocol does not allow; ``reason`` is the drop reason's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class EncodeError(ValueError):
    """Fields the protocol does not allow (an id or payload too long, ...)."""


# --- typed results -----------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """The server's ack of a heartbeat."""

    boot: int
    seq: int
    interval_ms: int
    ttl_ms: int


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the server reports it (it may be offline)."""

    device: str
    online: bool
    address: Tuple[str, int]
    last_seen_ago_ms: int
    last_seen_unix_ms: int
    expires_in_ms: int
    ttl_ms: int
    interval_ms: int
    boot: int
    seq: int
    heartbeats: int
    flaps: int
    version: int
    payload: bytes
    offline_reason_code: int

    @property
    def state(self) -> str:
        """``online``, ``suspect`` (late, or held while the server is degraded) or ``offline``."""
        if not self.online:
            return "offline"
        return STATES.get(self.offline_reason_code, "online")

    @property
    def offline_reason(self) -> Optional[str]:
        """``expired`` or ``left`` when offline, else None."""
        return None if self.online else OFFLINE_REASONS.get(self.offline_reason_code)

    @property
    def held(self) -> bool:
        """Whether it is held as suspect while the server is degraded."""
        return self.online and self.offline_reason_code == 4


@dataclass(frozen=True)
class Summary:
    """The server's counts; ``counters`` maps reason names to counts."""

    online: int
    known: int
    uptime_ms: int
    heartbeats: int
    leaves: int
    queries: int
    expirations: int
    late: int
    held: int
    degraded: int
    counters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    """One page of a listing: pass ``next_cursor`` back for the next one."""

    next_cursor: Optional[str]
    matched: int
    entries: List[DeviceInfo]


@dataclass(frozen=True)
class Unknown:
    """The server does not know the device."""


@dataclass(frozen=True)
class Status:
    """A status reply: ``body`` is a DeviceInfo, Unknown, Summary or Page."""

    request: int
    body: Union[DeviceInfo, Unknown, Summary, Page]


@dataclass(frozen=True)
class ErrorReply:
    """An error reply: ``code`` is its name; ``value`` what it carries
    (``needed`` bytes for request_too_small, the server's time for stale_query)."""

    code: str
    value: Optional[int]
    supported_version: int


# --- encoding ----------------------------------------------------------------


def varint(n: int) -> bytes:
    """An unsigned LEB128 varint, minimal."""
    if n < 0:
        raise EncodeError("varints are unsigned")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _u32(n: int) -> bytes:
    if not 0 <= n < 1 << 32:
        raise EncodeError(f"{n} is not a u32")
    return varint(n)


def _str(s: str, what: str = "id") -> bytes:
    raw = s.encode("utf-8")
    if not 1 <= len(raw) <= MAX_ID_LEN:
        raise EncodeError(f"the {what} must be 1 to {MAX_ID_LEN} bytes of UTF-8")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s):
        raise EncodeError(f"the {what} holds a control character")
    return varint(len(raw)) + raw


def _bytes(b: bytes) -> bytes:
    return varint(len(b)) + bytes(b)


def heartbeat(device: str, boot: int, seq: int, interval_ms: int, flags: int = 0, payload: bytes = b"") -> bytes:
    """An unsigned heartbeat frame (``auth.sign`` signs it)."""
    if len(payload) > MAX_PAYLOAD_LEN:
        raise EncodeError(f"the payload must be at most {MAX_PAYLOAD_LEN} bytes")
    if not 0 <= flags <= 0xFF:
        raise EncodeError("flags are one byte")
    return (
        bytes([VERSION, KIND_HEARTBEAT]) + _str(device) + _u32(boot) + _u32(seq) + _u32(interval_ms)
        + bytes([flags]) + _bytes(payload) + b"\x00"
    )


def leave(device: str, boot: int, seq: int) -> bytes:
    """An unsigned leave frame."""
    return bytes([VERSION, KIND_LEAVE]) + _str(device) + _u32(boot) + _u32(seq) + b"\x00"


def _query_kind(kind: str, device: Optional[str], after: Optional[str], limit: int, state: int,
                prefix: Optional[str], count_only: bool) -> bytes:
    if kind == "device":
        return varint(0) + _str(device or "")
    if kind == "summary":
        return varint(1)
    if kind == "list":
        if not 0 <= limit <= 0xFFFF:
            raise EncodeError("limit is a u16")
        cursor = b"\x00" if after is None else b"\x01" + _str(after, "cursor")
        prefix_bytes = b"\x00" if prefix is None else b"\x01" + _str(prefix, "prefix")
        return varint(2) + cursor + varint(limit) + bytes([state & 0xFF]) + prefix_bytes + bytes([int(count_only)])
    raise EncodeError(f"unknown query kind {kind!r}")


def query(request: int, kind: str, *, device: Optional[str] = None, after: Optional[str] = None,
          limit: int = 0, state: int = LIST_ONLINE, prefix: Optional[str] = None, count_only: bool = False,
          padding: Optional[int] = None, sent_unix_ms: Optional[int] = None) -> bytes:
    """A query frame, without its tag: ``kind`` is ``device``, ``summary`` or
    ``list``. It is padded to ``MAX_DATAGRAM`` bytes unless ``padding`` says
    how many padding bytes (the server never replies with more bytes than
    it received). With ``sent_unix_ms`` the frame ends with the tag marker
    and the time, ready for ``auth.sign_query``, which appends the tag."""
    head = bytes([VERSION, KIND_QUERY]) + _u32(request) + _query_kind(kind, device, after, limit, state, prefix,
                                                                       count_only)
    tail = b"\x00" if sent_unix_ms is None else b"\x01" + varint(sent_unix_ms)
    signed_extra = 0 if sent_unix_ms is None else TAG_LEN
    if padding is None:
        padding = MAX_DATAGRAM - len(head) - len(tail) - signed_extra - 1
        if padding > 127:
            padding -= 1  # the length prefix takes two bytes
        padding = max(padding, 0)
    frame = head + _bytes(bytes(padding)) + tail
    if len(frame) + signed_extra > MAX_DATAGRAM:
        raise EncodeError("the query does not fit in a datagram")
    return frame


# --- decoding ----------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            raise DecodeError("truncated")
        b = self.data[self.at]
        self.at += 1
        return b

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise DecodeError("truncated")
        out = self.data[self.at:self.at + n]
        self.at += n
        return bytes(out)

    def varint(self, bits: int) -> int:
        value, shift = 0, 0
        max_bytes = (bits + 6) // 7
        for i in range(max_bytes):
            b = self.byte()
            if i == max_bytes - 1 and b >> (bits - 7 * i) != 0:
                raise DecodeError("malformed")
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
        raise DecodeError("malformed")

    def boolean(self) -> bool:
        b = self.byte()
        if b > 1:
            raise DecodeError("malformed")
        return b == 1

    def bytes_field(self) -> bytes:
        return self.take(self.varint(64))

    def string(self) -> str:
        raw = self.bytes_field()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("malformed") from None

    def option(self) -> bool:
        return self.boolean()

    def done(self) -> bool:
        return self.at == len(self.data)


def _address(r: _Reader) -> Tuple[str, int]:
    kind = r.varint(32)
    if kind == 0:
        ip = str(ipaddress.IPv4Address(r.take(4)))
    elif kind == 1:
        ip = str(ipaddress.IPv6Address(r.take(16)))
    else:
        raise DecodeError("malformed")
    return ip, r.varint(16)


def _device_info(r: _Reader) -> DeviceInfo:
    device = r.string()
    online = r.boolean()
    address = _address(r)
    numbers = [r.varint(64), r.varint(64), r.varint(64), r.varint(32), r.varint(32), r.varint(32), r.varint(32),
               r.varint(64), r.varint(32), r.varint(32)]
    payload = r.bytes_field()
    reason = r.byte()
    if not 1 <= len(device.encode()) <= MAX_ID_LEN or len(payload) > MAX_PAYLOAD_LEN:
        raise DecodeError("malformed")
    return DeviceInfo(device, online, address, *numbers, payload, reason)


def _records(raw: bytes, read):
    r = _Reader(raw)
    out = []
    while not r.done():
        out.append(read(r))
    return out


def _counter(r: _Reader) -> Tuple[int, int]:
    return r.varint(16), r.varint(64)


def decode(datagram: bytes):
    """Decodes a frame from the server: an ``Ack``, a ``Status`` or an
    ``ErrorReply``. Raises ``DecodeError`` otherwise."""
    if len(datagram) > MAX_DATAGRAM:
        raise DecodeError("oversized")
    r = _Reader(datagram)
    if r.byte() != VERSION:
        raise DecodeError("unsupported_version")
    kind = r.varint(32)
    if kind >= 6:
        raise DecodeError("unknown_kind")
    if kind == KIND_ACK:
        message = Ack(r.varint(32), r.varint(32), r.varint(32), r.varint(32))
    elif kind == KIND_STATUS:
        request = r.varint(32)
        body_kind = r.varint(32)
        if body_kind == 0:
            body = _device_info(r)
        elif body_kind == 1:
            body = Unknown()
        elif body_kind == 2:
            counts = [r.varint(64) for _ in range(10)]
            counters = {DROP_REASONS.get(code, f"code_{code}"): count for code, count in _records(r.bytes_field(),
                                                                                                   _counter)}
            body = Summary(*counts, counters=counters)
        elif body_kind == 3:
            cursor = r.string() if r.option() else None
            matched = r.varint(64)
            body = Page(cursor, matched, _records(r.bytes_field(), _device_info))
        else:
            raise DecodeError("malformed")
        message = Status(request, body)
    elif kind == KIND_ERROR:
        code = r.varint(32)
        names = {0: ("unsupported_version", 0), 1: ("not_allowed", 0), 2: ("request_too_small", 16),
                 3: ("stale_query", 64)}
        if code not in names:
            raise DecodeError("malformed")
        name, bits = names[code]
        value = r.varint(bits) if bits else None
        message = ErrorReply(name, value, r.byte())
    else:
        raise DecodeError("unexpected_kind")
    if not r.done():
        raise DecodeError("trailing_bytes")
    return message
