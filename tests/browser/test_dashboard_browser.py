"""A real browser (Playwright driving Debian's chromium) through the dashboard's main flow: sign in,
add a client and a tunnel, watch bytes grow, lift a block, sign out.

Screenshots of each page go to $RELAY_SCREENSHOTS when set (docs/screenshots for the README),
else to the test's temporary directory.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    echo_handler,
    free_port,
    relayc_config,
    relayd_config,
    vhost_get,
    wait_port_serves,
)
from tests.e2e.rawclient import RawClient
from tests.e2e.test_dashboard import Api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "a-long-dashboard-password"

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must install Debian's chromium for the browser tests (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def sign_in(page: Any, dash: int) -> None:
    """Sign in to the dashboard on port ``dash`` as a user would."""
    page.goto(f"http://127.0.0.1:{dash}/login")
    page.fill("#user", "admin")
    page.fill("#password", PASSWORD)
    page.click("#sign-in")


def test_login_add_client_add_tunnel_watch_bytes_grow(tmp_path: Path, procs: list[Proc]) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("RELAY_SCREENSHOTS", str(tmp_path)))
    shots.mkdir(parents=True, exist_ok=True)
    echo = TcpServer(echo_handler)
    port, dash, public = free_port(), free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD},
                        auth={"token": TOKEN, "block_after_failures": 3})  # fmt: skip
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    base = f"http://127.0.0.1:{dash}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        # signing in
        page.goto(base + "/")
        expect(page).to_have_url(re.compile(r"/login$"))
        page.screenshot(path=str(shots / "login.png"))
        page.fill("#user", "admin")
        page.fill("#password", "wrong-password")
        page.click("#sign-in")
        expect(page.locator("#failed")).to_be_visible()
        page.fill("#user", "admin")
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        expect(page.locator("#ov-clients")).to_have_text("0 / 0")
        # adding a client: its ready-made relayc.toml is shown once
        page.click("#nav-clients")
        page.fill("#client-name", "lab-gpu-01")
        page.click("#add-client-btn")
        toml = page.locator("#new-client-toml")
        expect(toml).to_contain_text('name = "lab-gpu-01"')
        expect(toml).to_contain_text("server_fingerprint")
        (tmp_path / "relayc.toml").write_text(toml.inner_text())
        relayc = Proc("relay_client.cli", tmp_path / "relayc.toml")
        procs.append(relayc)
        relayc.wait_for("logged in to relayd")
        expect(page.locator('tr[data-client="lab-gpu-01"]')).to_contain_text("online")
        page.screenshot(path=str(shots / "clients.png"))
        # adding a TCP tunnel from the browser
        page.click("#nav-tunnels")
        page.select_option("#tunnel-client", "lab-gpu-01")
        page.fill("#tunnel-name", "ssh")
        page.fill("#tunnel-remote-port", str(public))
        page.fill("#tunnel-target", f"127.0.0.1:{echo.port}")
        page.click("#add-tunnel-btn")
        row = page.locator('tr[data-tunnel="lab-gpu-01/ssh"]')
        expect(row).to_contain_text("active", timeout=10_000)
        expect(row.locator(".bytes-in")).to_have_text("0 B")
        wait_port_serves(public, timeout=5)
        # traffic passes; the counter grows on the page without a reload
        with socket.create_connection(("127.0.0.1", public)) as s:
            s.sendall(b"x" * 50_000)
            got = 0
            while got < 50_000:
                got += len(s.recv(65536))
        expect(row.locator(".bytes-in")).to_have_text(re.compile(r"^5\d\.\d KB$"), timeout=10_000)
        expect(row.locator(".spark svg")).to_be_attached(timeout=10_000)
        page.screenshot(path=str(shots / "tunnels.png"))
        page.click("#nav-overview")
        expect(page.locator("#ov-clients")).to_have_text("1 / 1")
        expect(page.locator("#ov-tunnels")).to_have_text("1 / 1")
        page.screenshot(path=str(shots / "overview.png"))
        # a relayc with a wrong token (from 127.0.0.2) gets blocked by relayd; the Clients page lists
        # the block, and Unblock lifts it
        page.click("#nav-clients")
        expect(page.locator("#blocks-empty")).to_be_visible()
        for _ in range(3):
            raw = RawClient(port, source_ip="127.0.0.2")
            assert not raw.login("not-the-token-0123456789", name="raw-lab")
            raw.close()
        block = page.locator('#blocks-table tr[data-kind="client"][data-value="raw-lab"]')
        expect(block).to_contain_text("relayc", timeout=10_000)
        expect(block).to_contain_text("127.0.0.2")
        expect(page.locator("#blocks-empty")).to_be_hidden()
        page.screenshot(path=str(tmp_path / "blocked.png"), full_page=True)
        block.get_by_role("button", name="Unblock").click()
        expect(block).to_have_count(0)
        expect(page.locator("#blocks-empty")).to_be_visible()
        expect(page.locator("#block-error")).to_have_text("")
        raw = RawClient(port, source_ip="127.0.0.2")
        assert raw.login(TOKEN, name="raw-lab")  # unblocked: its proof is checked again
        raw.close()
        # signing out ends the session on the server: the old cookie no longer authenticates
        cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "relay_session")
        assert overview_status(dash, cookie) == 200
        page.click("#sign-out")
        expect(page).to_have_url(re.compile(r"/login$"))
        assert overview_status(dash, cookie) == 401
        page.goto(base + "/")
        expect(page).to_have_url(re.compile(r"/login$"))
        browser.close()
    echo.close()
    for name in ("login", "clients", "tunnels", "overview"):
        assert (shots / f"{name}.png").stat().st_size > 5000


def overview_status(dash: int, cookie: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", dash, timeout=10)
    conn.request("GET", "/api/v1/overview", headers={"Cookie": f"relay_session={cookie}"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_every_tunnel_field_from_the_form(tmp_path: Path, procs: list[Proc], host_app: tuple[int, list[str]]) -> None:
    """The form's "More options" come from /api/v1/tunnel-fields: an http tunnel with basic auth and
    a Host rewrite, made in the browser, is served that way by relayd."""
    from playwright.sync_api import expect, sync_playwright

    app_port, hosts = host_app
    port, dash, vhost = free_port(), free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD}, vhost_http_port=vhost,
                        subdomain_host="relay.test")  # fmt: skip
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    c = Proc("relay_client.cli", relayc_config(tmp_path, port, []))
    procs.append(c)
    c.wait_for("logged in to relayd")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        sign_in(page, dash)
        page.click("#nav-tunnels")
        expect(page.locator("#tunnel-client option")).to_have_text(["lab"])
        page.select_option("#tunnel-type", "http")
        page.fill("#tunnel-name", "app")
        page.fill("#tunnel-domain", "app")
        page.fill("#tunnel-target", f"127.0.0.1:{app_port}")
        page.click("#tunnel-more summary")
        expect(page.locator('input[data-field="locations"]')).to_be_visible()  # http keys shown for http
        expect(page.locator('input[data-field="http_password"]')).to_have_attribute("type", "password")
        page.fill('input[data-field="http_user"]', "u")
        page.fill('input[data-field="http_password"]', "p-browser-1")
        page.fill('input[data-field="host_header_rewrite"]', "localhost")
        page.fill('input[data-field="max_connections"]', "5")
        page.click("#add-tunnel-btn")
        row = page.locator('tr[data-tunnel="lab/app"]')
        expect(row).to_contain_text("active", timeout=10_000)
        expect(row.locator(".since")).to_contain_text("UTC")
        page.select_option("#tunnel-type", "tcp")
        expect(page.locator('input[data-field="locations"]')).to_be_hidden()  # and not for tcp
        browser.close()
    assert vhost_get(vhost, "app.relay.test")[0] == 401
    creds = "Basic " + base64.b64encode(b"u:p-browser-1").decode()
    assert vhost_get(vhost, "app.relay.test", {"Authorization": creds}) == (200, b"hello from the lab")
    assert hosts == ["localhost"]


def test_secret_and_udp_tunnels_from_the_form(tmp_path: Path, procs: list[Proc]) -> None:
    """A secret tunnel made in the browser (allow_visitors from "More options") is shown with no
    public port and reached by the allowed visitor through ``relayc connect``; a udp tunnel made
    there gets its public UDP port."""
    import subprocess
    import sys

    from playwright.sync_api import expect, sync_playwright

    echo = TcpServer(echo_handler)
    port, dash, udp_port = free_port(), free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD})
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    c = Proc("relay_client.cli", relayc_config(tmp_path, port, []))
    procs.append(c)
    c.wait_for("logged in to relayd")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        sign_in(page, dash)
        page.click("#nav-tunnels")
        expect(page.locator("#tunnel-client option")).to_have_text(["lab"])
        page.select_option("#tunnel-type", "secret")
        expect(page.locator("#tunnel-remote-port")).to_be_hidden()  # no public port, no domain
        expect(page.locator("#tunnel-domain")).to_be_hidden()
        page.fill("#tunnel-name", "ssh")
        page.fill("#tunnel-target", f"127.0.0.1:{echo.port}")
        page.click("#tunnel-more summary")
        expect(page.locator('input[data-field="locations"]')).to_be_hidden()
        expect(page.locator('input[data-field="secret_key"]')).to_have_attribute("type", "password")
        page.fill('input[data-field="allow_visitors"]', "laptop, tablet")
        page.click("#add-tunnel-btn")
        row = page.locator('tr[data-tunnel="lab/ssh"]')
        expect(row).to_contain_text("active", timeout=10_000)
        expect(row).to_contain_text("secret (visitors laptop, tablet)")
        page.select_option("#tunnel-type", "udp")
        expect(page.locator("#tunnel-remote-port")).to_be_visible()
        expect(page.locator('input[data-field="allow_visitors"]')).to_be_hidden()
        expect(page.locator('input[data-field="udp_idle_timeout"]')).to_be_visible()
        page.fill("#tunnel-name", "dns")
        page.fill("#tunnel-remote-port", str(udp_port))
        page.fill("#tunnel-target", f"127.0.0.1:{echo.port}")
        page.click("#add-tunnel-btn")
        udp_row = page.locator('tr[data-tunnel="lab/dns"]')
        expect(udp_row).to_contain_text("active", timeout=10_000)
        expect(udp_row).to_contain_text(f"127.0.0.1:{udp_port}/udp")
        browser.close()
    status, made, _ = Api(dash).call("POST", "/api/v1/clients", {"name": "laptop"})  # a token of its own
    assert status == 201, made
    laptop = relayc_config(tmp_path, port, [], filename="laptop.toml", name="laptop", auth={"token": made["token"]})
    done = subprocess.run([sys.executable, "-m", "relay_client.cli", "connect", "-c", str(laptop), "lab/ssh"],
                          input=b"made in the browser", capture_output=True, timeout=30)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"made in the browser"), done.stderr.decode()
    echo.close()


def test_an_app_over_https_through_relayd(tmp_path: Path, procs: list[Proc]) -> None:
    """The browser opens an http tunnel's app by name over HTTPS, relayd terminating TLS with a
    certificate from a file; the dashboard's tunnel lists the https URL and the certificate; the
    HSTS header reaches the browser; an hsts tunnel's plain http:// URL is answered with 308."""
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_https_termination import app_handler, issue, make_ca

    ca = make_ca(tmp_path, "relay-test-ca")
    cert_file, key_file = issue(tmp_path, ca, ["*.relay.test"], "wildcard")
    app = TcpServer(app_handler)
    port, dash, http_port, https_port = free_port(), free_port(), free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD}, vhost_http_port=http_port,
                        vhost_https_port=https_port, subdomain_host="relay.test",
                        certificates=[{"cert_file": cert_file.name, "key_file": key_file.name}])  # fmt: skip
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    tunnel = {"name": "app", "type": "http", "local_port": app.port, "subdomain": "app", "https_redirect": True,
              "hsts": True}  # fmt: skip
    c = Proc("relay_client.cli", relayc_config(tmp_path, port, [tunnel]))
    procs.append(c)
    c.wait_for("tunnel app: https://")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP *.relay.test 127.0.0.1"])  # fmt: skip
        # the throwaway CA is not in chromium's store: TLS errors are ignored for the page, and the
        # certificate's issuer is checked from what the browser saw
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        response = page.goto(f"https://app.relay.test:{https_port}/")
        assert response is not None and response.status == 200
        expect(page.locator("body")).to_have_text("proto=https")
        details = response.security_details()
        assert details is not None and details.get("issuer") == "relay-test-ca", details
        assert response.headers.get("strict-transport-security") == "max-age=31536000"
        sign_in(page, dash)
        page.click("#nav-tunnels")
        row = page.locator('tr[data-tunnel="lab/app"]')
        expect(row).to_contain_text(f"https://app.relay.test:{https_port}", timeout=10_000)
        cert_row = page.locator('#certs-table tr[data-domain="app.relay.test"]')
        expect(cert_row).to_contain_text("file")
        expect(cert_row.locator(".until")).to_contain_text("UTC")
        browser.close()
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: app.relay.test\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 308") and f"https://app.relay.test:{https_port}/x".encode() in head
    app.close()
