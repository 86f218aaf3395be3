"""Groups: several clients serving one public port or domain (``group`` / ``group_key``).

Theory of operation
===================

A port or domain belongs to one tunnel (its *holder* in the claim tables), with one exception: a
tunnel whose ``group``, ``group_key``, type and place (``remote_port``; or domains and locations)
equal the holder's joins the holder's ``TunnelGroup`` instead of being refused.  The holder keeps
the listener or routes; every member is in ``members``.  A visitor reaching the place is given to
``pick()``: round robin over the members that can take it now (client connected, health check
not failing).  When the holder leaves, its frontend hands the listener or routes to another member
(``heir``), so the place stays served while any member is; the last one out releases it as any
tunnel would, reserved for the group's *first* member's client (whose place it is).  A member
never becomes the owner of a domain: it serves the group's routes only.

Each operation costs O(members).  The group key is compared in constant time, and a wrong one is
refused without saying anything about the group beyond its name being in use.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from shared.tunnel import TunnelKind, TunnelSpec

if TYPE_CHECKING:
    from relay_server.tunnels import PublicTunnel


def place_of(spec: TunnelSpec) -> tuple[object, ...]:
    """What members of one group must share besides name and key: kind and place."""
    if spec.type is TunnelKind.HTTP:
        return spec.type, spec.subdomain, frozenset(spec.custom_domains), frozenset(spec.locations or ["/"])
    if spec.type is TunnelKind.HTTPS:
        return spec.type, spec.subdomain, frozenset(spec.custom_domains)
    return spec.type, spec.remote_port


def same_group(a: TunnelSpec, b: TunnelSpec) -> bool:
    """Whether two tunnels may serve one place together: same group, key, kind and place."""
    return bool(a.group) and a.group == b.group and hmac.compare_digest(a.group_key.encode(), b.group_key.encode()) \
        and place_of(a) == place_of(b)  # fmt: skip


class TunnelGroup:
    __slots__ = ("_next", "key", "members", "name", "owner", "place")

    def __init__(self, first: PublicTunnel) -> None:
        spec = first.spec
        self.name = spec.group
        self.key = spec.group_key
        self.owner = first.client_name  # whose place it stays (reserved for it when all have left)
        self.place = place_of(spec)
        self.members: list[PublicTunnel] = [first]
        self._next = 0
        first.group = self

    def problem(self, spec: TunnelSpec) -> str | None:
        """Why ``spec`` may not join this group, or None."""
        if spec.group != self.name:
            return "it is not in this group"
        if not hmac.compare_digest(spec.group_key.encode(), self.key.encode()):
            return f"group {self.name!r} has another group_key"
        if place_of(spec) != self.place:
            return f"members of group {self.name!r} must have the same type and remote_port (or domains and locations)"
        return None

    def join(self, tunnel: PublicTunnel) -> None:
        self.members.append(tunnel)
        tunnel.group = self

    def leave(self, tunnel: PublicTunnel) -> PublicTunnel | None:
        """Take ``tunnel`` out; return a member that may take over what it held (None: empty)."""
        if tunnel in self.members:
            self.members.remove(tunnel)
        return self.members[0] if self.members else None

    def pick(self) -> PublicTunnel | None:
        """The next member that can take a visitor now, round robin; None if none can."""
        members = self.members
        n = len(members)
        for i in range(n):
            member = members[(self._next + i) % n]
            # only a configured health check takes a member out (the gentle probe every tunnel
            # gets, see relay_client/health.py, shows "service down" and nothing more)
            down = member.healthy is False and bool(member.spec.health_check)
            if not down and member.client.mux.is_open:
                self._next = (self._next + i + 1) % n
                return member
        return None
