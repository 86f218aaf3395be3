"""Groups end to end: two lab clients serve one public port (and one domain) with the same group
and group_key; visitors are spread over both; a member whose health check fails is taken out and
put back when it recovers; when a member's relayc is killed, visitors keep being served."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, spawn, vhost_get
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import Api, start_relayd
from tests.waiting import wait_until

GROUP = {"group": "web", "group_key": "members-share-this-key"}


def identity(name: bytes) -> Callable[[socket.socket], None]:
    """A service that says which lab machine it is, as a TCP line or an HTTP answer."""

    def handle(conn: socket.socket) -> None:
        first = conn.recv(4096)
        if first.startswith(b"GET "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(name), name))
        else:
            conn.sendall(name)
        conn.shutdown(socket.SHUT_WR)

    return handle


def who(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello\n")
        out = b""
        while chunk := s.recv(64):
            out += chunk
        return out


def answers(port: int, n: int) -> list[bytes]:
    return [who(port) for _ in range(n)]


def test_a_group_spreads_visitors_and_survives_a_member(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash, public = free_port(), free_port(), free_port()
    a, b = TcpServer(identity(b"A")), TcpServer(identity(b"B"))
    try:
        d = start_relayd(procs, tmp_path, port, dash)
        probe = {"health_check": "tcp", "health_check_interval": 1, "health_check_timeout": 1,
                 "health_check_max_failures": 1}  # fmt: skip
        members = {}
        for name, server in (("lab-a", a), ("lab-b", b)):
            tunnel = {"name": "web", "local_port": server.port, "remote_port": public, **GROUP, **probe}
            members[name] = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel], name=name,
                                                                          filename=f"{name}.toml"))  # fmt: skip
            members[name].wait_for(rf"tunnel web: relayd port {public}")
        # a third client with the group's name but not its key is refused, and serves nothing
        intruder = dict(GROUP, group_key="a-guess-at-the-group-key")
        tunnel = {"name": "web", "local_port": a.port, "remote_port": public, **intruder}
        refused = rf"tunnel web refused by relayd: port {public} is served by group 'web': group 'web' has another"
        spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel], name="intruder",
                                                       filename="intruder.toml")).wait_for(refused)  # fmt: skip
        # round robin: both members serve, in turn
        got = answers(public, 6)
        assert sorted(set(got)) == [b"A", b"B"] and got.count(b"A") == 3, got
        api = Api(dash)
        wait_until(lambda: tunnel_item(api, "lab-b", "web").get("health") == "up", 10, "lab-b's check to pass")
        # lab-b's service goes down: its health check takes it out, then puts it back
        b_port = b.port
        b.close()
        wait_until(lambda: tunnel_item(api, "lab-b", "web").get("state") == "service down", 15,
                   "lab-b to be shown as service down")  # fmt: skip
        assert answers(public, 4) == [b"A"] * 4
        metrics = api.call("GET", "/metrics")[1]
        assert 'relay_tunnel_info{client="lab-b",tunnel="web",type="tcp",group="web"} 0' in metrics
        assert 'relay_tunnel_info{client="lab-a",tunnel="web",type="tcp",group="web"} 1' in metrics
        b = TcpServer(identity(b"B"), port=b_port)
        wait_until(lambda: tunnel_item(api, "lab-b", "web").get("state") == "active", 15, "lab-b to be back")
        assert sorted(set(answers(public, 4))) == [b"A", b"B"]
        # lab-a (which holds the listener: it came first) is killed: visitors keep being served
        members["lab-a"].stop(signal.SIGKILL)
        wait_until(lambda: answers(public, 4) == [b"B"] * 4, 30, "lab-b alone to serve every visitor")
        d.wait_for(r"client lab-a \(.*\) disconnected")
        assert answers(public, 3) == [b"B"] * 3
        assert "Traceback" not in d.output and "internal error" not in d.output
    finally:
        a.close()
        b.close()


def test_a_group_serves_one_domain(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash, http = free_port(), free_port(), free_port()
    a, b = TcpServer(identity(b"A")), TcpServer(identity(b"B"))
    try:
        start_relayd(procs, tmp_path, port, dash, vhost_http_port=http, subdomain_host="relay.test")
        for name, server in (("lab-a", a), ("lab-b", b)):
            tunnel = {"name": "app", "type": "http", "local_port": server.port, "subdomain": "app", **GROUP}
            member = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel], name=name,
                                                                   filename=f"{name}.toml"))  # fmt: skip
            member.wait_for(r"tunnel app: http://")
        got = [vhost_get(http, "app.relay.test") for _ in range(4)]
        assert {status for status, _ in got} == {200} and sorted({body for _, body in got}) == [b"A", b"B"], got
        # outside the group, the domain is still the first client's
        tunnel = {"name": "app", "type": "http", "local_port": a.port, "subdomain": "app"}
        spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel], name="other",
                                                      filename="other.toml")).wait_for(
            r"tunnel app refused by relayd: domain app\.relay\.test belongs to client 'lab-a'")  # fmt: skip
    finally:
        a.close()
        b.close()
