"""bench/forwarder.py, the benchmark's "bare" path: two forwarders with TLS between them carry
bytes both ways, and a visitor that never finishes the TLS handshake leaves nothing open behind
it (such a leftover connection once wedged the single-client iperf3 target of the benchmark)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.tls import ensure_self_signed
from tests.e2e.harness import ROOT, TcpServer, echo_handler, free_port, recv_all, round_trip
from tests.waiting import holds_for, wait_until


@pytest.fixture
def bare_pair(tmp_path: Path, echo: TcpServer) -> Iterator[tuple[int, int]]:
    cert, key = ensure_self_signed(tmp_path)
    inner, outer = free_port(), free_port()
    fwd = [sys.executable, "-m", "bench.forwarder"]
    started = [subprocess.Popen([*fwd, str(inner), str(echo.port), "--tls-in", str(cert), str(key)], cwd=ROOT)]
    try:
        started.append(subprocess.Popen([*fwd, str(outer), str(inner), "--tls-out"], cwd=ROOT))
        wait_until(lambda: _echoes(outer), 15, "the forwarders to start and carry an echo", interval=0.1)
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


def _listens(port: int) -> bool:
    """True when a plain TCP connect to ``port`` succeeds (no handshake)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_closed_by_forwarder(s: socket.socket) -> None:
    """Read until the forwarder closes ``s`` (whatever TLS alert comes first); a connection left
    open raises TimeoutError, which fails the test."""
    try:
        recv_all(s, timeout=10)
    except ConnectionResetError:
        return  # closed with a reset: closed all the same


def test_failed_handshake_leaves_no_target_connection(tmp_path: Path) -> None:
    target = TcpServer(echo_handler)
    cert, key = ensure_self_signed(tmp_path)
    inner = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.forwarder", str(inner), str(target.port), "--tls-in", str(cert), str(key)],
        cwd=ROOT,
    )
    try:
        wait_until(lambda: _listens(inner), 15, "the forwarder to listen")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", inner)) as s:
                s.sendall(b"not a TLS ClientHello\r\n\r\n")
                _wait_closed_by_forwarder(s)  # the forwarder is done with this visitor
        # What must not happen is a dial to the target, which would come at once: watched for
        # a while after the last visitor was dropped, failing at the first connection.
        holds_for(lambda: target.accepted == 0, 0.5, "no connection to the target after failed handshakes")
        # the control: a visitor that completes the handshake is dialed through, and counted
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", inner), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"
        assert target.accepted == 1
    finally:
        p.kill()
        p.wait()
        target.close()
