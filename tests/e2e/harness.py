"""Start real relayd/relayc processes and small target servers on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-0123456789abcdef"


def free_port() -> int:
    """A port that was free a moment ago (bound with port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_fixed_port() -> int:
    """A port free a moment ago and outside the kernel's ephemeral range.

    Use it for a port that must stay free while many other sockets are opened: neither an
    outgoing connection's source port nor another listener bound to port 0 can take it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free port below the ephemeral range after 200 tries")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for name, table in tables:
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, items in arrays:
        for item in items:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A relayd or relayc process whose stderr is collected line by line."""

    def __init__(self, module: str, config: Path, *extra: str) -> None:
        self.module = module
        self.config = config
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, "-c", str(config), "--log-level", "debug", *extra],
            cwd=str(config.parent),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """Wait until a log line (from index ``start``) matches ``pattern``; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.module}: no line matching {pattern!r}; output:\n{self.output}")
                self._cond.wait(min(left, 0.2))

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        return int(self.popen.returncode)


def spawn(procs: list[Proc], module: str, config: Path) -> Proc:
    """Start ``python -m module -c config`` and register it for cleanup in ``procs``."""
    p = Proc(module, config)
    procs.append(p)
    return p


def start_relayd(procs: list[Proc], tmp: Path, port: int, **overrides: Any) -> Proc:
    """relayd on ``port`` (config keys overridden by ``overrides``), waited for until it listens."""
    p = spawn(procs, "relay_server.cli", relayd_config(tmp, port, **overrides))
    p.wait_for(r"listening for relayc")
    return p


def start_tunnel(
    procs: list[Proc], tmp: Path, port: int, name: str, local_port: int, public: int = 0, **overrides: Any
) -> Proc:
    """relayc with one tcp tunnel, waited for until relayd has opened its port."""
    tunnel = {"name": name, "local_port": local_port, "remote_port": public}
    c = spawn(procs, "relay_client.cli", relayc_config(tmp, port, [tunnel], **overrides))
    c.wait_for(rf"tunnel {name}: relayd port")
    return c


def relayd_config(tmp: Path, port: int, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "bind_addr": "127.0.0.1",
        "bind_port": port,
        "state_dir": "state",
        "allow_ports": "1024-65535",
        "keepalive_timeout": 6,
        "auth": {"token": TOKEN},
    }
    data.update(overrides)
    return write_toml(tmp / "relayd.toml", data)


def relayc_config(
    tmp: Path, port: int, tunnels: list[dict[str, Any]], filename: str = "relayc.toml", **overrides: Any
) -> Path:
    data: dict[str, Any] = {
        "server_addr": "127.0.0.1",
        "server_port": port,
        "name": "lab",
        "keepalive_timeout": 6,
        "auth": {"token": TOKEN},
    }
    data.update(overrides)
    if tunnels:
        data["tunnels"] = tunnels
    return write_toml(tmp / filename, data)


class TcpServer:
    """A threaded TCP server on 127.0.0.1 running ``handler(conn)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # listen again on a port just closed
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.handler = handler
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not stop listening
        except OSError:
            pass
        self.sock.close()


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(1 << 18)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    """True when the other end closes ``s`` (FIN or reset) without sending a byte; a connection
    left hanging raises TimeoutError, so the calling test fails."""
    try:
        return recv_all(s, timeout=timeout) == b""
    except ConnectionResetError:
        return True


def port_refuses(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def wait_port_serves(port: int, timeout: float = 15.0, probe: bytes = b"ping") -> float:
    """Wait until a connection to ``port`` echoes ``probe``; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(probe)
                s.shutdown(socket.SHUT_WR)
                if recv_all(s, timeout=3) == probe:
                    return time.monotonic() - start
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"port {port} did not serve within {timeout} s (last error: {last})")


def round_trip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:``port`` and read the answer up to its length or to EOF,
    whichever comes first (for paths with a TLS hop, which cannot carry a half-close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        return bytes(got)


def recv_all(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while True:
        data = s.recv(1 << 20)
        if not data:
            return bytes(out)
        out += data


def vhost_get(port: int, host: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
