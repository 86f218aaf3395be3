"""The HTTPS vhost frontend: https tunnels on ``vhost_https_port``, routed by the server name in
the visitor's TLS ClientHello and passed through untouched (relayd holds no certificate for them)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from relay_server.certs import CertStore
from relay_server.claims import DomainClaims
from relay_server.frontends.http import HttpFrontend
from relay_server.frontends.vhost import VhostFrontend, _VhostVisitor
from relay_server.sni import ClientHelloReader, SniError
from relay_server.tls_terminator import TlsTerminator
from shared.aio import StreamBridge
from shared.tunnel import TunnelKind

log = logging.getLogger("relay_server.vhost")


class SniFrontend(VhostFrontend):
    """https tunnels passed through by server name; and, with a certificate store and the http
    frontend set (``terminate_with``), http tunnels' domains served over HTTPS by relayd."""

    kind = TunnelKind.HTTPS
    port_key = "vhost_https_port"

    def __init__(self, domains: DomainClaims, bind_addr: str, port: int, header_timeout: float) -> None:
        super().__init__(domains, bind_addr, port, header_timeout)
        self.certs: CertStore | None = None
        self.http: HttpFrontend | None = None
        self.alpn_contexts: dict[str, ssl.SSLContext] = {}  # TLS-ALPN-01 challenges: name -> context

    def terminate_with(self, certs: CertStore, http: HttpFrontend) -> None:
        self.certs = certs
        self.http = http

    def visitor(self) -> SniVisitor:
        return SniVisitor(self)

    def termination(self, name: str) -> ssl.SSLContext | None:
        """The TLS context to terminate a connection for ``name`` with, when an http tunnel serves
        that domain and relayd holds a valid certificate for it; else None."""
        if self.certs is None or self.http is None or not self.domains.serves_http(name):
            return None
        served = self.certs.find(name)
        return served.context if served is not None else None


class SniVisitor(_VhostVisitor):
    """One visitor connection on the HTTPS vhost port: routed by the ClientHello's server name."""

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(0, "")  # a TLS client: no HTTP page, just close

    __slots__ = ("_hello",)

    def __init__(self, frontend: VhostFrontend) -> None:
        super().__init__(frontend)
        self._hello: ClientHelloReader | None = ClientHelloReader()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        hello = self._hello
        if hello is None:  # routed: the rest is the visitor's TLS, passed on untouched
            StreamBridge.data_received(self, data)
            return
        try:
            name = hello.feed(data)
        except SniError as exc:
            log.debug("https vhost: closing the connection from %s: %s", self.visitor, exc)
            self._refuse(0, "")
            return
        if name is None:
            return
        self._cancel_timer()
        self._hello = None
        frontend = cast(SniFrontend, self.frontend)
        alpn = frontend.alpn_contexts.get(name) if hello.acme_alpn else None
        if alpn is not None and self.transport is not None:  # relayd's own ACME validation (RFC 8737)
            self._done = True
            TlsTerminator(self.transport, alpn, _HandshakeOnly(), frontend.header_timeout).start(hello.received())
            return
        # any other acme-tls/1 hello is routed like any other: an app behind an https (passthrough)
        # tunnel may be getting its own certificate
        tunnel = frontend.domains.match_https(name)
        if tunnel is None:
            context = frontend.termination(name)
            if context is not None and frontend.http is not None and self.transport is not None:
                # an http tunnel's domain: relayd terminates TLS and serves it as HTTP
                self._done = True  # this protocol is done: the terminator takes the socket over
                inner = frontend.http.visitor(scheme="https")
                TlsTerminator(self.transport, context, inner, frontend.header_timeout).start(hello.received())
                return
            log.debug("https vhost: no tunnel for %s (from %s)", name, self.visitor)
            self._refuse(0, "")
            return
        if self._attach(tunnel, hello.received()) is not None:
            self._refuse(0, "")


class _HandshakeOnly(asyncio.Protocol):
    """A TLS-ALPN-01 validation: the handshake is the answer; then the connection is closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
