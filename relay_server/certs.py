"""Certificates relayd serves on ``vhost_https_port`` for http tunnels it terminates TLS for.

Two sources: files named in relayd.toml (``[[certificates]]``, wildcards allowed), which win for
every name they cover, and ACME (``acme.py``), one certificate per name.  ``find(name)`` gives the
``ssl.SSLContext`` to serve a name with (exact name first, then a wildcard one label up), or None;
a certificate past its ``not_after`` is never served.  ``items`` lists every name for the API,
pending ACME names included, with the last error of each.  Replacing a certificate is one dict
assignment: connections already open keep the old one, new ones get the new one.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID


@dataclass
class Served:
    """One certificate chain and key, ready to serve."""

    names: list[str]
    not_after: float  # unix seconds
    not_before: float
    issuer: str | None  # the issuer's common name
    source: str  # "file" | "acme"
    context: ssl.SSLContext = field(repr=False)

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def describe(cert_pem: bytes) -> tuple[list[str], float, float, str | None]:
    """(DNS names, not_after, not_before, issuer common name) of the first certificate in a PEM."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    issuer = [str(a.value) for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names, cert.not_valid_after_utc.timestamp(), cert.not_valid_before_utc.timestamp(), \
        (issuer[0] if issuer else None)  # fmt: skip


def load(cert_file: Path, key_file: Path, source: str) -> Served:
    """A certificate chain and its key from PEM files; ``ssl.SSLError``/``ValueError``/``OSError``
    when they cannot be served."""
    names, not_after, not_before, issuer = describe(cert_file.read_bytes())
    context = server_context()
    context.load_cert_chain(str(cert_file), str(key_file))
    return Served(names, not_after, not_before, issuer, source, context)


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertStore:
    def __init__(self) -> None:
        self.files: dict[str, Served] = {}  # name (or *.domain) -> from [[certificates]]
        self.acme: dict[str, Served] = {}  # name -> from ACME
        self.errors: dict[str, str] = {}  # name -> the last ACME error
        self.pending: set[str] = set()  # names ACME is asked for and has no certificate for yet

    def add_file(self, served: Served) -> None:
        for name in served.names:
            self.files[name] = served

    def put_acme(self, name: str, served: Served) -> None:
        self.acme[name] = served
        self.pending.discard(name)
        self.errors.pop(name, None)

    def from_file(self, name: str) -> Served | None:
        """The file certificate that covers ``name`` (exact, or a wildcard one label up)."""
        served = self.files.get(name)
        if served is None and "." in name:
            served = self.files.get("*." + name.split(".", 1)[1])
        return served

    def find(self, name: str, now: float | None = None) -> Served | None:
        """What to serve ``name`` with now: a file certificate that covers it, else its ACME one;
        never an expired one."""
        now = time.time() if now is None else now
        for served in (self.from_file(name), self.acme.get(name)):
            if served is not None and served.not_before <= now < served.not_after:
                return served
        return None

    def items(self, names: list[str]) -> list[dict[str, Any]]:
        """One item per name (those asked for, plus those with a certificate): for the API."""
        out: dict[str, dict[str, Any]] = {}
        for name in [*names, *self.acme, *self.pending, *self.files]:
            if name in out:
                continue
            served = self.from_file(name) or self.acme.get(name)
            out[name] = {
                "domain": name,
                "not_after": int(served.not_after) if served else None,
                "issuer": served.issuer if served else None,
                "source": served.source if served else "acme",
                "last_error": None if served is not None and served.source == "file" else self.errors.get(name),
            }
        return sorted(out.values(), key=lambda i: i["domain"])
