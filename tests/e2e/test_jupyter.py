"""A real Jupyter server through relay over HTTPS by name, used as a browser uses it: relayd holds a
wildcard certificate for ``*.relay.test`` (from a throwaway CA) and terminates TLS for the http
tunnel ``jupyter``; the test speaks to https://jupyter.relay.test:PORT (TCP to 127.0.0.1, SNI and
Host by name, verified against the CA): the token link, the login form, a kernel started with the
login cookie and XSRF token, ``print(6*7)`` run over the kernel's WebSocket (with the token, and
with the cookie alone, where Jupyter checks the Origin), a foreign Origin refused, the kernel
deleted.

Jupyter runs with the narrowest settings that make this work (see ``jupyter_command``):
``--ServerApp.local_hostnames`` naming the tunnel's domain, and ``--ServerApp.trust_xheaders``.
No ``allow_remote_access``, ``allow_origin`` or ``host_header_rewrite``: relayd passes the
browser's Host on unchanged, so Jupyter's Origin check (Origin's host == Host) passes as it would
for a local browser, and stays on for other origins."""

from __future__ import annotations

import datetime
import http.client
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Proc, free_fixed_port, free_port, relayc_config, relayd_config, spawn
from tests.e2e.test_https_termination import issue, make_ca
from tests.waiting import wait_until

MISSING = [m for m in ("jupyter_server", "ipykernel", "websocket") if importlib.util.find_spec(m) is None]
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must install the test extras (pip install -e '.[test]'); missing: {', '.join(MISSING)}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (pip install -e '.[test]')")

NAME = "jupyter.relay.test"
JUPYTER_TOKEN = "jupyter-e2e-token-0123456789abcdef"


def jupyter_command(port: int, root: Path) -> list[str]:
    """The Jupyter command line for a lab machine serving Jupyter through relay as https://NAME."""
    return [
        sys.executable, "-m", "jupyter_server",
        "--no-browser",
        "--allow-root",  # CI runs as root, and Jupyter refuses to start as root without it
        "--ServerApp.ip=127.0.0.1",  # only relayc (on this machine) reaches it
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # fail if the port is taken instead of quietly moving to another
        f"--IdentityProvider.token={JUPYTER_TOKEN}",
        f"--ServerApp.root_dir={root}",
        # Jupyter answers 403 to a request whose Host names neither a loopback address nor one of
        # local_hostnames (its guard against DNS rebinding), and relayd passes on the browser's
        # Host, jupyter.relay.test:PORT. Naming the tunnel's domain here accepts exactly that name;
        # allow_remote_access=True would work too but drops the check for every name. (The option
        # replaces the default list, hence localhost again.)
        "--ServerApp.local_hostnames=localhost",
        f"--ServerApp.local_hostnames={NAME}",
        # relayd terminated TLS and says so in X-Forwarded-Proto (and who the visitor is in
        # X-Forwarded-For): trusting them makes Jupyter mark its login cookie Secure (HTTPS only)
        # and log the visitor's address instead of relayc's 127.0.0.1. relayd sets both headers
        # itself, the visitor's own X-Forwarded-Proto is dropped and tornado takes the last
        # X-Forwarded-For entry, relayd's; Jupyter listens on 127.0.0.1 only.
        "--ServerApp.trust_xheaders=True",
    ]  # fmt: skip


def jupyter_env(tmp: Path) -> dict[str, str]:
    """Jupyter's and IPython's config, data and runtime directories (and HOME) inside ``tmp``."""
    dirs = {
        "HOME": tmp / "home",
        "JUPYTER_CONFIG_DIR": tmp / "home" / "jupyter-config",
        "JUPYTER_DATA_DIR": tmp / "home" / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": tmp / "home" / "jupyter-runtime",
        "IPYTHONDIR": tmp / "home" / "ipython",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    env["JUPYTER_PLATFORM_DIRS"] = "1"  # the current directory layout, without jupyter_core's warning
    env.pop("JUPYTER_CONFIG_PATH", None)
    env.pop("JUPYTER_PATH", None)
    return env


class Jupyter:
    """A Jupyter server process on 127.0.0.1:``port``, its output in ``tmp/jupyter.log``."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.log = tmp / "jupyter.log"
        root = tmp / "notebooks"
        root.mkdir()
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(jupyter_command(port, root), cwd=root, env=jupyter_env(tmp), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def answers(self) -> bool:
        """True once GET /api/status with the token answers 200 on Jupyter's own port."""
        if self.popen.poll() is not None:
            raise AssertionError(f"jupyter exited with {self.popen.returncode}:\n{self.output()}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/api/status", headers={"Authorization": f"token {JUPYTER_TOKEN}"})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM (Jupyter then shuts its kernels down), SIGKILL if it has not exited in 20 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Browser:
    """What a browser does with https://NAME:PORT: TCP to 127.0.0.1 (no DNS for the name), TLS with
    SNI NAME verified against ``ca_file``, Host NAME:PORT, and a cookie jar."""

    def __init__(self, port: int, ca_file: Path) -> None:
        self.port = port
        self.origin = f"https://{NAME}:{port}"
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.cookies: dict[str, Any] = {}  # name -> http.cookies.Morsel, as last set

    def tls(self, timeout: float = 10.0) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            return self.context.wrap_socket(sock, server_hostname=NAME)
        except BaseException:
            sock.close()
            raise

    def cookie_header(self) -> str:
        return "; ".join(f"{name}={m.coded_value}" for name, m in self.cookies.items())

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One request on a new connection; Set-Cookie answers go to the jar."""
        conn = http.client.HTTPConnection(NAME, self.port, timeout=30)
        conn.sock = self.tls()  # already connected: http.client does not resolve NAME
        sent = {"Host": f"{NAME}:{self.port}", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = self.cookie_header()
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            for line in resp.headers.get_all("Set-Cookie") or []:
                jar: SimpleCookie = SimpleCookie()
                jar.load(line)
                self.cookies.update(jar)
            return resp.status, dict(resp.headers.items()), data
        finally:
            conn.close()

    def websocket(self, path: str, origin: str | None = None) -> Any:
        """A WebSocket to wss://NAME:PORT``path`` with an Origin header and the jar's cookies, as
        a page at ``origin`` (by default Jupyter's own) opens it."""
        import websocket  # websocket-client: a sync client that takes an already-connected socket

        return websocket.create_connection(
            f"wss://{NAME}:{self.port}{path}", socket=self.tls(), timeout=30, origin=origin or self.origin,
            cookie=self.cookie_header() or None,
        )  # fmt: skip


def run_code(ws: Any, code: str, timeout: float = 60.0) -> str:
    """Send an execute_request for ``code`` on the shell channel (Jupyter message protocol 5.3, the
    JSON WebSocket framing) and return its stdout once its execute_reply and idle status came."""
    msg_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "e2e", "session": session,
                   "version": "5.3", "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))  # fmt: skip
    stdout, replied, idle = "", False, False
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not (replied and idle):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no complete answer to {code!r} in {timeout:g} s; stdout {stdout!r}, saw {seen}")
        ws.settimeout(left)
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue  # the kernel's status at connection, or another client's
        kind, content = msg["header"]["msg_type"], msg["content"]
        seen.append(f"{msg['channel']}/{kind}")
        if msg["channel"] == "iopub" and kind == "stream" and content["name"] == "stdout":
            stdout += content["text"]
        elif msg["channel"] == "iopub" and kind == "error":
            raise AssertionError(f"{code!r} failed: {content['ename']}: {content['evalue']}")
        elif msg["channel"] == "shell" and kind == "execute_reply":
            assert content["status"] == "ok", content
            replied = True
        elif msg["channel"] == "iopub" and kind == "status" and content["execution_state"] == "idle":
            idle = True
    return stdout


def test_jupyter_through_relay_over_https_by_name(tmp_path: Path, procs: list[Proc]) -> None:
    ca = make_ca(tmp_path, "relay-test-ca")
    cert_file, key_file = issue(tmp_path, ca, ["*.relay.test"], "wildcard")
    # Jupyter binds its port a second or so later, after relayc has opened connections: a port
    # outside the ephemeral range, so that none of them can take it meanwhile.
    jupyter = Jupyter(tmp_path, free_fixed_port())
    try:
        port, http_port, https_port = free_port(), free_port(), free_port()
        d = spawn(procs, "relay_server.cli", relayd_config(
            tmp_path, port, vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="relay.test",
            certificates=[{"cert_file": cert_file.name, "key_file": key_file.name}]))  # fmt: skip
        d.wait_for(r"certificate wildcard\.crt for \*\.relay\.test")
        d.wait_for("listening for relayc")
        tunnel = {"name": "jupyter", "type": "http", "local_port": jupyter.port, "subdomain": "jupyter"}
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel]))
        c.wait_for(rf"tunnel jupyter: https://jupyter\.relay\.test:{https_port}\b")
        wait_until(jupyter.answers, 90, lambda: f"Jupyter to answer on 127.0.0.1:{jupyter.port}:\n{jupyter.output()}")

        browser = Browser(https_port, ca[2])
        origin = browser.origin
        # The link Jupyter prints, with the token: 200, and a login cookie for HTTPS only
        # (trust_xheaders: Jupyter knows from X-Forwarded-Proto that the browser speaks HTTPS).
        status, _, body = browser.request("GET", f"/api/status?token={JUPYTER_TOKEN}")
        assert status == 200, (status, body, jupyter.output()[-2000:])
        assert "started" in json.loads(body)
        login_cookie = f"username-jupyter-relay-test-{https_port}"  # Jupyter names it after the Host
        assert login_cookie in browser.cookies, browser.cookies
        assert browser.cookies[login_cookie]["secure"], "Jupyter did not see HTTPS (X-Forwarded-Proto)"

        # The login form, as someone with the token but no link would use it: the page sets the
        # _xsrf cookie, the form posts it back (with the Origin and Referer a browser sends).
        browser.cookies.clear()
        status, _, body = browser.request("GET", "/login")
        assert status == 200 and b"_xsrf" in body, (status, body[:300])
        xsrf = browser.cookies["_xsrf"].value  # sent back as JupyterLab does, read from document.cookie
        form = urllib.parse.urlencode({"_xsrf": xsrf, "password": JUPYTER_TOKEN}).encode()
        posted = {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin, "Referer": f"{origin}/login"}
        status, headers, body = browser.request("POST", "/login?next=%2F", body=form, headers=posted)
        assert status == 302 and login_cookie in browser.cookies, (status, headers, body[:300])
        assert browser.cookies[login_cookie]["secure"]

        # A kernel, as JupyterLab starts one: login cookie, X-XSRFToken from the _xsrf cookie, Origin.
        api = {"Origin": origin, "Referer": f"{origin}/lab", "X-XSRFToken": xsrf, "Content-Type": "application/json"}
        status, _, body = browser.request("POST", "/api/kernels", body=b'{"name": "python3"}', headers=api)
        assert status == 201, (status, body, jupyter.output()[-2000:])
        kernel = json.loads(body)["id"]

        def channels(query: str = "") -> str:
            """The kernel's channels, a session of their own for each WebSocket, as each browser tab
            has (Jupyter buffers a session's messages and replays them to its next connection)."""
            return f"/api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}{query}"

        try:
            # The kernel's channels with the token (Jupyter then skips its Origin check) ...
            ws = browser.websocket(channels(f"&token={JUPYTER_TOKEN}"))
            try:
                assert run_code(ws, "print(6*7)") == "42\n"
            finally:
                ws.close()
            # ... and with the login cookie alone, where the Origin is checked against the Host:
            # same name and port, so it passes (no allow_origin needed) ...
            ws = browser.websocket(channels())
            try:
                assert run_code(ws, "print(6*7)") == "42\n"
            finally:
                ws.close()
            # ... while a page elsewhere holding the same cookie is refused.
            import websocket

            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                browser.websocket(channels(), origin="https://elsewhere.relay.test").close()
            assert refused.value.status_code == 403
            # relayd's log says what a 403 on a WebSocket usually means behind it
            d.wait_for(r"client 'lab' tunnel 'jupyter': the app refused a WebSocket for 'jupyter\.relay\.test' "
                       r"with 403; Jupyter does that when the page's Origin is not its Host")  # fmt: skip
        finally:
            status, _, body = browser.request("DELETE", f"/api/kernels/{kernel}", headers=api)
        assert status == 204, (status, body)
        status, _, body = browser.request("GET", "/api/kernels", headers=api)
        assert status == 200 and json.loads(body) == [], body
    finally:
        jupyter.stop()
        for name, output in [("jupyter", jupyter.output()), *((p.module, p.output) for p in procs)]:
            print(f"----- {name}\n{output}")  # shown by pytest when the test fails
