"""The client against the real server (the same scenarios as the C
device's test, plus paging through 2 000 devices and signed queries)."""

import socket

import pytest

from presence import Client, Device, QueryError, wire
from conftest import cli, poll


def test_a_device_beats_reads_its_ack_and_leaves(server):
    s = server()
    client = Client(s.addr)
    with Device(s.addr, "py-device-1", interval=0.5) as device:
        ack = device.beat(payload=b"fw=py1", ack=True)
        assert ack == wire.Ack(device.boot, 1, 500, 1500)
        info = poll("online", lambda: client.device("py-device-1"))
        assert (info.online, info.state, info.payload, info.interval_ms) == (True, "online", b"fw=py1", 500)
        assert info.address[0] == "127.0.0.1"
    info = poll("offline", lambda: (lambda i: i if i and not i.online else None)(client.device("py-device-1")))
    assert (info.offline_reason, info.state, info.version) == ("left", "offline", 2)
    assert client.device("never-seen") is None


def test_a_signed_device_under_auth_required(server, master_key):
    s = server("--key-file", str(master_key))
    key = bytes.fromhex(cli("derive-key", "--key-file", str(master_key), "--id", "py-signed").strip())
    client = Client(s.addr)
    with Device(s.addr, "py-signed", interval=1.0, key=key) as device:
        assert device.beat(ack=True) is not None
        assert poll("online", lambda: client.device("py-signed")).online
    # Without the key the same device gets nothing: no ack, not let in.
    with Device(s.addr, "py-unsigned", interval=1.0) as unsigned:
        assert unsigned.beat(ack=True, timeout=0.3) is None
    assert client.device("py-unsigned") is None
    assert client.summary().counters.get("missing_tag", 0) >= 1


def test_paging_through_2000_devices(server):
    s = server()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host, port = s.addr.rsplit(":", 1)
    for i in range(2000):
        sender.sendto(wire.heartbeat(f"py-fleet-{i:04d}", 1, 1, 60000), (host, int(port)))
        if i % 200 == 199:
            # Let the server keep up with a burst from one socket.
            poll("the burst", lambda: Client(s.addr).summary().known >= i + 1)
    client = Client(s.addr)
    poll("2000 online", lambda: client.summary().online == 2000)
    seen = [d.device for d in client.devices()]
    assert sorted(seen) == [f"py-fleet-{i:04d}" for i in range(2000)], "each device exactly once"
    assert client.count() == 2000
    assert client.count(prefix="py-fleet-01") == 100
    pages, after = 0, None
    while True:
        page = client.page(after, limit=150)
        assert len(page.entries) <= 150
        pages += 1
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert pages >= 2000 // 150


def test_signed_queries_with_the_operator_key(server, master_key):
    # No source may query unsigned: only the operator key gets answers.
    s = server("--key-file", str(master_key), "--query-allow", "none")
    operator = bytes.fromhex(cli("derive-key", "--key-file", str(master_key), "--operator").strip())
    key = bytes.fromhex(cli("derive-key", "--key-file", str(master_key), "--id", "py-op-1").strip())
    with Device(s.addr, "py-op-1", interval=5.0, key=key) as device:
        device.beat(ack=True)
        with pytest.raises(QueryError, match="not_allowed"):
            Client(s.addr, retries=1).summary()
        client = Client(s.addr, operator_key=operator)
        assert client.summary().online == 1
        assert client.device("py-op-1").online
        assert [d.device for d in client.devices()] == ["py-op-1"]
    # A wrong operator key gets no answer at all (bad_tag is dropped silently).
    with pytest.raises(QueryError, match="no reply"):
        Client(s.addr, operator_key=bytes(32), timeout=0.3, retries=1).summary()
