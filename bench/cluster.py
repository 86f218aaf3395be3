"""Row 8 of the benchmark: relayd nodes of one cluster on this machine, sharing a tunnel's port.

Two setups run side by side on one throwaway PostgreSQL server (bench/postgres.py), each on a
database of its own so that they never see each other:

* "one node": one relayd with ``[store] url`` on database ``relay_one``, and one relayc;
* "two nodes": two relayd with ``[store] url`` on database ``relay_two`` (control ports of their
  own, the same ``proxy_bind_addr`` 127.0.0.1), and one relayc told of node A only, which learns
  node B from A's login answer and keeps a session to each.

In both, relayc's tcp tunnel ``http`` (to the bench's HTTP target) has a fixed ``remote_port``; with
``[store] url`` set relayd listens with SO_REUSEPORT, so in the two-node setup both nodes listen on
that port and the kernel spreads wrk's connections over them (by a hash of the 4-tuple: per
connection, not per request).  The one-node setup runs the same code (PostgreSQL store, cluster
heartbeats, SO_REUSEPORT on a port only it listens on): the node count is the only difference.

Each node has a dashboard (a random password) so its ``/api/v1/tunnels`` counters (bytes and
connections per tunnel, node-local in memory) tell how much of the traffic it carried.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.postgres import Postgres
from bench.postgres import available as postgres_available
from bench.ssh_reverse import wait_port

CLIENT = "bench"  # relayc's name
TUNNEL = "http"  # its tcp tunnel to the HTTP target
Spawn = Callable[[list[str], str], "subprocess.Popen[bytes]"]


def available() -> str | None:
    """None if row 8 can run here, else why not (naming the package to install)."""
    why = postgres_available()
    if why:
        return why
    try:
        import asyncpg  # noqa: F401 - relayd's PostgreSQL store needs it
    except ImportError:
        return "asyncpg not installed (pip install asyncpg; relayd's PostgreSQL store)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_command(name: str, module: str) -> list[str]:
    """This Python's own ``name`` script (a venv's, even when it is not activated; never another
    install's from PATH), else ``python -m module``."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", module]


@dataclass
class Node:
    name: str  # "A", "B"
    directory: Path
    control: int = field(default_factory=_free_port)
    dash: int = field(default_factory=_free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    proc: subprocess.Popen[bytes] | None = None

    def api(self, path: str) -> Any:
        """GET ``path`` on this node's dashboard (HTTP Basic), the JSON answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.dash, timeout=10)
        auth = base64.b64encode(f"admin:{self.password}".encode()).decode()
        try:
            conn.request("GET", path, headers={"Authorization": f"Basic {auth}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"node {self.name}: GET {path} answered {resp.status} {body[:200]!r}")
        return json.loads(body)

    def counters(self) -> tuple[int, int, int] | None:
        """(bytes_in, bytes_out, conns_total) of the tunnel on this node, None while it is not active here."""
        for item in self.api("/api/v1/tunnels"):
            if item["client"] == CLIENT and item["name"] == TUNNEL and item["state"] == "active":
                return int(item["bytes_in"]), int(item["bytes_out"]), int(item["conns_total"])
        return None


@dataclass
class Setup:
    """One cluster (``nodes`` on one database) and the relayc holding a session to each node."""

    name: str
    nodes: list[Node]
    public: int  # the tunnel's remote_port, on 127.0.0.1 (every node listens on it)
    relayc: subprocess.Popen[bytes] | None = None

    @property
    def pids(self) -> list[int]:
        """The relayd nodes' pids, then relayc's."""
        return [n.proc.pid for n in self.nodes if n.proc] + ([self.relayc.pid] if self.relayc else [])

    def counters(self) -> list[tuple[int, int, int]]:
        """Each node's counters of the tunnel (RuntimeError if a node does not have it active)."""
        out = []
        for node in self.nodes:
            got = node.counters()
            if got is None:
                raise RuntimeError(f"{self.name}: node {node.name} does not have the tunnel {TUNNEL!r} active")
            out.append(got)
        return out


def _get(port: int) -> None:
    """One request to the HTTP target through ``port``; RuntimeError unless its 'ok' comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"127.0.0.1:{port} answered {answer!r}, not the target's 'ok'")
            answer += chunk


class Cluster:
    """The PostgreSQL server and both setups; a context manager that stops all it started."""

    def __init__(self, tmp: Path, spawn: Spawn, token: str, target: int) -> None:
        """``tmp``: the bench's directory, where ``spawn`` puts each process's log (``cluster/...``)."""
        self.tmp = tmp
        self.directory = directory = tmp / "cluster"
        self.spawn = spawn
        self.token = token
        self.target = target  # the HTTP target's port
        self.pg = Postgres(["relay_one", "relay_two"])
        self.setups = [
            Setup("one node", [Node("A", directory / "one-A")], _free_port()),
            Setup("two nodes", [Node("A", directory / "two-A"), Node("B", directory / "two-B")], _free_port()),
        ]
        self._procs: list[subprocess.Popen[bytes]] = []

    def setup(self, name: str) -> Setup:
        return next(s for s in self.setups if s.name == name)

    def __enter__(self) -> Cluster:
        try:
            self.pg.start()
            for setup, database in zip(self.setups, ("relay_one", "relay_two"), strict=True):
                self._start(setup, self.pg.url(database))
            for setup in self.setups:
                self._wait_ready(setup)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        """SIGTERM relayc and the nodes we started (by pid), wait for them, then stop PostgreSQL."""
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.pg.stop()

    def _log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / name).read_text(errors="replace")[-2000:]
        return ""

    def _start(self, setup: Setup, url: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = setup.name.replace(" ", "-")
        for node in setup.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            cfg = node.directory / "relayd.toml"
            cfg.write_text(
                f'bind_addr = "127.0.0.1"\nbind_port = {node.control}\nproxy_bind_addr = "127.0.0.1"\n'
                f'state_dir = "{node.directory / "state"}"\n[auth]\ntoken = "{self.token}"\n'
                f'[store]\nurl = "{url}"\n'
                f'[dashboard]\naddr = "127.0.0.1"\nport = {node.dash}\npassword = "{node.password}"\n'
            )
            log = f"cluster/{tag}-{node.name}.log"
            node.proc = self.spawn([*relay_command("relayd", "relay_server.cli"), "-c", str(cfg), "--log-level",
                                    "warning"], log)  # fmt: skip
            self._procs.append(node.proc)
            try:
                wait_port(node.control, 30)
                wait_port(node.dash, 30)
            except RuntimeError as e:
                raise RuntimeError(f"{setup.name}: relayd {node.name} did not start: {e}\n{self._log(log)}") from e
        cfg = self.directory / f"{tag}-relayc.toml"
        cfg.write_text(  # told of node A only: it learns the others from A's login answer
            f'server_addr = "127.0.0.1"\nserver_port = {setup.nodes[0].control}\nname = "{CLIENT}"\n'
            f'[auth]\ntoken = "{self.token}"\n'
            f'[[tunnels]]\nname = "{TUNNEL}"\nlocal_port = {self.target}\nremote_port = {setup.public}\n'
        )
        setup.relayc = self.spawn([*relay_command("relayc", "relay_client.cli"), "-c", str(cfg), "--log-level",
                                   "warning"], f"cluster/{tag}-relayc.log")  # fmt: skip
        self._procs.append(setup.relayc)

    def _wait_ready(self, setup: Setup, timeout: float = 60.0) -> None:
        """Every node has the tunnel active (relayc holds a session to each), and every node has
        carried a visitor through the shared port (up to 400 tries)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                listed = [n.counters() is not None and len(n.api("/api/v1/nodes")) == len(setup.nodes)
                          for n in setup.nodes]  # fmt: skip
            except (OSError, RuntimeError, ValueError):
                listed = [False]
            if all(listed):
                break
            if time.monotonic() > deadline:
                logs = "\n".join(self._log(f"cluster/{setup.name.replace(' ', '-')}-{w}.log")
                                 for w in [n.name for n in setup.nodes] + ["relayc"])  # fmt: skip
                raise RuntimeError(f"{setup.name}: the tunnel not active on every node after {timeout:g} s\n{logs}")
            time.sleep(0.2)
        before = setup.counters()
        for _ in range(400):
            _get(setup.public)
            now = setup.counters()
            if all(a[2] > b[2] for a, b in zip(now, before, strict=True)):
                return
        landed = [a[2] - b[2] for a, b in zip(now, before, strict=True)]
        raise RuntimeError(f"{setup.name}: 400 connections to 127.0.0.1:{setup.public} did not reach every node "
                           f"(connections per node: {landed})")  # fmt: skip
