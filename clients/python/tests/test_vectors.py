"""The client against the protocol's test vectors (tests/vectors.json of the
repository, which PROTOCOL.md and the Rust and C tests share)."""

import json
import pathlib

import pytest

from presence import auth, wire

VECTORS = json.loads((pathlib.Path(__file__).resolve().parents[3] / "tests" / "vectors.json").read_text())
KEYS = VECTORS["keys"]


def key(name):
    return bytes.fromhex(KEYS["device"]["key"] if name == "device" else KEYS[name])


def encode(vector):
    m = vector["message"]
    kind = m["kind"]
    if kind == "heartbeat":
        frame = wire.heartbeat(m["device"], m["boot"], m["seq"], m["interval_ms"], m["flags"],
                               bytes.fromhex(m["payload"]))
    elif kind == "leave":
        frame = wire.leave(m["device"], m["boot"], m["seq"])
    elif kind == "query":
        (which, fields), = m["query"].items()
        args = {"device": fields} if which == "device" else {}
        if which == "list":
            args = {k: fields[k] for k in ("after", "limit", "state", "prefix", "count_only")}
        frame = wire.query(m["request"], which, padding=len(m["padding"]) // 2,
                           sent_unix_ms=m.get("sent_unix_ms"), **args)
        if vector.get("signed_with"):
            return auth.sign_query(frame, key(vector["signed_with"]))
        return frame
    else:
        return None
    if vector.get("signed_with"):
        return auth.sign(frame, key(vector["signed_with"]))
    return frame


def as_json(message):
    """A decoded reply in the vectors' form."""
    def device(d):
        return {
            "device": d.device, "online": d.online, "addr": f"{d.address[0]}:{d.address[1]}",
            "last_seen_ago_ms": d.last_seen_ago_ms, "last_seen_unix_ms": d.last_seen_unix_ms,
            "expires_in_ms": d.expires_in_ms, "ttl_ms": d.ttl_ms, "interval_ms": d.interval_ms, "boot": d.boot,
            "seq": d.seq, "heartbeats": d.heartbeats, "flaps": d.flaps, "version": d.version,
            "payload": d.payload.hex(), "offline_reason": d.offline_reason_code,
        }

    if isinstance(message, wire.Ack):
        return {"kind": "ack", "boot": message.boot, "seq": message.seq, "interval_ms": message.interval_ms,
                "ttl_ms": message.ttl_ms}
    if isinstance(message, wire.ErrorReply):
        fields = {"request_too_small": {"needed": message.value}, "stale_query": {"server_unix_ms": message.value}}
        return {"kind": "error", "code": {message.code: fields.get(message.code, {})},
                "supported_version": message.supported_version}
    body = message.body
    if isinstance(body, wire.Unknown):
        body = {"unknown_device": {}}
    elif isinstance(body, wire.DeviceInfo):
        body = {"device": device(body)}
    elif isinstance(body, wire.Summary):
        codes = {name: code for code, name in wire.DROP_REASONS.items()}
        s = body
        body = {"summary": {
            "online": s.online, "known": s.known, "uptime_ms": s.uptime_ms, "heartbeats": s.heartbeats,
            "leaves": s.leaves, "queries": s.queries, "expirations": s.expirations, "late": s.late, "held": s.held,
            "degraded": s.degraded,
            "counters": [{"code": codes.get(n, n), "count": c} for n, c in s.counters.items()],
        }}
    else:
        body = {"page": {"next_cursor": body.next_cursor, "matched": body.matched,
                         "entries": [device(e) for e in body.entries]}}
    return {"kind": "status", "request": message.request, "body": body}


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"{v['number']}-{v['message']['kind']}")
def test_each_vector(vector):
    frame = encode(vector)
    if frame is not None:
        assert frame.hex() == vector["hex"]
    else:
        assert as_json(wire.decode(bytes.fromhex(vector["hex"]))) == vector["message"]


def test_keys_derive_from_the_master():
    master = bytes.fromhex(KEYS["master"])
    assert auth.device_subkey(master).hex() == KEYS["device_subkey"]
    assert auth.device_key(master, KEYS["device"]["id"]).hex() == KEYS["device"]["key"]
    assert auth.operator_key(master).hex() == KEYS["operator"]


def test_bad_replies_raise_decode_error_with_the_reason():
    ack = bytes.fromhex("01040708904eb0ea01")
    assert wire.decode(ack) == wire.Ack(7, 8, 10000, 30000)
    for data, reason in [
        (b"", "truncated"), (ack[:-1], "truncated"), (ack + b"\x00", "trailing_bytes"),
        (b"\x02" + ack[1:], "unsupported_version"), (b"\x01\x06", "unknown_kind"),
        (bytes.fromhex("0101026431070800"), "unexpected_kind"), (bytes(1201), "oversized"),
        (bytes.fromhex("0103030002ffff"), "malformed"),
    ]:
        with pytest.raises(wire.DecodeError) as error:
            wire.decode(data)
        assert error.value.reason == reason, data.hex()


def test_every_truncation_of_every_reply_is_refused():
    for vector in VECTORS["vectors"]:
        if vector["message"]["kind"] in ("status", "ack", "error"):
            data = bytes.fromhex(vector["hex"])
            for cut in range(len(data)):
                with pytest.raises(wire.DecodeError):
                    wire.decode(data[:cut])


def test_bad_fields_are_refused_before_sending():
    for args in [("", 1, 1, 0), ("x" * 65, 1, 1, 0), ("tab\there", 1, 1, 0), ("d", -1, 1, 0), ("d", 1, 2**32, 0)]:
        with pytest.raises(wire.EncodeError):
            wire.heartbeat(*args)
    with pytest.raises(wire.EncodeError):
        wire.heartbeat("d", 1, 1, 0, payload=bytes(65))


def test_queries_are_padded_to_the_largest_reply():
    for kind, args in [("summary", {}), ("device", {"device": "boiler-7"}), ("list", {"after": "0.12"})]:
        assert len(wire.query(1, kind, **args)) == wire.MAX_DATAGRAM
        signed = auth.sign_query(wire.query(1, kind, sent_unix_ms=auth.unix_ms(), **args), bytes(32))
        assert len(signed) == wire.MAX_DATAGRAM
