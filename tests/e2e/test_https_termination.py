"""HTTPS termination at relayd with certificates from files (``[[certificates]]``): an http
tunnel's domain is served over HTTPS on vhost_https_port (X-Forwarded-Proto https, WebSockets,
HSTS with ``hsts``),
while an https (passthrough) tunnel on the same port keeps its own TLS untouched; plain HTTP
redirects with ``https_redirect``; a certificate that cannot be served stops relayd with exit 2
naming the key."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, relayd_config, spawn, vhost_get


def make_ca(tmp: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def issue(tmp: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path], names: list[str],
          stem: str) -> tuple[Path, Path]:  # fmt: skip
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = tmp / f"{stem}.crt", tmp / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


def app_handler(conn: socket.socket) -> None:
    """An app that answers with the X-Forwarded-Proto it got, or switches to an echo on Upgrade."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    if "upgrade: websocket" in head:
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while chunk := conn.recv(4096):
            conn.sendall(chunk)
        return
    proto = next((line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("x-forwarded-proto")),
                 "")  # fmt: skip
    body = f"proto={proto}".encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def lab_tls_handler(context: ssl.SSLContext) -> object:
    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nlab-tls")

    return handle


def https_request(port: int, name: str, ca_file: Path, request: bytes) -> tuple[ssl.SSLSocket, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(sock, server_hostname=name)
    tls.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    return tls, data


def test_http_tunnels_over_https_with_certificate_files(tmp_path: Path, procs: list[Proc]) -> None:
    relay_ca = make_ca(tmp_path, "relay-test-ca")
    cert_file, key_file = issue(tmp_path, relay_ca, ["*.relay.test"], "wildcard")
    lab_ca = make_ca(tmp_path, "lab-own-ca")
    lab_cert, lab_key = issue(tmp_path, lab_ca, ["tls.relay.test"], "lab")
    lab_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lab_context.load_cert_chain(lab_cert, lab_key)
    app, lab_tls = TcpServer(app_handler), TcpServer(lab_tls_handler(lab_context))  # type: ignore[arg-type]
    port, http_port, https_port = free_port(), free_port(), free_port()
    try:
        d = spawn(procs, "relay_server.cli", relayd_config(
            tmp_path, port, vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="relay.test",
            certificates=[{"cert_file": cert_file.name, "key_file": key_file.name}]))  # fmt: skip
        d.wait_for(r"certificate wildcard\.crt for \*\.relay\.test")
        d.wait_for("listening for relayc")
        tunnels = [
            {
                "name": "app",
                "type": "http",
                "local_port": app.port,
                "subdomain": "app",
                "https_redirect": True,
                "hsts": True,
            },
            {"name": "tls", "type": "https", "local_port": lab_tls.port, "subdomain": "tls"},
        ]
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
        c.wait_for(r"tunnel app: https://app\.relay\.test:\d+, http://app\.relay\.test")
        c.wait_for(r"tunnel tls: https://tls\.relay\.test")
        # the http tunnel over HTTPS, verified against relayd's certificate
        tls, answer = https_request(https_port, "app.relay.test", relay_ca[2],
                                    b"GET / HTTP/1.1\r\nHost: app.relay.test\r\n\r\n")  # fmt: skip
        while chunk := tls.recv(4096):
            answer += chunk
        tls.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=31536000\r\n"), answer
        assert answer.endswith(b"\r\nContent-Length: 11\r\nConnection: close\r\n\r\nproto=https"), answer
        # a WebSocket through it
        tls, answer = https_request(https_port, "app.relay.test", relay_ca[2],
                                    b"GET /ws HTTP/1.1\r\nHost: app.relay.test\r\nUpgrade: websocket\r\n"
                                    b"Connection: Upgrade\r\n\r\n")  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 101"), answer
        tls.sendall(b"frame through TLS")
        got = b""
        while len(got) < 17:
            got += tls.recv(4096)
        assert got == b"frame through TLS"
        tls.close()
        # the https tunnel on the same port: its own certificate, relayd does not terminate it
        tls, answer = https_request(https_port, "tls.relay.test", lab_ca[2],
                                    b"GET / HTTP/1.1\r\nHost: tls.relay.test\r\n\r\n")  # fmt: skip
        while chunk := tls.recv(4096):
            answer += chunk
        assert answer.endswith(b"lab-tls")
        tls.close()
        # plain HTTP: 308 to the https URL (path and query kept)
        status, _ = vhost_get(http_port, "app.relay.test")
        assert status == 308
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as s:
            s.sendall(b"GET /tree?x=1 HTTP/1.1\r\nHost: app.relay.test\r\n\r\n")
            head = s.recv(4096).decode()
        assert f"Location: https://app.relay.test:{https_port}/tree?x=1\r\n" in head, head
        # a name without a certificate or tunnel: closed, no HTTP page
        context = ssl.create_default_context(cafile=str(relay_ca[2]))
        with socket.create_connection(("127.0.0.1", https_port), timeout=10) as sock, \
                pytest.raises((ssl.SSLError, OSError)):  # fmt: skip
            context.wrap_socket(sock, server_hostname="nothing.relay.test").close()
    finally:
        app.close()
        lab_tls.close()


def test_a_certificate_that_cannot_be_served_exits_2_naming_the_key(tmp_path: Path) -> None:
    relay_ca = make_ca(tmp_path, "ca")
    cert_file, _ = issue(tmp_path, relay_ca, ["a.relay.test"], "a")
    _, other_key = issue(tmp_path, relay_ca, ["b.relay.test"], "b")
    cfg = relayd_config(tmp_path, free_port(), vhost_https_port=free_port(),
                        certificates=[{"cert_file": cert_file.name, "key_file": other_key.name}])  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "relay_server.cli", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "certificates[0].cert_file" in done.stderr, done.stderr
    cfg = relayd_config(tmp_path, free_port(), certificates=[{"cert_file": "missing.crt", "key_file": "b.key"}])
    done = subprocess.run([sys.executable, "-m", "relay_server.cli", "-c", str(cfg), "--check"], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "certificates[0].cert_file: 'missing.crt': no such file" in done.stderr
