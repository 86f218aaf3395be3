"""The dashboard's own UI (issue 18), in a real browser (Playwright driving Debian's chromium): copy
buttons for the one-time token and relayc.toml, charts with axes, units, legend and time ranges, a
tunnel's own page with its connections (from a real visitor through a real relayc), its refusals
and its health, the edit form changing a dashboard tunnel live, no sideways scrolling on a laptop
or a phone, and /docs with nothing but the dashboard reachable.

Screenshots go to $RELAY_SCREENSHOTS when set (docs/screenshots for the README), else to the
test's temporary directory.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.test_dashboard_browser import CHROMIUM, PASSWORD, sign_in
from tests.e2e.harness import (
    Proc,
    TcpServer,
    echo_handler,
    free_port,
    relayc_config,
    relayd_config,
    vhost_get,
    wait_port_serves,
)
from tests.e2e.test_dashboard import Api

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")

LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # fmt: skip
        yield b
        b.close()


def offline_context(browser: Any, **kw: Any) -> tuple[Any, list[str]]:
    """A browser context where any request to something but the loopback is aborted (and listed)."""
    context = browser.new_context(**kw)
    outside: list[str] = []

    def gate(route: Any) -> None:
        host = urllib.parse.urlsplit(route.request.url).hostname or ""
        if host in LOOPBACK or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    return context, outside


def assert_no_sideways_scroll(page: Any, what: str) -> None:
    """At both sizes the page is no wider than the window (tables scroll in their own box)."""
    for size in (LAPTOP, PHONE):
        page.set_viewport_size(size)
        page.wait_for_timeout(150)  # let the charts redraw at the new width (they redraw 100 ms after a resize)
        scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, f"{what} scrolls sideways at {size['width']}x{size['height']}: {scroll} > {inner}"
    page.set_viewport_size(LAPTOP)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def start(tmp_path: Path, procs: list[Proc], **dashboard: Any) -> tuple[int, int]:
    port, dash = free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD, **dashboard})
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    return port, dash


def test_copy_buttons_docs_offline_and_no_sideways_scroll(tmp_path: Path, procs: list[Proc], browser: Any) -> None:
    """Copy puts the one-time token and the relayc.toml in the clipboard (the relayc.toml pasted
    from it logs in); without the Clipboard API the text is selected instead.  /docs lists the API
    with every other host unreachable, and no page asks for anything beyond the dashboard."""
    _, dash = start(tmp_path, procs)
    base = f"http://127.0.0.1:{dash}"
    context, outside = offline_context(browser, viewport=LAPTOP)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    from playwright.sync_api import expect

    page.goto(base + "/login")
    assert_no_sideways_scroll(page, "the sign-in page")
    sign_in(page, dash)
    expect(page.locator("#ov-clients")).to_have_text("0 / 0")
    assert_no_sideways_scroll(page, "the overview")
    page.click("#nav-clients")
    page.fill("#client-name", "lab-gpu-01")
    page.click("#add-client-btn")
    toml = page.locator("#new-client-toml")
    expect(toml).to_contain_text('name = "lab-gpu-01"')
    token = page.locator("#new-client-token").inner_text()
    assert len(token) >= 20 and f'token = "{token}"' in toml.inner_text()
    page.click("#copy-token")
    expect(page.locator("#copy-status")).to_have_text("Copied the token.")
    assert page.evaluate("navigator.clipboard.readText()") == token
    page.click("#copy-toml")
    expect(page.locator("#copy-status")).to_have_text("Copied the relayc.toml.")
    pasted = page.evaluate("navigator.clipboard.readText()")
    assert pasted.strip() == toml.inner_text().strip() and f'token = "{token}"' in pasted
    (tmp_path / "relayc.toml").write_text(pasted)  # what the operator pastes on the lab machine works
    relayc = Proc("relay_client.cli", tmp_path / "relayc.toml")
    procs.append(relayc)
    relayc.wait_for("logged in to relayd", timeout=30)  # a deadline, generous for a loaded machine
    expect(page.locator('tr[data-client="lab-gpu-01"]')).to_contain_text("online")
    # a rotated token is shown the same way, with its own copy
    page.locator('tr[data-client="lab-gpu-01"]').get_by_role("button", name="Rotate token").click()
    expect(page.locator("#new-client-token")).not_to_have_text(token)
    rotated = page.locator("#new-client-token").inner_text()
    page.click("#copy-token")
    expect(page.locator("#copy-status")).to_have_text("Copied the token.")
    assert page.evaluate("navigator.clipboard.readText()") == rotated
    assert_no_sideways_scroll(page, "the clients page with a relayc.toml shown")
    # /docs: relayd's own page, built from /openapi.json, nothing from a CDN
    page.goto(base + "/docs")
    expect(page.locator('.api-op[data-path="/api/v1/tunnels"][data-method="POST"]')).to_be_visible()
    expect(page.locator('.api-op[data-path="/api/v1/tunnels/{client}/{name}"][data-method="PATCH"]')).to_be_visible()
    expect(page.locator("#api")).to_contain_text("GET /api/v1/traffic")
    expect(page.locator("#api-error")).to_have_text("")
    assert_no_sideways_scroll(page, "/docs")
    assert outside == [], f"the dashboard asked for something beyond itself: {outside}"
    context.close()
    # without the Clipboard API (a dashboard over plain http on a LAN address), the text is selected
    plain = browser.new_context(viewport=PHONE)
    page = plain.new_page()
    page.add_init_script("Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    sign_in(page, dash)
    page.click("#nav-clients")
    page.fill("#client-name", "lab-gpu-02")
    page.click("#add-client-btn")
    expect(page.locator("#new-client-toml")).to_contain_text('name = "lab-gpu-02"')
    page.click("#copy-toml")
    expect(page.locator("#copy-status")).to_contain_text("relayc.toml")
    selected = page.evaluate("window.getSelection().toString()")
    assert selected.strip() == page.locator("#new-client-toml").inner_text().strip()
    assert_no_sideways_scroll(page, "the clients page on a phone")
    plain.close()


def test_charts_and_a_tunnels_own_page(tmp_path: Path, procs: list[Proc], browser: Any) -> None:
    """Charts have axes in bytes/s, a legend and time ranges that change the request; a tunnel's page
    (linked from the table) shows its chart, the connection of a real visitor through a real relayc
    (open, then closed, with its bytes), that it is read-only when from relayc.toml, and "service
    down" clearly when relayc's health check cannot reach the service."""
    from playwright.sync_api import expect

    shots = Path(os.environ.get("RELAY_SCREENSHOTS", str(tmp_path)))
    shots.mkdir(parents=True, exist_ok=True)
    echo = TcpServer(echo_handler)
    port, dash = start(tmp_path, procs)
    notebook = TcpServer(echo_handler)  # closed later: its tunnel's service goes down
    public, guarded = free_port(), free_port()
    tunnels = [
        {"name": "ssh", "type": "tcp", "local_port": echo.port, "remote_port": public},
        {"name": "guarded", "type": "tcp", "local_port": echo.port, "remote_port": guarded,
         "allow_sources": ["10.0.0.0/8"]},
        {"name": "low", "type": "tcp", "local_port": echo.port, "remote_port": 1000},  # refused: not in allow_ports
        {"name": "notebook", "type": "tcp", "local_port": notebook.port, "health_check": "tcp",
         "health_check_interval": 1, "health_check_timeout": 1, "health_check_max_failures": 1},
    ]  # fmt: skip
    relayc = Proc("relay_client.cli", relayc_config(tmp_path, port, tunnels))
    procs.append(relayc)
    relayc.wait_for("logged in to relayd")
    wait_port_serves(public, timeout=10)
    base = f"http://127.0.0.1:{dash}"
    context, outside = offline_context(browser, viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, dash)
    # the overview's chart: axes with units, a legend, and ranges that ask for that range
    chart = page.locator("#ov-chart")
    expect(chart.locator(".axis-y text").first).to_have_text("0 B/s")
    assert chart.locator(".axis-y text").count() >= 2
    assert all(re.fullmatch(r"[\d.]+ [KMGT]?B/s", t) for t in chart.locator(".axis-y text").all_text_contents())
    assert chart.locator(".axis-x text").count() >= 3
    expect(chart.locator(".legend")).to_contain_text("in: visitors → lab")
    expect(chart.locator(".legend")).to_contain_text("out: lab → visitors")
    expect(chart.locator(".legend")).to_contain_text("bytes/s")
    assert chart.locator("polyline.line-in").count() == 1 and chart.locator("polyline.line-out").count() == 1
    for label, seconds in (("24 h", 86400), ("7 d", 7 * 86400), ("15 min", 900)):
        with page.expect_request(lambda r: "/api/v1/traffic?" in r.url) as req:
            page.locator("#ov-ranges").get_by_role("button", name=label).click()
        since = float(urllib.parse.parse_qs(urllib.parse.urlsplit(req.value.url).query)["since"][0])
        assert abs(time.time() - seconds - since) < 30, (label, since)
        expect(page.locator("#ov-ranges").get_by_role("button", name=label)).to_have_attribute("aria-pressed", "true")
    # a visitor through the real tunnel; the tunnel's page lists its connection while it is open
    page.click("#nav-tunnels")
    row = page.locator('tr[data-tunnel="lab/ssh"]')
    expect(row).to_contain_text("active", timeout=10_000)
    expect(row.locator(".actions")).to_contain_text("relayc.toml")  # read-only: no Edit
    expect(row.get_by_role("button", name="Edit")).to_have_count(0)
    assert_no_sideways_scroll(page, "the tunnels page")
    visitor = socket.create_connection(("127.0.0.1", public), timeout=10)
    visitor.sendall(b"x" * 50_000)
    got = 0
    while got < 50_000:
        got += len(visitor.recv(65536))
    row.locator("a.tunnel-link").click()
    expect(page).to_have_url(re.compile(r"/tunnels#/tunnel/lab/ssh$"))
    expect(page.locator("#page-tunnel")).to_be_visible()
    expect(page.locator("#tp-title")).to_have_text("lab/ssh")
    expect(page.locator("#tp-readonly")).to_be_visible()
    expect(page.locator("#tp-edit")).to_be_hidden()
    expect(page.locator("#tp-health")).to_have_class(re.compile(r"\bgood\b"))
    expect(page.locator("#tp-refusals")).to_contain_text("has not refused")
    conn = page.locator("#conns-table tbody tr").first
    expect(conn.locator(".addr")).to_contain_text("127.0.0.1", timeout=15_000)
    expect(conn).to_contain_text("open", timeout=15_000)
    expect(conn.locator(".bytes-in")).to_have_text(re.compile(r"^5\d\.\d KB$"), timeout=15_000)
    expect(page.locator("#tp-chart .legend")).to_contain_text("in: visitors → lab")
    with page.expect_request(lambda r: "/api/v1/traffic?" in r.url) as req:
        page.locator("#tp-ranges").get_by_role("button", name="24 h").click()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.value.url).query)
    assert query["client"] == ["lab"] and query["tunnel"] == ["ssh"]
    assert abs(time.time() - 86400 - float(query["since"][0])) < 30
    expect(page.locator("#tp-chart polyline.line-in")).to_have_count(1)
    visitor.close()
    expect(conn.locator("td").nth(2)).not_to_have_text("open", timeout=15_000)  # closed: its time
    expect(conn.locator(".bytes-out")).to_have_text(re.compile(r"^5\d\.\d KB$"))
    page.locator("#tp-ranges").get_by_role("button", name="15 min").click()
    expect(page.locator("#tp-chart polyline.line-in")).to_have_count(1)
    page.screenshot(path=str(shots / "tunnel.png"), full_page=True)
    assert_no_sideways_scroll(page, "a tunnel's page")
    # a tunnel whose service stops: "service down", in red
    page.goto(base + "/tunnels#/tunnel/lab/notebook")
    health = page.locator("#tp-health")
    expect(health).to_contain_text("the health check reaches the service", timeout=15_000)
    notebook.close()
    expect(health).to_contain_text("Service down", timeout=15_000)
    expect(health).to_have_class(re.compile(r"\bbad\b"))
    expect(health).to_contain_text(f"127.0.0.1:{notebook.port}")
    assert page.locator("#tp-health").evaluate("e => getComputedStyle(e).color") == "rgb(192, 57, 43)"
    expect(page.locator("#conns-empty")).to_be_visible()
    # a refused tunnel's page says why relayd refused it
    page.goto(base + "/tunnels#/tunnel/lab/low")
    expect(page.locator("#tp-refusals .refusal")).to_contain_text("relayd refused this tunnel", timeout=10_000)
    expect(page.locator("#tp-refusals .refusal")).to_contain_text("1000")
    expect(page.locator("#tp-health")).to_contain_text("refused")
    # visitors a tunnel turned away are listed on its page (and by the API), with why
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", guarded), timeout=10) as turned_away:
            turned_away.settimeout(10)
            assert turned_away.recv(1) == b""  # closed by relayd: 127.0.0.1 is not in allow_sources
    status, listed, _ = Api(dash).call("GET", "/api/v1/tunnels/lab/guarded/refusals")
    assert status == 200 and len(listed) == 2, listed
    assert {r["reason"] for r in listed} == {"source"} and listed[0]["addr"] == "127.0.0.1"
    assert listed[0]["at"] >= listed[1]["at"] and "not in allow_sources" in listed[0]["text"]
    assert Api(dash).call("GET", "/api/v1/tunnels/lab/nope/refusals")[0] == 404
    page.goto(base + "/tunnels#/tunnel/lab/guarded")
    expect(page.locator("#visitor-refusals tbody tr")).to_have_count(2, timeout=10_000)
    expect(page.locator("#visitor-refusals tbody tr").first).to_contain_text("source 127.0.0.1 is not in allow_sources")
    # a tunnel that is gone says so
    page.goto(base + "/tunnels#/tunnel/lab/nope")
    expect(page.locator("#tp-health")).to_contain_text("No tunnel lab/nope")
    assert outside == [], outside
    context.close()
    echo.close()


def test_edit_form_changes_a_dashboard_tunnel_live(tmp_path: Path, procs: list[Proc], browser: Any,
                                                   host_app: tuple[int, list[str]]) -> None:  # fmt: skip
    """An http tunnel defined in the dashboard is edited in the browser: the form generated from
    /api/v1/tunnel-fields opens prefilled (client, name and type fixed), a wrong value is refused
    next to the form naming its field, and a new basic-auth password and target port take effect
    live; a tunnel from relayc.toml is refused (409) by the API and offers no Edit."""
    from playwright.sync_api import expect

    shots = Path(os.environ.get("RELAY_SCREENSHOTS", str(tmp_path)))
    shots.mkdir(parents=True, exist_ok=True)
    app_port, hosts = host_app
    echo = TcpServer(echo_handler)
    port, dash, vhost = free_port(), free_port(), free_port()
    cfg = relayd_config(tmp_path, port, dashboard={"port": dash, "password": PASSWORD}, vhost_http_port=vhost,
                        subdomain_host="relay.test")  # fmt: skip
    d = Proc("relay_server.cli", cfg)
    procs.append(d)
    d.wait_for("dashboard on")
    echo_tunnel = {"name": "echo", "type": "tcp", "local_port": echo.port}
    c = Proc("relay_client.cli", relayc_config(tmp_path, port, [echo_tunnel]))
    procs.append(c)
    c.wait_for("logged in to relayd")
    api = Api(dash)
    wrong_target = free_port()  # nothing listens: the edit points the tunnel at the app
    status, item, _ = api.call("POST", "/api/v1/tunnels", {
        "client": "lab", "name": "app", "type": "http", "local_port": wrong_target, "subdomain": "app",
        "http_user": "u", "http_password": "old-password-1"})  # fmt: skip
    assert status == 201, item
    old = "Basic " + base64.b64encode(b"u:old-password-1").decode()
    new = "Basic " + base64.b64encode(b"u:new-password-2").decode()
    wait_until(lambda: vhost_get(vhost, "app.relay.test")[0] == 401, 15, "the http tunnel to ask for basic auth")
    assert vhost_get(vhost, "app.relay.test", {"Authorization": old})[0] in (502, 503, 504)  # no answer from its target
    status, body, _ = api.call("PATCH", "/api/v1/tunnels/lab/echo", {"max_connections": 3})
    assert status == 409, body  # relayc.toml's tunnels are read-only in the dashboard

    context, outside = offline_context(browser, viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, dash)
    page.click("#nav-tunnels")
    row = page.locator('tr[data-tunnel="lab/app"]')
    expect(row.locator(".state")).to_contain_text("service down", timeout=15_000)  # nothing on its port yet
    expect(page.locator('tr[data-tunnel="lab/echo"]').get_by_role("button", name="Edit")).to_have_count(0)
    row.get_by_role("button", name="Edit").click()
    dialog = page.locator("#edit-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#edit-key")).to_have_text("lab/app")
    expect(page.locator("#edit-type")).to_have_text("http")
    fields = page.locator("#edit-fields")
    assert fields.locator('[data-field="name"], [data-field="type"], [data-field="client"]').count() == 0
    expect(fields.locator('input[data-field="local_port"]')).to_have_value(str(wrong_target))
    expect(fields.locator('input[data-field="subdomain"]')).to_have_value("app")
    expect(fields.locator('input[data-field="http_user"]')).to_have_value("u")
    expect(fields.locator('input[data-field="http_password"]')).to_have_value("")  # write-only
    expect(fields.locator('input[data-field="locations"]')).to_be_visible()  # http keys, not tcp's
    expect(fields.locator('input[data-field="remote_port"]')).to_have_count(0)
    assert_no_sideways_scroll(page, "the edit form")
    # a wrong value: refused, the error next to the form names the field
    fields.locator('input[data-field="local_port"]').fill("70000")
    page.click("#edit-save")
    expect(page.locator("#edit-error")).to_contain_text("local_port")
    expect(fields.locator('label[data-for-field="local_port"]')).to_have_class(re.compile(r"\binvalid\b"))
    expect(dialog).to_be_visible()
    page.screenshot(path=str(tmp_path / "edit-error.png"))
    # the real change: the app's port and a new password
    fields.locator('input[data-field="local_port"]').fill(str(app_port))
    fields.locator('input[data-field="http_password"]').fill("new-password-2")
    fields.locator('input[data-field="max_connections"]').fill("7")
    page.screenshot(path=str(shots / "edit.png"))
    with page.expect_request(lambda r: r.method == "PATCH") as req:
        page.click("#edit-save")
    assert req.value.post_data_json == {"local_port": app_port, "http_password": "new-password-2", "max_connections": 7}
    expect(dialog).to_be_hidden()
    expect(page.locator("#tunnel-error")).to_have_text("")
    expect(row).to_contain_text(f"127.0.0.1:{app_port}", timeout=10_000)
    wait_until(lambda: vhost_get(vhost, "app.relay.test", {"Authorization": new}) == (200, b"hello from the lab"), 15,
               "the new password and target to take effect")  # fmt: skip
    assert vhost_get(vhost, "app.relay.test", {"Authorization": old})[0] == 401
    # relayc probes a down service every health_check_interval (10 s): it is seen up again by then
    expect(row.locator(".state")).to_have_text(re.compile(r"^active"), timeout=25_000)
    status, item, _ = api.call("GET", "/api/v1/tunnels")
    edited = next(t for t in item if t["name"] == "app")
    assert edited["max_connections"] == 7 and "http_password" not in edited
    assert hosts  # the app was reached
    # the tunnel's page offers the same form
    page.goto(f"http://127.0.0.1:{dash}/tunnels#/tunnel/lab/app")
    expect(page.locator("#tp-edit")).to_be_visible()
    expect(page.locator("#tp-readonly")).to_be_hidden()
    page.click("#tp-edit")
    expect(page.locator('#edit-fields input[data-field="max_connections"]')).to_have_value("7")
    page.click("#edit-cancel")
    expect(dialog).to_be_hidden()
    assert outside == [], outside
    context.close()
    echo.close()


def test_static_files_load_nothing_from_elsewhere_and_write_no_html_from_data() -> None:
    """Every dashboard file is served by relayd (no CDN, no other host) and app.js builds the page
    from text nodes: no innerHTML/outerHTML/insertAdjacentHTML/document.write anywhere."""
    static = Path(__file__).parents[2] / "relay_server" / "dashboard" / "static"
    for f in static.iterdir():
        text = f.read_text()
        hosts = [u for u in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
                 if not u.startswith("http://www.w3.org/2000/svg")]  # fmt: skip
        assert hosts == [], (f.name, hosts)
        if f.suffix in (".js", ".html"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert sink not in text, (f.name, sink)
