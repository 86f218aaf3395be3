"""Public TCP listeners for tunnels, and the port policy that decides who may have which port."""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from relay_server.holds import HOLD_SECONDS, RECLAIM_SECONDS, OfflineHolds
from shared.aio import StreamBridge, TrafficCounters
from shared.config import PortRanges
from shared.errors import LocalProtocolError
from shared.limits import SourceFilter, TokenBucket
from shared.messages import TunnelSpec, encode_stream_open

if TYPE_CHECKING:
    from relay_server.server import ClientSession

log = logging.getLogger(__name__)


# Visitor bytes waiting for a client's credit past which its new visitors are turned away: its
# visitors are already paused at 16 MiB (server.SEND_BACKLOG_LIMIT), but each new connection is
# read once before it can be paused (uvloop starts reading as it accepts), so without this a
# flood of new visitors could still add a read each.
BUSY_BACKLOG = 64 * 1024 * 1024


class TunnelRefused(Exception):
    """A tunnel registration that policy or the host refuses; the message is sent to relayc."""


class Refusal(enum.Enum):
    """Why a visitor may not use a tunnel now."""

    SOURCE = "source"  # not in allow_sources
    TUNNEL_FULL = "tunnel_full"  # max_connections of the tunnel
    CLIENT_FULL = "client_full"  # max_connections_per_client
    CLIENT_BUSY = "client_busy"  # far more waits for the client's credit than it takes in
    OFFLINE = "offline"  # the client's session cannot take a new stream

    @property
    def http_status(self) -> int:
        return 403 if self is Refusal.SOURCE else 502 if self is Refusal.OFFLINE else 503


def min_nonzero(*values: int) -> int:
    """The strictest of several limits where 0 means unlimited."""
    set_values = [v for v in values if v]
    return min(set_values) if set_values else 0


class PublicTunnel:
    """One tunnel of one logged-in client: its listener (tcp), counters and limits."""

    def __init__(self, client: ClientSession, spec: TunnelSpec) -> None:
        self.client = client
        self.spec = spec
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.counters = TrafficCounters()
        self.visitors: set[StreamBridge] = set()
        self.routes: list[tuple[str, tuple[str, ...]]] = []  # http/https: (domain, locations) claimed
        limits = client.server.config.limits
        self.max_connections = min_nonzero(limits.max_connections_per_tunnel, spec.max_connections)
        rate = min_nonzero(limits.bandwidth_per_tunnel, spec.bandwidth_limit)
        self.bucket = TokenBucket(rate, asyncio.get_running_loop().time()) if rate else None
        self.sources = SourceFilter(spec.allow_sources)
        self.buckets = tuple(b for b in (self.bucket, client.bucket) if b is not None)

    def attach(self, bridge: StreamBridge, visitor: str, first: bytes = b"") -> bool:
        """Bind a visitor's bridge to this tunnel: open its stream to the client (``stream_open``
        preamble, then ``first``), count it, apply the bandwidth limits.  False if the client's
        session cannot take a new stream (closing, going away)."""
        mux = self.client.mux
        if not mux.is_open:
            return False
        try:
            stream_id = mux.open_stream(bridge, encode_stream_open(self.spec.name, visitor) + first)
        except LocalProtocolError:
            return False
        bridge.bind(mux, stream_id)  # paused at once if the session's connection is backed up
        bridge.counters = counters = self.counters
        bridge.buckets = self.buckets
        counters.conns_open += 1
        counters.conns_total += 1
        counters.bytes_in += len(first)
        self.visitors.add(bridge)
        self.client.visitors_open += 1
        return True

    def detach(self, bridge: StreamBridge) -> None:
        """A visitor attached by ``attach`` went away."""
        if bridge in self.visitors:
            self.visitors.discard(bridge)
            self.client.visitors_open -= 1

    def refusal(self, visitor_ip: str) -> Refusal | None:
        """Why a new visitor from ``visitor_ip`` may not use this tunnel now, or None."""
        if not self.sources.allows(visitor_ip):
            return Refusal.SOURCE
        if self.max_connections and self.counters.conns_open >= self.max_connections:
            return Refusal.TUNNEL_FULL
        client_max = self.client.server.config.limits.max_connections_per_client
        if client_max and self.client.visitors_open >= client_max:
            return Refusal.CLIENT_FULL
        if self.client.backlog() > BUSY_BACKLOG:
            return Refusal.CLIENT_BUSY
        return None

    def refusal_text(self, refusal: Refusal, visitor_ip: str) -> str:
        if refusal is Refusal.SOURCE:
            return f"source {visitor_ip} is not in allow_sources"
        if refusal is Refusal.TUNNEL_FULL:
            return f"max_connections={self.max_connections} reached"
        if refusal is Refusal.CLIENT_FULL:
            limit = self.client.server.config.limits.max_connections_per_client
            return f"client {self.client.name} reached max_connections_per_client={limit}"
        if refusal is Refusal.CLIENT_BUSY:
            return f"client {self.client.name} is not taking in what its visitors send (try again later)"
        return f"client {self.client.name} is not connected"

    @property
    def name(self) -> str:
        return self.spec.name

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: VisitorBridge(self), host, port, reuse_address=True, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Close the listener; visitors already connected carry on (graceful shutdown)."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def close(self) -> None:
        """Stop accepting and reset the visitors still connected."""
        self.stop_accepting()
        for visitor in list(self.visitors):
            self.detach(visitor)
            visitor.abort()


class VisitorBridge(StreamBridge):
    """A public visitor connection: opens a stream to relayc carrying the tunnel name first."""

    __slots__ = ("tunnel",)

    def __init__(self, tunnel: PublicTunnel) -> None:
        super().__init__(tunnel.client.mux)  # counters are attached once the visitor is admitted
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        tunnel = self.tunnel
        peer = transport.get_extra_info("peername")
        visitor = f"{peer[0]}:{peer[1]}" if peer else ""
        visitor_ip = str(peer[0]) if peer else ""
        refusal = tunnel.refusal(visitor_ip)
        if refusal is not None:
            tunnel.client.server.burst_log.warning(
                f"refuse:{tunnel.client.name}:{tunnel.name}", "client %s tunnel %s: visitor %s refused: %s",
                tunnel.client.name, tunnel.name, visitor, tunnel.refusal_text(refusal, visitor_ip),
            )  # fmt: skip
            self.transport = transport
            self._done = True
            transport.abort()
            return
        self.transport = transport
        if not tunnel.attach(self, visitor):
            self._done = True
            transport.abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tunnel.detach(self)
        super().connection_lost(exc)


class PortPolicy:
    """Which public ports a client may claim, and who holds each one now.

    Every operation costs O(1) in the number of ports held (a client registering N tunnels costs
    O(N) in total), and choosing a free port for ``remote_port = 0`` probes random allowed ports
    instead of listing the whole range.  The ports of a client that went offline stay reserved for
    it (``holds``), so no other client takes them during a network blip of the lab.
    """

    def __init__(self, allowed: PortRanges, max_per_client: int) -> None:
        self.allowed = allowed
        self.max_per_client = max_per_client
        self.holders: dict[int, PublicTunnel] = {}
        self._count: dict[str, int] = {}  # client name -> ports held
        self.holds: OfflineHolds[int] = OfflineHolds(HOLD_SECONDS, RECLAIM_SECONDS)
        self._starts: list[int] = []  # index of each range's first port in the allowed set
        total = 0
        for lo, hi in allowed.ranges:
            self._starts.append(total)
            total += hi - lo + 1
        self._size = total

    def count_for(self, client_name: str) -> int:
        return self._count.get(client_name, 0)

    def check(self, client_name: str, port: int, now: float) -> None:
        if self.max_per_client and self.count_for(client_name) >= self.max_per_client:
            raise TunnelRefused(
                f"client {client_name!r} already holds max_ports_per_client={self.max_per_client} ports"
            )
        if port == 0:
            return
        if port not in self.allowed:
            raise TunnelRefused(f"port {port} is not in allow_ports ({self.allowed.text})")
        holder = self.holders.get(port)
        if holder is not None:
            raise TunnelRefused(f"port {port} is already used by client {holder.client.name!r} tunnel {holder.name!r}")
        held_for = self.holds.holder(port, now)
        if held_for is not None and held_for != client_name:
            raise TunnelRefused(f"port {port} belongs to client {held_for!r} (offline; reserved for it)")

    def _taken(self, port: int, client_name: str, now: float) -> bool:
        """Held by a tunnel, or reserved for another (offline) client."""
        return port in self.holders or self.holds.holder(port, now) not in (None, client_name)

    async def bind(self, tunnel: PublicTunnel, host: str, port: int) -> None:
        """Bind ``tunnel`` to ``port``, or to a free allowed port when ``port`` is 0."""
        name = tunnel.client.name
        self.check(name, port, time.monotonic())
        if port:
            try:
                await tunnel.listen(host, port)
            except OSError as exc:
                raise TunnelRefused(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        else:
            await self._bind_any(tunnel, host)
        # the await above let other clients in: check again before taking the port
        if self._taken(tunnel.port, name, time.monotonic()):
            tunnel.close()
            raise TunnelRefused(f"port {tunnel.port} was taken meanwhile; try again")
        self.holders[tunnel.port] = tunnel
        self.holds.release(tunnel.port)
        self._count[name] = self._count.get(name, 0) + 1

    def _candidates(self) -> Iterator[int]:
        """Ports to try for ``remote_port = 0``: random allowed ones, then (nearly full) every one
        once from a random start; O(range) only in that last case."""
        for _ in range(_BIND_ATTEMPTS * 4):
            yield self._nth_allowed(random.randrange(self._size))
        start = random.randrange(self._size)
        for i in range(self._size):
            yield self._nth_allowed((start + i) % self._size)

    def _nth_allowed(self, index: int) -> int:
        i = bisect.bisect_right(self._starts, index) - 1
        return self.allowed.ranges[i][0] + index - self._starts[i]

    async def _bind_any(self, tunnel: PublicTunnel, host: str) -> None:
        name = tunnel.client.name
        if self._size >= 64511:  # the default 1024-65535: let the OS pick
            try:
                await tunnel.listen(host, 0)
            except OSError as exc:
                raise TunnelRefused(f"cannot listen on {host}: {exc.strerror or exc}") from None
            if tunnel.port in self.allowed and not self._taken(tunnel.port, name, time.monotonic()):
                return
            tunnel.close()
        tried: set[int] = set()
        for port in self._candidates():
            if len(tried) >= _BIND_ATTEMPTS:
                break
            if port in tried or self._taken(port, name, time.monotonic()):
                continue
            tried.add(port)
            try:
                await tunnel.listen(host, port)
                return
            except OSError:
                continue  # taken by another program: try another
        raise TunnelRefused(f"no free port found in allow_ports ({self.allowed.text}) after {len(tried)} tries")

    def owner_returned(self, owner: str, now: float) -> None:
        """``owner`` logged in again: its reserved ports it does not claim back soon are released."""
        self.holds.owner_returned(owner, now)

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        """Close the tunnel's listener and free its port: at once when the tunnel was removed or
        replaced, reserved for its client when the client went away."""
        if self.holders.get(tunnel.port) is tunnel:
            del self.holders[tunnel.port]
            name = tunnel.client.name
            if client_gone:
                self.holds.hold(tunnel.port, name, time.monotonic())
            left = self._count.get(name, 0) - 1
            if left > 0:
                self._count[name] = left
            else:
                self._count.pop(name, None)
        tunnel.close()


_BIND_ATTEMPTS = 200
