"""Row 7 of the benchmark: keep-alive requests over HTTPS, TLS terminated at the front.

Two things the row needs that the other rows do not:

* a throwaway CA and a wildcard certificate for the vhost domain (relayd's ``[[certificates]]``
  and haproxy's ``ssl crt``), made with the cryptography package (a relay dependency);
* a way to make wrk speak TLS to a *name* on 127.0.0.1.  wrk takes the TLS server name (SNI)
  and the Host header from its URL; relayd routes an HTTPS connection by SNI and closes one
  without it, so the URL must carry ``web.bench.test``, which nothing resolves (names under
  ``.localhost`` do not resolve either without nss-myhostname, and system files such as
  /etc/hosts are not the bench's to edit).  wrk's Lua ``wrk.resolve`` is what turns the URL's
  host into addresses: a one-line script replaces it with a lookup of 127.0.0.1, so SNI and Host
  stay the name while the connection goes to loopback.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# wrk's default wrk.resolve looks the URL's host up; connect to loopback instead, keeping the name
# for SNI and Host.  ``service`` is the URL's port.
WRK_LOOPBACK_LUA = """\
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


@dataclass
class Certificate:
    ca_file: Path  # the throwaway CA (PEM), to verify with
    cert_file: Path  # the leaf (PEM)
    key_file: Path  # its key (PEM, PKCS#8, unencrypted)
    combined: Path  # cert then key in one file, as haproxy's ``crt`` wants


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificate(directory: Path, names: list[str]) -> Certificate:
    """A one-day CA and a P-256 certificate it signed for ``names`` (wildcards allowed), in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("relay-bench-ca"))
        .issuer_name(_name("relay-bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out = Certificate(directory / "ca.pem", directory / "vhost.crt", directory / "vhost.key", directory / "vhost.pem")
    out.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert_file.write_bytes(cert_pem)
    out.key_file.write_bytes(key_pem)
    out.combined.write_bytes(cert_pem + key_pem)
    for private in (out.key_file, out.combined):
        private.chmod(0o600)
    return out


def haproxy_terminator_config(port: int, pem: Path, target_port: int) -> str:
    """One haproxy, one thread, terminating TLS on ``port`` and keeping connections to the plain
    HTTP target alive; it adds the X-Forwarded-* lines relayd adds, so both do the same work."""
    return (
        "global\n nbthread 1\n"
        "defaults\n mode http\n timeout connect 5s\n timeout client 60s\n timeout server 60s\n"
        f"frontend https\n bind 127.0.0.1:{port} ssl crt {pem}\n"
        " option forwardfor\n"
        " http-request set-header X-Forwarded-Proto https\n"
        " http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"
        " default_backend target\n"
        f"backend target\n http-reuse always\n server target 127.0.0.1:{target_port}\n"
    )
