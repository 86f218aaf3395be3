"""Editing dashboard tunnels live (``PATCH /api/v1/tunnels/{client}/{name}``) and the recent
visitor connections of a tunnel (``GET .../connections``), against real relayd and relayc
processes on 127.0.0.1.

One relayd (dashboard, HTTP vhost port) and one relayc for the module: the relayc runs on the
relayc.toml the dashboard made for client ``lab``, plus one tunnel of its own (``fromfile``), so
both kinds of tunnel, dashboard and relayc.toml, are there to edit.
"""

from __future__ import annotations

import base64
import errno
import http.client
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e.harness import Proc, TcpServer, closed_by_peer, echo_handler, free_port, recv_all, relayc_config
from tests.e2e.test_dashboard import Api, relayc_from, start_relayd
from tests.waiting import wait_until

SUBDOMAIN_HOST = "relay.test"


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        body = f"app at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _named_server(name: bytes) -> TcpServer:
    """A TCP server that sends ``name`` and then echoes: a visitor can tell which one it reached."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(name)
        echo_handler(conn)

    return TcpServer(handler)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("edit")
    procs: list[Proc] = []
    app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    echo = TcpServer(echo_handler)
    one, two = _named_server(b"one:"), _named_server(b"two:")
    port, dash, http_port = free_port(), free_port(), free_port()
    try:
        d = start_relayd(procs, tmp, port, dash, vhost_http_port=http_port, subdomain_host=SUBDOMAIN_HOST)
        api = Api(dash)
        status, created, _ = api.call("POST", "/api/v1/clients", {"name": "lab"})
        assert status == 201
        own = f'\n[[tunnels]]\nname = "fromfile"\nlocal_port = {echo.port}\nremote_port = 0\n'
        c = relayc_from(procs, tmp, created["relayc_toml"] + own, "lab.toml")
        c.wait_for(r"tunnel fromfile: relayd port \d+")
        yield {"api": api, "relayd": d, "relayc": c, "tmp": tmp, "port": port, "http_port": http_port,
               "app_port": int(app.server_address[1]), "echo": echo, "one": one, "two": two}  # fmt: skip
    finally:
        for p in procs:
            p.stop()
        for server in (echo, one, two):
            server.close()
        app.shutdown()
        app.server_close()


def _item(api: Api, client: str, name: str) -> dict[str, Any]:
    status, items, _ = api.call("GET", "/api/v1/tunnels")
    assert status == 200
    return next(t for t in items if t["client"] == client and t["name"] == name)


def _define(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    status, item, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", **body})
    assert status == 201, item
    wait_until(lambda: _item(api, "lab", body["name"])["state"] == "active", 10,
               lambda: f"tunnel {body['name']} active: {_item(api, 'lab', body['name'])}")  # fmt: skip
    return _item(api, "lab", body["name"])


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _get(port: int, path: str, headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> int:  # fmt: skip
    """The status of ``GET path`` for web.relay.test on the vhost port (on ``conn`` if given)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"web.{SUBDOMAIN_HOST}", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        if own:
            conn.close()


def _reached(port: int, payload: bytes = b"ping") -> bytes:
    """Connect to the tunnel's public port, send ``payload``, half-close, read all (b"": the
    visitor was turned away, closed or reset)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s, timeout=10)
    except OSError as exc:  # reset before the shutdown (ENOTCONN), the send or the read
        if isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN:
            return b""
        raise


def _fields(api: Api, client: str, name: str, body: Any) -> tuple[int, Any]:
    status, answer, _ = api.call("PATCH", f"/api/v1/tunnels/{client}/{name}", body)
    return status, answer


def _named(answer: Any) -> str:
    """The key a 422 names."""
    return str(answer["detail"][0]["loc"][-1])


def test_edit_http_password_and_locations_live(world: dict[str, Any]) -> None:
    api, port = world["api"], world["http_port"]
    _define(api, {"name": "web", "type": "http", "local_port": world["app_port"], "subdomain": "web",
                  "locations": ["/a"], "http_user": "ann", "http_password": "old-secret"})  # fmt: skip
    wait_until(lambda: _get(port, "/a/x", _basic("ann", "old-secret")) == 200, 10, "the http tunnel serving /a")
    assert _get(port, "/a/x") == 401
    assert _get(port, "/b/x", _basic("ann", "old-secret")) == 404
    keep = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a visitor connected across the edit
    assert _get(port, "/a/x", _basic("ann", "old-secret"), conn=keep) == 200

    # a new password: applied where the tunnel stands; a connection let in with the old one is cut
    # (a leaked password is changed to cut off its holder, an upgraded WebSocket included)
    assert keep.sock is not None
    kept = keep.sock
    status, item = _fields(api, "lab", "web", {"http_password": "new-secret"})
    assert status == 200 and "http_password" not in item and item["http_user"] == "ann"
    wait_until(lambda: _get(port, "/a/x", _basic("ann", "new-secret")) == 200, 10, "the new password accepted")
    assert _get(port, "/a/x", _basic("ann", "old-secret")) == 401
    assert closed_by_peer(kept, timeout=10)
    keep.close()

    # new locations (the routes change: the tunnel is opened again where it now belongs)
    status, item = _fields(api, "lab", "web", {"locations": ["/b"]})
    assert status == 200 and item["locations"] == ["/b"] and "http_password" not in item
    wait_until(lambda: _get(port, "/b/x", _basic("ann", "new-secret")) == 200, 10, "the tunnel serving /b")
    assert _get(port, "/b/x") == 401
    assert _get(port, "/b/x", _basic("ann", "old-secret")) == 401
    assert _get(port, "/a/x", _basic("ann", "new-secret")) == 404

    # a new user without the password: the password is kept (write-only, never shown)
    status, item = _fields(api, "lab", "web", {"http_user": "bob"})
    assert status == 200 and item["http_user"] == "bob" and "http_password" not in item
    wait_until(lambda: _get(port, "/b/x", _basic("bob", "new-secret")) == 200, 10, "user bob with the kept password")
    assert _get(port, "/b/x", _basic("ann", "new-secret")) == 401
    assert "http_password" not in _item(api, "lab", "web")

    # one entry per visitor TCP connection, however many requests it carries
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert _get(port, "/b/1", _basic("bob", "new-secret"), conn=conn) == 200
    assert _get(port, "/b/2", _basic("bob", "new-secret"), conn=conn) == 200
    assert conn.sock is not None
    addr = _local(conn.sock)
    conn.close()

    def entries() -> list[dict[str, Any]]:
        return [e for e in api.call("GET", "/api/v1/tunnels/lab/web/connections")[1] if e["addr"] == addr]

    wait_until(lambda: [e["closed"] for e in entries()] != [None] and entries(), 10, "the http visitor's entry closed")
    (entry,) = entries()
    assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0


def test_edit_tcp_local_port_live(world: dict[str, Any]) -> None:
    api, one, two = world["api"], world["one"], world["two"]
    item = _define(api, {"name": "svc", "type": "tcp", "local_port": one.port, "remote_port": 0})
    public = item["remote_port"]
    assert _reached(public) == b"one:ping"
    before = socket.create_connection(("127.0.0.1", public), timeout=10)  # connected to one across the edit
    assert recv_all_n(before, 4) == b"one:"

    status, item = _fields(api, "lab", "svc", {"local_port": two.port})
    assert status == 200 and item["local_port"] == two.port and item["remote_port"] == public
    wait_until(lambda: _reached(public) == b"two:ping", 10, "a new visitor reaching the second server")
    assert _item(api, "lab", "svc")["remote_port"] == public  # remote_port = 0: the port chosen stays
    before.sendall(b"still")  # the visitor connected before the edit carries on with the first server
    assert recv_all_n(before, 5) == b"still"
    before.close()
    assert _fields(api, "lab", "svc", {"local_port": one.port, "enabled": False})[0] == 200
    wait_until(lambda: _item(api, "lab", "svc")["state"] == "disabled", 10, "svc disabled")
    assert _fields(api, "lab", "svc", {"enabled": True})[0] == 200
    wait_until(lambda: _item(api, "lab", "svc")["state"] == "active", 10, "svc enabled again")
    public = _item(api, "lab", "svc")["remote_port"]
    assert _reached(public) == b"one:ping"

    # allow_sources without 127.0.0.1: new visitors are turned away, and the one connected is reset
    inside = socket.create_connection(("127.0.0.1", public), timeout=10)
    assert recv_all_n(inside, 4) == b"one:"
    status, item = _fields(api, "lab", "svc", {"allow_sources": ["10.0.0.0/8"]})
    assert status == 200 and item["allow_sources"] == ["10.0.0.0/8"]
    assert closed_by_peer(inside, timeout=10)
    inside.close()
    wait_until(lambda: _reached(public) == b"", 10, "new visitors from 127.0.0.1 turned away")
    assert _fields(api, "lab", "svc", {"allow_sources": ["127.0.0.0/8"]})[0] == 200
    wait_until(lambda: _reached(public) == b"one:ping", 10, "127.0.0.1 allowed again")


def _local(s: socket.socket) -> str:
    """``ip:port`` of our end of ``s``: the visitor address relayd lists."""
    host, port = s.getsockname()[:2]
    return f"{host}:{port}"


def recv_all_n(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_edit_refusals(world: dict[str, Any]) -> None:
    api, echo = world["api"], world["echo"]
    item = _define(api, {"name": "strict", "type": "tcp", "local_port": echo.port, "remote_port": 0})
    other = _define(api, {"name": "taken", "type": "tcp", "local_port": echo.port, "remote_port": 0})
    # a relayc.toml tunnel is read-only here; enabled alone is 404 there, as it always was
    status, answer = _fields(api, "lab", "fromfile", {"local_port": 1234})
    assert status == 409 and "relayc.toml" in answer["detail"] and "read-only" in answer["detail"]
    assert _fields(api, "lab", "fromfile", {"enabled": False})[0] == 404
    # what cannot change, unknown keys, bad values: 422 naming the key
    for body, key in (({"name": "renamed"}, "name"), ({"type": "udp"}, "type"), ({"client": "elsewhere"}, "client")):
        status, answer = _fields(api, "lab", "strict", body)
        assert status == 422 and _named(answer) == key and "cannot be changed" in answer["detail"][0]["msg"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"colour": "red"}, "colour"), ({"local_port": 70000}, "local_port"),
        ({"allow_sources": ["not-a-cidr"]}, "allow_sources"), ({"http_user": "u"}, "http_user"),
        ({"bandwidth_limit": "fast"}, "bandwidth_limit"), ({"enabled": "maybe"}, "enabled"),
    ]  # fmt: skip
    for body, key in bad:
        status, answer = _fields(api, "lab", "strict", body)
        assert status == 422 and _named(answer) == key, (body, answer)
    assert _fields(api, "lab", "strict", [1, 2])[0] == 422
    # the same name and type are not a change; another tunnel's port is a conflict naming it
    assert _fields(api, "lab", "strict", {"name": "strict", "type": "tcp", "max_connections": 5})[0] == 200
    status, answer = _fields(api, "lab", "strict", {"remote_port": other["remote_port"]})
    assert status == 409 and "taken" in answer["detail"]
    # unknown tunnels
    assert _fields(api, "lab", "nope", {"local_port": 1})[0] == 404
    assert _fields(api, "ghost", "strict", {"local_port": 1})[0] == 404
    item = _item(api, "lab", "strict")
    assert item["max_connections"] == 5 and item["local_port"] == echo.port and item["state"] == "active"


def test_recent_connections(world: dict[str, Any]) -> None:
    api, echo = world["api"], world["echo"]
    public = _define(api, {"name": "conns", "type": "tcp", "local_port": echo.port, "remote_port": 0})["remote_port"]
    path = "/api/v1/tunnels/lab/conns/connections"
    assert api.call("GET", path)[:2] == (200, [])

    def listed() -> list[dict[str, Any]]:
        status, body, _ = api.call("GET", path)
        assert status == 200
        return list(body)

    addrs = []
    for n in (100, 2000, 30000):
        s = socket.create_connection(("127.0.0.1", public), timeout=10)
        addrs.append(_local(s))
        s.sendall(b"x" * n)
        assert recv_all_n(s, n) == b"x" * n
        # open: listed, newest first, closed null
        wait_until(lambda: listed() and listed()[0]["addr"] == addrs[-1], 10, f"connection {addrs[-1]} listed")
        first = listed()[0]
        assert first["closed"] is None and isinstance(first["opened"], float)
        s.close()
    wait_until(lambda: all(e["closed"] is not None for e in listed()), 10, lambda: f"all closed: {listed()}")
    entries = listed()
    assert [e["addr"] for e in entries] == addrs[::-1]
    for entry, n in zip(entries, (30000, 2000, 100), strict=True):
        assert set(entry) == {"addr", "opened", "closed", "bytes_in", "bytes_out"}
        assert entry["bytes_in"] == n and entry["bytes_out"] == n
        assert entry["opened"] <= entry["closed"]
    assert entries[0]["opened"] >= entries[1]["opened"] >= entries[2]["opened"]

    # 98 more: the 101st connection pushes the oldest out; at most 100 are kept
    for _ in range(98):
        with socket.create_connection(("127.0.0.1", public), timeout=10) as s:
            addrs.append(_local(s))
            s.sendall(b"y")
            assert recv_all_n(s, 1) == b"y"
    wait_until(lambda: listed()[0]["addr"] == addrs[-1] and all(e["closed"] for e in listed()), 10,
               "the 101st connection listed, all closed")  # fmt: skip
    entries = listed()
    assert len(entries) == 100
    assert [e["addr"] for e in entries] == addrs[1:][::-1]
    assert _item(api, "lab", "conns")["conns_total"] == 101

    # unknown tunnels; a tunnel of a relayc.toml has its list too
    assert api.call("GET", "/api/v1/tunnels/lab/nope/connections")[0] == 404
    assert api.call("GET", "/api/v1/tunnels/ghost/conns/connections")[0] == 404
    assert api.call("GET", "/api/v1/tunnels/lab/fromfile/connections")[0] == 200


def test_recent_connections_of_udp_flows(world: dict[str, Any]) -> None:
    api = world["api"]
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))

    def echo_datagrams() -> None:
        while True:
            try:
                data, addr = server.recvfrom(65536)
                server.sendto(data, addr)
            except OSError:
                return

    threading.Thread(target=echo_datagrams, daemon=True).start()
    try:
        body = {"name": "flows", "type": "udp", "local_port": server.getsockname()[1], "remote_port": 0,
                "udp_idle_timeout": 1}  # fmt: skip
        public = _define(api, body)["remote_port"]
        visitors = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for n, visitor in zip((10, 300), visitors, strict=True):
            visitor.settimeout(10)
            visitor.connect(("127.0.0.1", public))
            for _ in range(2):  # one flow per visitor address, however many datagrams
                visitor.send(b"d" * n)
                assert visitor.recv(65536) == b"d" * n
        addrs = [_local(v) for v in visitors]

        def listed() -> list[dict[str, Any]]:
            return list(api.call("GET", "/api/v1/tunnels/lab/flows/connections")[1])

        # a flow ends after udp_idle_timeout without a datagram
        wait_until(lambda: len(listed()) == 2 and all(e["closed"] for e in listed()), 15,
                   lambda: f"both flows listed and ended: {listed()}")  # fmt: skip
        entries = listed()
        assert [e["addr"] for e in entries] == addrs[::-1]
        assert [(e["bytes_in"], e["bytes_out"]) for e in entries] == [(600, 600), (20, 20)]
        for visitor in visitors:
            visitor.close()
    finally:
        server.close()


def test_recent_connections_of_secret_visits(world: dict[str, Any]) -> None:
    api, tmp = world["api"], world["tmp"]
    key = "a-visitor-key-0123456789"
    _define(api, {"name": "hidden", "type": "secret", "local_port": world["echo"].port, "secret_key": key})
    visitor = {"client": "lab", "tunnel": "hidden", "secret_key": key, "bind_port": free_port()}
    cfg = relayc_config(tmp, world["port"], [], filename="laptop.toml", name="laptop", visitors=[visitor])
    data = b"v" * 5000
    done = subprocess.run([sys.executable, "-m", "relay_client.cli", "connect", "-c", str(cfg), "lab/hidden"],
                          input=data, capture_output=True, timeout=60, cwd=tmp)  # fmt: skip
    assert done.returncode == 0 and done.stdout == data, done.stderr[-2000:]

    def listed() -> list[dict[str, Any]]:
        return list(api.call("GET", "/api/v1/tunnels/lab/hidden/connections")[1])

    wait_until(lambda: len(listed()) == 1 and listed()[0]["closed"], 10, lambda: f"the visit listed, ended: {listed()}")
    (entry,) = listed()
    assert entry["addr"] == "laptop@127.0.0.1"  # a visit: the visiting client and its address
    assert entry["bytes_in"] == entry["bytes_out"] == len(data)


def test_an_edit_relayc_refuses_is_shown_as_not_applied(world: dict[str, Any]) -> None:
    """An edit relayc refuses (a target outside its allow_targets) leaves the old definition
    serving; the API and the dashboard say the edit is not applied, and why."""
    api, one = world["api"], world["one"]
    item = _define(api, {"name": "moved", "type": "tcp", "local_port": one.port, "remote_port": 0})
    public = item["remote_port"]
    assert item["pending_edit"] is False and item["edit_error"] is None
    status, _ = _fields(api, "lab", "moved", {"local_ip": "10.1.2.3"})
    assert status == 200
    wait_until(lambda: _item(api, "lab", "moved")["edit_error"] is not None, 10, "relayc's refusal of the edit")
    item = _item(api, "lab", "moved")
    assert item["pending_edit"] is True and "allow_targets" in item["edit_error"], item
    assert item["local_ip"] == "10.1.2.3" and item["state"] == "active"  # the definition; the old one serves
    assert _reached(public) == b"one:ping"
    status, _ = _fields(api, "lab", "moved", {"local_ip": "127.0.0.1", "local_port": world["two"].port})
    assert status == 200
    wait_until(lambda: _reached(public) == b"two:ping", 10, "the next edit applied")
    item = _item(api, "lab", "moved")
    assert item["pending_edit"] is False and item["edit_error"] is None
