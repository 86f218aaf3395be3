"""bench/forwarder.py, the benchmark's "bare" path: two forwarders with TLS between them carry
bytes both ways, and a visitor that never finishes the TLS handshake leaves nothing open behind
it (such a leftover connection once wedged the single-client iperf3 target of the benchmark)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.tls import ensure_self_signed
from tests.e2e.harness import ROOT, TcpServer, echo_handler, free_port, recv_all, round_trip


@pytest.fixture
def bare_pair(tmp_path: Path, echo: TcpServer) -> Iterator[tuple[int, int]]:
    cert, key = ensure_self_signed(tmp_path)
    inner, outer = free_port(), free_port()
    fwd = [sys.executable, "-m", "bench.forwarder"]
    started = [subprocess.Popen([*fwd, str(inner), str(echo.port), "--tls-in", str(cert), str(key)], cwd=ROOT)]
    try:
        started.append(subprocess.Popen([*fwd, str(outer), str(inner), "--tls-out"], cwd=ROOT))
        deadline = time.monotonic() + 15
        while not _echoes(outer):
            assert time.monotonic() < deadline, "the forwarders did not start"
            time.sleep(0.1)
        yield inner, outer
    finally:
        for p in started:
            p.kill()
            p.wait()


def _echoes(port: int, payload: bytes = b"ping") -> bool:
    """True when ``payload`` sent through ``port`` comes back whole (a TLS hop cannot carry a
    half-close, so the reply is read by length, not to EOF)."""
    try:
        return round_trip(port, payload, timeout=5) == payload
    except OSError:
        return False


def test_bytes_pass_both_ways_and_close_passes_through(bare_pair: tuple[int, int]) -> None:
    _, outer = bare_pair
    assert _echoes(outer, bytes(range(256)) * 4096)  # 1 MiB there and back
    with socket.create_connection(("127.0.0.1", outer)) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        s.shutdown(socket.SHUT_WR)  # the visitor is done: the whole chain closes behind it
        assert recv_all(s, timeout=10) == b""


def test_failed_handshake_leaves_no_target_connection(tmp_path: Path) -> None:
    target = TcpServer(echo_handler)
    cert, key = ensure_self_signed(tmp_path)
    inner = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.forwarder", str(inner), str(target.port), "--tls-in", str(cert), str(key)],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # plain TCP connects (no handshake) until the forwarder listens
            try:
                socket.create_connection(("127.0.0.1", inner), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the forwarder did not start"
                time.sleep(0.05)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", inner)) as s:
                s.sendall(b"not a TLS ClientHello\r\n\r\n")
        time.sleep(0.5)
        assert target.accepted == 0
    finally:
        p.kill()
        p.wait()
        target.close()
