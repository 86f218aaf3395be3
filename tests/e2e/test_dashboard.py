"""The dashboard's JSON API against a real relayd (real SQLite file), and the end-to-end flows."""

from __future__ import annotations

import base64
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    Proc,
    TcpServer,
    free_port,
    port_refuses,
    relayd_config,
    wait_port_serves,
    write_toml,
)

PASSWORD = "a-long-dashboard-password"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {result!r})")
        time.sleep(interval)


class Api:
    def __init__(self, port: int, auth: str | None = "basic", token: str = "", source: str = "",
                 timeout: float = 10) -> None:  # fmt: skip
        self.port = port
        self.source = source  # a source address on the loopback (127.0.0.0/8): each is its own peer
        self.timeout = timeout
        self.headers: dict[str, str] = {}
        if auth == "basic":
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        elif auth == "bearer":
            self.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
             ) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        source = (self.source, 0) if self.source else None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout, source_address=source)
        h = {**self.headers, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        parsed: Any = json.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
        return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}


def start_relayd(procs: list[Proc], tmp: Path, port: int, dash_port: int, **kw: Any) -> Proc:
    cfg = relayd_config(tmp, port, dashboard={"addr": "127.0.0.1", "port": dash_port, "password": PASSWORD}, **kw)
    p = Proc("relay_server.cli", cfg)
    procs.append(p)
    p.wait_for(r"dashboard on http://127\.0\.0\.1")
    return p


def relayc_from(procs: list[Proc], tmp: Path, toml_text: str, filename: str) -> Proc:
    """Start relayc on the relayc.toml the dashboard made, as a user would paste it."""
    path = tmp / filename
    path.write_text(toml_text)
    p = Proc("relay_client.cli", path)
    procs.append(p)
    return p


def test_auth_is_required_everywhere(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    start_relayd(procs, tmp_path, port, dash)
    anon = Api(dash, auth=None)
    for path in ("/api/v1/clients", "/api/v1/tunnels", "/api/v1/traffic", "/api/v1/overview", "/metrics",
                 "/docs", "/openapi.json"):  # fmt: skip
        assert anon.call("GET", path)[0] == 401, path
    assert anon.call("POST", "/api/v1/clients", {"name": "x"})[0] == 401
    assert anon.call("DELETE", "/api/v1/clients/x")[0] == 401
    assert anon.call("GET", "/")[0] == 303  # pages send browsers to the login form
    wrong = Api(dash, auth=None)
    wrong.headers["Authorization"] = "Basic " + base64.b64encode(b"admin:nope").decode()
    t0 = time.monotonic()
    assert wrong.call("GET", "/api/v1/clients")[0] == 401
    assert wrong.call("GET", "/api/v1/clients")[0] == 401
    assert time.monotonic() - t0 >= 0.25  # failed logins are slowed down
    assert Api(dash, auth="bearer", token="not-the-token").call("GET", "/api/v1/clients")[0] == 401
    token = (tmp_path / "state" / "dashboard_api_token").read_text().strip()
    assert Api(dash, auth="bearer", token=token).call("GET", "/api/v1/clients")[0] == 200
    status, body, _ = Api(dash).call("GET", "/openapi.json")
    assert status == 200 and "/api/v1/tunnels" in body["paths"]
    assert Api(dash).call("GET", "/docs")[0] == 200
    status, text, _ = Api(dash).call("GET", "/metrics")
    assert status == 200 and "relay_clients_online 0" in text


def test_cookie_login_with_csrf(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    start_relayd(procs, tmp_path, port, dash)
    anon = Api(dash, auth=None)
    form = urllib.parse.urlencode({"user": "admin", "password": "wrong"}).encode()
    status, _, headers = anon.call("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and "failed" in headers["location"] and "set-cookie" not in headers
    form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD}).encode()
    status, _, headers = anon.call("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    session = {"Cookie": cookie.split(";")[0]}
    status, page, _ = anon.call("GET", "/", headers=session)
    assert status == 200
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert anon.call("GET", "/api/v1/clients", headers=session)[0] == 200
    assert anon.call("POST", "/api/v1/clients", {"name": "no-csrf"}, headers=session)[0] == 403
    status, body, _ = anon.call(
        "POST", "/api/v1/clients", {"name": "with-csrf"}, headers={**session, "X-CSRF-Token": csrf}
    )
    assert status == 201 and body["name"] == "with-csrf"


def test_every_endpoint_with_a_real_client(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, dash, public = free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, dash, allow_ports="1024-65535")
    api = Api(dash)
    # clients: create, 409 on a duplicate, 422 naming the field
    status, created, _ = api.call("POST", "/api/v1/clients", {"name": "lab"})
    assert status == 201 and created["token"] and 'name = "lab"' in created["relayc_toml"]
    assert 'server_fingerprint = "sha256:' in created["relayc_toml"]
    status, body, _ = api.call("POST", "/api/v1/clients", {"name": "lab"})
    assert status == 409 and "already exists" in body["detail"]
    status, body, _ = api.call("POST", "/api/v1/clients", {"name": "has space"})
    assert status == 422 and body["detail"][0]["loc"][-1] == "name"
    assert (tmp_path / "state" / "relayd.db").exists()
    # a relayc using only the address, port, token and pin from relayc_toml
    c = relayc_from(procs, tmp_path, created["relayc_toml"], "lab.toml")
    c.wait_for(r"logged in to relayd")
    status, clients, _ = api.call("GET", "/api/v1/clients")
    lab = next(x for x in clients if x["name"] == "lab")
    assert lab["online"] and lab["remote_addr"] == "127.0.0.1" and lab["version"]
    # tunnels: create (pushed live, serving within 2 s), 409s, 422s
    t0 = time.monotonic()
    status, tunnel, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "echo", "type": "tcp",
                                                           "local_ip": "127.0.0.1", "local_port": echo.port,
                                                           "remote_port": public})  # fmt: skip
    assert status == 201 and tunnel["source"] == "dashboard"
    wait_port_serves(public, timeout=2)
    assert time.monotonic() - t0 < 2.5
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "echo", "local_port": 1})
    assert status == 409 and "already has a tunnel named 'echo'" in body["detail"]
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "other", "local_port": 1,
                                                         "remote_port": public})  # fmt: skip
    assert status == 409 and f"port {public} is already used" in body["detail"]
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "bad", "local_port": 70000})
    assert status == 422 and body["detail"][0]["loc"][-1] == "local_port"
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "nobody", "name": "x", "local_port": 1})
    assert status == 404
    # traffic passes: counters and the list
    with socket.create_connection(("127.0.0.1", public)) as s:
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(4096)
    status, tunnels, _ = api.call("GET", "/api/v1/tunnels")
    item = next(t for t in tunnels if t["name"] == "echo")
    for key in ("name", "client", "type", "remote_port", "local_ip", "local_port", "source", "status", "bytes_in",
                "bytes_out", "conns_open", "conns_total"):  # fmt: skip
        assert key in item
    assert item["status"] == "active" and item["bytes_in"] >= 1000 and item["bytes_out"] >= 1000
    status, series, _ = api.call("GET", f"/api/v1/traffic?client=lab&tunnel=echo&since={time.time() - 600}")
    assert status == 200 and series["step"] == 60 and sum(p["bytes_in"] for p in series["points"]) >= 1000
    status, metrics, _ = api.call("GET", "/metrics")
    assert 'relay_tunnel_bytes_in_total{client="lab",tunnel="echo"}' in metrics
    status, overview, _ = api.call("GET", "/api/v1/overview")
    assert overview["clients_online"] == 1 and overview["tunnels_active"] == 1
    # disable, enable, delete a tunnel: the port closes and opens
    assert api.call("PATCH", "/api/v1/tunnels/lab/echo", {"enabled": False})[0] == 200
    wait_until(lambda: port_refuses(public), "the disabled tunnel's port closes")
    assert api.call("PATCH", "/api/v1/tunnels/lab/echo", {"enabled": "maybe"})[0] == 422
    assert api.call("PATCH", "/api/v1/tunnels/lab/echo", {"enabled": True})[0] == 200
    wait_port_serves(public, timeout=3)
    assert api.call("DELETE", "/api/v1/tunnels/lab/echo")[0] == 204
    wait_until(lambda: port_refuses(public), "the deleted tunnel's port closes")
    assert api.call("DELETE", "/api/v1/tunnels/lab/echo")[0] == 404
    # kick, rotate, disable, delete a client
    mark = c.mark()
    status, body, _ = api.call("POST", "/api/v1/clients/lab/kick")
    assert status == 200 and body["kicked"]
    c.wait_for(r"logged in to relayd", start=mark)  # it comes back by itself
    status, rotated, _ = api.call("POST", "/api/v1/clients/lab/rotate")
    assert status == 200 and rotated["token"] != created["token"]
    c.wait_for(r"login to relayd at .* failed", start=mark)  # the old token no longer works
    assert api.call("PATCH", "/api/v1/clients/lab", {"enabled": False})[1]["enabled"] is False
    assert api.call("DELETE", "/api/v1/clients/lab")[0] == 204
    assert api.call("DELETE", "/api/v1/clients/lab")[0] == 404
    assert api.call("POST", "/api/v1/clients/ghost/kick")[0] == 404
    assert d.popen.poll() is None


def test_pushed_tunnels_survive_restarts_and_allow_targets_refuses(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, dash, public, other = free_port(), free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, dash)
    api = Api(dash)
    created = api.call("POST", "/api/v1/clients", {"name": "gpu"})[1]
    c = relayc_from(procs, tmp_path, created["relayc_toml"], "gpu.toml")  # no tunnels in its file
    c.wait_for(r"logged in to relayd")
    api.call(
        "POST", "/api/v1/tunnels", {"client": "gpu", "name": "echo", "local_port": echo.port, "remote_port": public}
    )
    wait_port_serves(public, timeout=2)
    # a target outside allow_targets (default: loopback only) is refused before any dial, and the API says why
    status, _, _ = api.call("POST", "/api/v1/tunnels", {"client": "gpu", "name": "lan", "local_ip": "10.1.2.3",
                                                      "local_port": 22, "remote_port": other})  # fmt: skip
    assert status == 201
    c.wait_for(r"tunnel lan pushed by relayd refused: target 10\.1\.2\.3:22 is not in allow_targets")

    def lan_refused() -> str:
        status = str(next(t for t in api.call("GET", "/api/v1/tunnels")[1] if t["name"] == "lan")["status"])
        return status if status.startswith("refused") else ""

    status_text = wait_until(lan_refused, "the API shows the refusal")
    assert "not in allow_targets" in status_text
    assert port_refuses(other)
    # relayd restarted: the dashboard tunnel comes back from SQLite
    d.stop(signal.SIGTERM)
    start_relayd(procs, tmp_path, port, dash)
    wait_port_serves(public, timeout=15)
    assert next(t for t in Api(dash).call("GET", "/api/v1/tunnels")[1] if t["name"] == "echo")["status"] == "active"


def test_dashboard_config_errors_and_hash_password(tmp_path: Path) -> None:
    def check(dashboard: dict[str, Any], addr: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
        cfg = write_toml(tmp_path / "d.toml", {"bind_addr": "127.0.0.1", "auth": {"token": "t" * 20},
                                              "dashboard": {"addr": addr, **dashboard}})  # fmt: skip
        return subprocess.run([sys.executable, "-m", "relay_server.cli", "-c", str(cfg), "--check"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    r = check({})
    assert r.returncode == 2 and "dashboard.password" in r.stderr and "never runs without a password" in r.stderr
    r = check({"password": "admin"}, addr="0.0.0.0")
    assert r.returncode == 2 and "too weak" in r.stderr
    assert check({"password": "admin"}).returncode == 0  # loopback only: allowed
    r = subprocess.run([sys.executable, "-m", "relay_server.cli", "hash-password"], input="s3cret-pass\n",
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("scrypt$")
    assert check({"password_hash": r.stdout.strip()}, addr="0.0.0.0").returncode == 0
    from relay_server.passwords import verify_password

    assert verify_password("s3cret-pass", r.stdout.strip()) and not verify_password("other", r.stdout.strip())
