"""Certificates from an ACME CA (RFC 8555) for the domains of http tunnels.

Theory of operation
===================

``AcmeManager`` keeps, for every domain an http tunnel serves (``DomainClaims.http_domains``), a
certificate in ``state_dir/acme/`` and in the ``CertStore`` that the HTTPS vhost serves from.
It looks at the domains when a tunnel opens and once every ``SCAN_EVERY`` seconds; a domain a
``[[certificates]]`` file covers is left alone.  Each name wanted and without a valid
certificate, or with less than a third of its lifetime left, is ordered, one order at a time:

  new order (thread) -> challenge answers installed (loop) -> answer, poll, finalize (thread)
  -> certificate and key written, then served (loop) -> challenge answers removed

The ``acme`` library (certbot's) speaks the protocol; it is synchronous, so its calls run in a
worker thread while the event loop answers the CA's validation requests: HTTP-01 on
``vhost_http_port`` (``/.well-known/acme-challenge/TOKEN``, answered before routing, basic auth
and redirects), or TLS-ALPN-01 on ``vhost_https_port`` (a ClientHello offering ``acme-tls/1`` for
a name being validated gets the RFC 8737 certificate built here with ``cryptography``).

Bounds: names a client's tunnels ask for count against ``max_tunnels_per_client``; a name that
failed waits ``BACKOFF_START`` seconds, doubling up to ``BACKOFF_MAX``, before it is tried again,
so no client can spend the account's rate limits.  Failures are kept per name (``CertStore``) for
the dashboard.  New certificates are served to new connections at once, without a restart.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from relay_server.certs import CertStore, describe, load, server_context
from relay_server.stores.base import Store
from shared.config import AcmeConfig, resolve_path
from shared.errors import StoreUnavailable

if TYPE_CHECKING:
    from relay_server.claims import DomainClaims

log = logging.getLogger("relayd.acme")

SCAN_EVERY = 60.0  # seconds between looks at the names wanted and the renewals due
BACKOFF_START = 60.0
BACKOFF_MAX = 86400.0
ORDER_TIMEOUT = 120.0  # seconds an order may take from new order to certificate
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier (RFC 8737)
ACME_TLS_ALPN = "acme-tls/1"


@dataclass
class Backoff:
    failures: int = 0
    next_try: float = 0.0


class AcmeError(Exception):
    """An order that did not end in a certificate; the text says why."""


class AcmeManager:
    def __init__(self, config: AcmeConfig, config_path: Path, state_dir: Path, certs: CertStore,
                 domains: DomainClaims, max_names_per_client: int, store: Store | None = None,
                 node: str = "") -> None:  # fmt: skip
        self.config = config
        # a cluster: the account, certificates and challenge answers are shared through the store,
        # and one node at a time orders a name (a lease); alone, state_dir holds everything
        self.store = store if store is not None and store.shared else None
        self.node = node
        self.ca_file = str(resolve_path(config_path, config.ca_file)) if config.ca_file else ""
        self.dir = state_dir / "acme"
        self.certs = certs
        self.domains = domains
        self.max_names_per_client = max_names_per_client
        self.http_tokens: dict[str, str] = {}  # HTTP-01: token -> key authorization
        self.alpn_contexts: dict[str, ssl.SSLContext] = {}  # TLS-ALPN-01: name -> its challenge context
        self._backoff: dict[str, Backoff] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._account: Any = None  # (acme client, account key) once registered
        self._loading: set[asyncio.Task[None]] = set()

    # --- running --------------------------------------------------------------------------------

    def start(self) -> None:
        (self.dir / "certs").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for crt in sorted((self.dir / "certs").glob("*.crt")):
            try:
                self.certs.put_acme(crt.stem, load(crt, crt.with_suffix(".key"), "acme"))
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("acme: ignoring %s: %s", crt, exc)
        if self.store is not None:
            self.store.subscribe_acme(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        """A tunnel opened: look at the names wanted soon."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            if self.store is not None:
                await self._sync()
            for name in self._due(time.time()):
                try:
                    await asyncio.wait_for(self._order(name), ORDER_TIMEOUT)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the CA, the network, the library: reported per name
                    self._failed(name, exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._sleep(time.time()))
            except asyncio.TimeoutError:
                pass

    def _sleep(self, now: float) -> float:
        """Seconds until the next look: the next renewal or retry due, at most ``SCAN_EVERY``."""
        wanted = set(self.wanted())
        times = [s.not_after - s.lifetime / 3 for name, s in self.certs.acme.items() if name in wanted]
        times += [b.next_try for b in self._backoff.values()]
        return max(1.0, min([SCAN_EVERY, *(t - now for t in times)]))

    def wanted(self) -> list[str]:
        """The names ACME should hold certificates for now (for the API: pending ones too)."""
        per_client: dict[str, int] = {}
        out: list[str] = []
        for name, owner in self.domains.http_domains():
            if self.certs.from_file(name) is not None:
                continue
            count = per_client[owner] = per_client.get(owner, 0) + 1
            if self.max_names_per_client and count > self.max_names_per_client:
                self.certs.errors[name] = (f"client {owner!r} has more than max_tunnels_per_client="
                                           f"{self.max_names_per_client} names with certificates")  # fmt: skip
                continue
            out.append(name)
        return out

    def _due(self, now: float) -> list[str]:
        due = []
        wanted = self.wanted()
        keep = set(wanted)
        for table in (self._backoff, self.certs.errors):  # names no tunnel serves any more: forgotten
            for name in [n for n in table if n not in keep]:
                del table[name]
        self.certs.pending &= keep
        for name in wanted:
            served = self.certs.acme.get(name)
            if served is not None and served.not_after - now > served.lifetime / 3:
                continue
            if served is None:
                self.certs.pending.add(name)
            backoff = self._backoff.get(name)
            if backoff is not None and now < backoff.next_try:
                continue
            due.append(name)
        return due

    def _failed(self, name: str, exc: BaseException) -> None:
        backoff = self._backoff.setdefault(name, Backoff())
        backoff.failures += 1
        wait = min(BACKOFF_MAX, BACKOFF_START * 2 ** (backoff.failures - 1))
        backoff.next_try = time.time() + wait
        text = str(exc) or exc.__class__.__name__
        if isinstance(exc, asyncio.TimeoutError):
            text = f"no certificate within {ORDER_TIMEOUT:g} s"
        self.certs.errors[name] = text[:500]
        log.warning("acme: no certificate for %s: %s (next try in %.0f s)", name, text[:500], wait)

    # --- one order ------------------------------------------------------------------------------

    async def _order(self, name: str) -> None:
        store = self.store
        if store is not None and not await store.acme_lease(name, self.node, ORDER_TIMEOUT + 30):
            log.debug("acme: another node is ordering %s", name)
            return
        log.info("acme: ordering a certificate for %s from %s", name, self.config.directory_url)
        account_pem = await self._account_key()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
        order, answers = await asyncio.to_thread(self._new_order, name, key_pem, account_pem)
        installed: list[tuple[str, str]] = []
        try:
            for kind, token_or_name, value, _ in answers:
                self._install(kind, token_or_name, value)
                installed.append((kind, token_or_name))
                if store is not None:  # the CA may validate through any node
                    await store.publish_acme({"op": "answer", "kind": kind, "key": token_or_name, "value": value,
                                              "node": self.node})  # fmt: skip
            chain_pem = await asyncio.to_thread(self._finish, order, [a[3] for a in answers])
        finally:
            for kind, key_name in installed:
                self._uninstall(kind, key_name)
                if store is not None:
                    try:
                        await store.publish_acme({"op": "done", "kind": kind, "key": key_name, "node": self.node})
                    except StoreUnavailable:
                        pass  # the others' answers are dropped when their order lease runs out
        if store is not None:
            await store.acme_put(f"cert:{name}", json.dumps({"chain": chain_pem, "key": key_pem.decode()}))
            await store.publish_acme({"op": "cert", "name": name, "node": self.node})
        self._save(name, chain_pem, key_pem)

    def _install(self, kind: str, key: str, value: str) -> None:
        if kind == "http-01":
            self.http_tokens[key] = value
        else:
            self.alpn_contexts[key] = self._alpn_context(key, value)

    def _uninstall(self, kind: str, key: str) -> None:
        if kind == "http-01":
            self.http_tokens.pop(key, None)
        else:
            self.alpn_contexts.pop(key, None)

    def _on_event(self, event: dict[str, Any]) -> None:
        """An ACME event another node published: a challenge answer to give (the CA may validate
        through this node), one to drop, a certificate to load."""
        if event.get("node") == self.node:
            return
        op, kind, key = event.get("op"), str(event.get("kind", "")), str(event.get("key", ""))
        if op == "answer" and kind in ("http-01", "tls-alpn-01") and key and len(self.http_tokens) < 1024:
            self._install(kind, key[:300], str(event.get("value", ""))[:300])
        elif op == "done":
            self._uninstall(kind, key)
        elif op == "cert" and event.get("name") in self.wanted():  # a name of ours: never a path from elsewhere
            task = asyncio.get_running_loop().create_task(self._load_shared(str(event["name"])))
            self._loading.add(task)
            task.add_done_callback(self._loading.discard)

    async def _sync(self) -> None:
        """A cluster: take the certificates other nodes stored for the names wanted here."""
        for name in self.wanted():
            served = self.certs.acme.get(name)
            if served is None or served.not_after - time.time() <= served.lifetime / 3:
                await self._load_shared(name)

    async def _load_shared(self, name: str) -> None:
        store = self.store
        if store is None:
            return
        try:
            raw = await store.acme_get(f"cert:{name}")
        except StoreUnavailable:
            return
        if raw is None:
            return
        try:
            data = json.loads(raw)
            chain, key = data["chain"], data["key"].encode()
            _, not_after, _, _ = describe(chain.encode())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("acme: the stored certificate for %s is unusable: %s", name, exc)
            return
        served = self.certs.acme.get(name)
        if served is None or not_after > served.not_after:
            self._save(name, chain, key)

    async def _account_key(self) -> bytes:
        """The ACME account's key: the cluster's (in the store), else this node's file."""
        key_path = self.dir / "account.pem"
        store = self.store
        if store is not None:
            shared = await store.acme_get("account")
            if shared is not None:
                return shared.encode()
        if key_path.exists():
            pem = key_path.read_bytes()
        else:
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            key_path.write_bytes(pem)
            os.chmod(key_path, 0o600)
        if store is not None:
            await store.acme_put("account", pem.decode())
        return pem

    def _save(self, name: str, chain_pem: str, key_pem: bytes) -> None:
        """Write a certificate and its key to state_dir and serve it."""
        crt, key_file = self.dir / "certs" / f"{name}.crt", self.dir / "certs" / f"{name}.key"
        tmp = key_file.with_suffix(".key.tmp")
        tmp.write_bytes(key_pem)
        os.chmod(tmp, 0o600)
        tmp.replace(key_file)
        crt.with_suffix(".crt.tmp").write_text(chain_pem)
        crt.with_suffix(".crt.tmp").replace(crt)
        served = load(crt, key_file, "acme")
        self.certs.put_acme(name, served)
        self._backoff.pop(name, None)
        log.info("acme: certificate for %s from %s, valid until %s", name, served.issuer,
                 time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(served.not_after)))  # fmt: skip

    def _client(self, account_pem: bytes) -> Any:
        """The account (registered once per run with ``account_pem``, the same key each time)."""
        if self._account is not None:
            return self._account
        from acme import client, errors, messages
        from josepy.jwa import ES256
        from josepy.jwk import JWKEC

        account_key = serialization.load_pem_private_key(account_pem, None)
        jwk = JWKEC(key=account_key)
        net = client.ClientNetwork(jwk, alg=ES256, user_agent="relay (https://github.com/relay)")
        net.verify_ssl = self.ca_file or True  # type: ignore[assignment]  # requests takes a CA bundle path
        directory = client.ClientV2.get_directory(self.config.directory_url, net)
        acme = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(email=self.config.email or None,
                                                          terms_of_service_agreed=True)  # fmt: skip
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # this key has an account already: use it
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        self._account = (acme, jwk)
        return self._account

    def _new_order(self, name: str, key_pem: bytes, account_pem: bytes) -> tuple[Any, list[tuple[str, str, str, Any]]]:
        """Thread: a new order for ``name``; (order, [(challenge kind, token or name, answer,
        challenge)])."""
        from acme import crypto_util, messages
        from josepy.b64 import b64encode

        try:
            acme, jwk = self._client(account_pem)
            order = acme.new_order(crypto_util.make_csr(key_pem, [name]))
        except Exception as exc:
            self._account = None  # a fresh start next time (a CA restarted, a network error)
            raise AcmeError(_explain(exc)) from None
        thumbprint = b64encode(jwk.thumbprint(hash_function=hashes.SHA256)).decode()
        answers: list[tuple[str, str, str, Any]] = []
        wanted = self.config.challenge
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA still holds a validation of this name
            challb = next((c for c in authz.body.challenges if c.chall.to_partial_json().get("type") == wanted), None)
            if challb is None:
                raise AcmeError(f"the CA offers no {wanted} challenge for {name}")
            token = str(challb.chall.to_partial_json()["token"])
            answers.append((wanted, token if wanted == "http-01" else name, f"{token}.{thumbprint}", challb))
        return order, answers

    def _finish(self, order: Any, challenge_bodies: list[Any]) -> str:
        """Thread: answer the challenges, wait for the certificate; its chain as PEM."""
        from acme import challenges

        acme, _ = self._account
        try:
            for challb in challenge_bodies:
                acme.answer_challenge(challb, challenges.HTTP01Response())  # {}: "ready, validate now"
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT - 10)
            order = acme.poll_and_finalize(order, deadline)
        except Exception as exc:
            raise AcmeError(_explain(exc)) from None
        return str(order.fullchain_pem)

    def _alpn_context(self, name: str, key_authorization: str) -> ssl.SSLContext:
        """The TLS-ALPN-01 answer for ``name`` (RFC 8737): a self-signed certificate for the name
        carrying the SHA-256 of the key authorization in a critical acmeIdentifier extension,
        served only with ALPN ``acme-tls/1``."""
        key = ec.generate_private_key(ec.SECP256R1())
        digest = hashlib.sha256(key_authorization.encode()).digest()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
                .sign(key, hashes.SHA256()))  # fmt: skip
        path = self.dir / "alpn"
        path.mkdir(exist_ok=True)
        crt, key_file = path / f"{name}.crt", path / f"{name}.key"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
        os.chmod(key_file, 0o600)
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        context = server_context()
        context.set_alpn_protocols([ACME_TLS_ALPN])
        context.load_cert_chain(str(crt), str(key_file))
        return context


def _explain(exc: BaseException) -> str:
    """A one-line reason from what the acme library or requests raised."""
    detail = getattr(exc, "detail", None) or getattr(exc, "description", None)
    text = str(detail or exc) or exc.__class__.__name__
    return " ".join(text.split())[:500]
