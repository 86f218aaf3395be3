"""HTTPS with automatic certificates, against a real ACME server (pebble, Debian's package): a
certificate is issued through relayd's own challenge responder (HTTP-01 and TLS-ALPN-01), a client
that trusts pebble's root reaches the app over HTTPS by name with a WebSocket, renewal replaces the
certificate without dropping an open connection, a passthrough domain on the same port is not
terminated, and a failed issuance leaves plain HTTP working and is reported by the API."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, relayd_config, spawn, vhost_get
from tests.e2e.pebble import Pebble, available
from tests.e2e.test_dashboard import PASSWORD, Api
from tests.e2e.test_https_termination import app_handler, issue, lab_tls_handler, make_ca
from tests.waiting import wait_until

MISSING = available()
if MISSING is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must install pebble for the ACME tests: {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def served_certificate(port: int, name: str) -> x509.Certificate:
    """The certificate relayd presents for ``name`` (not verified: to look at it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=name) as tls:  # fmt: skip
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def verified(pebble: Pebble, tmp: Path) -> ssl.SSLContext:
    """A client context that trusts pebble's issuing root (and nothing else)."""
    root = tmp / "pebble-root.pem"
    root.write_text(pebble.root_pem())
    return ssl.create_default_context(cafile=str(root))


def get(tls: ssl.SSLSocket, host: str, path: str = "/") -> bytes:
    """One keep-alive request on ``tls``: the answer's body (Content-Length framed)."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += tls.recv(4096)
    return body


def keepalive_app(conn: socket.socket) -> None:
    """Answers every request on a connection with ``proto=<X-Forwarded-Proto>``, keep-alive."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        if b"upgrade: websocket" in head.lower():
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + buf)
            while chunk := conn.recv(4096):
                conn.sendall(chunk)
            return
        proto = b"".join(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                         if line.lower().startswith(b"x-forwarded-proto"))  # fmt: skip
        body = b"proto=" + proto
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def certificate_items(api: Api) -> dict[str, dict[str, Any]]:
    status, items, _ = api.call("GET", "/api/v1/certificates")
    assert status == 200, items
    return {i["domain"]: i for i in items}


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_certificates_are_issued_served_and_renewed(challenge: str, tmp_path: Path, procs: list[Proc]) -> None:
    port, dash, http_port, https_port = free_port(), free_port(), free_port(), free_port()
    app = TcpServer(keepalive_app)
    lab_ca = make_ca(tmp_path, "lab-ca")
    lab_cert, lab_key = issue(tmp_path, lab_ca, ["tls.relay.test"], "lab")
    lab_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lab_context.load_cert_chain(lab_cert, lab_key)
    lab_tls = TcpServer(lab_tls_handler(lab_context))  # type: ignore[arg-type]
    # 30 s certificates: renewed when 10 s are left, so one renewal happens within the test
    with Pebble(tmp_path / "pebble", http_port=http_port, tls_port=https_port, validity_seconds=30,
                extra_env={"PEBBLE_AUTHZREUSE": "0"}) as pebble:  # fmt: skip
        d = spawn(procs, "relay_server.cli", relayd_config(
            tmp_path, port, vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="relay.test",
            dashboard={"port": dash, "password": PASSWORD},
            acme={"enable": True, "directory_url": pebble.directory_url, "ca_file": str(pebble.ca_file),
                  "challenge": challenge, "email": "lab@example.org"}))  # fmt: skip
        d.wait_for("listening for relayc")
        tunnels = [{"name": "app", "type": "http", "local_port": app.port, "subdomain": "app"},
                   {"name": "tls", "type": "https", "local_port": lab_tls.port, "subdomain": "tls"}]  # fmt: skip
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
        c.wait_for(r"tunnel app: https://app\.relay\.test:\d+, http://app\.relay\.test")
        api = Api(dash)
        wait_until(lambda: certificate_items(api).get("app.relay.test", {}).get("not_after") is not None, 60,
                   lambda: f"a certificate for app.relay.test (API: {certificate_items(api)}; relayd:\n"
                           f"{d.output[-3000:]}\npebble:\n{pebble.log()[-3000:]})")  # fmt: skip
        item = certificate_items(api)["app.relay.test"]
        assert item["source"] == "acme" and item["issuer"] and "Pebble" in item["issuer"] and item["last_error"] is None
        assert "tls.relay.test" not in certificate_items(api)  # passthrough: relayd holds nothing for it
        # a client that trusts pebble's root reaches the app by name over HTTPS
        context = verified(pebble, tmp_path)
        first = served_certificate(https_port, "app.relay.test")
        sock = socket.create_connection(("127.0.0.1", https_port), timeout=10)
        tls = context.wrap_socket(sock, server_hostname="app.relay.test")
        assert get(tls, "app.relay.test") == b"proto=https"
        # a WebSocket over it
        ws = context.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                                 server_hostname="app.relay.test")  # fmt: skip
        ws.sendall(b"GET /ws HTTP/1.1\r\nHost: app.relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        assert ws.recv(4096).startswith(b"HTTP/1.1 101")
        ws.sendall(b"kernel message")
        got = b""
        while len(got) < 14:
            got += ws.recv(4096)
        assert got == b"kernel message"
        ws.close()
        # the passthrough domain on the same port keeps its own certificate
        lab_client = ssl.create_default_context(cafile=str(lab_ca[2]))
        with lab_client.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                                    server_hostname="tls.relay.test") as passthrough:  # fmt: skip
            passthrough.sendall(b"GET / HTTP/1.1\r\nHost: tls.relay.test\r\n\r\n")
            assert b"lab-tls" in passthrough.recv(4096)
        # renewal: a new certificate is served to new connections; the open one carries on
        wait_until(lambda: served_certificate(https_port, "app.relay.test").serial_number != first.serial_number, 60,
                   "the certificate to be renewed")  # fmt: skip
        assert get(tls, "app.relay.test") == b"proto=https"  # the connection opened before renewal
        tls.close()
        with context.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                                 server_hostname="app.relay.test") as again:  # fmt: skip
            assert get(again, "app.relay.test") == b"proto=https"
        assert "Traceback" not in d.output
    app.close()
    lab_tls.close()


def test_a_failed_issuance_leaves_http_working_and_is_reported(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash, http_port, https_port = free_port(), free_port(), free_port(), free_port()
    app = TcpServer(app_handler)
    try:
        closed = free_port()  # no ACME server there
        d = spawn(procs, "relay_server.cli", relayd_config(
            tmp_path, port, vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="relay.test",
            dashboard={"port": dash, "password": PASSWORD},
            acme={"enable": True, "directory_url": f"https://127.0.0.1:{closed}/dir",
                  "challenge": "http-01"}))  # fmt: skip
        d.wait_for("listening for relayc")
        tunnel = {"name": "app", "type": "http", "local_port": app.port, "subdomain": "app", "https_redirect": True}
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel]))
        c.wait_for(r"tunnel app: https://app\.relay\.test:\d+, http://app\.relay\.test")
        api = Api(dash)
        wait_until(lambda: certificate_items(api).get("app.relay.test", {}).get("last_error"), 30,
                   lambda: f"the failure to be reported (API: {certificate_items(api)})")  # fmt: skip
        item = certificate_items(api)["app.relay.test"]
        assert item["not_after"] is None and item["source"] == "acme"
        assert "refused" in item["last_error"].lower() or "connect" in item["last_error"].lower(), item
        d.wait_for(r"acme: no certificate for app\.relay\.test: .* \(next try in 60 s\)")
        # plain HTTP still serves the app (no redirect to an https that has no certificate)
        assert vhost_get(http_port, "app.relay.test") == (200, b"proto=http")
    finally:
        app.close()


def test_a_cluster_orders_a_name_once_and_every_node_serves_it(tmp_path: Path, procs: list[Proc]) -> None:
    """Two nodes on one PostgreSQL: the node that orders publishes its challenge answer, so the CA
    may validate through the other node (pebble sends its HTTP-01 validation to node B's port while
    node A, which relayc reached first, holds the order); the certificate goes into the store and
    both nodes serve the same one."""
    from tests.e2e.postgres import Postgres
    from tests.e2e.postgres import available as pg_missing

    if pg_missing() is not None:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must install postgresql: {pg_missing()}")
        pytest.skip(str(pg_missing()))
    app = TcpServer(keepalive_app)
    ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(2)]  # control, dash, http, https
    with Postgres(tmp_path / "pg") as pg, Pebble(tmp_path / "pebble", http_port=ports[1][2], tls_port=ports[1][3],
                                                  extra_env={"PEBBLE_AUTHZREUSE": "0"}) as pebble:  # fmt: skip
        nodes = []
        for i, (port, dash, http_port, https_port) in enumerate(ports):
            node_dir = tmp_path / f"node{i}"
            node_dir.mkdir()
            nodes.append(spawn(procs, "relay_server.cli", relayd_config(
                node_dir, port, vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="relay.test",
                store={"url": pg.url}, dashboard={"port": dash, "password": PASSWORD},
                acme={"enable": True, "directory_url": pebble.directory_url, "ca_file": str(pebble.ca_file),
                      "challenge": "http-01"})))  # fmt: skip
            nodes[-1].wait_for("listening for relayc")
        wait_until(lambda: "2 live nodes" in nodes[0].output, 15, "node A to see node B")
        tunnel = {"name": "app", "type": "http", "local_port": app.port, "subdomain": "app"}
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, ports[0][0], [tunnel]))
        c.wait_for(rf"logged in to relayd \S+ at 127\.0\.0\.1:{ports[1][0]}", timeout=20)
        apis = [Api(dash) for _, dash, _, _ in ports]

        def both_served() -> bool:
            return all((certificate_items(api).get("app.relay.test") or {}).get("not_after") for api in apis)

        def why() -> str:
            items = [certificate_items(a) for a in apis]
            logs = "\n".join(n.output[-2000:] for n in nodes)
            return f"both nodes to hold a certificate ({items}); relayd A and B:\n{logs}"

        wait_until(both_served, 60, why)
        served = [served_certificate(https_port, "app.relay.test") for _, _, _, https_port in ports]
        assert served[0].serial_number == served[1].serial_number  # one order, one certificate
        ordered = ["acme: ordering a certificate for app.relay.test" in n.output for n in nodes]
        assert ordered == [True, False]  # node A ordered (relayc reached it first); pebble validated through B

        context = verified(pebble, tmp_path)
        for _, _, _, https_port in ports:
            with context.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                                     server_hostname="app.relay.test") as tls:  # fmt: skip
                assert get(tls, "app.relay.test") == b"proto=https"
    app.close()
