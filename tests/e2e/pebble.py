"""A real ACME server (RFC 8555) for tests: Let's Encrypt's ``pebble`` with ``pebble-challtestsrv``
as its DNS, both from the Debian package ``pebble`` (``apt-get install pebble``).

``Pebble(tmp, http_port=..., tls_port=...)`` in a temporary directory:

1. makes a private CA with ``cryptography`` and, signed by it, the certificate of pebble's own
   HTTPS listeners (ACME and management) for ``localhost`` and ``127.0.0.1``; the CA is written to
   ``ca.pem`` (:attr:`Pebble.ca_file`), which is what an ACME client's ``ca_file`` points at;
2. starts ``pebble-challtestsrv`` with only its DNS server (and its management API, which cannot
   be switched off) on 127.0.0.1, answering every A query with 127.0.0.1 and no AAAA;
3. writes pebble's JSON config: ACME and management listeners on 127.0.0.1, challenges validated
   against ``127.0.0.1:http_port`` (HTTP-01) and ``127.0.0.1:tls_port`` (TLS-ALPN-01), optionally a
   short certificate validity;
4. starts ``pebble`` with that DNS (``-dnsserver``), without the random validation sleeps
   (``PEBBLE_VA_NOSLEEP=1``) and without random nonce rejections (``PEBBLE_WFE_NONCEREJECT=0``),
   but *with* real validation (``PEBBLE_VA_ALWAYS_VALID`` is removed from its environment), and
   waits until its directory answers.

Every listener is on 127.0.0.1 at a port the OS chose.  Pebble regenerates its issuing root on
each start: :meth:`Pebble.root_pem` fetches it from the management interface, to verify the
certificates pebble issued.  :meth:`Pebble.stop` ends only the two processes it started, by pid.

Facts about the packaged version (pebble 2.4.0+ds1, Debian):

* ``pebble-challtestsrv -management ""`` does *not* disable the management API: Go's
  ``ListenAndServe("")`` then listens on ``:80`` on every interface, so it is given a 127.0.0.1 port.
  There is no ``-doh`` flag in this version; ``-http01 ""``, ``-https01 ""``, ``-tlsalpn01 ""`` do
  switch those servers off.
* pebble's config accepts ``certificateValidityPeriod`` (seconds; pebble logs "Using certificate
  validity period of N seconds").
* The management interface serves the issuing root at ``/roots/0`` and the intermediate at
  ``/intermediates/0``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.waiting import wait_until

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"
HOST = "127.0.0.1"


def available() -> str | None:
    """None if ``pebble`` and ``pebble-challtestsrv`` are installed, else why not (naming the package)."""
    missing = [name for name in (PEBBLE, CHALLTESTSRV) if shutil.which(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (apt-get install pebble)"


def _free_port(udp_too: bool = False) -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound with port 0, then released).

    With ``udp_too`` the same number must also be free for UDP (a DNS server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if not udp_too:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((HOST, port))
        except OSError:
            continue
        return port
    raise RuntimeError("found no port free for both TCP and UDP on 127.0.0.1")


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _key_usage(ca: bool) -> x509.KeyUsage:
    """digitalSignature, plus keyCertSign and cRLSign for a CA."""
    off = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False)
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False, **off
    )


def _write_https_identity(directory: Path) -> tuple[Path, Path, Path]:
    """Make a private CA and a certificate signed by it for ``localhost`` and ``127.0.0.1``.

    Returns the paths of the CA certificate (``ca.pem``), the listener certificate and its key.
    Both certificates carry the extensions Python's strict verification (3.13+) insists on."""
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay tests: pebble HTTPS CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address(HOST))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_file, cert_file, key_file = directory / "ca.pem", directory / "pebble-cert.pem", directory / "pebble-key.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


class Pebble:
    """pebble and its DNS (pebble-challtestsrv) running in ``directory``, all on 127.0.0.1.

    ``http_port`` and ``tls_port`` are where pebble sends HTTP-01 and TLS-ALPN-01 validations (on
    127.0.0.1, since every name resolves there).  ``validity_seconds``, when given, is the lifetime
    of the certificates pebble issues (its ``certificateValidityPeriod``; pebble's default is about
    five years).  ``extra_env`` adds to pebble's environment (e.g. ``{"PEBBLE_AUTHZREUSE": "0"}``).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with Pebble(tmp_path, http_port=vhost_http, tls_port=vhost_https) as pebble:
            ...  # ACME client with directory_url=pebble.directory_url, ca_file=pebble.ca_file
    """

    def __init__(
        self,
        directory: Path,
        http_port: int,
        tls_port: int,
        *,
        validity_seconds: int | None = None,
        extra_env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if validity_seconds is not None and validity_seconds <= 0:
            raise ValueError(f"validity_seconds must be positive, not {validity_seconds}")
        self.directory = Path(directory)
        self.http_port = http_port
        self.tls_port = tls_port
        self.validity_seconds = validity_seconds
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.port = 0  # pebble's ACME listener
        self.management_port = 0  # pebble's management listener (roots, intermediates, cert status)
        self.dns_port = 0  # challtestsrv's DNS server (TCP and UDP)
        self.challtestsrv_management_port = 0  # challtestsrv's management API (cannot be turned off)
        self.config_file = self.directory / "pebble-config.json"
        self.log_file = self.directory / "pebble.log"
        self.challtestsrv_log_file = self.directory / "pebble-challtestsrv.log"
        self.ca_file = self.directory / "ca.pem"
        self._pebble: subprocess.Popen[bytes] | None = None
        self._challtestsrv: subprocess.Popen[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        """The ACME directory, ``https://127.0.0.1:PORT/dir`` (verify it with :attr:`ca_file`)."""
        return f"https://{HOST}:{self.port}/dir"

    @property
    def management_url(self) -> str:
        """The base URL of pebble's management interface (same certificate as the directory)."""
        return f"https://{HOST}:{self.management_port}"

    @property
    def pids(self) -> list[int]:
        """The pids of the processes this instance started (challtestsrv, then pebble)."""
        return [p.pid for p in (self._challtestsrv, self._pebble) if p is not None]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only :attr:`ca_file`, i.e. pebble's own HTTPS listeners."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Pebble:
        """Write the CA and config, start challtestsrv then pebble, and wait until the directory
        answers 200.  Raises RuntimeError (with the logs) if either process dies or the deadline
        passes; nothing is left running then."""
        if self._pebble is not None or self._challtestsrv is not None:
            raise RuntimeError("Pebble already started")
        problem = available()
        if problem is not None:
            raise RuntimeError(problem)
        self.directory.mkdir(parents=True, exist_ok=True)
        _, cert_file, key_file = _write_https_identity(self.directory)
        try:
            self._start_challtestsrv()
            self._start_pebble(cert_file, key_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_challtestsrv(self) -> None:
        """DNS on 127.0.0.1:dns_port answering A queries with 127.0.0.1 (no AAAA), management API on
        127.0.0.1; the HTTP-01, HTTPS HTTP-01 and TLS-ALPN-01 responders off."""
        self.dns_port = _free_port(udp_too=True)
        self.challtestsrv_management_port = _free_port()
        argv = [
            CHALLTESTSRV,
            "-http01", "",
            "-https01", "",
            "-tlsalpn01", "",
            "-dns01", f"{HOST}:{self.dns_port}",
            "-management", f"{HOST}:{self.challtestsrv_management_port}",
            "-defaultIPv4", HOST,
            "-defaultIPv6", "",
        ]  # fmt: skip
        self._challtestsrv = _spawn(argv, self.challtestsrv_log_file, os.environ.copy(), self.directory)
        proc = self._challtestsrv

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"pebble-challtestsrv exited with {proc.returncode}:\n{self.challtestsrv_log()}")
            return _accepts(self.dns_port) and _accepts(self.challtestsrv_management_port)

        wait_until(ready, self.startup_timeout, lambda: f"pebble-challtestsrv to listen:\n{self.challtestsrv_log()}")

    def _start_pebble(self, cert_file: Path, key_file: Path) -> None:
        """Config, environment and start of pebble, then wait for its directory."""
        self.port = _free_port()
        self.management_port = _free_port()
        config: dict[str, object] = {
            "listenAddress": f"{HOST}:{self.port}",
            "managementListenAddress": f"{HOST}:{self.management_port}",
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds is not None:
            config["certificateValidityPeriod"] = self.validity_seconds
        self.config_file.write_text(json.dumps({"pebble": config}, indent=2) + "\n")

        env = os.environ.copy()
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)  # challenges must really be validated
        env.update({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})
        env.update(self.extra_env)
        argv = [PEBBLE, "-config", str(self.config_file), "-dnsserver", f"{HOST}:{self.dns_port}", "-strict=false"]
        self._pebble = _spawn(argv, self.log_file, env, self.directory)
        proc = self._pebble

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"pebble exited with {proc.returncode}:\n{self.log()}")
            try:
                return self._get(self.directory_url, timeout=2)[0] == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_until(ready, self.startup_timeout, lambda: f"pebble's directory {self.directory_url}:\n{self.log()}")

    def stop(self) -> None:
        """End pebble then challtestsrv (SIGTERM, then SIGKILL after 5 s), by pid; idempotent."""
        for attr in ("_pebble", "_challtestsrv"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            setattr(self, attr, None)

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what a test reads ----------------------------------------------------------------------

    def _get(self, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET ``url`` verified with :attr:`ca_file`; (status, body)."""
        with urllib.request.urlopen(url, timeout=timeout, context=self.ssl_context()) as resp:
            return int(resp.status), resp.read()

    def _management_pem(self, path: str) -> str:
        status, body = self._get(self.management_url + path)
        if status != 200 or b"-----BEGIN CERTIFICATE-----" not in body:
            raise RuntimeError(f"pebble management {path} answered {status}: {body[:200]!r}")
        return body.decode("ascii")

    def root_pem(self) -> str:
        """PEM of the root pebble issues under (new at each start), from ``/roots/0`` on the
        management interface: the trust anchor for the certificates pebble issued."""
        return self._management_pem("/roots/0")

    def intermediate_pem(self) -> str:
        """PEM of pebble's issuing intermediate, from ``/intermediates/0`` (issued chains carry it too)."""
        return self._management_pem("/intermediates/0")

    def log(self) -> str:
        """pebble's output (stdout and stderr) so far."""
        return _read(self.log_file)

    def challtestsrv_log(self) -> str:
        """pebble-challtestsrv's output so far."""
        return _read(self.challtestsrv_log_file)


def _spawn(argv: list[str], log_file: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_file`` and no stdin."""
    with log_file.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
