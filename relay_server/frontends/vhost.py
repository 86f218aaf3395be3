"""What the HTTP and HTTPS (SNI) vhost frontends share: one public port for many tunnels, each
visitor routed by a name it sends first (a Host header, a TLS server name), in the registry's
domain claims."""

from __future__ import annotations

import abc
import asyncio
import html
import logging
import time
from typing import cast

from relay_server.claims import DomainClaims
from relay_server.frontends.base import Frontend
from relay_server.tunnels import PublicTunnel, Refusal
from shared.aio import MuxConnection, StreamBridge
from shared.errors import TunnelRefusal, TunnelRefused
from shared.tunnel import TunnelKind

log = logging.getLogger("relay_server.vhost")


_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    308: "Permanent Redirect",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def error_response(status: int, message: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    """A small HTML page; ``message`` is escaped.  The connection closes after it."""
    title = f"{status} {_STATUS_TEXT.get(status, '')}"
    body = (
        f"<!doctype html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>{html.escape(message)}</p><hr><p>relay</p></body></html>\n"
    ).encode()
    head = [f"HTTP/1.1 {title}", "Content-Type: text/html; charset=utf-8", f"Content-Length: {len(body)}",
            "Connection: close", "Cache-Control: no-store", *extra_headers]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def host_of(value: str) -> str:
    """``Example.org:8080`` -> ``example.org``; ``[::1]:80`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if ":" in value else value.rstrip(".")


class VhostFrontend(Frontend):
    """A frontend whose tunnels share one port and are told apart by name."""

    port_key: str  # the relayd.toml key of the port, for messages

    def __init__(self, domains: DomainClaims, bind_addr: str, port: int, header_timeout: float) -> None:
        self.domains = domains
        self.bind_addr = bind_addr
        self.port = port  # as configured (0: this kind is off)
        self.header_timeout = header_timeout
        self._server: asyncio.AbstractServer | None = None
        self._bound = 0
        # nodes of a cluster on one host share the port (SO_REUSEPORT): the kernel spreads visitors
        self.reuse_port = False

    @abc.abstractmethod
    def visitor(self) -> asyncio.Protocol:
        """A new visitor connection's protocol."""

    async def start(self) -> None:
        if not self.port:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.visitor, self.bind_addr, self.port, reuse_address=True,
                                                reuse_port=self.reuse_port or None,
                                                backlog=1024)  # fmt: skip
        self._bound = int(self._server.sockets[0].getsockname()[1])
        log.info("%s virtual hosts on %s:%d", self.kind.value, self.bind_addr, self._bound)

    @property
    def bound_port(self) -> int:
        return self._bound

    async def claim(self, tunnel: PublicTunnel) -> str:
        kind = self.kind
        if not self._bound:
            raise TunnelRefused(TunnelRefusal.KIND_OFF, f"{kind} tunnels are off on this relayd ({self.port_key} is "
                                "not set)")  # fmt: skip
        domains = self.domains.add(tunnel, time.monotonic())
        tunnel.port = self._bound
        default = 80 if kind is TunnelKind.HTTP else 443
        suffix = "" if self._bound == default else f":{self._bound}"
        return ", ".join(f"{kind}://{d}{suffix}" for d in domains)

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        self.domains.remove(tunnel, client_gone, time.monotonic())
        tunnel.reset_visitors()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class _VhostVisitor(StreamBridge):
    """A visitor whose tunnel is only known after its first bytes were read."""

    __slots__ = ("_replied", "_timer", "frontend", "tunnel", "visitor", "visitor_ip")

    def __init__(self, frontend: VhostFrontend) -> None:
        super().__init__(cast(MuxConnection, None))  # bound to a session once routed
        self.frontend = frontend
        self.tunnel: PublicTunnel | None = None
        self.visitor = ""
        self.visitor_ip = ""
        self._timer: asyncio.TimerHandle | None = None
        self._replied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.visitor = f"{peer[0]}:{peer[1]}" if peer else ""
        self.visitor_ip = str(peer[0]) if peer else ""
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.frontend.header_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(408, "the request was not received in time")

    def _refuse(self, status: int, message: str, extra_headers: tuple[str, ...] = ()) -> None:
        """Answer with an error page and close (or just close, before any HTTP)."""
        self._cancel_timer()
        transport = self.transport
        if self.tunnel is not None and not self._done:
            self._done = True
            self.mux.reset(self.stream_id)
        self._done = True
        if transport is None or transport.is_closing():
            return
        if status and not self._replied:
            self._replied = True
            transport.write(error_response(status, message, extra_headers))
        transport.close()

    def _attach(self, routed: PublicTunnel, first: bytes = b"") -> Refusal | None:
        """Join this visitor to ``routed`` (or the member of its group whose turn it is): a stream
        to its client; or say why not."""
        tunnel = routed.pick()
        if tunnel is None:
            return Refusal.NO_MEMBER
        refusal = tunnel.refusal(self.visitor_ip)
        if refusal is not None:
            return refusal
        public = ""
        if tunnel.spec.proxy_protocol and self.transport is not None:
            local = self.transport.get_extra_info("sockname")
            public = f"{local[0]}:{local[1]}" if local else ""
        if not tunnel.attach(self, self.visitor, first, public):
            return Refusal.OFFLINE
        self.tunnel = tunnel
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self.tunnel is not None:
            self.tunnel.detach(self)
            super().connection_lost(exc)
        else:
            self._done = True

    def eof_received(self) -> bool:
        if self.tunnel is None:
            self._cancel_timer()
            return False  # nothing routed yet: close
        return super().eof_received()

    def on_data(self, data: bytes | memoryview) -> None:
        self._replied = True  # the app has started answering
        super().on_data(data)
