"""PROXY protocol end to end: a tcp tunnel with ``proxy_protocol = "v1"`` / ``"v2"`` in front of a
real consumer (haproxy with ``accept-proxy``), which logs the visitor's real address."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, spawn, start_relayd
from tests.waiting import wait_until

HAPROXY = shutil.which("haproxy")
if HAPROXY is None and os.environ.get("CI"):
    raise RuntimeError("CI must install haproxy for the PROXY protocol test (apt-get install haproxy)")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)")

VISITOR_IP = "127.0.0.7"  # a loopback address of its own, so the log line can only be this visitor's


class Haproxy:
    """haproxy accepting the PROXY protocol on ``port`` in front of ``target``, logging each
    connection's client address (as the header told it) to its stdout."""

    def __init__(self, tmp: Path, port: int, target: int) -> None:
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(
            "global\n log stdout format raw local0\n"
            "defaults\n mode tcp\n log global\n timeout connect 5s\n timeout client 10s\n timeout server 10s\n"
            f'frontend lab\n bind 127.0.0.1:{port} accept-proxy\n log-format "visitor=%ci:%cp"\n'
            f" default_backend app\nbackend app\n server app 127.0.0.1:{target}\n"
        )
        assert HAPROXY is not None
        self.popen = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_local_service_learns_the_visitors_address(
    version: str, tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public, lab = free_port(), free_port(), free_port()
    haproxy = Haproxy(tmp_path, lab, echo.port)
    try:
        wait_until(lambda: _serves(lab), 10, "haproxy to listen")
        start_relayd(procs, tmp_path, port)
        tunnel = {"name": "app", "local_port": lab, "remote_port": public, "proxy_protocol": version}
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel]))
        c.wait_for(r"tunnel app: relayd port")
        with socket.create_connection(("127.0.0.1", public), timeout=10, source_address=(VISITOR_IP, 0)) as s:
            visitor_port = s.getsockname()[1]
            s.sendall(b"hello through the tunnel")
            got = b""
            while len(got) < 24:
                chunk = s.recv(4096)
                assert chunk, "the connection closed before the echo came back"
                got += chunk
        assert got == b"hello through the tunnel"  # the header was taken off by haproxy, not echoed
        expected = f"visitor={VISITOR_IP}:{visitor_port}"
        wait_until(lambda: any(expected in line for line in haproxy.lines), 10,
                   lambda: f"haproxy to log {expected!r} (it logged {haproxy.lines[-3:]!r})")  # fmt: skip
    finally:
        haproxy.stop()


def _serves(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
