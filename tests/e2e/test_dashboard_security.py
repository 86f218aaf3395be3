"""The dashboard under attack, against a real relayd: the sign-in gate (slow-down and block for
every way of authenticating, parallel guesses no better than serial ones), hashing off the event
loop, cross-site Basic auth, sign-out, hostile query values and headers, blocks, the tunnel cap,
the loop-lag metric and uvicorn's logs.

Loopback addresses other than 127.0.0.1 (127.0.0.0/8 is all local on Linux) stand for distinct
peers, so one test can play several attackers and a bystander."""

from __future__ import annotations

import base64
import re
import socket
import statistics
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    free_port,
    start_relayd,
    start_tunnel,
    wait_port_serves,
)
from tests.e2e.rawclient import RawClient
from tests.e2e.test_dashboard import PASSWORD, Api, wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def start(procs: list[Proc], tmp: Path, port: int, dash: int, dashboard: dict[str, Any] | None = None,
          **kw: Any) -> Proc:  # fmt: skip
    """relayd with a dashboard on 127.0.0.1:``dash`` (password PASSWORD unless ``dashboard`` says)."""
    table = {"addr": "127.0.0.1", "port": dash, **(dashboard or {"password": PASSWORD})}
    d = start_relayd(procs, tmp, port, dashboard=table, **kw)
    d.wait_for(r"dashboard on http://127\.0\.0\.1")
    return d


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def api_token(tmp: Path) -> str:
    return (tmp / "state" / "dashboard_api_token").read_text().strip()


def assert_clean_log(d: Proc) -> None:
    """No request crashed inside relayd (a 500 logs a traceback)."""
    assert d.popen.poll() is None
    assert "Traceback" not in d.output and "Exception in ASGI application" not in d.output, d.output[-3000:]


# --- 1. one gate for every credential ----------------------------------------------------------


def guess_once(dash: int, source: str, way: str, timeout: float) -> bool:
    """One wrong guess; True when it was checked and refused (401, or the form's failed redirect)."""
    api = Api(dash, auth=None, source=source, timeout=timeout)
    if way == "form":
        form = urllib.parse.urlencode({"user": "admin", "password": "wrong"}).encode()
        status, _, headers = api.call("POST", "/login", form, FORM)
        if "wait" in headers.get("location", ""):  # not checked: one attempt at a time
            time.sleep(min(1.0, timeout))
        return status == 303 and "failed" in headers.get("location", "")
    header = basic("admin", "wrong") if way == "basic" else {"Authorization": "Bearer wrong-token"}
    status, _, headers = api.call("GET", "/api/v1/overview", headers=header)
    assert status in (401, 429, 503), status
    if status == 429:  # one attempt at a time from this address: Retry-After says when to come back
        time.sleep(min(float(headers.get("retry-after", "1")), timeout))
    return status == 401


def attack(dash: int, source: str, ways: list[str], seconds: float) -> list[int]:
    """Guess from ``source`` for ``seconds``, one thread per entry of ``ways``, each sending its next
    guess as soon as the previous is answered.  Returns, per thread, the refusals answered in time."""
    deadline = time.monotonic() + seconds
    counts = [0] * len(ways)

    def run(i: int, way: str) -> None:
        while (left := deadline - time.monotonic()) > 0:
            try:
                checked = guess_once(dash, source, way, timeout=left)
            except (TimeoutError, OSError):  # still waiting in line at the deadline
                return
            if checked and time.monotonic() <= deadline:
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i, w), daemon=True) for i, w in enumerate(ways)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return counts


def test_parallel_guesses_in_every_way_get_no_more_tries_than_serial(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    results: dict[str, list[int]] = {}
    # at the same time: one serial guesser, and 30 parallel ones mixing the form, Basic and Bearer
    serial = threading.Thread(target=lambda: results.update(serial=attack(dash, "127.0.0.2", ["basic"], 6.0)))
    serial.start()
    results["parallel"] = attack(dash, "127.0.0.3", ["form", "basic", "bearer"] * 10, 6.0)
    serial.join(30)
    n_serial, n_parallel = sum(results["serial"]), sum(results["parallel"])
    # the delays owed per address are 0.25, 0.5, 1, 2 s...: about 4 answers in 6 s either way
    assert 3 <= n_serial <= 5, results
    assert 1 <= n_parallel <= n_serial + 1, results
    # the bystander at 127.0.0.1 was never slowed down
    t0 = time.monotonic()
    assert Api(dash).call("GET", "/api/v1/overview")[0] == 200
    assert time.monotonic() - t0 < 1.0
    assert_clean_log(d)


@pytest.mark.slow
def test_a_blocked_address_is_refused_in_every_way_then_unblocked(tmp_path: Path, procs: list[Proc]) -> None:
    """30 failures within 10 min block an address for 5 min.  The delays make reaching 30 take
    about 200 s whatever the attacker does: this test pays that once, serially, for real."""
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    attacker = "127.0.0.4"
    failures = 0
    deadline = time.monotonic() + 260
    while True:
        assert time.monotonic() < deadline, f"not blocked after {failures} failures"
        status, body, headers = Api(dash, auth=None, source=attacker, timeout=20).call(
            "GET", "/api/v1/clients", headers=basic("admin", f"guess-{failures}")
        )
        if status == 429:
            break
        assert status == 401, (status, body)
        failures += 1
    assert failures == 30
    assert re.fullmatch(r"too many failed sign-ins from 127\.0\.0\.4; blocked until \d{4}-\d\d-\d\dT[\d:]+\+00:00",
                        body["detail"]), body  # fmt: skip
    assert 1 <= int(headers["retry-after"]) <= 300
    d.wait_for(r"dashboard: sign-ins from '127\.0\.0\.4' blocked for 300 s after 30 failed attempts")
    # blocked: the right password, the right token and the form are refused without being checked
    right = Api(dash, source=attacker)
    assert right.call("GET", "/api/v1/clients")[0] == 429
    assert Api(dash, auth="bearer", token=api_token(tmp_path), source=attacker).call("GET", "/api/v1/clients")[0] == 429
    form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD}).encode()
    status, _, headers = right.call("POST", "/login", form, FORM)
    assert status == 303 and headers["location"] == "/login?wait=1" and "set-cookie" not in headers  # not checked
    # the operator, from another address, sees the block and lifts it
    api = Api(dash)
    blocks = api.call("GET", "/api/v1/blocks")[1]
    assert len(blocks) == 1 and blocks[0]["kind"] == "address" and blocks[0]["value"] == attacker
    assert blocks[0]["scope"] == "dashboard" and blocks[0]["failures"] == 30
    assert time.time() + 250 < blocks[0]["until"] <= time.time() + 300
    assert api.call("DELETE", f"/api/v1/blocks/address/{attacker}")[0] == 204
    assert api.call("GET", "/api/v1/blocks")[1] == []
    assert api.call("DELETE", f"/api/v1/blocks/address/{attacker}")[0] == 404
    t0 = time.monotonic()
    assert right.call("GET", "/api/v1/clients")[0] == 200  # and without the delay it owed
    assert time.monotonic() - t0 < 2.0
    assert_clean_log(d)


# --- 2. hashing off the event loop -------------------------------------------------------------


def test_password_guessing_does_not_slow_tunnels(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    from relay_server.passwords import hash_password

    port, dash, public = free_port(), free_port(), free_port()
    d = start(procs, tmp_path, port, dash, dashboard={"password_hash": hash_password(PASSWORD)})
    start_tunnel(procs, tmp_path, port, "echo", echo.port, public)
    wait_port_serves(public)
    scrape = Api(dash, auth="bearer", token=api_token(tmp_path))
    assert scrape.call("GET", "/metrics")[0] == 200  # starts the loop-lag interval
    # 40 attackers (40 addresses, so 40 guesses can be in flight at once) guess wrong passwords
    # while the tunnel carries echo round trips
    checked = [0]
    stop = threading.Event()

    def guesser(source: str) -> None:
        api = Api(dash, auth=None, source=source, timeout=15)
        while not stop.is_set():
            try:
                status = api.call("GET", "/api/v1/overview", headers=basic("admin", "wrong"))[0]
            except OSError:
                return
            if status == 401:
                checked[0] += 1

    attackers = [threading.Thread(target=guesser, args=(f"127.0.1.{i}",), daemon=True) for i in range(1, 41)]
    for t in attackers:
        t.start()
    trips: list[float] = []
    with socket.create_connection(("127.0.0.1", public), timeout=10) as s:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            s.sendall(b"p" * 64)
            got = b""
            while len(got) < 64:
                got += s.recv(64 - len(got))
            trips.append(time.monotonic() - t0)
            time.sleep(0.01)
    lag_text = scrape.call("GET", "/metrics")[1]
    stop.set()
    for t in attackers:
        t.join(20)
    worst, median = max(trips), statistics.median(trips)
    summary = f"{len(trips)} echo round trips: median {median:.3f} s, worst {worst:.3f} s; {checked[0]} guesses checked"
    assert worst < 0.5, summary
    assert median < 0.1 and len(trips) > 100, summary  # hashing on the loop: ~0.25 s each, ~40 in 8 s
    assert checked[0] >= 40, summary  # every attacker had guesses checked: scrypt ran all along
    lag = float(re.search(r"^relay_event_loop_lag_seconds (\S+)$", lag_text, re.M).group(1))  # type: ignore[union-attr]
    assert lag < 0.5, lag
    assert_clean_log(d)


# --- 3. cached Basic credentials cannot be used cross-site -------------------------------------


def test_basic_auth_state_changes_from_other_sites_are_refused(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    api = Api(dash)
    own = f"http://127.0.0.1:{dash}"
    refused: list[tuple[dict[str, str], str]] = [
        ({"Origin": "http://evil.example"}, "Origin"),
        ({"Origin": "null"}, "Origin"),
        ({"Origin": f"https://127.0.0.1:{dash}"}, "Origin"),  # the scheme is part of the origin
        ({"Origin": f"http://127.0.0.1:{dash + 1}"}, "Origin"),
        ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
        ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site"),
        ({"Origin": own, "Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
    ]
    for i, (headers, named) in enumerate(refused):
        status, body, _ = api.call("POST", "/api/v1/clients", {"name": f"csrf-{i}"}, headers=headers)
        assert status == 403 and named in body["detail"], (headers, status, body)
    api.call("POST", "/api/v1/clients", {"name": "victim"})
    for method, path, body in (("DELETE", "/api/v1/clients/victim", None),
                               ("PATCH", "/api/v1/clients/victim", {"enabled": False}),
                               ("POST", "/api/v1/clients/victim/rotate", None)):  # fmt: skip
        assert api.call(method, path, body, headers={"Origin": "http://evil.example"})[0] == 403, (method, path)
    names = {c["name"] for c in api.call("GET", "/api/v1/clients")[1]}
    assert names == {"victim"}  # nothing refused was done
    assert next(c for c in api.call("GET", "/api/v1/clients")[1] if c["name"] == "victim")["enabled"]
    # reads are not state changes; the dashboard's own pages, and scripts without the headers, pass
    assert api.call("GET", "/api/v1/clients", headers={"Origin": "http://evil.example"})[0] == 200
    assert api.call("POST", "/api/v1/clients", {"name": "own"}, headers={"Origin": own})[0] == 201
    assert api.call("POST", "/api/v1/clients", {"name": "same"}, headers={"Sec-Fetch-Site": "same-origin"})[0] == 201
    assert api.call("POST", "/api/v1/clients", {"name": "curl"})[0] == 201
    # the Bearer token is never sent by a browser on its own: not concerned
    bearer = Api(dash, auth="bearer", token=api_token(tmp_path))
    assert bearer.call("POST", "/api/v1/clients", {"name": "script"}, headers={"Origin": "http://x"})[0] == 201
    # a hostile page cannot make the operator's browser guess (and get its address blocked)
    form = urllib.parse.urlencode({"user": "admin", "password": "x"}).encode()
    assert Api(dash, auth=None).call("POST", "/login", form, {**FORM, "Sec-Fetch-Site": "cross-site"})[0] == 403
    assert_clean_log(d)


# --- 4. sign-out ends the session on the server ------------------------------------------------


def test_sign_out_ends_the_session_and_needs_the_csrf_token(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    anon = Api(dash, auth=None)

    def sign_in() -> tuple[dict[str, str], str]:
        form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD}).encode()
        status, _, headers = anon.call("POST", "/login", form, FORM)
        assert status == 303
        session = {"Cookie": headers["set-cookie"].split(";")[0]}
        page = anon.call("GET", "/", headers=session)[1]
        assert 'id="logout"' in page
        form_token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        meta_token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        assert form_token == meta_token
        return session, form_token

    session, csrf = sign_in()
    # without the token, or with another, sign-out is refused and the session lives on
    for body in (b"", b"csrf=wrong"):
        assert anon.call("POST", "/logout", body, {**FORM, **session})[0] == 403
    assert anon.call("GET", "/api/v1/overview", headers=session)[0] == 200
    # the Sign out form as a browser sends it
    status, _, headers = anon.call("POST", "/logout", urllib.parse.urlencode({"csrf": csrf}).encode(),
                                   {**FORM, **session})  # fmt: skip
    assert status == 303 and headers["location"] == "/login"
    assert re.search(r"relay_session=\"?\"?;", headers["set-cookie"]) and "Max-Age=0" in headers["set-cookie"]
    assert anon.call("GET", "/api/v1/overview", headers=session)[0] == 401  # the old cookie is dead on the server
    assert anon.call("GET", "/", headers=session)[0] == 303
    # the header works too (for scripts using the cookie)
    session, csrf = sign_in()
    assert anon.call("POST", "/logout", headers={**session, "X-CSRF-Token": csrf})[0] == 303
    assert anon.call("GET", "/api/v1/overview", headers=session)[0] == 401
    assert_clean_log(d)


# --- 5. hostile query and path values ----------------------------------------------------------


def test_bad_query_and_path_values_are_422_not_500(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    api = Api(dash)
    for bad in ("nan", "NaN", "inf", "-inf", "Infinity", "1e400", "1e300", str(2**41), "-1", "abc", ""):
        status, body, _ = api.call("GET", f"/api/v1/traffic?since={urllib.parse.quote(bad)}")
        assert status == 422, (bad, status, body)
        assert body["detail"][0]["loc"] == ["query", "since"], (bad, body)
    for good in ("0", str(int(time.time()) - 600), "1e9", str(2**40)):
        assert api.call("GET", f"/api/v1/traffic?since={good}")[0] == 200, good
    long = "x" * 300
    for field in ("client", "tunnel"):
        status, body, _ = api.call("GET", f"/api/v1/traffic?{field}={long}")
        assert status == 422 and body["detail"][0]["loc"] == ["query", field]
        assert api.call("GET", f"/api/v1/traffic?{field}=%00%ff%ED%A0%80")[0] == 200
    for method, path in (("PATCH", "/api/v1/clients/{}"), ("POST", "/api/v1/clients/{}/rotate"),
                         ("POST", "/api/v1/clients/{}/kick"), ("DELETE", "/api/v1/clients/{}"),
                         ("PATCH", "/api/v1/tunnels/lab/{}"), ("DELETE", "/api/v1/tunnels/{}/x"),
                         ("DELETE", "/api/v1/blocks/client/{}")):  # fmt: skip
        body = {"enabled": True} if method == "PATCH" else None
        assert api.call(method, path.format(long), body)[0] == 422, path
        for odd in ("%00", "%ff", "%ED%A0%80", "..", "a%0Ab"):
            assert api.call(method, path.format(odd), body)[0] == 404, (path, odd)
    assert api.call("DELETE", "/api/v1/blocks/everyone/x")[0] == 422
    assert_clean_log(d)


# --- 6. blocks: listed and lifted --------------------------------------------------------------


def test_relayc_blocks_are_listed_and_lifted(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash, auth={"token": TOKEN, "block_after_failures": 3})
    api = Api(dash)
    assert api.call("GET", "/api/v1/blocks")[1] == []
    name = "lab.gpu-01"
    for _ in range(3):  # a relayc with a wrong token, from 127.0.0.2
        c = RawClient(port, source_ip="127.0.0.2")
        assert not c.login("wrong-token-0123456789", name=name)
        c.close()

    def listed() -> list[dict[str, Any]]:
        return [b for b in api.call("GET", "/api/v1/blocks")[1] if b["scope"] == "relayc"]

    blocks = wait_until(listed, "relayd's login guard lists the block")
    assert [(b["kind"], b["value"], b.get("address")) for b in blocks] == [("client", name, "127.0.0.2")], blocks
    assert blocks[0]["failures"] == 3 and time.time() < blocks[0]["until"] <= time.time() + 600
    quoted = urllib.parse.quote(name, safe="")
    assert api.call("DELETE", f"/api/v1/blocks/client/{quoted}")[0] == 204
    assert listed() == []
    assert api.call("DELETE", f"/api/v1/blocks/client/{quoted}")[0] == 404
    assert api.call("DELETE", "/api/v1/blocks/address/127.0.0.9")[0] == 404
    assert api.call("DELETE", "/api/v1/blocks/pair/raw")[0] == 422
    c = RawClient(port, source_ip="127.0.0.2")  # unblocked: its proof is checked again
    assert c.login(TOKEN, name=name)
    c.close()
    assert_clean_log(d)


# --- 7. the tunnel cap counts every tunnel of a client -----------------------------------------


def test_tunnel_cap_counts_config_and_dashboard_tunnels(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash, max_tunnels_per_client=3)
    api = Api(dash)
    # "lab" has two tunnels from its own relayc.toml (shared token: not in the store)
    start_tunnel(procs, tmp_path, port, "from-config", echo.port, 0)
    wait_until(lambda: len([t for t in api.call("GET", "/api/v1/tunnels")[1] if t["status"] == "active"]) == 1,
               "relayc's tunnel is live")  # fmt: skip
    assert api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "dash-1", "local_port": echo.port})[0] == 201
    wait_until(lambda: len([t for t in api.call("GET", "/api/v1/tunnels")[1] if t["status"] == "active"]) == 2,
               "the pushed tunnel is live")  # fmt: skip
    assert api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "dash-2", "local_port": echo.port})[0] == 201
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "dash-3", "local_port": echo.port})
    assert status == 409 and "max_tunnels_per_client is 3" in body["detail"] and "has 3 tunnels" in body["detail"]
    # a dashboard client that is offline: stored tunnels count, disabled ones too
    api.call("POST", "/api/v1/clients", {"name": "gpu"})
    for i in range(3):
        assert api.call("POST", "/api/v1/tunnels", {"client": "gpu", "name": f"t{i}", "local_port": 22})[0] == 201
    assert api.call("PATCH", "/api/v1/tunnels/gpu/t0", {"enabled": False})[0] == 200
    status, body, _ = api.call("POST", "/api/v1/tunnels", {"client": "gpu", "name": "t3", "local_port": 22})
    assert status == 409 and "max_tunnels_per_client is 3" in body["detail"]
    assert api.call("DELETE", "/api/v1/tunnels/gpu/t0")[0] == 204
    assert api.call("POST", "/api/v1/tunnels", {"client": "gpu", "name": "t3", "local_port": 22})[0] == 201
    assert_clean_log(d)


def test_tunnel_cap_zero_is_unlimited(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash, max_tunnels_per_client=0)
    api = Api(dash)
    api.call("POST", "/api/v1/clients", {"name": "gpu"})
    for i in range(70):  # beyond the default of 64
        assert api.call("POST", "/api/v1/tunnels", {"client": "gpu", "name": f"t{i}", "local_port": 22})[0] == 201
    assert_clean_log(d)


# --- 8. the event-loop lag metric --------------------------------------------------------------


def test_metrics_export_event_loop_lag(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    text = Api(dash).call("GET", "/metrics")[1]
    assert "# HELP relay_event_loop_lag_seconds Worst event-loop lag since the previous scrape.\n" in text
    assert "# TYPE relay_event_loop_lag_seconds gauge\n" in text
    m = re.search(r"^relay_event_loop_lag_seconds (\S+)$", text, re.M)
    assert m is not None and 0 <= float(m.group(1)) < 1.0
    assert_clean_log(d)


# --- 9. uvicorn logs through relayd's handler --------------------------------------------------


def test_uvicorn_logs_propagate_to_relayds_handler(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    mark = d.mark()
    with socket.create_connection(("127.0.0.1", dash), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http\r\n\r\n")  # uvicorn logs "Invalid HTTP request received."
        s.recv(1024)
    # relayd's format (with the logger's name), not uvicorn's own ("WARNING:  Invalid HTTP request...")
    d.wait_for(r"WARNING.*uvicorn\.error: Invalid HTTP request received", start=mark)
    assert not any(line.startswith("WARNING:  ") for line in d.lines)
    # what the dashboard logs about a peer is quoted (%r)
    mark = d.mark()
    assert Api(dash, auth=None, source="127.0.0.5").call("GET", "/metrics", headers=basic("x", "y"))[0] == 401
    d.wait_for(r"dashboard: failed sign-in \(basic\) from '127\.0\.0\.5'", start=mark)
    assert_clean_log(d)


# --- 10. hostile credentials and bodies --------------------------------------------------------


def raw_request(port: int, request: bytes, timeout: float = 10) -> int:
    """Send bytes as they are; the status code of the answer (0 when the connection is closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                return 0
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_malformed_credentials_and_huge_bodies_are_4xx(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    anon = Api(dash, auth=None)
    b64 = base64.b64encode
    for header in ("Basic !!!not-base64!!!", "Basic " + b64(b"\xff\xfe:\xfd").decode(),
                   "Basic " + b64(b"no-colon").decode(), "Basic", "Basic ====", "Bearer", "Bearer " + "x" * 5000,
                   "Basic " + "QUFB" * 2000, "Digest username=admin"):  # fmt: skip
        status = anon.call("GET", "/api/v1/clients", headers={"Authorization": header})[0]
        assert 400 <= status < 500, (header[:40], status)
    # bytes that are not UTF-8 (nor ASCII) in the header itself, and in a Bearer token
    for value in (b"Basic \xff\xfe\xfd", b"Bearer \xc3\x28\xff", b"\xff\xff \xff"):
        req = b"GET /api/v1/clients HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\nConnection: close\r\n\r\n"
        assert 400 <= raw_request(dash, req) < 500, value
    # a huge Authorization header is refused, whatever the HTTP parser's own limits
    req = b"GET /api/v1/clients HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"A" * 60_000 + b"\r\n\r\n"
    status = raw_request(dash, req)
    assert status == 0 or 400 <= status < 500, status
    # bodies: refused before anything buffers or parses them, signed in or not.  Only the head is
    # sent (relayd answers from Content-Length), or, chunked, just over the limit: what relayd does
    # not read would make its close a reset that loses the answer.
    auth = b"Authorization: " + basic("admin", PASSWORD)["Authorization"].encode() + b"\r\n"
    for path, ctype, extra in ((b"/api/v1/clients", b"application/json", b""),
                               (b"/api/v1/clients", b"application/json", auth),
                               (b"/login", b"application/x-www-form-urlencoded", b"")):  # fmt: skip
        head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\n" + extra +
                b"Content-Length: 100000000\r\n\r\n")  # fmt: skip
        assert raw_request(dash, head) == 413, path
    chunked = (b"POST /api/v1/clients HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\n\r\n%x\r\n" % 70_000 + b" " * 70_000 + b"\r\n")  # fmt: skip
    assert raw_request(dash, chunked) == 413
    assert raw_request(dash, b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n") in (400, 413)
    # a long form is cut at 8 KiB (a password beyond that is not a password): a failed sign-in
    status, _, headers = anon.call("POST", "/login", b"user=admin&password=" + b"x" * 20_000, FORM)
    assert status == 303 and "failed" in headers["location"]
    assert Api(dash).call("GET", "/api/v1/overview")[0] == 200
    assert_clean_log(d)


def test_guesses_waiting_in_line_are_bounded_per_address(tmp_path: Path, procs: list[Proc]) -> None:
    """80 guesses at once from one address: at most 64 may hold or wait for the address's turn; the
    rest are refused at once (503, nothing checked).  Other addresses are not affected."""
    port, dash = free_port(), free_port()
    d = start(procs, tmp_path, port, dash)
    answers: list[tuple[int, float, str]] = []

    def one() -> None:
        t0 = time.monotonic()
        try:
            status, _, headers = Api(dash, auth=None, source="127.0.0.6", timeout=3).call(
                "GET", "/api/v1/overview", headers=basic("admin", "wrong"))  # fmt: skip
        except OSError:  # still waiting in line
            return
        answers.append((status, time.monotonic() - t0, headers.get("retry-after", "")))

    threads = [threading.Thread(target=one) for _ in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # once the address has failed, the guesses that were not yet in line are refused at once
    busy = [a for a in answers if a[0] in (429, 503)]
    assert len(busy) >= 10, answers
    assert all(elapsed < 2.0 and retry == "1" for _, elapsed, retry in busy), busy
    assert {a[0] for a in answers} <= {401, 429, 503}
    assert [a[0] for a in answers].count(401) <= 4  # 0.25 + 0.5 + 1 + 2 s of delays fit in 3 s
    t0 = time.monotonic()
    assert Api(dash, source="127.0.0.7").call("GET", "/api/v1/overview")[0] == 200
    assert time.monotonic() - t0 < 1.0
    assert_clean_log(d)
