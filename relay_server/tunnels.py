"""An open tunnel of a logged-in client (``PublicTunnel``): its limits, counters and visitors.

Whatever the kind, a visitor is joined to a tunnel the same way: ``refusal`` says whether it may
come in (sources, connection caps, a client that does not take in what it is sent), then ``attach``
opens a stream to the client starting with ``stream_open``.  How visitors reach the tunnel (a TCP
listener, a domain on a vhost port) is its frontend's business (``relay_server.frontends``).
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Any, Protocol

from shared.aio import ConnectionRecord, MuxConnection, StreamHandler, TrafficCounters
from shared.config import ServerLimits
from shared.errors import LocalProtocolError
from shared.limits import SourceFilter, TokenBucket
from shared.messages import StreamOpen, encode_message, encode_stream_open
from shared.tunnel import TunnelSpec

if TYPE_CHECKING:
    from relay_server.groups import TunnelGroup

# Visitor bytes waiting for a client's credit past which its new visitors are turned away: its
# visitors are already paused at 16 MiB (control.SEND_BACKLOG_LIMIT), but each new connection is
# read once before it can be paused (uvloop starts reading as it accepts), so without this a
# flood of new visitors could still add a read each.
BUSY_BACKLOG = 64 * 1024 * 1024


class Visitor(StreamHandler, Protocol):
    """What a tunnel joins to its client: a visitor's end of one stream (a TCP connection's
    bridge, a UDP flow, a secret tunnel's visit)."""

    counters: TrafficCounters | None
    record: ConnectionRecord | None  # what the dashboard lists of this connection (its bytes too)
    buckets: tuple[TokenBucket, ...]

    def bind(self, mux: MuxConnection, stream_id: int) -> None: ...
    def abort(self) -> None: ...


class TunnelOwner(Protocol):
    """What a tunnel needs of its client's session."""

    name: str
    mux: MuxConnection
    bucket: TokenBucket | None
    visitors_open: int

    def backlog(self) -> int: ...


# What lets a visitor in besides its address: changed, and the visitors let in by the old go.
CREDENTIAL_KEYS = ("http_user", "http_password", "secret_key", "allow_visitors")


class Refusal(enum.Enum):
    """Why a visitor may not use a tunnel now."""

    SOURCE = "source"  # not in allow_sources
    TUNNEL_FULL = "tunnel_full"  # max_connections of the tunnel
    CLIENT_FULL = "client_full"  # max_connections_per_client
    CLIENT_BUSY = "client_busy"  # far more waits for the client's credit than it takes in
    OFFLINE = "offline"  # the client's session cannot take a new stream
    NO_MEMBER = "no_member"  # a group with no member that can take a visitor (offline, failing checks)

    @property
    def http_status(self) -> int:
        return 403 if self is Refusal.SOURCE else 502 if self in (Refusal.OFFLINE, Refusal.NO_MEMBER) else 503


def min_nonzero(*values: int) -> int:
    """The strictest of several limits where 0 means unlimited."""
    set_values = [v for v in values if v]
    return min(set_values) if set_values else 0


class PublicTunnel:
    """One open tunnel of one logged-in client.

    ``counters`` is the registry's lasting counter of (client, tunnel name): a new incarnation of
    the tunnel (after a reconnect) goes on counting where the last one stopped.  ``claim`` is what
    its frontend holds for it (a listener, routes), released by that frontend."""

    __slots__ = ("bind_host", "bucket", "buckets", "claim", "client", "client_max", "counters", "dropped",
                 "group", "health_error", "healthy", "max_connections", "port", "public", "sources", "spec",
                 "visitors")  # fmt: skip

    def __init__(self, client: TunnelOwner, spec: TunnelSpec, limits: ServerLimits, counters: TrafficCounters,
                 bind_host: str) -> None:  # fmt: skip
        self.client = client
        self.spec = spec
        self.bind_host = bind_host
        self.port = 0
        self.public = ""  # where visitors reach it, as its frontend says
        self.claim: Any = None  # the frontend's: a listener (tcp), the routes claimed (http, https)
        self.counters = counters
        self.visitors: set[Visitor] = set()
        self.healthy: bool | None = None  # relayc's health check of the local service (None: none yet)
        self.health_error = ""
        self.dropped = 0  # datagrams dropped (udp tunnels)
        self.group: TunnelGroup | None = None  # the group it serves in, when spec.group is set
        self.max_connections = min_nonzero(limits.max_connections_per_tunnel, spec.max_connections)
        self.client_max = limits.max_connections_per_client
        rate = min_nonzero(limits.bandwidth_per_tunnel, spec.bandwidth_limit)
        self.bucket = TokenBucket(rate, asyncio.get_running_loop().time()) if rate else None
        self.sources = SourceFilter(spec.allow_sources)
        self.buckets = tuple(b for b in (self.bucket, client.bucket) if b is not None)

    @property
    def name(self) -> str:
        return self.spec.name

    def update(self, spec: TunnelSpec, limits: ServerLimits) -> None:
        """The tunnel's definition changed without changing its place (port, domains, locations,
        group): apply the new limits, sources and settings now.  A new bandwidth limit also holds
        for the visitors connected; one no longer in ``allow_sources`` is reset, and every one is
        when a credential changed (a leaked password or key is changed to cut off its holder:
        an upgraded WebSocket, a visit in progress)."""
        old = self.spec
        credentials_changed = any(getattr(old, key) != getattr(spec, key) for key in CREDENTIAL_KEYS)
        self.spec = spec
        self.max_connections = min_nonzero(limits.max_connections_per_tunnel, spec.max_connections)
        self.client_max = limits.max_connections_per_client
        rate = min_nonzero(limits.bandwidth_per_tunnel, spec.bandwidth_limit)
        if not rate:
            self.bucket = None
        elif self.bucket is not None:
            self.bucket.rate = rate  # the bucket's level is capped to the new rate on its next take
        else:
            self.bucket = TokenBucket(rate, asyncio.get_running_loop().time())
        self.buckets = tuple(b for b in (self.bucket, self.client.bucket) if b is not None)
        self.sources = SourceFilter(spec.allow_sources)
        # the health verdict stays: relayc probes a changed tunnel again at once and says if it differs
        for visitor in list(self.visitors):
            visitor.buckets = self.buckets
            record = visitor.record
            if credentials_changed or (spec.allow_sources and record is not None
                                       and not self.sources.allows(ip_of(record.addr))):  # fmt: skip
                self.detach(visitor)
                visitor.abort()

    def pick(self) -> PublicTunnel | None:
        """The tunnel a new visitor of this one's place goes to: itself, or the next member of its
        group that can take one (None: no member can now)."""
        return self.group.pick() if self.group is not None else self

    @property
    def client_name(self) -> str:
        return self.client.name

    def attach(self, bridge: Visitor, visitor: str, first: bytes = b"", public: str = "") -> bool:
        """Bind a visitor's bridge to this tunnel: open its stream to the client (``stream_open``
        preamble, then ``first``), count it, apply the bandwidth limits.  False if the client's
        session cannot take a new stream (closing, going away).  ``public``: the address of
        relayd's socket the visitor reached, sent only for a PROXY protocol tunnel."""
        mux = self.client.mux
        if not mux.is_open:
            return False
        if self.spec.proxy_protocol:
            preamble = encode_message(StreamOpen(tunnel=self.spec.name, visitor=visitor, public=public))
        else:
            preamble = encode_stream_open(self.spec.name, visitor)
        try:
            stream_id = mux.open_stream(bridge, preamble + first)
        except LocalProtocolError:
            return False
        bridge.bind(mux, stream_id)  # paused at once if the session's connection is backed up
        bridge.counters = counters = self.counters
        bridge.buckets = self.buckets
        bridge.record = record = counters.opened(display_addr(visitor), time.time())
        counters.bytes_in += len(first)
        record.bytes_in += len(first)
        self.visitors.add(bridge)
        self.client.visitors_open += 1
        return True

    def detach(self, bridge: Visitor) -> None:
        """A visitor attached by ``attach`` went away."""
        if bridge in self.visitors:
            self.visitors.discard(bridge)
            self.client.visitors_open -= 1
            record = bridge.record
            if record is not None and record.closed is None:
                record.closed = time.time()

    def refusal(self, visitor_ip: str) -> Refusal | None:
        """Why a new visitor from ``visitor_ip`` may not use this tunnel now, or None (a refusal
        is remembered for the tunnel's page)."""
        if not self.sources.allows(visitor_ip):
            refusal = Refusal.SOURCE
        elif self.max_connections and self.counters.conns_open >= self.max_connections:
            refusal = Refusal.TUNNEL_FULL
        elif self.client_max and self.client.visitors_open >= self.client_max:
            refusal = Refusal.CLIENT_FULL
        elif self.client.backlog() > BUSY_BACKLOG:
            refusal = Refusal.CLIENT_BUSY
        else:
            return None
        self.counters.refused(visitor_ip, refusal.value, self.refusal_text(refusal, visitor_ip), time.time())
        return refusal

    def refusal_text(self, refusal: Refusal, visitor_ip: str) -> str:
        if refusal is Refusal.SOURCE:
            return f"source {visitor_ip} is not in allow_sources"
        if refusal is Refusal.TUNNEL_FULL:
            return f"max_connections={self.max_connections} reached"
        if refusal is Refusal.CLIENT_FULL:
            return f"client {self.client.name} reached max_connections_per_client={self.client_max}"
        if refusal is Refusal.NO_MEMBER:
            return f"no member of group {self.spec.group!r} can serve it now (offline, or failing health checks)"
        if refusal is Refusal.CLIENT_BUSY:
            return f"client {self.client.name} is not taking in what its visitors send (try again later)"
        return f"client {self.client.name} is not connected"

    def reset_visitors(self) -> None:
        """Reset the visitors still connected (the tunnel is closed)."""
        for visitor in list(self.visitors):
            self.detach(visitor)
            visitor.abort()


def display_addr(visitor: str) -> str:
    """A visitor as the dashboard lists it: ``ip:port``, an IPv6 address in brackets
    (``[::1]:5000``); a visit to a secret tunnel as ``client@ip``."""
    if visitor.count(":") > 1 and not visitor.startswith("[") and "@" not in visitor:
        host, _, port = visitor.rpartition(":")
        return f"[{host}]:{port}"
    return visitor


def ip_of(addr: str) -> str:
    """The IP address in ``display_addr``'s form."""
    if "@" in addr:  # client@ip: no port
        return addr.rpartition("@")[2].strip("[]")
    if addr.startswith("["):
        return addr[1 : addr.find("]")]
    return addr.rpartition(":")[0] if ":" in addr else addr
