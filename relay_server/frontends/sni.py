"""The HTTPS vhost frontend: https tunnels on ``vhost_https_port``, routed by the server name in
the visitor's TLS ClientHello and passed through untouched (relayd holds no certificate for them)."""

from __future__ import annotations

import logging

from relay_server.frontends.vhost import VhostFrontend, _VhostVisitor
from relay_server.sni import ClientHelloReader, SniError
from shared.aio import StreamBridge
from shared.tunnel import TunnelKind

log = logging.getLogger("relay_server.vhost")


class SniFrontend(VhostFrontend):
    kind = TunnelKind.HTTPS
    port_key = "vhost_https_port"

    def visitor(self) -> SniVisitor:
        return SniVisitor(self)


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
        tunnel = self.frontend.domains.match_https(name)
        if tunnel is None:
            log.debug("https vhost: no tunnel for %s (from %s)", name, self.visitor)
            self._refuse(0, "")
            return
        if self._attach(tunnel, hello.received()) is not None:
            self._refuse(0, "")
