"""Several relayd nodes on one PostgreSQL database (Debian's package, a throwaway server): three
nodes on 127.0.0.1 (control ports of their own, public tunnel ports on 127.0.0.1, 127.0.0.2 and
127.0.0.3), one relayc configured with node A only that learns B and C from A's member list.

Proves: a tunnel added on A's API is reachable through B and C (the delays are printed for the
closing note); kill -9 of A under a steady load through B and C fails no connection there, and A
restarted rejoins; PostgreSQL stopped for 10 s drops no running tunnel, a dashboard change then is
refused clearly (503), and one after it works."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.messages import LoginFailed
from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    free_port,
    relayc_config,
    relayd_config,
    round_trip,
    spawn,
    vhost_get,
)
from tests.e2e.postgres import Postgres, available
from tests.e2e.rawclient import RawClient
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import PASSWORD, Api
from tests.waiting import wait_until

try:
    import asyncpg
except ImportError:  # pragma: no cover - a dependency of the project
    asyncpg = None

MISSING = available() or (None if asyncpg is not None else "asyncpg not installed (pip install asyncpg)")
if MISSING is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must install PostgreSQL (apt-get install postgresql) for the cluster tests: {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class Node:
    def __init__(self, tmp: Path, name: str, url: str, public: str, procs: list[Proc]) -> None:
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.port, self.dash = free_port(), free_port()
        self.public = public  # proxy_bind_addr: where its tunnel ports listen
        self.url = url
        self.procs = procs
        self.proc: Proc | None = None
        self.api = Api(self.dash)
        self.http = 0  # vhost_http_port, when the test sets one

    def start(self) -> Proc:
        cfg = relayd_config(self.dir, self.port, proxy_bind_addr=self.public, store={"url": self.url},
                            dashboard={"port": self.dash, "password": PASSWORD},
                            auth={"token": TOKEN, "block_after_failures": 3})  # fmt: skip
        self.proc = spawn(self.procs, "relay_server.cli", cfg)
        self.proc.wait_for(r"dashboard on http://127\.0\.0\.1")
        return self.proc


def reaches(addr: str, port: int, payload: bytes = b"ping") -> bool:
    try:
        with socket.create_connection((addr, port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(64) == payload
    except OSError:
        return False


def echo_through(addr: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((addr, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


class Load:
    """Steady round trips through some nodes' public ports, counting failures per address."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self.ok: dict[str, int] = {a: 0 for a, _ in targets}
        self.failed: dict[str, list[str]] = {a: [] for a, _ in targets}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in targets]

    def _run(self, target: tuple[str, int]) -> None:
        addr, port = target
        payload = os.urandom(2048)
        for _ in range(100_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            try:
                if echo_through(addr, port, payload) != payload:
                    self.failed[addr].append("wrong bytes")
                else:
                    self.ok[addr] += 1
            except OSError as exc:
                self.failed[addr].append(str(exc))
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_three_nodes_on_one_database(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    with Postgres(tmp_path / "pg", synchronous_commit=True) as pg:
        nodes = [Node(tmp_path, f"node{i}", pg.url, ADDRS[i], procs) for i in range(3)]
        for node in nodes:
            node.start()
        a, b, c = nodes
        wait_until(lambda: "3 live nodes" in (c.proc.output if c.proc else ""), 15, "node C to see three nodes")
        # one relayc, told of node A only: it learns B and C from A's member list
        lab = spawn(procs, "relay_client.cli", relayc_config(tmp_path, a.port, [], filename="lab.toml"))
        for node in nodes:
            lab.wait_for(rf"logged in to relayd \S+ at 127\.0\.0\.1:{node.port}", timeout=20)

        # any node's dashboard shows the whole cluster: every node, healthy, with lab's session on each
        def cluster_view() -> bool:
            items = b.api.call("GET", "/api/v1/nodes")[1]
            return len(items) == 3 and all(n["clients"] == ["lab"] and n["heartbeat_age"] < 10 for n in items)

        wait_until(
            cluster_view, 15, lambda: f"node B to show three nodes with lab ({b.api.call('GET', '/api/v1/nodes')[1]})"
        )
        lab_item = next(i for i in b.api.call("GET", "/api/v1/clients")[1] if i["name"] == "lab")
        assert sorted(lab_item["nodes"]) == sorted(f"127.0.0.1:{n.port}" for n in nodes)
        # a login block made on node A holds on node C at once (cluster-wide blocks)
        for _ in range(3):
            raw = RawClient(a.port)
            answer = raw.login_answer("a-wrong-token", name="mallory")
            raw.close()
            assert isinstance(answer, LoginFailed), answer
        assert answer.code == "blocked", answer

        def blocks_on_c() -> list[Any]:
            return [b for b in c.api.call("GET", "/api/v1/blocks")[1] if b.get("value") == "mallory"]

        wait_until(blocks_on_c, 10, "node C to list mallory's block (made on node A)")
        raw = RawClient(c.port)
        answer = raw.login_answer("a-wrong-token", name="mallory")  # its first try on C: already blocked
        raw.close()
        assert isinstance(answer, LoginFailed) and answer.code == "blocked", answer
        # a tunnel added on A's API reaches the relayc's sessions on every node
        public = free_port()
        delays = []
        for i in range(5):
            port = public if i == 0 else free_port()
            t0 = time.monotonic()
            body = {"client": "lab", "name": f"echo{i}", "local_port": echo.port, "remote_port": port}
            status, answer, _ = a.api.call("POST", "/api/v1/tunnels", body)
            assert status == 201, answer
            wait_until(lambda port=port: reaches(ADDRS[1], port) and reaches(ADDRS[2], port), 10,
                       f"tunnel echo{i} to be reachable through nodes B and C")  # fmt: skip
            delays.append(time.monotonic() - t0)
        print(f"\nCLUSTER tunnel added on A reachable through B and C: median {statistics.median(delays):.3f} s, "
              f"max {max(delays):.3f} s over {len(delays)}")  # fmt: skip
        assert tunnel_item(b.api, "lab", "echo0")["state"] == "active"
        # remote_port = 0: one port, chosen once for the whole cluster
        status, answer, _ = b.api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "anyport",
                                                                   "local_port": echo.port})  # fmt: skip
        assert status == 201, answer

        def ports() -> set[int]:
            return {tunnel_item(node.api, "lab", "anyport").get("remote_port", 0) for node in nodes}

        wait_until(lambda: len(ports()) == 1 and 0 not in ports(), 10, lambda: f"one port on every node ({ports()})")
        (chosen,) = ports()
        assert all(reaches(addr, chosen) for addr in ADDRS)
        # kill -9 of node A under load through B and C: nothing fails there
        with Load([(ADDRS[1], public), (ADDRS[2], public)]) as load:
            wait_until(lambda: all(n > 5 for n in load.ok.values()), 20, "the load to run")
            assert a.proc is not None
            a.proc.stop(signal.SIGKILL)
            t_kill = time.monotonic()
            assert not reaches(ADDRS[0], public)
            wait_until(lambda: time.monotonic() - t_kill > 3 and all(n > 30 for n in load.ok.values()), 30,
                       "the load to go on after the kill")  # fmt: skip
        assert load.failed == {ADDRS[1]: [], ADDRS[2]: []}, load.failed
        # A restarted rejoins: relayc reconnects (A is in its server_addr) and A serves the tunnel again
        mark = lab.mark()
        a.start()
        lab.wait_for(rf"logged in to relayd \S+ at 127\.0\.0\.1:{a.port}", timeout=30, start=mark)
        wait_until(lambda: reaches(ADDRS[0], public), 15, "node A to serve the tunnel again")
        # PostgreSQL down for 10 s: running tunnels keep working; changes are refused clearly
        with Load([(addr, public) for addr in ADDRS]) as load:
            wait_until(lambda: all(n > 3 for n in load.ok.values()), 20, "the load to run")
            pg.stop_server()
            t_down = time.monotonic()
            status, body, _ = b.api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "during",
                                                                     "local_port": echo.port})  # fmt: skip
            assert status == 503 and "not reachable" in body["detail"] and "changes are refused" in body["detail"]
            before = dict(load.ok)
            wait_until(lambda: time.monotonic() - t_down >= 10, 15, "ten seconds of outage")
            assert all(load.ok[addr] > before[addr] for addr in ADDRS), (before, load.ok)
            pg.start_server()
        assert load.failed == {addr: [] for addr in ADDRS}, load.failed

        # after the outage a change works again, and reaches every node
        def added() -> bool:
            body = {"client": "lab", "name": "after", "local_port": echo.port, "remote_port": after}
            status, _, _ = c.api.call("POST", "/api/v1/tunnels", body)
            return status == 201

        after = free_port()
        wait_until(added, 20, "a dashboard change to be accepted once PostgreSQL is back")

        def logs() -> str:
            states = " | ".join(f"{addr}: {reaches(addr, after)}" for addr in ADDRS)
            return f"the new tunnel on every node ({states}); relayc:\n{lab.output[-3000:]}"

        wait_until(lambda: all(reaches(addr, after) for addr in ADDRS), 15, logs)
        assert round_trip(after, b"x" * 1000) == b"x" * 1000


def test_a_domain_belongs_to_one_client_on_every_node(tmp_path: Path, procs: list[Proc]) -> None:
    """Node B restarts with empty tables and bob reaches it before alice's relayc is back there:
    the database still says the domain is alice's (node A keeps it fresh), so bob is refused on B
    too, and every visitor of the domain reaches alice, whichever node it reaches."""
    alice_app, bob_app = TcpServer(lambda c: _answer(c, b"alice")), TcpServer(lambda c: _answer(c, b"bob"))
    with Postgres(tmp_path / "pg") as pg:
        nodes = []
        for i in range(2):
            node = Node(tmp_path, f"node{i}", pg.url, "127.0.0.1", procs)
            node.http = free_port()
            nodes.append(node)
        a, b = nodes

        def start(node: Node) -> Proc:
            cfg = relayd_config(node.dir, node.port, store={"url": pg.url}, vhost_http_port=node.http,
                                subdomain_host="relay.test")  # fmt: skip
            node.proc = spawn(procs, "relay_server.cli", cfg)
            node.proc.wait_for("listening for relayc")
            return node.proc

        start(a)
        start(b)
        tunnel = {"name": "app", "type": "http", "subdomain": "app"}
        alice_tunnels = [{**tunnel, "local_port": alice_app.port}]
        alice = spawn(procs, "relay_client.cli", relayc_config(tmp_path, a.port, alice_tunnels, name="alice",
                                                               filename="alice.toml"))  # fmt: skip
        alice.wait_for(rf"logged in to relayd \S+ at 127\.0\.0\.1:{b.port}", timeout=20)
        wait_until(lambda: all(vhost_get(n.http, "app.relay.test") == (200, b"alice") for n in nodes), 15,
                   "alice's app through both nodes")  # fmt: skip
        assert b.proc is not None
        b.proc.stop(signal.SIGKILL)
        mark = alice.mark()
        start(b)
        bob_tunnels = [{**tunnel, "local_port": bob_app.port}]
        bob = spawn(procs, "relay_client.cli", relayc_config(tmp_path, b.port, bob_tunnels, name="bob",
                                                             filename="bob.toml"))  # fmt: skip
        bob.wait_for(r"tunnel app refused by relayd: domain app\.relay\.test belongs to client 'alice'", timeout=20)
        alice.wait_for(rf"logged in to relayd \S+ at 127\.0\.0\.1:{b.port}", timeout=30, start=mark)
        wait_until(lambda: vhost_get(b.http, "app.relay.test") == (200, b"alice"), 15, "alice's app through B again")
        answers = {vhost_get(n.http, "app.relay.test")[1] for n in nodes for _ in range(5)}
        assert answers == {b"alice"}
    alice_app.close()
    bob_app.close()


def _answer(conn: socket.socket, body: bytes) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
