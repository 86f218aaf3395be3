"""relayd's core end to end: totals that outlive sessions and restarts, dashboard tunnels with every
relayc.toml key, and relayd without the dashboard's web stack installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from base64 import b64encode
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    ROOT,
    Proc,
    TcpServer,
    free_port,
    relayd_config,
    round_trip,
    spawn,
    start_tunnel,
    vhost_get,
    wait_port_serves,
)
from tests.e2e.test_dashboard import Api, relayc_from, start_relayd
from tests.waiting import wait_until

# A meta-path finder that refuses the dashboard's web stack, as if it were not installed.
BLOCKER = """\
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("fastapi", "starlette", "uvicorn"):
            raise ImportError(f"{name} is blocked for this test", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""
LAUNCHER = BLOCKER + 'import runpy\nsys.argv[0] = "relayd"\nrunpy.run_module("relay_server.cli", run_name="__main__")\n'


class Launched(Proc):
    """A ``Proc`` running a given command line (``Proc`` itself always runs ``python -m module``)."""

    def __init__(self, argv: list[str], config: Path, env: dict[str, str]) -> None:
        self.module, self.config = "relayd (launcher)", config
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(argv, cwd=str(config.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**env, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def tunnel_item(api: Api, client: str, name: str) -> dict[str, Any]:
    status, tunnels, _ = api.call("GET", "/api/v1/tunnels")
    assert status == 200, tunnels
    return next((t for t in tunnels if t["client"] == client and t["name"] == name), {})


def client_item(api: Api, name: str) -> dict[str, Any]:
    status, clients, _ = api.call("GET", "/api/v1/clients")
    assert status == 200, clients
    return next((c for c in clients if c["name"] == name), {})


def wait_totals(api: Api, at_least: int) -> dict[str, Any]:
    """The lab/echo tunnel item once it counts ``at_least`` bytes each way."""
    last: dict[str, Any] = {}

    def counted() -> bool:
        last.clear()
        last.update(tunnel_item(api, "lab", "echo"))
        return last.get("bytes_in", -1) >= at_least and last.get("bytes_out", -1) >= at_least

    wait_until(counted, 10, lambda: f"lab/echo to count {at_least} bytes each way (last item: {last})")
    return dict(last)


def echo_through(port: int, n: int) -> None:
    payload = bytes(i % 251 for i in range(n))
    assert round_trip(port, payload) == payload


def test_totals_survive_relayc_and_relayd_restarts(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    n, m, k = 100_000, 50_000, 30_000
    port, dash, public = free_port(), free_port(), free_port()
    started = time.time()
    d = start_relayd(procs, tmp_path, port, dash)
    api = Api(dash)
    c = start_tunnel(procs, tmp_path, port, "echo", echo.port, public)
    wait_port_serves(public)
    echo_through(public, n)
    item = wait_totals(api, n)
    since = item.get("totals_since")
    assert isinstance(since, (int, float)) and started - 60 <= since <= time.time(), item
    assert item["conns_total"] >= 1, item
    lab = client_item(api, "lab")
    for key in ("bytes_in", "bytes_out", "conns_total"):
        assert lab.get(key, -1) >= item[key], (key, lab, item)
    assert isinstance(lab.get("totals_since"), (int, float)) and lab["totals_since"] <= time.time(), lab

    # relayc restarted on the same file: the tunnel's totals go on from where they were
    mark = d.mark()
    c.stop(signal.SIGTERM)
    d.wait_for(r"client lab .*disconnected", start=mark)
    c = spawn(procs, "relay_client.cli", c.config)
    c.wait_for(r"tunnel echo: relayd port")
    wait_port_serves(public)
    echo_through(public, m)
    item = wait_totals(api, n + m)
    assert item["totals_since"] == since and item["conns_total"] >= 2, item

    # relayd restarted on the same config, ports and state dir: relayc comes back by itself
    mark = c.mark()
    assert d.stop(signal.SIGTERM) == 0, d.output  # a clean exit, not a kill after the timeout
    d = spawn(procs, "relay_server.cli", d.config)
    d.wait_for(r"dashboard on http://127\.0\.0\.1")
    c.wait_for(r"logged in to relayd", timeout=30, start=mark)
    c.wait_for(r"tunnel echo: relayd port", start=mark)
    wait_port_serves(public, timeout=30)
    echo_through(public, k)
    item = wait_totals(api, n + m + k)
    assert item["totals_since"] == since and item["conns_total"] >= 3, item

    # the per-minute series lost no minute to the reconnect or the restart
    total = 0

    def series_complete() -> bool:
        nonlocal total
        query = f"/api/v1/traffic?client=lab&tunnel=echo&since={time.time() - 600:.0f}"
        status, series, _ = api.call("GET", query)
        assert status == 200, series
        total = sum(p["bytes_in"] for p in series["points"])
        return total >= n + m + k

    wait_until(series_complete, 10, lambda: f"traffic points to sum {n + m + k} bytes in (last sum: {total})")


def test_dashboard_tunnel_carries_every_relayc_field(
    tmp_path: Path, echo: TcpServer, host_app: tuple[int, list[str]], procs: list[Proc]
) -> None:
    app_port, hosts = host_app
    port, dash, http_port, https_port = free_port(), free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port, dash, vhost_http_port=http_port, vhost_https_port=https_port,
                 subdomain_host="relay.test")  # fmt: skip
    api = Api(dash)
    answers: list[str] = []  # every answer's JSON, checked for the password at the end

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, parsed, _ = api.call(method, path, body)
        answers.append(json.dumps(parsed))
        return status, parsed

    status, created = call("POST", "/api/v1/clients", {"name": "web"})
    assert status == 201, created
    relayc_from(procs, tmp_path, created["relayc_toml"], "web.toml").wait_for(r"logged in to relayd")
    sent = {"http_user": "u", "locations": ["/"], "host_header_rewrite": "localhost", "max_connections": 10,
            "allow_sources": ["127.0.0.0/8"], "custom_domains": ["app.example.test"]}  # fmt: skip
    body = {"client": "web", "name": "app", "type": "http", "local_port": app_port, "subdomain": "app",
            "http_password": "p-secret-1", "bandwidth_limit": "10MB", **sent}  # fmt: skip
    status, answer = call("POST", "/api/v1/tunnels", body)
    assert status == 201, answer
    wait_until(lambda: tunnel_item(api, "web", "app").get("status") == "active", 10, "web/app to be active")

    # relayd asks for the password before anything reaches the lab; the app sees the rewritten Host
    status, _ = vhost_get(http_port, "app.relay.test")
    assert status == 401 and hosts == []
    status, text = vhost_get(
        http_port, "app.relay.test", {"Authorization": "Basic " + b64encode(b"u:p-secret-1").decode()}
    )
    assert status == 200 and text == b"hello from the lab" and hosts == ["localhost"]

    # every key comes back as sent, in the 201 answer and in the list; the password never does
    item = tunnel_item(api, "web", "app")
    answers.append(json.dumps(item))
    for key, value in sent.items():
        assert answer.get(key) == value and item.get(key) == value, (key, answer, item)

    # unknown keys and keys that do not fit the type are refused, naming the key
    status, err = call("POST", "/api/v1/tunnels", {"client": "web", "name": "typo", "local_port": 1, "locl_port": 1})
    assert status == 422 and err["detail"][0]["loc"][-1] == "locl_port", err
    status, tls = call("POST", "/api/v1/tunnels", {"client": "web", "name": "tls", "type": "https",
                                                   "local_port": app_port, "subdomain": "tls"})  # fmt: skip
    assert status == 201, tls
    status, err = call("POST", "/api/v1/tunnels", {"client": "web", "name": "plain", "type": "tcp",
                                                   "local_port": echo.port, "subdomain": "plain"})  # fmt: skip
    assert status == 422 and any(e["loc"][-1] == "subdomain" or "subdomain" in e["msg"] for e in err["detail"]), err

    # the keys POST takes are exactly relayc.toml's [[tunnels]] keys, plus client
    from shared.config import TunnelConfig

    defaults: dict[str, Any] = {"client": "web"}
    for f in fields(TunnelConfig):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    defaults.update(name="defaults", local_port=echo.port)
    assert set(defaults) == set(TunnelConfig.table_keys()) | {"client"}
    status, made = call("POST", "/api/v1/tunnels", defaults)
    assert status == 201, made

    call("GET", "/api/v1/tunnels")
    call("GET", "/api/v1/clients")
    for text in answers:
        assert "p-secret-1" not in text and '"http_password"' not in text, text


def test_relayd_runs_without_fastapi_starlette_uvicorn(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("fastapi", "starlette.routing", "uvicorn"):  # the block itself works
        r = subprocess.run([sys.executable, "-c", BLOCKER + f"import {name}"], capture_output=True, text=True,
                           env=env, timeout=60)  # fmt: skip
        assert r.returncode != 0 and "is blocked for this test" in r.stderr, (name, r.stderr)

    port, public = free_port(), free_port()
    cfg = relayd_config(tmp_path, port)  # no [dashboard] table
    d = Launched([sys.executable, "-c", LAUNCHER, "-c", str(cfg), "--log-level", "debug"], cfg, env)
    procs.append(d)
    d.wait_for(r"listening for relayc")
    d.wait_for(r"fingerprint: sha256:[0-9a-f]+")
    start_tunnel(procs, tmp_path, port, "echo", echo.port, public)
    wait_port_serves(public)
    echo_through(public, 50_000)
    assert d.popen.poll() is None, d.output
