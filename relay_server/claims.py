"""Claims: who holds which public port and which domain (and its locations).

These tables are owned by the registry (``relay_server.registry``), which is where every
cross-client rule is enforced; frontends ask them and never decide ownership themselves.

Ports are claimed per protocol (``(protocol, port)``), so a UDP tunnel on a port number does not
collide with a TCP one.  A domain (a tunnel's ``subdomain`` under ``subdomain_host``, or one of
its ``custom_domains``; the two spellings of one name are one domain) belongs to the client that
claimed it first: no other client can register anything on it, no location on http and nothing on
https.  The owner may split its domain between its own http tunnels by ``locations`` (the longest
matching prefix wins; locations and request paths are compared normalized).

What an offline client held stays reserved for it (``holds.HOLD_SECONDS``); when it comes back,
what it does not claim again within ``holds.RECLAIM_SECONDS`` is released.  Every claim and
release costs time in the number of the tunnel's own ports or routes, never in the number relayd
holds.
"""

from __future__ import annotations

import bisect
import enum
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from relay_server.groups import TunnelGroup
from relay_server.holds import HOLD_SECONDS, RECLAIM_SECONDS, OfflineHolds
from relay_server.http1 import HttpError, normalize_path
from shared.config import PortRanges
from shared.errors import TunnelRefusal as R
from shared.errors import TunnelRefused
from shared.tunnel import TunnelKind

if TYPE_CHECKING:
    from relay_server.tunnels import PublicTunnel


class Transport(str, enum.Enum):
    """What a port is claimed for: a UDP port and a TCP port of the same number are two claims."""

    TCP = "tcp"
    UDP = "udp"


Listen = Callable[[int], Awaitable[int]]  # bind a listener to a port (0: any), return the port bound


class PortClaims:
    """Which public ports a client may claim, and who holds each one now, per protocol.

    Every operation costs O(1) in the number of ports held (a client registering N tunnels costs
    O(N) in total), and choosing a free port for ``remote_port = 0`` probes random allowed ports
    instead of listing the whole range.  The ports of a client that went offline stay reserved for
    it (``holds``), so no other client takes them during a network blip of the lab.
    """

    def __init__(self, allowed: PortRanges, max_per_client: int) -> None:
        self.allowed = allowed
        self.max_per_client = max_per_client
        self.holders: dict[tuple[Transport, int], PublicTunnel] = {}  # (protocol, port) -> tunnel
        self._count: dict[str, int] = {}  # client name -> ports held
        self.holds: OfflineHolds[tuple[Transport, int]] = OfflineHolds(HOLD_SECONDS, RECLAIM_SECONDS)
        self._starts: list[int] = []  # index of each range's first port in the allowed set
        total = 0
        for lo, hi in allowed.ranges:
            self._starts.append(total)
            total += hi - lo + 1
        self._size = total

    def count_for(self, client_name: str) -> int:
        return self._count.get(client_name, 0)

    def holder(self, protocol: Transport, port: int) -> PublicTunnel | None:
        return self.holders.get((protocol, port))

    def check(self, client_name: str, protocol: Transport, port: int, now: float) -> None:
        """Raise ``TunnelRefused`` if ``client_name`` may not claim ``port`` now (0: any port)."""
        if self.max_per_client and self.count_for(client_name) >= self.max_per_client:
            raise TunnelRefused(R.TOO_MANY_PORTS, f"client {client_name!r} already holds "
                                f"max_ports_per_client={self.max_per_client} ports")  # fmt: skip
        if port == 0:
            return
        if port not in self.allowed:
            raise TunnelRefused(R.PORT_NOT_ALLOWED, f"port {port} is not in allow_ports ({self.allowed.text})")
        holder = self.holders.get((protocol, port))
        if holder is not None:
            raise TunnelRefused(R.PORT_TAKEN, f"port {port} is already used by client {holder.client_name!r} "
                                f"tunnel {holder.name!r}")  # fmt: skip
        held_for = self.holds.holder((protocol, port), now)
        if held_for is not None and held_for != client_name:
            raise TunnelRefused(R.PORT_RESERVED, f"port {port} belongs to client {held_for!r} (offline; reserved "
                                "for it)")  # fmt: skip

    def _taken(self, protocol: Transport, port: int, client_name: str, now: float) -> bool:
        """Held by a tunnel, or reserved for another (offline) client."""
        key = (protocol, port)
        return key in self.holders or self.holds.holder(key, now) not in (None, client_name)

    async def claim(self, tunnel: PublicTunnel, protocol: Transport, port: int, listen: Listen,
                    close: Callable[[], None]) -> int:  # fmt: skip
        """Bind ``tunnel`` to ``port``, or to a free allowed port when ``port`` is 0, with ``listen``
        (``close`` undoes it); return the port.  ``TunnelRefused`` naming the holder otherwise."""
        name = tunnel.client_name
        self.check(name, protocol, port, time.monotonic())
        if port:
            try:
                bound = await listen(port)
            except OSError as exc:
                raise TunnelRefused(R.CANNOT_LISTEN, f"cannot listen on {tunnel.bind_host}:{port}: "
                                    f"{exc.strerror or exc}") from None  # fmt: skip
        else:
            bound = await self._bind_any(name, protocol, tunnel.bind_host, listen, close)
        # the await above let other clients in: check again before taking the port
        if self._taken(protocol, bound, name, time.monotonic()):
            close()
            raise TunnelRefused(R.PORT_TAKEN, f"port {bound} was taken meanwhile; try again")
        self.holders[(protocol, bound)] = tunnel
        self.holds.release((protocol, bound))
        self._count[name] = self._count.get(name, 0) + 1
        return bound

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

    async def _bind_any(
        self, name: str, protocol: Transport, host: str, listen: Listen, close: Callable[[], None]
    ) -> int:
        if self._size >= 64511:  # the default 1024-65535: let the OS pick
            try:
                bound = await listen(0)
            except OSError as exc:
                raise TunnelRefused(R.CANNOT_LISTEN, f"cannot listen on {host}: {exc.strerror or exc}") from None
            if bound in self.allowed and not self._taken(protocol, bound, name, time.monotonic()):
                return bound
            close()
        tried: set[int] = set()
        for port in self._candidates():
            if len(tried) >= _BIND_ATTEMPTS:
                break
            if port in tried or self._taken(protocol, port, name, time.monotonic()):
                continue
            tried.add(port)
            try:
                return await listen(port)
            except OSError:
                continue  # taken by another program: try another
        raise TunnelRefused(R.CANNOT_LISTEN, f"no free port found in allow_ports ({self.allowed.text}) after "
                            f"{len(tried)} tries")  # fmt: skip

    def owner_returned(self, owner: str, now: float) -> None:
        """``owner`` logged in again: its reserved ports it does not claim back soon are released."""
        self.holds.owner_returned(owner, now)

    def join(self, tunnel: PublicTunnel, protocol: Transport, port: int) -> TunnelGroup | None:
        """The group of the holder of ``port`` that ``tunnel`` may join (counted as a port of its
        client), or None when the holder is not in ``tunnel``'s group; ``TunnelRefused`` when it is
        in a group of that name that ``tunnel`` does not fit (another key, another place)."""
        holder = self.holders.get((protocol, port))
        group = holder.group if holder is not None else None
        if group is None or group.name != tunnel.spec.group:
            return None
        problem = group.problem(tunnel.spec)
        if problem is not None:
            raise TunnelRefused(R.PORT_TAKEN, f"port {port} is served by group {group.name!r}: {problem}")
        name = tunnel.client_name
        if self.max_per_client and self.count_for(name) >= self.max_per_client:
            raise TunnelRefused(R.TOO_MANY_PORTS, f"client {name!r} already holds "
                                f"max_ports_per_client={self.max_per_client} ports")  # fmt: skip
        self._count[name] = self._count.get(name, 0) + 1
        return group

    def release(self, tunnel: PublicTunnel, protocol: Transport, port: int, client_gone: bool,
                heir: PublicTunnel | None = None) -> None:  # fmt: skip
        """Free the tunnel's port: at once when the tunnel was removed or replaced, reserved for
        its client when the client went away; handed to ``heir`` (a member of its group that goes
        on serving it) when there is one."""
        key = (protocol, port)
        holder = self.holders.get(key)
        if holder is not tunnel and (holder is None or holder.group is None or holder.group is not tunnel.group):
            return  # not counted for this port (a claim that failed, or a port taken over meanwhile)
        name = tunnel.client_name
        if holder is tunnel:
            if heir is not None:
                self.holders[key] = heir
            else:
                del self.holders[key]
                if client_gone:  # reserved for the port's owner: a group's first member, not its last
                    owner = tunnel.group.owner if tunnel.group is not None else name
                    self.holds.hold(key, owner, time.monotonic())
        left = self._count.get(name, 0) - 1
        if left > 0:
            self._count[name] = left
        else:
            self._count.pop(name, None)


_BIND_ATTEMPTS = 200


class DomainClaim:
    """One domain with at least one tunnel on it: its owner, its http routes (location ->
    tunnel), its https tunnel."""

    __slots__ = ("http", "https", "length_count", "lengths", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.http: dict[str, PublicTunnel] = {}
        self.lengths: list[int] = []  # distinct location lengths negated, so longest first (<= 1024)
        self.length_count: dict[int, int] = {}  # location length -> how many locations have it
        self.https: PublicTunnel | None = None

    @property
    def empty(self) -> bool:
        return not self.http and self.https is None

    def match(self, path: str) -> PublicTunnel | None:
        """The tunnel whose location is the longest prefix of ``path`` (a normalized path)."""
        http = self.http
        for negated in self.lengths:
            n = -negated
            tunnel = http.get(path[:n]) if len(path) >= n else None
            if tunnel is not None:
                return tunnel
        return None

    def add_location(self, location: str, tunnel: PublicTunnel) -> None:
        if location not in self.http:
            n = len(location)
            count = self.length_count.get(n, 0)
            self.length_count[n] = count + 1
            if not count:
                bisect.insort(self.lengths, -n)  # stored negated: longest first
        self.http[location] = tunnel

    def remove_location(self, location: str) -> None:
        del self.http[location]
        n = len(location)
        count = self.length_count[n] - 1
        if count:
            self.length_count[n] = count
        else:
            del self.length_count[n]
            self.lengths.remove(-n)


class DomainClaims:
    """Which client owns which domain, and which of its tunnels serves which path."""

    def __init__(self, subdomain_host: str) -> None:
        self.subdomain_host = subdomain_host
        self.domains: dict[str, DomainClaim] = {}
        self.holds: OfflineHolds[str] = OfflineHolds(HOLD_SECONDS, RECLAIM_SECONDS)

    def domains_of(self, tunnel: PublicTunnel) -> list[str]:
        spec = tunnel.spec
        domains: list[str] = []
        if spec.subdomain:
            if not self.subdomain_host:
                raise TunnelRefused(R.NO_SUBDOMAIN_HOST, "relayd has no subdomain_host configured; use custom_domains")
            domains.append(f"{spec.subdomain}.{self.subdomain_host}".lower())
        domains += [d.lower().rstrip(".") for d in spec.custom_domains]
        return list(dict.fromkeys(domains))  # a custom domain may spell the subdomain again

    def add(self, tunnel: PublicTunnel, now: float) -> list[str]:
        """Claim the tunnel's routes; raise TunnelRefused naming the holder of any conflict."""
        domains = self.domains_of(tunnel)
        https = tunnel.spec.type is TunnelKind.HTTPS
        locations = [] if https else list(dict.fromkeys(normalize_location(loc) for loc in tunnel.spec.locations))
        locations = locations or ["/"]
        owner = tunnel.client_name
        group = self._group_to_join(tunnel, domains, locations, https)
        if group is not None:
            group.join(tunnel)
            tunnel.claim = [(d, tuple(locations)) for d in domains]
            return domains
        for d in domains:
            claim = self.domains.get(d)
            if claim is None:
                held_for = self.holds.holder(d, now)
                if held_for is not None and held_for != owner:
                    raise TunnelRefused(R.DOMAIN_RESERVED, f"domain {d} belongs to client {held_for!r} (offline; "
                                        "reserved for it)")  # fmt: skip
                continue
            if claim.owner != owner:
                raise TunnelRefused(R.DOMAIN_TAKEN, f"domain {d} belongs to client {claim.owner!r}")
            if https:
                if claim.https is not None and claim.https is not tunnel:
                    raise TunnelRefused(R.DOMAIN_TAKEN, f"domain {d} is already used by tunnel {claim.https.name!r}")
            else:
                for loc in locations:
                    holder = claim.http.get(loc)
                    if holder is not None and holder is not tunnel:
                        raise TunnelRefused(R.DOMAIN_TAKEN, f"domain {d} location {loc} is already used by tunnel "
                                            f"{holder.name!r}")  # fmt: skip
        for d in domains:
            claim = self.domains.get(d)
            if claim is None:
                claim = self.domains[d] = DomainClaim(owner)
                self.holds.release(d)
            if https:
                claim.https = tunnel
            else:
                for loc in locations:
                    claim.add_location(loc, tunnel)
        tunnel.claim = [(d, tuple(locations)) for d in domains]
        if tunnel.spec.group:
            TunnelGroup(tunnel)  # the first member: the others join it
        return domains

    def _group_to_join(self, tunnel: PublicTunnel, domains: list[str], locations: list[str],
                       https: bool) -> TunnelGroup | None:  # fmt: skip
        """The group holding every route ``tunnel`` would take, when ``tunnel`` is of it; None when
        the routes are not held by a group of its name (the usual rules apply)."""
        name = tunnel.spec.group
        if not name or not domains:
            return None
        group = None
        for d in domains:
            claim = self.domains.get(d)
            holders = [claim.https] if claim is not None and https else \
                [claim.http.get(loc) for loc in locations] if claim is not None else [None]  # fmt: skip
            for holder in holders:
                held = holder.group if holder is not None else None
                if held is None or held.name != name:
                    if group is not None:
                        raise TunnelRefused(R.DOMAIN_TAKEN, f"domain {d} is not served by group {name!r} (its members "
                                            "must have the same domains and locations)")  # fmt: skip
                    return None
                if group is None:
                    problem = held.problem(tunnel.spec)
                    if problem is not None:
                        raise TunnelRefused(R.DOMAIN_TAKEN, f"domain {d} is served by group {name!r}: {problem}")
                    group = held
        return group

    def remove(self, tunnel: PublicTunnel, client_gone: bool, now: float) -> None:
        """Release the tunnel's routes.  A domain left empty stays reserved for its owner when the
        client went away; one released on purpose (tunnel removed or replaced) is free at once.
        Routes a group member held go to another member of its group."""
        https = tunnel.spec.type is TunnelKind.HTTPS
        heir = tunnel.group.leave(tunnel) if tunnel.group is not None else None
        for d, locations in tunnel.claim or ():
            claim = self.domains.get(d)
            if claim is None:
                continue
            if https:
                if claim.https is tunnel:
                    claim.https = heir
            else:
                for loc in locations:
                    if claim.http.get(loc) is tunnel:
                        if heir is not None:
                            claim.http[loc] = heir
                        else:
                            claim.remove_location(loc)

            if claim.empty:
                del self.domains[d]
                if client_gone:
                    self.holds.hold(d, claim.owner, now)
        tunnel.claim = None

    def owner_returned(self, owner: str, now: float) -> None:
        """``owner`` logged in again: what it does not claim back soon is released."""
        self.holds.owner_returned(owner, now)

    def match_http(self, host: str, path: str) -> PublicTunnel | None:
        claim = self.domains.get(host)
        return claim.match(path) if claim is not None else None

    def http_domains(self) -> list[tuple[str, str]]:
        """(domain, owner) of every domain an http tunnel has a route on."""
        return [(name, claim.owner) for name, claim in self.domains.items() if claim.http]

    def serves_http(self, host: str) -> bool:
        """Whether an http tunnel has a route on ``host`` (relayd may terminate TLS for it)."""
        claim = self.domains.get(host)
        return claim is not None and bool(claim.http)

    def match_https(self, host: str) -> PublicTunnel | None:
        claim = self.domains.get(host)
        return claim.https if claim is not None else None

    def offline_owner(self, host: str, now: float) -> str | None:
        """The client whose domain ``host`` is while it is offline (for the 502 page)."""
        return self.holds.holder(host, now) if host not in self.domains else None


def normalize_location(location: str) -> str:
    """A location as request paths are compared: normalized the same way (a location that does
    not normalize, say with ``%2F``, can never match and is refused at registration)."""
    try:
        return normalize_path(location)
    except HttpError as exc:
        raise TunnelRefused(R.BAD_SPEC, f"location {location!r}: {exc.reason}") from None
