"""The TCP frontend: one public listener per tcp tunnel, each visitor connection one stream."""

from __future__ import annotations

import asyncio
from typing import cast

from relay_server.claims import PortClaims, Transport
from relay_server.frontends.base import Frontend
from relay_server.groups import TunnelGroup
from relay_server.tunnels import PublicTunnel, Refusal
from shared.aio import StreamBridge
from shared.burst import BurstLog
from shared.tunnel import TunnelKind

PROTOCOL = Transport.TCP


class TcpFrontend(Frontend):
    kind = TunnelKind.TCP

    def __init__(self, ports: PortClaims, burst_log: BurstLog, reuse_port: bool = False) -> None:
        self.ports = ports
        self.burst_log = burst_log
        # in a cluster, several nodes on one host listen on each tunnel's port (SO_REUSEPORT)
        self.reuse_port = reuse_port

    async def claim(self, tunnel: PublicTunnel) -> str:
        loop = asyncio.get_running_loop()
        spec = tunnel.spec
        group = self.ports.join(tunnel, PROTOCOL, spec.remote_port) if spec.group else None
        if group is not None:  # the port is served by this tunnel's group: one more member
            group.join(tunnel)
            tunnel.port = spec.remote_port
            return f"{tunnel.bind_host}:{tunnel.port}"

        async def listen(port: int) -> int:
            server = await loop.create_server(lambda: VisitorBridge(tunnel, self.burst_log), tunnel.bind_host, port,
                                              reuse_address=True, reuse_port=self.reuse_port or None,
                                              backlog=1024)  # fmt: skip
            tunnel.claim = server
            return int(server.sockets[0].getsockname()[1])

        tunnel.port = await self.ports.claim(tunnel, PROTOCOL, tunnel.spec.remote_port, listen,
                                             lambda: self.stop_accepting(tunnel))  # fmt: skip
        if spec.group:
            TunnelGroup(tunnel)  # the first member: it holds the listener, the others join it
        return f"{tunnel.bind_host}:{tunnel.port}"

    def stop_accepting(self, tunnel: PublicTunnel) -> None:
        server = tunnel.claim
        if server is not None:
            cast(asyncio.AbstractServer, server).close()
            tunnel.claim = None

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        heir = tunnel.group.leave(tunnel) if tunnel.group is not None else None
        self.ports.release(tunnel, PROTOCOL, tunnel.port, client_gone, heir)
        if heir is not None:  # the group goes on serving the port: its listener goes to another member
            if tunnel.claim is not None:
                heir.claim, tunnel.claim = tunnel.claim, None
        else:
            self.stop_accepting(tunnel)
        tunnel.reset_visitors()


class VisitorBridge(StreamBridge):
    """A public visitor connection: opens a stream to relayc carrying the tunnel name first."""

    __slots__ = ("burst_log", "tunnel")

    def __init__(self, tunnel: PublicTunnel, burst_log: BurstLog) -> None:
        super().__init__(tunnel.client.mux)  # counters are attached once the visitor is admitted
        self.tunnel = tunnel
        self.burst_log = burst_log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        routed = self.tunnel
        peer = transport.get_extra_info("peername")
        visitor = f"{peer[0]}:{peer[1]}" if peer else ""
        visitor_ip = str(peer[0]) if peer else ""
        picked = routed.pick()  # itself, or the member of its group whose turn it is
        refusal: Refusal | None
        if picked is None:
            tunnel, refusal = routed, Refusal.NO_MEMBER
        else:
            self.tunnel = tunnel = picked
            refusal = tunnel.refusal(visitor_ip)
        if refusal is not None:
            self.burst_log.warning(
                f"refuse:{tunnel.client_name}:{tunnel.name}", "client %s tunnel %s: visitor %s refused: %s",
                tunnel.client_name, tunnel.name, visitor, tunnel.refusal_text(refusal, visitor_ip),
            )  # fmt: skip
            self.transport = transport
            self._done = True
            transport.abort()
            return
        self.transport = transport
        if not tunnel.attach(self, visitor, public=_public(transport) if tunnel.spec.proxy_protocol else ""):
            self._done = True
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tunnel.detach(self)
        super().connection_lost(exc)


def _public(transport: asyncio.BaseTransport) -> str:
    """``ip:port`` of relayd's socket a visitor reached."""
    local = transport.get_extra_info("sockname")
    return f"{local[0]}:{local[1]}" if local else ""
