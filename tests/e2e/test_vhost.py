"""HTTP and HTTPS virtual hosts end to end: real relayd/relayc, real backends on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.harness import Proc, free_port, recv_all, relayc_config, relayd_config

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SSE_SECOND = threading.Event()  # set by the test once the first event reached it


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    app_name = "?"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: first\n\n")
            self.wfile.flush()
            SSE_SECOND.wait(30)  # the response stays open until the test saw the first event
            self.wfile.write(b"data: second\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            head = self.rfile.read(2)
            length = head[1] & 0x7F
            mask = self.rfile.read(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            self.wfile.write(bytes([0x81, len(payload)]) + payload)  # echo, unmasked
            self.wfile.flush()
            self.close_connection = True
            return
        body = json.dumps({"app": self.app_name, "path": self.path, "headers": dict(self.headers),
                           "requestline": self.requestline}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_app(name: str) -> ThreadingHTTPServer:
    handler = type(f"App_{name}", (App,), {"app_name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def start_tls_app(tmp: Path, name: str) -> tuple[int, Path]:
    """A TLS server that answers 'hello from NAME' after the handshake: the app terminates TLS."""
    cert, key = make_cert(tmp, name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(100)
                    tls.sendall(f"hello from {name}".encode())
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1]), cert


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("vhost")
    apps = {n: start_app(n) for n in ("one", "two", "api")}
    tls_a, cert_a = start_tls_app(tmp, "a.tls.test")
    tls_b, cert_b = start_tls_app(tmp, "b.tls.test")
    port, http_port, https_port = free_port(), free_port(), free_port()
    dead = free_port()
    d = Proc("relay_server.cli", relayd_config(tmp, port, vhost_http_port=http_port, vhost_https_port=https_port,
                                                subdomain_host="relay.test", vhost_header_timeout=2))  # fmt: skip
    d.wait_for(r"listening for relayc")
    tunnels = [
        {"name": "one", "type": "http", "local_port": apps["one"].server_port, "subdomain": "one"},
        {"name": "two", "type": "http", "local_port": apps["two"].server_port, "custom_domains": ["two.example.org"]},
        {"name": "api", "type": "http", "local_port": apps["api"].server_port, "subdomain": "one",
         "locations": ["/api"]},
        {"name": "locked", "type": "http", "local_port": apps["one"].server_port, "subdomain": "locked",
         "http_user": "alice", "http_password": "s3cret"},
        {"name": "down", "type": "http", "local_port": dead, "subdomain": "down"},
        {"name": "tls-a", "type": "https", "local_port": tls_a, "custom_domains": ["a.tls.test"]},
        {"name": "tls-b", "type": "https", "local_port": tls_b, "custom_domains": ["b.tls.test"]},
    ]  # fmt: skip
    c = Proc("relay_client.cli", relayc_config(tmp, port, tunnels))
    for t in tunnels:
        c.wait_for(rf"tunnel {t['name']}: http")
    # a second client that then goes offline, to see the 502 page
    c2 = Proc(
        "relay_client.cli",
        relayc_config(
            tmp,
            port,
            [{"name": "gone", "type": "http", "local_port": dead, "subdomain": "gone"}],
            filename="c2.toml",
            name="lab2",
        ),
    )
    c2.wait_for(r"tunnel gone: http")
    c2.stop(signal.SIGTERM)
    d.wait_for(r"client lab2 .* disconnected")
    yield {"http": http_port, "https": https_port, "certs": {"a": cert_a, "b": cert_b}, "relayd": d, "relayc": c}
    for p in (c, d):
        p.stop(signal.SIGKILL)
    for a in apps.values():
        a.shutdown()


def get(
    port: int, host: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host, **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def test_two_http_tunnels_on_one_port_routed_by_host(world: dict[str, Any]) -> None:
    status, _, body = get(world["http"], "one.relay.test")
    assert status == 200 and json.loads(body)["app"] == "one"
    status, _, body = get(world["http"], "TWO.example.org:8080")  # case and port suffix ignored
    assert status == 200 and json.loads(body)["app"] == "two"


def test_longest_location_wins(world: dict[str, Any]) -> None:
    assert json.loads(get(world["http"], "one.relay.test", "/api/v1")[2])["app"] == "api"
    assert json.loads(get(world["http"], "one.relay.test", "/apix")[2])["app"] == "api"  # plain prefix
    assert json.loads(get(world["http"], "one.relay.test", "/other")[2])["app"] == "one"


def test_forwarded_headers_reach_the_app(world: dict[str, Any]) -> None:
    _, _, body = get(world["http"], "one.relay.test", "/", {"X-Forwarded-Proto": "forged"})
    headers = json.loads(body)["headers"]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "one.relay.test"


def test_keep_alive_requests_each_routed_and_never_to_the_wrong_tunnel(world: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", world["http"], timeout=10)
    for _ in range(3):
        conn.request("GET", "/", headers={"Host": "one.relay.test"})
        assert json.loads(conn.getresponse().read())["app"] == "one"
    # the same connection, another host: relayd closes instead of delivering it to "one"
    conn.request("GET", "/", headers={"Host": "two.example.org"})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        conn.getresponse().read()
    conn.close()
    # a fresh connection (what a browser does next) reaches the right app
    assert json.loads(get(world["http"], "two.example.org")[2])["app"] == "two"


def recv_until(s: socket.socket, done: Callable[[bytes], bool], size: int = 1000) -> bytes:
    """Read from ``s`` until ``done(what was read)``; an EOF before that fails the test, a silence
    raises the socket's timeout."""
    got = b""
    while not done(got):
        chunk = s.recv(size)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def test_websocket_echo_through_the_tunnel(world: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", world["http"]), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: one.relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
        head = recv_until(s, lambda got: b"\r\n\r\n" in got, size=1)  # not a byte of what follows
        assert head.startswith(b"HTTP/1.1 101")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        mask = b"\x01\x02\x03\x04"
        payload = b"kernel-message"
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        frame = recv_until(s, lambda got: len(got) >= 2 + len(payload))
        assert frame == bytes([0x81, len(payload)]) + payload


def test_server_sent_event_arrives_while_the_response_is_open(world: dict[str, Any]) -> None:
    """The app sends its second event only once the first reached the visitor: a relayd that held
    the answer back until the response ends never delivers the first (the read times out)."""
    SSE_SECOND.clear()
    try:
        with socket.create_connection(("127.0.0.1", world["http"]), timeout=10) as s:
            s.sendall(b"GET /sse HTTP/1.1\r\nHost: one.relay.test\r\n\r\n")
            got = recv_until(s, lambda got: b"data: first" in got)
            assert b"data: second" not in got
            SSE_SECOND.set()
            rest = recv_all(s, timeout=10)
            assert b"data: second" in rest
    finally:
        SSE_SECOND.set()  # never leave the app's thread waiting


def test_basic_auth(world: dict[str, Any]) -> None:
    status, headers, _ = get(world["http"], "locked.relay.test")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
    bad = base64.b64encode(b"alice:wrong").decode()
    assert get(world["http"], "locked.relay.test", "/", {"Authorization": f"Basic {bad}"})[0] == 401
    good = base64.b64encode(b"alice:s3cret").decode()
    status, _, body = get(world["http"], "locked.relay.test", "/", {"Authorization": f"Basic {good}"})
    assert status == 200
    assert "Authorization" not in json.loads(body)["headers"]  # relayd's password is not passed on


def test_unknown_host_404_names_the_host(world: dict[str, Any]) -> None:
    status, _, body = get(world["http"], "nobody.relay.test")
    assert status == 404 and b"nobody.relay.test" in body and b"Traceback" not in body


def test_offline_client_502_and_unreachable_service_502(world: dict[str, Any]) -> None:
    status, _, body = get(world["http"], "gone.relay.test")
    assert status == 502 and b"lab2" in body and b"not connected" in body
    status, _, body = get(world["http"], "down.relay.test")
    assert status == 502 and b"not reachable" in body


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return recv_all(s, timeout=10)


def test_malformed_request_400_and_oversized_headers_431(world: dict[str, Any]) -> None:
    assert raw(world["http"], b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    big = b"GET / HTTP/1.1\r\nHost: one.relay.test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert raw(world["http"], big).startswith(b"HTTP/1.1 431")
    # other visitors are unaffected
    assert get(world["http"], "one.relay.test")[0] == 200


def test_slow_headers_are_cut_off(world: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", world["http"]), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: one.rel")
        t0 = time.monotonic()
        answer = recv_all(s, timeout=10)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert get(world["http"], "one.relay.test")[0] == 200


@pytest.mark.parametrize("name", ["a", "b"])
def test_sni_routes_real_tls_handshakes(world: dict[str, Any], name: str) -> None:
    ctx = ssl.create_default_context(cafile=str(world["certs"][name]))
    with (
        socket.create_connection(("127.0.0.1", world["https"]), timeout=10) as raw_sock,
        ctx.wrap_socket(raw_sock, server_hostname=f"{name}.tls.test") as tls,
    ):
        assert tls.getpeercert()["subject"][0][0][1] == f"{name}.tls.test"  # the app's own certificate
        tls.sendall(b"hi")
        assert tls.recv(100) == f"hello from {name}.tls.test".encode()


def test_sni_unknown_or_missing_name_is_closed(world: dict[str, Any]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for server_name in ("unknown.tls.test", None):
        with (
            socket.create_connection(("127.0.0.1", world["https"]), timeout=10) as raw_sock,
            pytest.raises(OSError) as closed,  # ssl.SSLError and ConnectionResetError are OSErrors
        ):
            ctx.wrap_socket(raw_sock, server_hostname=server_name).recv(10)
        # a timeout is an OSError too, but means the connection was left open (or routed to an app,
        # which waits for the visitor to speak first): not closed
        assert not isinstance(closed.value, TimeoutError), f"{server_name}: not closed within 10 s"


def test_conflicting_domain_is_refused_with_the_reason(world: dict[str, Any], tmp_path: Path) -> None:
    port = int(world["relayd"].wait_for(r"listening for relayc on 127\.0\.0\.1:(\d+)").group(1))
    c = Proc(
        "relay_client.cli",
        relayc_config(
            tmp_path, port, [{"name": "thief", "type": "http", "local_port": 1, "subdomain": "one"}], name="other"
        ),
    )
    try:
        c.wait_for(r"tunnel thief refused by relayd: domain one\.relay\.test belongs to client 'lab'")
    finally:
        c.stop(signal.SIGKILL)
    assert json.loads(get(world["http"], "one.relay.test")[2])["app"] == "one"
