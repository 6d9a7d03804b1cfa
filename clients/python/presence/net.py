"""Talking to a server over UDP: ``Device`` sends heartbeats and leaves and
reads acks; ``Client`` queries one device, the summary, or every device
page by page."""

from __future__ import annotations

import itertools
import socket
import time
from typing import Iterator, List, Optional, Tuple, Union

from . import auth, wire
from .wire import Ack, DeviceInfo, ErrorReply, Page, Status, Summary, Unknown


def _address(server: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(server, tuple):
        return server
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server must be HOST:PORT, not {server!r}")
    return host.strip("[]"), int(port)


def _socket(server: Tuple[str, int]) -> socket.socket:
    family = socket.getaddrinfo(server[0], server[1], type=socket.SOCK_DGRAM)[0][0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect(server)
    return sock


class Device:
    """A device: ``beat()`` every ``interval`` seconds, ``leave()`` when it
    goes away (a ``with`` block leaves at its end).

    ``boot`` must grow at every start of the device (PROTOCOL.md, "Boot
    epoch"); the default, the Unix time in seconds, does on a machine with a
    clock. ``key`` (32 bytes, from `presence derive-key`) signs every frame.
    """

    def __init__(self, server: Union[str, Tuple[str, int]], device: str, interval: float = 10.0,
                 key: Optional[bytes] = None, boot: Optional[int] = None):
        self.server = _address(server)
        self.device = device
        self.interval_ms = int(interval * 1000)
        self.key = auth._key(key) if key is not None else None
        self.boot = int(time.time()) if boot is None else boot
        self.seq = 0
        self._sock = _socket(self.server)
        wire.heartbeat(device, self.boot, 0, self.interval_ms)  # validates the id now

    def _send(self, frame: bytes) -> None:
        self._sock.send(auth.sign(frame, self.key) if self.key is not None else frame)

    def beat(self, payload: bytes = b"", ack: bool = False, timeout: float = 1.0) -> Optional[Ack]:
        """Sends the next heartbeat. With ``ack=True`` asks for an ack and
        waits up to ``timeout`` seconds for it: returns it, or None."""
        self.seq += 1
        flags = wire.FLAG_ACK if ack else 0
        self._send(wire.heartbeat(self.device, self.boot, self.seq, self.interval_ms, flags, payload))
        return self.wait_ack(self.seq, timeout) if ack else None

    def wait_ack(self, seq: int, timeout: float) -> Optional[Ack]:
        """The ack of heartbeat ``seq``, if it comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(wire.MAX_DATAGRAM)
            except (socket.timeout, ConnectionRefusedError):
                return None
            try:
                reply = wire.decode(data)
            except wire.DecodeError:
                continue
            if isinstance(reply, Ack) and reply.boot == self.boot and reply.seq == seq:
                return reply

    def leave(self) -> None:
        """Says goodbye: the server takes the device offline at once."""
        self.seq += 1
        self._send(wire.leave(self.device, self.boot, self.seq))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *_exc) -> None:
        try:
            self.leave()
        finally:
            self.close()


class QueryError(RuntimeError):
    """The server answered with an error, or not at all."""


class Client:
    """Status queries. Unsigned queries are answered only for the server's
    ``--query-allow`` sources (loopback by default); with ``operator_key``
    (from `presence derive-key --operator`) every query is signed, with the
    current time, and answered from anywhere."""

    def __init__(self, server: Union[str, Tuple[str, int]], timeout: float = 2.0, retries: int = 3,
                 operator_key: Optional[bytes] = None):
        self.server = _address(server)
        self.timeout = timeout
        self.retries = retries
        self.operator_key = auth._key(operator_key) if operator_key is not None else None
        self._sock = _socket(self.server)
        self._requests = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _ask(self, kind: str, **fields):
        for _ in range(self.retries):
            request = next(self._requests) & 0xFFFFFFFF
            if self.operator_key is not None:
                # Signed afresh on every try: the server answers a signed query once.
                frame = auth.sign_query(wire.query(request, kind, sent_unix_ms=auth.unix_ms(), **fields),
                                        self.operator_key)
            else:
                frame = wire.query(request, kind, **fields)
            self._sock.send(frame)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    data = self._sock.recv(wire.MAX_DATAGRAM)
                except socket.timeout:
                    break
                except ConnectionRefusedError:
                    raise QueryError(f"nothing is listening on {self.server[0]}:{self.server[1]}") from None
                try:
                    reply = wire.decode(data)
                except wire.DecodeError:
                    continue
                if isinstance(reply, ErrorReply):
                    raise QueryError(f"the server refused the query: {reply.code}"
                                     + (f" ({reply.value})" if reply.value is not None else ""))
                if isinstance(reply, Status) and reply.request == request:
                    return reply.body
        raise QueryError(f"no reply from {self.server[0]}:{self.server[1]} after {self.retries} tries")

    def device(self, device: str) -> Optional[DeviceInfo]:
        """One device, online or not; None if the server does not know it."""
        body = self._ask("device", device=device)
        if isinstance(body, Unknown):
            return None
        if not isinstance(body, DeviceInfo) or body.device != device:
            raise QueryError("the server answered another question")
        return body

    def summary(self) -> Summary:
        """The server's counts."""
        body = self._ask("summary")
        if not isinstance(body, Summary):
            raise QueryError("the server answered another question")
        return body

    def page(self, after: Optional[str] = None, *, state: int = wire.LIST_ONLINE, prefix: Optional[str] = None,
             limit: int = 0, count_only: bool = False) -> Page:
        """One page of a listing; pass its ``next_cursor`` as ``after`` for
        the next. ``state``: ``wire.LIST_ONLINE``, ``LIST_OFFLINE`` or ``LIST_ALL``."""
        body = self._ask("list", after=after, state=state, prefix=prefix, limit=limit, count_only=count_only)
        if not isinstance(body, Page):
            raise QueryError("the server answered another question")
        return body

    def devices(self, *, state: int = wire.LIST_ONLINE, prefix: Optional[str] = None) -> Iterator[DeviceInfo]:
        """Every device the filter selects, following the cursors page by page."""
        after: Optional[str] = None
        while True:
            page = self.page(after, state=state, prefix=prefix)
            yield from page.entries
            if page.next_cursor is None:
                return
            after = page.next_cursor

    def count(self, *, state: int = wire.LIST_ONLINE, prefix: Optional[str] = None) -> int:
        """How many devices the filter selects, without listing them."""
        total, after = 0, None
        while True:
            page = self.page(after, state=state, prefix=prefix, count_only=True)
            total += page.matched
            if page.next_cursor is None:
                return total
            after = page.next_cursor


def list_all(server: Union[str, Tuple[str, int]], **kwargs) -> List[DeviceInfo]:
    """Every online device, as a list (a convenience over ``Client.devices``)."""
    with Client(server, **kwargs) as client:
        return list(client.devices())
