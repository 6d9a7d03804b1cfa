"""Fixtures: the real `presence` server binary, started per test on a free
loopback port (`--bind 127.0.0.1:0`; the port is read from its log) and
stopped at the end. PRESENCE_BIN names the binary; by default the debug
build of this repository (`cargo build`)."""

import json
import os
import pathlib
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def binary() -> str:
    path = os.environ.get("PRESENCE_BIN") or str(REPO / "target" / "debug" / "presence")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no presence binary at {path}: run `cargo build` (or set PRESENCE_BIN)")
    return path


class Server:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [binary(), "--log-format", "json", "serve", "--bind", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        deadline = time.monotonic() + 10
        self.addr = None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            record = json.loads(line)
            if record.get("fields", {}).get("message") == "listening":
                self.addr = record["fields"]["addr"]
                break
        if self.addr is None:
            self.stop()
            pytest.fail("the server did not start listening")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cli(*args: str) -> str:
    out = subprocess.run([binary(), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def server():
    started = []

    def start(*args: str) -> Server:
        s = Server(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def master_key(tmp_path):
    path = tmp_path / "master.key"
    cli("keygen", "--out", str(path))
    return path


def poll(what: str, probe, limit: float = 10.0):
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.01)
