"""Hostile input against a real relayd: fuzzing, idle floods, brute force, malicious clients, limits."""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from shared.frames import Flag, FrameType, ResetCode, frame_header, preface
from shared.messages import LoginOk
from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    closed_by_peer,
    free_port,
    recv_all,
    relayc_config,
    relayd_config,
    spawn,
    start_relayd,
    start_tunnel,
    wait_port_serves,
)
from tests.e2e.rawclient import RawClient


def tls_send(port: int, data: bytes) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(data)
            s.settimeout(3)
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, OSError, ssl.SSLError):
                pass
    except (OSError, ssl.SSLError):
        pass


def test_fuzzing_the_control_port_leaves_real_clients_served(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, handshake_timeout=2)
    start_tunnel(procs, tmp_path, port, "e", echo.port, public)
    rng = random.Random(7)
    cases = [
        os.urandom(100),  # random bytes, before TLS
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for case in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(case)
            try:
                recv_all(s, timeout=5)
            except (TimeoutError, OSError):
                pass
    tls_cases = [
        rng.randbytes(2000),  # random bytes inside TLS
        preface() + rng.randbytes(500),  # a valid preface, then garbage
        preface() + frame_header(FrameType.DATA, Flag.SYN, 1, 0xFFFFFFFF),  # absurd length
        preface() + frame_header(FrameType.DATA, Flag.SYN, 1, 100)[:7],  # half a header, then silence
        preface() + frame_header(FrameType.DATA, Flag.SYN, 1, 5) + struct.pack("!I", 2**31) + b"x",  # absurd message
        preface() + frame_header(FrameType.DATA, Flag.SYN, 3, 4) + b"abcd",  # a stream other than control
        b"RELAY\x09\r\n",  # a future protocol version
    ]
    for i in range(60):
        tls_send(port, tls_cases[i % len(tls_cases)] if i < 2 * len(tls_cases) else rng.randbytes(rng.randint(1, 300)))
    assert d.popen.poll() is None
    wait_port_serves(public)
    # the logged-in client kept its session through all of it
    assert "disconnected" not in d.output


def test_idle_flood_is_capped_and_a_real_client_still_logs_in(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port, handshake_timeout=3,
                                                       limits={"max_preauth_per_ip": 50}))  # fmt: skip
    d.wait_for("listening for relayc")
    idle = []
    for _ in range(1500):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    try:
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
            {"name": "e", "local_port": echo.port, "remote_port": public}]))  # fmt: skip
        c.wait_for(r"tunnel e: relayd port", timeout=20)
        wait_port_serves(public)
        d.wait_for(r"too many connections from 127\.0\.0\.1 that have not logged in")
        # the capped ones were closed by relayd, and the rest time out
        deadline = time.monotonic() + 10
        open_count = len(idle)
        while time.monotonic() < deadline and open_count:
            open_count = 0
            for s in idle:
                s.settimeout(0)
                try:
                    if s.recv(1) == b"":
                        continue
                except BlockingIOError:
                    open_count += 1
                except OSError:
                    continue
            time.sleep(0.5)
        assert open_count == 0
    finally:
        for s in idle:
            s.close()


def test_brute_force_is_slowed_then_blocked_and_others_unaffected(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port, auth={
        "token": TOKEN, "block_after_failures": 4, "failure_window": 60, "block_seconds": 30}))  # fmt: skip
    d.wait_for("listening for relayc")
    results = []
    for _ in range(4):
        client = RawClient(port, source_ip="127.0.0.2")
        t0 = time.monotonic()
        results.append((client.login("wrong-token"), time.monotonic() - t0))
        client.close()
    assert [ok for ok, _ in results] == [False] * 4
    assert results[-1][1] > results[0][1]  # answers get slower
    d.wait_for(r"login: client 'raw' from 127\.0\.0\.2 blocked for 30 s after 4 failed logins")
    # now blocked: answered at once, and even the right token is not checked
    client = RawClient(port, source_ip="127.0.0.2")
    t0 = time.monotonic()
    assert not client.login(TOKEN)
    assert time.monotonic() - t0 < results[-1][1]
    client.close()
    assert d.output.count("login failed: client 'raw' from 127.0.0.2") == 1  # once per burst
    # a guesser that tries many names is dropped before TLS
    for name in ("root", "admin", "gpu", "x"):
        client = RawClient(port, source_ip="127.0.0.4")
        assert not client.login("guess", name=name)
        client.close()
    with pytest.raises((ConnectionResetError, ssl.SSLError, OSError)):
        RawClient(port, source_ip="127.0.0.4").login("wrong-token")
    # a good client from another address, or with another name from the same one, is unaffected
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "e", "local_port": echo.port, "remote_port": public}]))  # fmt: skip
    c.wait_for(r"tunnel e: relayd port")
    assert RawClient(port, source_ip="127.0.0.1").login(TOKEN, name="other")
    assert RawClient(port, source_ip="127.0.0.2").login(TOKEN, name="other")


def test_malicious_client_cannot_escape_its_limits(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, taken, allowed_a, allowed_b = free_port(), free_port(), free_port(), free_port()
    d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port, allow_ports=f"{taken},{allowed_a},{allowed_b}",
                                                       max_ports_per_client=1))  # fmt: skip
    d.wait_for("listening for relayc")
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "a", "local_port": echo.port, "remote_port": taken},
        {"name": "b", "local_port": echo.port, "remote_port": allowed_a}]))  # fmt: skip
    c.wait_for(r"tunnel a: relayd port")
    c.wait_for(r"tunnel b refused by relayd: client 'lab' already holds max_ports_per_client=1")
    # another client cannot take the port of the first
    c2 = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "x", "local_port": echo.port, "remote_port": taken}], filename="c2.toml", name="other"))  # fmt: skip
    c2.wait_for(rf"tunnel x refused by relayd: port {taken} is already used by client 'lab' tunnel 'a'")
    # a client opening a stream toward relayd gets it reset, and nothing else happens
    raw = RawClient(port)
    assert raw.login(TOKEN, name="evil")
    sid = raw.session.open_stream(b"GET / HTTP/1.0\r\n\r\n")
    raw.flush()
    assert raw.wait_reset(sid) == ResetCode.NOT_ALLOWED
    # an oversized control message closes that session only
    raw.session.send_data(1, struct.pack("!I", 10**9) + b"x" * 100)
    raw.flush()
    assert raw.closed_by_server()
    raw.close()
    # sending past the window closes that session only
    raw = RawClient(port)
    assert raw.login(TOKEN, name="evil2")
    raw.sock.sendall(frame_header(FrameType.DATA, 0, 1, 200_000) + bytes(200_000))
    raw.sock.sendall(frame_header(FrameType.DATA, 0, 1, 200_000) + bytes(200_000))
    assert raw.closed_by_server()
    raw.close()
    wait_port_serves(taken)
    assert d.popen.poll() is None


def test_tunnel_limits_sources_connections_bandwidth(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, p_src, p_conn, p_bw = free_port(), free_port(), free_port(), free_port()
    d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port))
    d.wait_for("listening for relayc")
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "campus-only", "local_port": echo.port, "remote_port": p_src, "allow_sources": ["10.0.0.0/8"]},
        {"name": "two", "local_port": echo.port, "remote_port": p_conn, "max_connections": 2},
        {"name": "slow", "local_port": echo.port, "remote_port": p_bw, "bandwidth_limit": "1MB"},
    ]))  # fmt: skip
    c.wait_for(r"tunnel slow: relayd port")
    # source allowlist: 127.0.0.1 is not in 10.0.0.0/8
    with socket.create_connection(("127.0.0.1", p_src), timeout=5) as s:
        s.sendall(b"x")
        assert closed_by_peer(s)
    d.wait_for(r"tunnel campus-only: visitor 127\.0\.0\.1:\d+ refused: source 127\.0\.0\.1 is not in allow_sources")
    # max_connections: two held, the third refused, and once one closes a new one works
    held = [socket.create_connection(("127.0.0.1", p_conn), timeout=5) for _ in range(2)]
    for s in held:
        s.sendall(b"a")
        assert s.recv(1) == b"a"
    with socket.create_connection(("127.0.0.1", p_conn), timeout=5) as s:
        s.sendall(b"x")
        assert closed_by_peer(s)
    held.pop().close()
    time.sleep(0.3)
    wait_port_serves(p_conn)
    for s in held:
        s.close()
    # bandwidth: 3 MB echoed through a 1 MB/s tunnel cannot take less than about 2 s
    payload = os.urandom(3_000_000)
    with socket.create_connection(("127.0.0.1", p_bw), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s, timeout=30)
        elapsed = time.monotonic() - t0
    assert got == payload
    assert elapsed >= 1.8  # a lower bound: a slow machine only makes it longer


def test_names_a_peer_chooses_never_forge_log_lines(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    d = start_relayd(procs, tmp_path, port)
    evil = "1.0\nERROR   relayd: forged \x1b[31mred\x1b[0m"
    client = RawClient(port)
    assert isinstance(client.login_answer(TOKEN, "lab", version=evil), LoginOk)
    d.wait_for(r"client lab logged in from 127\.0\.0\.1 \(relayc 1\.0\\nERROR   relayd: forged \\x1b\[31mred")
    client.close()
    # a client name with a newline is refused, and named escaped
    bad = RawClient(port)
    assert not bad.login(TOKEN, name="x\nINFO    relayd: client admin logged in")
    bad.close()
    d.wait_for(r"login refused: client from 127\.0\.0\.1 sent the name 'x\\nINFO")
    assert not any(line.startswith(("ERROR   relayd: forged", "INFO    relayd: client admin")) for line in d.lines)
    assert "\x1b" not in d.output
