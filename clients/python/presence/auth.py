"""Keys and tags (PROTOCOL.md, "Authentication"): keyed BLAKE3, from the
PyPI ``blake3`` package."""

from __future__ import annotations

import time
from typing import Optional

from blake3 import blake3

from .wire import TAG_LEN

KEY_LEN = 32
DEVICE_SUBKEY_CONTEXT = "presence v1 device subkey"
OPERATOR_KEY_CONTEXT = "presence v1 operator key"


def _key(key: bytes) -> bytes:
    key = bytes(key)
    if len(key) != KEY_LEN:
        raise ValueError(f"keys are {KEY_LEN} bytes (64 hex digits), not {len(key)}")
    return key


def device_subkey(master: bytes) -> bytes:
    """The server's device subkey, from the master secret."""
    return blake3(_key(master), derive_key_context=DEVICE_SUBKEY_CONTEXT).digest()


def device_key(master: bytes, device: str) -> bytes:
    """The key of one device (what `presence derive-key --id` prints)."""
    return blake3(device.encode("utf-8"), key=device_subkey(master)).digest()


def operator_key(master: bytes) -> bytes:
    """The operator key, which signs status queries."""
    return blake3(_key(master), derive_key_context=OPERATOR_KEY_CONTEXT).digest()


def tag(key: bytes, signed: bytes) -> bytes:
    """The 8-byte tag of ``signed`` (every frame byte before the tag)."""
    return blake3(bytes(signed), key=_key(key)).digest()[:TAG_LEN]


def sign(frame: bytes, key: bytes) -> bytes:
    """A heartbeat or leave frame from ``wire`` (which ends with the
    no-tag byte 00), signed with the device key."""
    if not frame or frame[-1] != 0:
        raise ValueError("not an unsigned heartbeat or leave frame")
    signed = bytes(frame[:-1]) + b"\x01"
    return signed + tag(key, signed)


def sign_query(frame: bytes, key: bytes) -> bytes:
    """A query frame built with ``sent_unix_ms``, with its tag appended."""
    return bytes(frame) + tag(key, frame)


def unix_ms(now: Optional[float] = None) -> int:
    """The wall time in Unix milliseconds."""
    return int((time.time() if now is None else now) * 1000)
