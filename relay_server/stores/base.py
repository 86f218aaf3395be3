"""relayd's persistent state, behind an async interface: clients, dashboard tunnels, traffic.

What a store keeps: the clients made in the dashboard (name, token, enabled), the tunnels defined
in the dashboard (a ``TunnelSpec`` each, kept in its dict form so a new field needs no new
column), per-minute and per-hour traffic buckets, and the lasting totals of each (client, tunnel
name).  Nothing about how it keeps them leaks out of this interface.

Change feed: every write that changes what some relayd must do (a client created, disabled,
deleted or given a new token; a tunnel defined, edited, enabled, disabled or deleted) is announced to the
subscribers as a ``Change`` (what changed, for whom) once it is stored.  The registry acts on
changes only through this feed, whether they were made on this node or, with a shared database,
on another one.

Every method is a coroutine that must not block the event loop for more than a few milliseconds
(an embedded database runs its calls in a thread of its own).
"""

from __future__ import annotations

import abc
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.tunnel import TunnelSpec

log = logging.getLogger("relayd.store")

MINUTE_KEEP = 7 * 86400  # per-minute buckets are kept this long
HOUR_KEEP = 90 * 86400  # and hourly ones this long


@dataclass(frozen=True)
class ClientRecord:
    """A client made in the dashboard (clients of the shared token have none)."""

    name: str
    token: str
    created: float
    last_seen: float | None = None
    remote_addr: str = ""
    version: str = ""
    enabled: bool = True


@dataclass(frozen=True)
class TunnelRecord:
    """A tunnel defined in the dashboard: pushed to its client while enabled."""

    client: str
    spec: TunnelSpec
    enabled: bool = True
    created: float = 0.0


@dataclass
class Totals:
    """What went through one (client, tunnel name) since ``since`` (Unix seconds)."""

    bytes_in: int = 0
    bytes_out: int = 0
    conns_total: int = 0
    since: float = 0.0


@dataclass(frozen=True)
class TrafficDelta:
    """Traffic of one (client, tunnel name) since the last record."""

    client: str
    tunnel: str
    bytes_in: int
    bytes_out: int
    conns: int
    since: float  # the totals' ``since``, used when they are first stored


class ChangeKind(str, enum.Enum):
    CLIENT = "client"  # a dashboard client was created, changed or deleted
    TUNNEL = "tunnel"  # a dashboard tunnel was defined, changed or deleted
    ALL = "all"  # changes may have been missed (the feed was down): read everything again


@dataclass(frozen=True)
class Member:
    """A relayd node of a cluster sharing one database: where its clients reach it."""

    addr: str  # public_addr, "host:port"
    fingerprint: str  # its TLS certificate's SHA-256 ("" without TLS)
    started: float
    heartbeat: float
    clients: tuple[str, ...] = ()  # the clients with a session on it (at its last heartbeat)


@dataclass(frozen=True)
class Change:
    """One entry of the change feed: what changed, for whom (read the current state back)."""

    kind: ChangeKind
    client: str
    tunnel: str = ""


ChangeListener = Callable[[Change], None]
BlockListener = Callable[[dict[str, Any]], None]


class Store(abc.ABC):
    """The async interface every store implements (``stores.sqlite`` is the embedded default,
    ``stores.postgres`` the one several nodes share)."""

    shared = False  # several relayd nodes use it (a cluster)

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []
        self._block_listeners: list[BlockListener] = []
        self._acme_listeners: list[BlockListener] = []

    # --- change feed ----------------------------------------------------------------------------

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener`` with each ``Change`` once it is stored (on the event loop)."""
        self._listeners.append(listener)

    def announce(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # a subscriber's bug must not undo a stored write
                log.exception("store: a change listener failed on %s", change)

    def subscribe_blocks(self, listener: BlockListener) -> None:
        """Call ``listener`` with each login block (or unblock) any node of the cluster published."""
        self._block_listeners.append(listener)

    def announce_block(self, event: dict[str, Any]) -> None:
        for listener in self._block_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("store: a block listener failed on %s", event)

    async def publish_block(self, event: dict[str, Any]) -> None:  # noqa: B027
        """Tell every node of the cluster about a login block or unblock (nothing to do alone)."""

    # --- ACME, shared by a cluster's nodes (alone, relayd keeps it in state_dir) ---------------

    def subscribe_acme(self, listener: BlockListener) -> None:
        """Call ``listener`` with each ACME event another node published (a challenge answer to
        serve or drop, a certificate stored)."""
        self._acme_listeners.append(listener)

    def announce_acme(self, event: dict[str, Any]) -> None:
        for listener in self._acme_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("store: an ACME listener failed on %s", str(event)[:200])

    async def publish_acme(self, event: dict[str, Any]) -> None:  # noqa: B027
        """Tell every node about an ACME event (nothing to do alone)."""

    async def acme_get(self, key: str) -> str | None:
        """A stored ACME value (the account key, ``cert:NAME``), or None."""
        return None

    async def acme_put(self, key: str, value: str) -> None:  # noqa: B027
        """Store an ACME value for every node."""

    async def acme_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Whether ``holder`` may order ``name`` now (no other node holds a lease on it that is
        younger than ``seconds``); alone, always."""
        return True

    # --- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema; ready for calls afterwards."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # --- clients --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def clients(self) -> list[ClientRecord]: ...

    @abc.abstractmethod
    async def client(self, name: str) -> ClientRecord | None: ...

    @abc.abstractmethod
    async def create_client(self, name: str, token: str) -> ClientRecord:
        """Raises ``shared.errors.Conflict`` if the name exists."""

    @abc.abstractmethod
    async def set_client_token(self, name: str, token: str) -> None: ...

    @abc.abstractmethod
    async def set_client_enabled(self, name: str, enabled: bool) -> None: ...

    @abc.abstractmethod
    async def delete_client(self, name: str) -> None:
        """The client, its tunnels and its totals."""

    @abc.abstractmethod
    async def touch_client(self, name: str, remote_addr: str, version: str, when: float) -> None:
        """Remember a login (no change is announced: nothing to act on)."""

    # --- dashboard tunnels ----------------------------------------------------------------------

    @abc.abstractmethod
    async def tunnels(self, client: str | None = None) -> list[TunnelRecord]: ...

    @abc.abstractmethod
    async def tunnel(self, client: str, name: str) -> TunnelRecord | None: ...

    @abc.abstractmethod
    async def add_tunnel(self, record: TunnelRecord) -> None:
        """Raises ``shared.errors.Conflict`` if the client has a tunnel of that name."""

    @abc.abstractmethod
    async def set_tunnel_enabled(self, client: str, name: str, enabled: bool) -> None: ...

    @abc.abstractmethod
    async def update_tunnel(self, client: str, spec: TunnelSpec, enabled: bool) -> None:
        """Replace the definition of ``client``'s tunnel ``spec.name`` (an edit in the dashboard);
        raises ``shared.errors.NotFound`` if it is not stored (deleted meanwhile)."""

    @abc.abstractmethod
    async def delete_tunnel(self, client: str, name: str) -> None:
        """The tunnel and its totals."""

    # --- traffic --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def totals(self) -> dict[tuple[str, str], Totals]:
        """The lasting totals of every (client, tunnel name)."""

    @abc.abstractmethod
    async def record_traffic(self, minute: int, deltas: list[TrafficDelta]) -> None:
        """Add ``deltas`` to the totals, to the minute bucket ``minute`` (Unix seconds, a multiple
        of 60) and to its hour; prune buckets older than MINUTE_KEEP / HOUR_KEEP."""

    @abc.abstractmethod
    async def drop_totals(self, client: str, tunnel: str) -> None:
        """Forget one (client, tunnel name)'s totals (the registry bounds how many it keeps)."""

    @abc.abstractmethod
    async def traffic(
        self, client: str, tunnel: str, since: float, now: float
    ) -> tuple[int, list[tuple[int, int, int]]]:
        """(step, [(bucket start, bytes_in, bytes_out), ...]) from ``since``: per-minute buckets
        when ``since`` is within MINUTE_KEEP, hourly ones otherwise; "" matches every name."""

    # --- the cluster (a store only one node uses has no other members) -------------------------

    async def heartbeat(self, addr: str, fingerprint: str, started: float,  # noqa: B027
                        clients: tuple[str, ...] = ()) -> None:  # fmt: skip
        """Say this node (at ``addr``) is alive, with the clients that have a session on it."""

    async def members(self, max_age: float) -> list[Member]:
        """The nodes whose heartbeat is younger than ``max_age`` seconds."""
        return []

    async def leave(self, addr: str) -> None:  # noqa: B027
        """This node stops (its member entry goes)."""

    async def choose_port(self, client: str, tunnel: str, transport: str, port: int) -> int:
        """The port of a ``remote_port = 0`` tunnel, chosen once for all nodes: ``port`` if no node
        chose one before, else the one chosen."""
        return port

    async def claim_places(self, places: list[tuple[str, str]], owner: str, group: str,
                           stale_after: float) -> tuple[str, str] | None:  # fmt: skip
        """Take the places (("tcp", "6000"), ("domain", "app.example.org"), ...) for ``owner``
        across the cluster: None if taken (or already ``owner``'s, or its group's), else the first
        place another owner holds and that owner.  A place no node refreshed for ``stale_after``
        seconds is free.  Alone: always None (the registry's own tables decide)."""
        return None

    async def release_places(self, places: list[tuple[str, str]], owner: str) -> None:  # noqa: B027
        """``owner`` removed the tunnel holding these places (not merely went offline)."""

    async def refresh_places(self, places: list[tuple[str, str]]) -> None:  # noqa: B027
        """This node still holds these places."""

    async def chosen_port(self, client: str, tunnel: str, transport: str) -> int:
        """The port chosen before for that tunnel by any node (0: none yet)."""
        return 0
