"""TLS helpers: a self-signed ECDSA certificate made once, fingerprints, SSL contexts."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import ssl
from pathlib import Path

_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def fingerprint_of_der(der: bytes) -> str:
    """``sha256:`` and 64 lowercase hex digits: the form relayd logs and relayc pins."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normalize_fingerprint(value: str) -> str:
    """Accept ``sha256:AB:CD...`` or ``SHA256:abcd...``; return the canonical form or raise ValueError."""
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[7:]
    v = "sha256:" + v.replace(":", "")
    if not _FINGERPRINT_RE.match(v):
        raise ValueError("must be 'sha256:' followed by 64 hex digits (as relayd logs at start)")
    return v


def fingerprint_of_pem_file(path: Path) -> str:
    """Fingerprint of the first certificate in a PEM file (the leaf of a chain)."""
    text = path.read_text()
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return fingerprint_of_der(ssl.PEM_cert_to_DER_cert(text[begin:end]))


def ensure_self_signed(state_dir: Path, common_name: str = "relayd") -> tuple[Path, Path]:
    """Return (cert, key) paths in ``state_dir``, generating an ECDSA P-256 pair the first time."""
    cert_path = state_dir / "server.crt"
    key_path = state_dir / "server.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    # imported here: cryptography costs ~10 MiB of memory that only certificate generation needs
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp_key = key_path.with_suffix(".key.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".crt.tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)
    return cert_path, key_path


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_context(server_name: str = "", ca_file: str = "") -> ssl.SSLContext:
    """A client context.  With ``server_name``: full chain and name verification (system CAs or
    ``ca_file``).  Without: the chain is not checked here because the caller pins the certificate
    fingerprint right after the handshake, before anything secret-derived is sent."""
    if server_name:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
