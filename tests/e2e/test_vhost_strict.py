"""The HTTP vhost as an attacker sees it: strict parsing, normalized paths against location-scoped
auth, and requests after a declined Upgrade, against real relayd/relayc processes."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import Proc, free_port, relayc_config, relayd_config, spawn
from tests.e2e.test_vhost import start_app

AUTH = "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("strict")
    public_app, admin_app = start_app("public"), start_app("admin")
    port, http_port = free_port(), free_port()
    procs: list[Proc] = []
    d = spawn(procs, "relay_server.cli", relayd_config(tmp, port, vhost_http_port=http_port,
                                                        subdomain_host="relay.test"))  # fmt: skip
    d.wait_for(r"listening for relayc")
    tunnels = [
        {"name": "public", "type": "http", "local_port": public_app.server_port, "subdomain": "site"},
        # the same domain's /admin goes to another app, behind basic auth
        {"name": "admin", "type": "http", "local_port": admin_app.server_port, "subdomain": "site",
         "locations": ["/admin"], "http_user": "alice", "http_password": "s3cret"},
        {"name": "locked", "type": "http", "local_port": public_app.server_port, "subdomain": "locked",
         "http_user": "alice", "http_password": "s3cret"},
    ]  # fmt: skip
    c = spawn(procs, "relay_client.cli", relayc_config(tmp, port, tunnels))
    for t in tunnels:
        c.wait_for(rf"tunnel {t['name']}: http")
    yield {"http": http_port, "relayd": d}
    for p in procs:
        p.stop()
    public_app.shutdown()
    admin_app.shutdown()


def exchange(port: int, data: bytes, answers: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read up to ``answers`` responses (fewer if it closes)."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while len(out) < answers:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            out.append((status, headers, buf[:length]))
            buf = buf[length:]
    return out


def request(path: str, host: str = "site.relay.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


@pytest.mark.parametrize("path", ["/%61dmin", "//admin", "/./admin", "/x/../admin", "/%2e/admin", "/admin/./"])
def test_disguised_paths_never_get_past_location_auth(site: dict[str, Any], path: str) -> None:
    [(status, headers, _)] = exchange(site["http"], request(path))
    assert status == 401 and "www-authenticate" in headers
    [(status, _, body)] = exchange(site["http"], request(path, extra=f"Authorization: {AUTH}\r\n"))
    assert status == 200
    seen = json.loads(body)
    assert seen["app"] == "admin" and seen["requestline"] == f"GET {path} HTTP/1.1"  # the target, unchanged


@pytest.mark.parametrize("path", ["/admin%2Fx", "/%2fadmin", "/a%5Cb", "/a%00", "/../admin", "/a/../../admin",
                                  "/a\\admin", "/%zz"])  # fmt: skip
def test_encoded_separators_and_climbing_paths_are_400(site: dict[str, Any], path: str) -> None:
    [(status, _, _)] = exchange(site["http"], request(path))
    assert status == 400


MALFORMED = [
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nContent-Length: \xc2\xb2\r\n\r\nxx",  # a unicode digit
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nContent-Length: +5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nContent-Length: 1_0\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: site.relay.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: site.relay.test\r\nHost: locked.relay.test\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: site.relay.test\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: site.relay.test\r\nX-Evil: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: site.relay.test\r\n folded: line\r\n\r\n",
    b"GET nothing HTTP/1.1\r\nHost: site.relay.test\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_heads_get_400_and_nothing_in_the_log(site: dict[str, Any], data: bytes) -> None:
    mark = site["relayd"].mark()
    answers = exchange(site["http"], data)
    assert answers and answers[0][0] == 400
    logged = "\n".join(site["relayd"].lines[mark:])
    assert "Traceback" not in logged and "Exception" not in logged


def test_requests_after_a_declined_upgrade_are_routed_and_authenticated(site: dict[str, Any]) -> None:
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    # the app answers 200 (it declines); the next request on the connection has no credentials: it
    # never reaches the app (relayd cannot put its 401 after an answer it does not follow, so it
    # closes the connection; a browser asks again on a new one and gets the 401 there)
    answers = exchange(site["http"], request("/nows", "locked.relay.test", f"{upgrade}Authorization: {AUTH}\r\n")
                       + request("/after", "locked.relay.test"), answers=2)  # fmt: skip
    assert [a[0] for a in answers] == [200]
    # with credentials and spoofed forwarding headers: relayd's X-Forwarded-* as on a first request
    answers = exchange(site["http"], request("/nows", "locked.relay.test", f"{upgrade}Authorization: {AUTH}\r\n")
                       + request("/after", "locked.relay.test", f"Authorization: {AUTH}\r\nX-Forwarded-For: 6.6.6.6"
                                 "\r\nX-Forwarded-Host: evil.example\r\n"), answers=2)  # fmt: skip
    assert [a[0] for a in answers] == [200, 200]
    seen = json.loads(answers[1][2])["headers"]
    assert seen["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"
    assert seen["X-Forwarded-Host"] == "locked.relay.test"
    assert "Authorization" not in seen  # basic auth is relayd's, not passed to the app


def test_an_upgrade_after_other_requests_goes_to_a_new_connection(site: dict[str, Any]) -> None:
    upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    answers = exchange(site["http"], request("/first") + request("/ws", extra=upgrade), answers=2)
    assert [a[0] for a in answers] == [200]  # the first answered, then the connection closed
