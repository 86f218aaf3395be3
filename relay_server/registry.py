"""The registry: everything relayd knows about clients and tunnels, in one place.

Theory of operation
===================

The registry owns the live sessions (one per client name), the open tunnels of each, the claim
tables (``ports``: who holds which port, per protocol; ``domains``: who owns which domain and
location), the refusals, the login guard's blocks, the lasting traffic counters, and a cache of
what the store holds (dashboard clients and tunnels).  Every cross-client rule and every
per-client cap is checked here, once: control sessions (``control.py``) and the dashboard call its
commands; frontends (``frontends/``) are handed the claim tables and never decide ownership.

Commands change state and raise a typed error (``shared.errors``: ``TunnelRefused`` with a
``TunnelRefusal``, ``NotFound``, ``Conflict``, ``InvalidField``); queries return plain values for
views.  Observers ``subscribe`` to typed events (``ClientOnline``, ``TunnelOpened``, ...).

Changes made through the store (a dashboard tunnel defined, a client disabled or given a new
token) take effect through the store's change feed only (``_on_change``), so a change written by
another node sharing the database is applied the same way as one made here: the registry reads
the current state back and pushes, removes or disconnects accordingly.  Commands update the cache
at once so that their answer shows what they did.

Counters: each (client, tunnel name) has one ``Lasting`` counter, loaded from the store's totals
at start and handed to every incarnation of that tunnel, so totals survive reconnects; what is
not yet recorded is written once a minute and at shutdown (``flush_traffic``).  How many are kept
is bounded per client and in total; the oldest of a client's inactive tunnels go first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay_server.claims import DomainClaims, PortClaims, Transport
from relay_server.frontends.base import Frontend
from relay_server.groups import same_group
from relay_server.guard import Block, BlockKind, LoginGuard
from relay_server.holds import HOLD_SECONDS
from relay_server.stores.base import (
    Change,
    ChangeKind,
    ClientRecord,
    Member,
    Store,
    Totals,
    TrafficDelta,
    TunnelRecord,
)
from relay_server.tunnels import PublicTunnel
from shared.aio import MuxConnection, StreamHandler, TrafficCounters
from shared.burst import BurstLog
from shared.config import ServerConfig
from shared.errors import Conflict, InvalidField, NotFound, StoreUnavailable, TunnelRefusal, TunnelRefused
from shared.frames import GoAwayCode
from shared.schema import SchemaError, key_path
from shared.tunnel import TunnelKind, TunnelSpec

if TYPE_CHECKING:
    from relay_server.control import ClientSession

log = logging.getLogger("relayd")

REFUSALS_LOGGED_EACH = 32  # per client name: refusals logged one line each before one line per burst
TOTALS_PER_CLIENT = 1024  # lasting counters kept per client name (inactive ones beyond go, oldest first)
TOTALS_KEPT = 100_000  # and in all
MAX_SINCE = 2**40
VISITOR_SESSIONS_PER_CLIENT = 32  # visitor-only sessions (relayc connect) open at once per client name


class TunnelState(str, enum.Enum):
    """Where a tunnel is, as the API shows it (``status`` adds the refusal's text)."""

    ACTIVE = "active"
    SERVICE_DOWN = "service down"  # open, but relayc's health check cannot reach its local service
    PENDING = "pending"  # defined in the dashboard, pushed, not registered yet
    DISABLED = "disabled"
    OFFLINE = "client offline"
    REFUSED = "refused"


class TunnelSource(str, enum.Enum):
    CLIENT = "client"  # from the client's relayc.toml
    DASHBOARD = "dashboard"  # defined in the dashboard (the store), pushed to the client


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOnline:
    client: str
    remote_addr: str


@dataclass(frozen=True)
class ClientOffline:
    client: str


@dataclass(frozen=True)
class TunnelOpened:
    client: str
    tunnel: str
    kind: TunnelKind
    public: str


@dataclass(frozen=True)
class TunnelClosed:
    client: str
    tunnel: str


@dataclass(frozen=True)
class TunnelRefusedEvent:
    client: str
    tunnel: str
    reason: TunnelRefusal
    text: str


Event = ClientOnline | ClientOffline | TunnelOpened | TunnelClosed | TunnelRefusedEvent


class Lasting:
    """The lasting counters of one (client, tunnel name), and how much of them is recorded."""

    __slots__ = ("counters", "recorded", "since")

    def __init__(self, since: float, bytes_in: int = 0, bytes_out: int = 0, conns_total: int = 0) -> None:
        self.counters = TrafficCounters()
        self.counters.bytes_in, self.counters.bytes_out, self.counters.conns_total = bytes_in, bytes_out, conns_total
        self.recorded = (bytes_in, bytes_out, conns_total)
        self.since = since

    def pending(self) -> tuple[int, int, int]:
        c, (r_in, r_out, r_conns) = self.counters, self.recorded
        return c.bytes_in - r_in, c.bytes_out - r_out, c.conns_total - r_conns

    def as_dict(self) -> dict[str, Any]:
        c = self.counters
        return {"bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "conns_open": c.conns_open,
                "conns_total": c.conns_total, "totals_since": self.since}  # fmt: skip


class LastingTable:
    """Every ``Lasting`` by (client, tunnel name), with the bounds: at most ``per_client`` per client
    name and ``total`` in all, not counting those that cannot go (a live tunnel's, a dashboard
    tunnel's).  Past a bound the oldest evictable one goes (O(1)); ``dropped`` gets its key."""

    def __init__(self, dropped: Callable[[tuple[str, str]], None]) -> None:
        self.dropped = dropped
        self.by_key: dict[tuple[str, str], Lasting] = {}
        self.by_client: dict[str, dict[str, Lasting]] = {}
        self._evictable: dict[tuple[str, str], None] = {}  # oldest first
        self._evictable_of: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: tuple[str, str]) -> Lasting | None:
        return self.by_key.get(key)

    def add(self, key: tuple[str, str], lasting: Lasting, evictable: bool) -> None:
        client, tunnel = key
        self.by_key[key] = lasting
        mine = self.by_client.setdefault(client, {})
        mine[tunnel] = lasting
        if evictable:
            self.set_evictable(key, True)
        if len(mine) > TOTALS_PER_CLIENT:
            oldest = next(iter(self._evictable_of.get(client, {})), None)
            if oldest is not None:
                self.drop((client, oldest))
        if len(self.by_key) > TOTALS_KEPT and self._evictable:
            self.drop(next(iter(self._evictable)))

    def set_evictable(self, key: tuple[str, str], evictable: bool) -> None:
        client, tunnel = key
        if evictable and key in self.by_key:
            self._evictable[key] = None
            self._evictable_of.setdefault(client, {})[tunnel] = None
            return
        self._evictable.pop(key, None)
        mine = self._evictable_of.get(client)
        if mine is not None:
            mine.pop(tunnel, None)
            if not mine:
                del self._evictable_of[client]

    def drop(self, key: tuple[str, str]) -> None:
        if self.by_key.pop(key, None) is None:
            return
        client, tunnel = key
        mine = self.by_client[client]
        del mine[tunnel]
        if not mine:
            del self.by_client[client]
        self.set_evictable(key, False)
        self.dropped(key)


_TUNNEL_KEYS = frozenset(name for name, _, _, _ in TunnelSpec.schema())
_NO_TOTALS = {"bytes_in": 0, "bytes_out": 0, "conns_open": 0, "conns_total": 0, "totals_since": None}


class Registry:
    def __init__(self, config: ServerConfig, store: Store, guard: LoginGuard, burst_log: BurstLog) -> None:
        self.config = config
        self.store = store
        self.guard = guard
        self.burst_log = burst_log
        self.ports = PortClaims(config.port_ranges, config.max_ports_per_client)
        self.domains = DomainClaims(config.subdomain_host)
        self.frontends: dict[TunnelKind, Frontend] = {}
        self.sessions: dict[str, ClientSession] = {}
        self.visitor_sessions: dict[str, set[ClientSession]] = {}  # relayc connect: no tunnels, any number
        self.clients: dict[str, ClientRecord] = {}  # made in the dashboard (the store's, cached)
        self.defined: dict[tuple[str, str], TunnelRecord] = {}  # dashboard tunnels (the store's, cached)
        self._edit_lock = asyncio.Lock()  # dashboard edits, one at a time (none lost to another)
        self._lasting = LastingTable(self._forget_totals)
        self._live: dict[tuple[str, str], int] = {}  # open incarnations per key (0 or 1)
        self._flush_lock = asyncio.Lock()
        self._listeners: list[Callable[[Event], None]] = []
        self._refusal_logs: dict[str, int] = {}  # client name -> refusals logged one by one
        self._tasks: set[asyncio.Task[Any]] = set()
        self.members: list[Member] = []  # the cluster's live nodes (the store's, refreshed by the heartbeat)
        self.cluster_totals: dict[tuple[str, str], Totals] = {}  # a cluster: totals every node recorded

    # --- wiring ---------------------------------------------------------------------------------

    def add_frontend(self, frontend: Frontend) -> None:
        self.frontends[frontend.kind] = frontend

    async def load(self) -> None:
        """Read the store (clients, dashboard tunnels, totals) and follow its change feed."""
        self.clients = {c.name: c for c in await self.store.clients()}
        self.defined = {(t.client, t.spec.name): t for t in await self.store.tunnels()}
        for (client, tunnel), totals in (await self.store.totals()).items():
            lasting = Lasting(totals.since, totals.bytes_in, totals.bytes_out, totals.conns_total)
            self._lasting.add((client, tunnel), lasting, evictable=(client, tunnel) not in self.defined)
        self.store.subscribe(self._on_change)
        self.store.subscribe_blocks(self._on_block)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("registry: an event listener failed on %s", event)

    def _spawn(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("registry: %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    # --- sessions (called by control sessions) --------------------------------------------------

    def token_for(self, client_name: str) -> str | None:
        """A client made in the dashboard logs in with its own token (none while disabled); any
        other name with the shared ``[auth] token``."""
        record = self.clients.get(client_name)
        if record is not None:
            return record.token if record.enabled else None
        return self.config.auth.token or None

    def register(self, session: ClientSession) -> None:
        """``session`` logged in: it holds the name now (a previous one is ended), what was
        reserved for it may be claimed back, and its dashboard tunnels are pushed to it."""
        name = session.name
        old = self.sessions.get(name)
        if old is not None and old is not session:
            log.info("client %s: a new session from %s replaces the one from %s", name, session.remote_addr,
                     old.remote_addr)  # fmt: skip
            old.end(GoAwayCode.REPLACED)
        self.sessions[name] = session
        now = time.monotonic()
        self.domains.owner_returned(name, now)
        self.ports.owner_returned(name, now)
        self._emit(ClientOnline(name, session.remote_addr))
        if name in self.clients:
            self._spawn(self.store.touch_client(name, session.remote_addr, session.version, time.time()),
                        f"remembering the login of {name}")  # fmt: skip
        for (client, _), record in self.defined.items():
            if client == name and record.enabled:
                session.push(record.spec)

    def visitor_slot(self, name: str) -> bool:
        """Whether client ``name`` may open one more visitor-only session."""
        return len(self.visitor_sessions.get(name, ())) < VISITOR_SESSIONS_PER_CLIENT

    def has_own_token(self, session: ClientSession) -> bool:
        """Whether ``session`` logged in with a token of its own (a client made in the dashboard),
        rather than relayd's shared token, under which any name can be taken."""
        record = self.clients.get(session.name)
        return record is not None and bool(session.token_used) and session.token_used == record.token

    def register_visitor(self, session: ClientSession) -> None:
        """A visitor-only session logged in: it visits secret tunnels and holds nothing, so it
        never conflicts with the client's own session of the same name."""
        self.visitor_sessions.setdefault(session.name, set()).add(session)

    def peer_stream(self, session: ClientSession, mux: MuxConnection, stream_id: int) -> StreamHandler | None:
        """The handler of a stream a logged-in relayc opened (a visit), from the first frontend
        that serves such streams; None: the stream is reset."""
        for frontend in self.frontends.values():
            handler = frontend.peer_stream(session, mux, stream_id)
            if handler is not None:
                return handler
        return None

    def find_secret(self, client: str, tunnel: str) -> PublicTunnel | None:
        """The tunnel ``tunnel`` client ``client`` has open now (for a visit), or None."""
        session = self.sessions.get(client)
        return session.tunnels.get(tunnel) if session is not None and session.ready else None

    def set_health(self, session: ClientSession, name: str, healthy: bool, error: str) -> None:
        """relayc's probe of tunnel ``name`` says its local service is up or down (its health
        check, or the gentle probe relayc runs for every tunnel; logged one line per burst,
        whatever relayc sends)."""
        tunnel = session.tunnels.get(name)
        if tunnel is None or tunnel.healthy is healthy:
            return
        tunnel.healthy = healthy
        tunnel.health_error = "" if healthy else error[:256]
        key = f"health:{session.name}:{name}"
        if healthy:
            self.burst_log.info(key, "client %s tunnel %s: local service is up again", session.name, name)
        else:
            self.burst_log.warning(key, "client %s tunnel %s: local service is down: %s", session.name, name,
                                   tunnel.health_error)  # fmt: skip

    def session_closed(self, session: ClientSession) -> None:
        visitors = self.visitor_sessions.get(session.name)
        if visitors is not None and session in visitors:
            visitors.discard(session)
            if not visitors:
                del self.visitor_sessions[session.name]
            return
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            self.burst_log.forget(f"tunnel-refused:{session.name}")
            self._emit(ClientOffline(session.name))

    def kick(self, client: str) -> bool:
        """End the client's session and its visitor-only sessions."""
        for visitor in list(self.visitor_sessions.get(client, ())):
            visitor.end(GoAwayCode.KICKED)
        session = self.sessions.get(client)
        if session is None:
            return False
        log.info("client %s: kicked by the operator", client)
        session.end(GoAwayCode.KICKED)
        return True

    # --- tunnels (called by control sessions) ---------------------------------------------------

    def check_cap(self, session: ClientSession, name: str) -> None:
        cap = self.config.max_tunnels_per_client
        if cap and name not in session.tunnels and len(session.tunnels) >= cap:
            text = f"client {session.name!r} already has max_tunnels_per_client={cap} tunnels"
            raise TunnelRefused(TunnelRefusal.TOO_MANY_TUNNELS, text)

    async def open_tunnel(self, session: ClientSession, spec: TunnelSpec) -> PublicTunnel | None:
        """Open ``spec`` for ``session`` (replacing its tunnel of that name): claimed by its kind's
        frontend.  None if the session ended meanwhile; ``TunnelRefused`` if it may not be."""
        self.check_cap(session, spec.name)
        frontend = self.frontends.get(spec.type)
        key = (session.name, spec.name)
        # a dashboard tunnel relayd removed (disabled, deleted) while this add was on its way
        withdrawn = key in self.defined and spec.name not in session.pushed
        old = session.tunnels.get(spec.name)
        if old is not None and frontend is not None and not withdrawn and same_place(old.spec, spec):
            self._update_in_place(session, old, spec, frontend)  # an edit: same port, visitors stay
            return old
        old = session.tunnels.pop(spec.name, None)
        if old is not None:
            places = places_of(old) if self.store.shared else []
            self.close_tunnel(old, client_gone=False, release_places=False)
            if places:  # released before the new claim, which may take the same places again
                await self._release_places(places, session.name)
        if frontend is None:
            raise TunnelRefused(TunnelRefusal.KIND_OFF, f"{spec.type} tunnels are not served by this relayd")
        if withdrawn:
            raise TunnelRefused(TunnelRefusal.NAME_TAKEN, f"tunnel {spec.name!r} is a dashboard tunnel that is not "
                                "enabled for this client now")  # fmt: skip
        spec = await self._cluster_port(session.name, spec)
        lasting = self._lasting.get(key)
        known = lasting is not None
        if lasting is None:  # kept only once the tunnel is open: a refused one leaves nothing behind
            lasting = Lasting(float(int(time.time())))
        tunnel = PublicTunnel(session, spec, self.config.limits, lasting.counters, self.config.public_bind_addr)
        self._went_live(key)
        try:
            tunnel.public = await frontend.claim(tunnel)
            if self.store.shared and spec.type in (TunnelKind.TCP, TunnelKind.UDP) and not spec.remote_port:
                chosen = await self.store.choose_port(session.name, spec.name, spec.type.value, tunnel.port)
                if chosen != tunnel.port:  # another node chose first meanwhile: take that one
                    frontend.release(tunnel, client_gone=False)
                    tunnel.spec = dataclasses.replace(spec, remote_port=chosen)
                    tunnel.public = await frontend.claim(tunnel)
        except BaseException:
            self._went_inactive(key)
            raise
        if self.store.shared:
            await self._claim_in_cluster(session.name, tunnel, frontend)
        if not known and self._lasting.get(key) is None:
            self._lasting.add(key, lasting, evictable=False)
        session.refusals.pop(spec.name, None)
        if not session.ready:  # the session ended while the frontend was binding
            self.close_tunnel(tunnel, client_gone=True)
            return None
        session.tunnels[spec.name] = tunnel
        self._emit(TunnelOpened(session.name, spec.name, spec.type, tunnel.public))
        return tunnel

    def _update_in_place(self, session: ClientSession, tunnel: PublicTunnel, spec: TunnelSpec,
                         frontend: Frontend) -> None:  # fmt: skip
        """``spec`` replaces an open tunnel's definition where it stands (an edit, or relayc adding
        it again): what visitors reach (port, domains, locations, group) stays, so does the port
        chosen for ``remote_port = 0``, and connected visitors carry on."""
        if not spec.remote_port and tunnel.spec.remote_port:
            spec = dataclasses.replace(spec, remote_port=tunnel.spec.remote_port)  # a port chosen in a cluster
        tunnel.update(spec, self.config.limits)
        tunnel.public = frontend.update(tunnel)
        session.refusals.pop(spec.name, None)

    async def _claim_in_cluster(self, client: str, tunnel: PublicTunnel, frontend: Frontend) -> None:
        """In a cluster, a port or domain belongs to one client on every node: the tunnel's places
        are taken in the database too (a place no node refreshed for HOLD_SECONDS is free), and a
        place another client holds elsewhere refuses the tunnel here.  With the database down, the
        node's own tables decide (running and returning clients keep their tunnels)."""
        places = places_of(tunnel)
        if not places:
            return
        try:
            taken = await self.store.claim_places(places, client, group_id(tunnel.spec), HOLD_SECONDS)
        except StoreUnavailable as exc:
            log.warning("cluster: %s/%s claimed on this node only: %s", client, tunnel.name, exc)
            return
        except BaseException:
            frontend.release(tunnel, client_gone=False)
            self._went_inactive((client, tunnel.name))
            raise
        if taken is not None:
            frontend.release(tunnel, client_gone=False)
            self._went_inactive((client, tunnel.name))
            place, owner = taken
            reason = TunnelRefusal.DOMAIN_TAKEN if place.startswith("domain") else TunnelRefusal.PORT_TAKEN
            raise TunnelRefused(reason, f"{place} belongs to client {owner!r} (on another node of the cluster)")

    def held_places(self) -> list[tuple[str, str]]:
        """The places this node's open tunnels hold (refreshed in the cluster's database)."""
        return [place for session in self.sessions.values() for t in session.tunnels.values() for place in places_of(t)]

    async def _cluster_port(self, client: str, spec: TunnelSpec) -> TunnelSpec:
        """In a cluster, a ``remote_port = 0`` tcp/udp tunnel gets the port some node chose for it
        before (the same on every node); elsewhere ``spec`` as it is."""
        if not self.store.shared or spec.type not in (TunnelKind.TCP, TunnelKind.UDP) or spec.remote_port:
            return spec
        try:
            chosen = await self.store.chosen_port(client, spec.name, spec.type.value)
        except StoreUnavailable as exc:
            raise TunnelRefused(TunnelRefusal.CANNOT_LISTEN, f"remote_port = 0 needs the database to agree on a "
                                f"port with the other nodes: {exc}") from None  # fmt: skip
        return dataclasses.replace(spec, remote_port=chosen) if chosen else spec

    def close_tunnel(self, tunnel: PublicTunnel, client_gone: bool, release_places: bool = True) -> None:
        """Release what the tunnel's frontend holds for it and reset its visitors (and, in a
        cluster, its places in the database, later, unless the caller does it itself)."""
        if self.store.shared and not client_gone and release_places and (places := places_of(tunnel)):
            self._spawn(self._release_places(places, tunnel.client_name), "releasing a tunnel's places")
        self.frontends[tunnel.spec.type].release(tunnel, client_gone)
        self.burst_log.forget(f"refuse:{tunnel.client_name}:{tunnel.name}")
        self._went_inactive((tunnel.client_name, tunnel.name))
        self._emit(TunnelClosed(tunnel.client_name, tunnel.name))

    async def _release_places(self, places: list[tuple[str, str]], client: str) -> None:
        try:
            await self.store.release_places(places, client)
        except StoreUnavailable:
            pass  # they are freed when no node refreshes them for HOLD_SECONDS

    def stop_accepting(self, tunnel: PublicTunnel) -> None:
        self.frontends[tunnel.spec.type].stop_accepting(tunnel)

    def refused(self, session: ClientSession, name: str, reason: TunnelRefusal, text: str) -> None:
        """Remember and log why a tunnel of ``session`` is not active (the first few per client
        one line each, then one line per burst: a client cannot flood the log)."""
        session.remember_refusal(name, reason, text)
        if self._count_refusal_log(session.name) <= REFUSALS_LOGGED_EACH:
            log.warning("client %s tunnel %s refused: %s", session.name, name, text)
        else:
            self.burst_log.warning(f"tunnel-refused:{session.name}", "client %s tunnel %s refused: %s",
                                   session.name, name, text)  # fmt: skip
        self._emit(TunnelRefusedEvent(session.name, name, reason, text))

    def _count_refusal_log(self, client: str) -> int:
        counts = self._refusal_logs
        n = counts.pop(client, 0) + 1
        counts[client] = n
        if len(counts) > 1024:  # names come from peers: keep the most recent ones only
            del counts[next(iter(counts))]
        return n

    # --- lasting counters -----------------------------------------------------------------------

    def _went_live(self, key: tuple[str, str]) -> None:
        self._live[key] = self._live.get(key, 0) + 1
        self._lasting.set_evictable(key, False)

    def _went_inactive(self, key: tuple[str, str]) -> None:
        left = self._live.get(key, 0) - 1
        if left > 0:
            self._live[key] = left
            return
        self._live.pop(key, None)
        evictable = key not in self.defined
        self._lasting.set_evictable(key, evictable)
        lasting = self._lasting.get(key)
        if evictable and lasting is not None:
            # up to 100,000 closed tunnels' totals are kept; their recent connections and
            # refusals (up to ~54 KB each) only while open, or while the dashboard defines them
            lasting.counters.forget_recent()

    def _forget_totals(self, key: tuple[str, str]) -> None:
        """A lasting counter was dropped from memory: drop its stored totals too (queued after any
        record of it already on its way, so nothing writes it back)."""
        self._spawn(self.store.drop_totals(*key), f"forgetting the totals of {key[0]}/{key[1]}")

    def pending_traffic(self, client: str = "", tunnel: str = "") -> list[TrafficDelta]:
        """What the counters hold that the store does not yet, for one client, one tunnel or all
        ("" matches every name); reads only."""
        if client and tunnel:
            one = self._lasting.get((client, tunnel))
            items: Any = [((client, tunnel), one)] if one is not None else []
        elif client:
            items = (((client, t), lasting) for t, lasting in self._lasting.by_client.get(client, {}).items())
        else:
            items = self._lasting.by_key.items()
        out = []
        for (c, t), lasting in items:
            if tunnel and t != tunnel:
                continue
            d_in, d_out, d_conns = lasting.pending()
            if d_in or d_out or d_conns:
                out.append(TrafficDelta(c, t, d_in, d_out, d_conns, lasting.since))
        return out

    async def flush_traffic(self) -> None:
        """Record what is pending in the current minute's bucket and the totals (once a minute,
        and at shutdown); one flush at a time, so a record is never written twice."""
        async with self._flush_lock:
            deltas = self.pending_traffic()
            if not deltas:
                return
            now = int(time.time())
            await self.store.record_traffic(now - now % 60, deltas)
            for d in deltas:  # counted as recorded only once stored
                lasting = self._lasting.get((d.client, d.tunnel))
                if lasting is not None:
                    r_in, r_out, r_conns = lasting.recorded
                    lasting.recorded = (r_in + d.bytes_in, r_out + d.bytes_out, r_conns + d.conns)

    async def refresh_cluster_totals(self) -> None:
        """In a cluster, read what every node recorded (the API then shows the sums)."""
        if self.store.shared:
            self.cluster_totals = await self.store.totals()

    async def record_traffic_forever(self) -> None:
        while True:
            await asyncio.sleep(60 - time.time() % 60 + 0.05)
            try:
                # shielded: a shutdown that cancels this loop lets a record on its way finish
                # (and count as recorded), so the last flush does not write it again
                await asyncio.shield(self.flush_traffic())
                await self.refresh_cluster_totals()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("registry: traffic not recorded (kept for the next minute): %s", exc)
            except Exception:
                log.exception("registry: recording traffic failed (kept for the next minute)")

    # --- commands from the dashboard ------------------------------------------------------------

    async def create_client(self, name: str) -> ClientRecord:
        if name in self.sessions and name not in self.clients:
            raise Conflict(f"client {name!r} is connected with the shared token; pick another name")
        record = await self.store.create_client(name, secrets.token_urlsafe(32))
        self.clients[name] = record
        return record

    async def rotate_token(self, name: str) -> str:
        record = self._dashboard_client(name)
        token = secrets.token_urlsafe(32)
        await self.store.set_client_token(name, token)
        self.clients[name] = dataclasses.replace(record, token=token)
        return token

    async def set_client_enabled(self, name: str, enabled: bool) -> None:
        record = self.clients.get(name)
        if record is None and name not in self.sessions:
            raise NotFound(f"client {name!r} does not exist")
        if record is not None:  # its session is ended through the change feed
            await self.store.set_client_enabled(name, enabled)
            self.clients[name] = dataclasses.replace(record, enabled=enabled)
        elif not enabled:  # a client of the shared token: nothing stored, so end it here
            self.kick(name)

    async def delete_client(self, name: str) -> None:
        self._dashboard_client(name)
        await self.store.delete_client(name)  # its session is ended through the change feed
        self.clients.pop(name, None)
        for key in [k for k in self.defined if k[0] == name]:
            del self.defined[key]
        for tunnel in list(self._lasting.by_client.get(name, {})):
            self._lasting.drop((name, tunnel))

    async def define_tunnel(self, body: Any) -> TunnelRecord:
        """A tunnel defined in the dashboard: ``body`` is relayc.toml's ``[[tunnels]]`` keys plus
        ``client``.  ``InvalidField`` naming the key, ``NotFound`` for an unknown client,
        ``Conflict`` for a name, port or cap already taken."""
        if not isinstance(body, dict):
            raise InvalidField("body", "expected a JSON object")
        fields = dict(body)
        client = fields.pop("client", None)
        if not isinstance(client, str) or not client:
            raise InvalidField("client", "required: the name of the client the tunnel belongs to")
        try:
            spec = TunnelSpec.parse(fields)
        except SchemaError as exc:
            where, why = exc.problems[0]
            raise InvalidField(key_path(where) or "body", why) from None
        if client not in self.clients and client not in self.sessions:
            raise NotFound(f"client {client!r} does not exist")
        key = (client, spec.name)
        session = self.sessions.get(client)
        if key in self.defined:
            raise Conflict(f"client {client!r} already has a tunnel named {spec.name!r}", TunnelRefusal.NAME_TAKEN)
        if session is not None and spec.name in session.tunnels:
            raise Conflict(f"client {client!r} already has a tunnel named {spec.name!r} (from relayc.toml)",
                           TunnelRefusal.NAME_TAKEN)  # fmt: skip
        cap = self.config.max_tunnels_per_client
        if cap:  # every tunnel the client has: stored in the dashboard, and live from its relayc.toml
            names = {n for c, n in self.defined if c == client} | set(session.tunnels if session else ())
            if len(names) >= cap:
                raise Conflict(f"client {client!r} already has {len(names)} tunnels: max_tunnels_per_client is {cap}",
                               TunnelRefusal.TOO_MANY_TUNNELS)  # fmt: skip
        if spec.type in (TunnelKind.TCP, TunnelKind.UDP) and spec.remote_port:
            self._check_port_free(client, spec)
        record = TunnelRecord(client=client, spec=spec, enabled=True, created=time.time())
        await self.store.add_tunnel(record)
        self.defined[key] = record
        self._lasting.set_evictable(key, False)
        return record

    def _check_port_free(self, client: str, spec: TunnelSpec) -> None:
        """``Conflict`` if the port of ``spec`` (tcp or udp) is held or defined by another tunnel
        (members of one group share theirs)."""
        port = spec.remote_port
        if port not in self.ports.allowed:
            raise InvalidField("remote_port", f"{port} is not in allow_ports ({self.ports.allowed.text})")
        holder = self.ports.holder(Transport(spec.type.value), port)
        if holder is not None and (holder.client_name, holder.name) == (client, spec.name):
            holder = None  # the tunnel itself (being edited)
        if holder is not None and (holder.group is None or holder.group.problem(spec) is not None):
            raise Conflict(f"{spec.type} port {port} is already used by client {holder.client_name!r} tunnel "
                           f"{holder.name!r}", TunnelRefusal.PORT_TAKEN)  # fmt: skip
        for (c, n), record in self.defined.items():
            other = record.spec
            if (c, n) == (client, spec.name):
                continue
            if other.type is spec.type and other.remote_port == port and not same_group(other, spec):
                raise Conflict(f"{spec.type} port {port} is already used by client {c!r} tunnel {n!r}",
                               TunnelRefusal.PORT_TAKEN)  # fmt: skip

    async def edit_tunnel(self, client: str, name: str, body: Any) -> TunnelRecord:
        """Change a dashboard tunnel: ``body`` holds any keys ``define_tunnel`` takes but ``client``,
        ``name`` and ``type`` (given with their current value, they are ignored; another value is
        refused naming the key), and ``enabled``.
        The old definition with these keys is checked like a new one (``InvalidField`` naming the
        key, ``Conflict`` for a port taken); a secret key left out keeps its value.  Stored, it
        reaches the client through the change feed (pushed again, applied where it stands when
        its place is unchanged).  A tunnel of a relayc.toml is ``Conflict`` (only the client's
        file changes it), and ``NotFound`` even for ``enabled`` alone, as before."""
        if not isinstance(body, dict):
            raise InvalidField("body", "expected a JSON object")
        fields = dict(body)
        enabled = fields.pop("enabled", None)
        if "enabled" in body and not isinstance(enabled, bool):
            raise InvalidField("enabled", "expected true or false")
        for field_name in fields:
            if field_name not in _TUNNEL_KEYS and field_name != "client":
                raise InvalidField(field_name, "unknown key (is it misspelled?); see /api/v1/tunnel-fields")
        if not body:
            raise InvalidField("body", "nothing to change: give enabled or tunnel fields")
        async with self._edit_lock:  # one edit at a time: each starts from the one before
            return await self._edit_tunnel(client, name, fields, enabled)

    async def _edit_tunnel(self, client: str, name: str, fields: dict[str, Any], enabled: bool | None) -> TunnelRecord:
        key = (client, name)
        record = self.defined.get(key)
        if record is None:
            session = self.sessions.get(client)
            from_file = session is not None and (name in session.tunnels or name in session.refusals)
            if from_file and fields:
                raise Conflict(f"tunnel {client}/{name} is defined in the relayc.toml of client {client!r}: it is "
                               "read-only here; change it in that file (relayc reloads it)")  # fmt: skip
            raise NotFound(f"no dashboard tunnel {client}/{name}")
        current = {"client": client, "name": name, "type": record.spec.type.value}
        for field_name, value in current.items():
            if field_name in fields and fields.pop(field_name) != value:
                raise InvalidField(field_name, f"cannot be changed (it is {value!r}); delete the tunnel and define "
                                   "a new one")  # fmt: skip
        try:
            spec = TunnelSpec.parse({**record.spec.to_dict(), **fields})
        except SchemaError as exc:
            where, why = exc.problems[0]
            raise InvalidField(key_path(where) or "body", why) from None
        if spec.type in (TunnelKind.TCP, TunnelKind.UDP) and spec.remote_port and \
                spec.remote_port != record.spec.remote_port:  # fmt: skip
            self._check_port_free(client, spec)
        enabled = record.enabled if enabled is None else enabled
        if spec == record.spec:
            if enabled != record.enabled:
                return await self.set_tunnel_enabled(client, name, enabled)
            return record
        await self.store.update_tunnel(client, spec, enabled)
        updated = dataclasses.replace(record, spec=spec, enabled=enabled)
        self.defined[key] = updated
        log.info("dashboard: tunnel %s/%s changed (%s)", client, name, ", ".join(sorted(fields)) or "enabled")
        return updated

    async def set_tunnel_enabled(self, client: str, name: str, enabled: bool) -> TunnelRecord:
        record = self._defined(client, name)
        await self.store.set_tunnel_enabled(client, name, enabled)
        updated = dataclasses.replace(record, enabled=enabled)
        self.defined[(client, name)] = updated
        return updated

    async def delete_tunnel(self, client: str, name: str) -> None:
        self._defined(client, name)
        await self.store.delete_tunnel(client, name)
        self.defined.pop((client, name), None)

    def share_block(self, kind: BlockKind, addr: str, name: str, seconds: float) -> None:
        """A login block made here holds on every node of a cluster (best effort: a node that
        misses it still counts its own failures)."""
        if self.store.shared:
            event = {"op": "block", "kind": kind.value, "addr": addr, "name": name, "until": time.time() + seconds}
            self._spawn(self._publish_block(event), "sharing a login block")

    async def _publish_block(self, event: dict[str, Any]) -> None:
        try:
            await self.store.publish_block(event)
        except StoreUnavailable as exc:
            log.warning("cluster: login block not shared with the other nodes: %s", exc)

    def _on_block(self, event: dict[str, Any]) -> None:
        """A block (or unblock) from some node of the cluster, this one included."""
        try:
            kind = BlockKind(event["kind"])
            if event.get("op") == "unblock":
                self.guard.unblock(kind, str(event["value"]))
                return
            left = float(event["until"]) - time.time()
            if 0 < left <= 86400:
                now = time.monotonic()
                self.guard.impose(kind, str(event["addr"]), str(event.get("name") or ""), now + left, now)
        except (KeyError, ValueError, TypeError):
            log.warning("cluster: ignoring a malformed block event %r", str(event)[:200])

    def unblock(self, kind: BlockKind, value: str) -> bool:
        """Lift a block here and, in a cluster, on every node."""
        if self.store.shared:
            self._spawn(self._publish_block({"op": "unblock", "kind": kind.value, "value": value}),
                        "sharing an unblock")  # fmt: skip
        return self.guard.unblock(kind, value)

    def _dashboard_client(self, name: str) -> ClientRecord:
        record = self.clients.get(name)
        if record is None:
            raise NotFound(f"client {name!r} was not created in the dashboard")
        return record

    def _defined(self, client: str, name: str) -> TunnelRecord:
        record = self.defined.get((client, name))
        if record is None:
            raise NotFound(f"no dashboard tunnel {client}/{name}")
        return record

    # --- the change feed ------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        self._spawn(self._apply(change), f"applying {change}")

    async def _apply(self, change: Change) -> None:
        """Make the live state follow what the store now holds for ``change``'s subject."""
        if change.kind is ChangeKind.ALL:  # changes may have been missed: every subject, again
            subjects = {*self.clients, *(c.name for c in await self.store.clients())}
            keys = {*self.defined, *((t.client, t.spec.name) for t in await self.store.tunnels())}
            for client in sorted(subjects):
                await self._apply(Change(ChangeKind.CLIENT, client))
            for client, tunnel in sorted(keys):
                await self._apply(Change(ChangeKind.TUNNEL, client, tunnel))
            return
        name = change.client
        if change.kind is ChangeKind.CLIENT:
            record = await self.store.client(name)
            old = self.clients.get(name)
            if record is None:
                self.clients.pop(name, None)
            else:
                self.clients[name] = record
            for session in [self.sessions.get(name), *self.visitor_sessions.get(name, ())]:
                if session is None:
                    continue
                if record is None:  # deleted: a session that logged in with its token goes
                    stale = old is not None or session.token_used != self.config.auth.token
                else:  # disabled, or given a new token: the session logged in with the old one goes
                    stale = not record.enabled or session.token_used != record.token
                if stale:
                    log.info("client %s: session from %s ended (token no longer valid)", name, session.remote_addr)
                    session.end(GoAwayCode.KICKED)
            return
        key = (name, change.tunnel)
        tunnel_record = await self.store.tunnel(name, change.tunnel)
        session = self.sessions.get(name)
        if tunnel_record is None:
            self.defined.pop(key, None)
        else:
            self.defined[key] = tunnel_record
            self._lasting.set_evictable(key, False)
        if session is not None and session.ready:
            if tunnel_record is not None and tunnel_record.enabled:
                if session.pushed.get(change.tunnel) != tunnel_record.spec:
                    session.push(tunnel_record.spec)
            elif change.tunnel in session.pushed or change.tunnel in session.tunnels:
                session.unpush(change.tunnel)  # closes it here (and its counters go inactive)
        if tunnel_record is None and not self._live.get(key):
            self._lasting.drop(key)  # deleted: its totals go

    # --- queries --------------------------------------------------------------------------------

    def refusals(self) -> dict[tuple[str, str], tuple[TunnelRefusal, str]]:
        """Why each refused tunnel of a connected client is not active.  Built on each call."""
        return {(name, t): why for name, s in self.sessions.items() for t, why in s.refusals.items()}

    def blocks(self, now: float, wall: float) -> list[Block]:
        return self.guard.blocks(now, wall)

    def public_address(self, spec: TunnelSpec, port: int) -> str:
        if spec.type is TunnelKind.TCP:
            return f"{self.config.public_bind_addr}:{port}"
        if spec.type is TunnelKind.UDP:
            return f"{self.config.public_bind_addr}:{port}/udp"
        if spec.type is TunnelKind.SECRET:
            return "secret"
        frontend = self.frontends.get(spec.type)
        port = frontend.bound_port if frontend is not None else port
        cfg = self.config
        names = [f"{spec.subdomain}.{cfg.subdomain_host}"] if spec.subdomain and cfg.subdomain_host else []
        names += spec.custom_domains
        default = 80 if spec.type is TunnelKind.HTTP else 443
        return ", ".join(f"{spec.type}://{n}" + ("" if port == default else f":{port}") for n in names)

    def _totals(self, client: str, tunnel: str) -> dict[str, Any]:
        """A tunnel's totals; in a cluster, what every node recorded plus what this one has not
        recorded yet (other nodes' last minute shows once they record it)."""
        lasting = self._lasting.get((client, tunnel))
        out = lasting.as_dict() if lasting is not None else dict(_NO_TOTALS)
        shared = self.cluster_totals.get((client, tunnel))
        if shared is not None:
            p_in, p_out, p_conns = lasting.pending() if lasting is not None else (0, 0, 0)
            out.update(bytes_in=shared.bytes_in + p_in, bytes_out=shared.bytes_out + p_out,
                       conns_total=shared.conns_total + p_conns)  # fmt: skip
        return out

    def tunnel_items(self) -> list[dict[str, Any]]:
        """Every tunnel: live ones, dashboard ones that are not live, refused ones; as the API
        shows them (``http_password`` never included)."""
        refusals = self.refusals()
        out: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for cname, session in self.sessions.items():
            for t in session.tunnels.values():
                key = (cname, t.name)
                seen.add(key)
                state = TunnelState.SERVICE_DOWN if t.healthy is False else TunnelState.ACTIVE
                defined = self.defined.get(key)
                spec = defined.spec if defined is not None else t.spec  # just edited: the new definition
                # an edit not (yet) applied: relayc has not answered the push, or refused it (a
                # target outside its allow_targets) and the old definition still serves
                pending = defined is not None and not _serves(defined.spec, t.spec)
                edit_refusal = session.refusals.get(t.name) if pending else None
                out.append({
                    "client": cname, **spec.to_dict(secrets=False), "remote_port": t.port,
                    "source": (TunnelSource.DASHBOARD if defined is not None else TunnelSource.CLIENT).value,
                    "state": state.value, "reason": None, "enabled": True,
                    "status": state.value,
                    "health": None if t.healthy is None else "up" if t.healthy else "down",
                    "health_error": t.health_error if t.healthy is False else None,
                    "pending_edit": pending, "edit_error": edit_refusal[1] if edit_refusal else None,
                    "public": t.public or self.public_address(t.spec, t.port), **self._totals(cname, t.name),
                    **({"datagrams_dropped": t.dropped} if t.spec.type is TunnelKind.UDP else {}),
                })  # fmt: skip
        for key, record in self.defined.items():
            if key in seen:
                continue
            refusal = refusals.get(key)
            if not record.enabled:
                state = TunnelState.DISABLED
            elif refusal is not None:
                state = TunnelState.REFUSED
            elif key[0] not in self.sessions:
                state = TunnelState.OFFLINE
            else:
                state = TunnelState.PENDING
            out.append({
                "client": key[0], **record.spec.to_dict(secrets=False), "source": TunnelSource.DASHBOARD.value,
                "state": state.value, "status": _status(state, refusal),
                "reason": refusal[0].value if refusal else None,
                "enabled": record.enabled, "public": "", **self._totals(*key),
            })  # fmt: skip
        for key, (reason, text) in refusals.items():
            if key not in seen and key not in self.defined:
                out.append({"client": key[0], "name": key[1], "type": "?", "local_ip": "", "local_port": 0,
                            "remote_port": 0, "subdomain": "", "custom_domains": [],
                            "source": TunnelSource.CLIENT.value,
                            "state": TunnelState.REFUSED.value, "status": f"refused: {text}", "reason": reason.value,
                            "enabled": True, "public": "", **self._totals(*key)})  # fmt: skip
        return sorted(out, key=lambda t: (t["client"], t["name"]))

    def client_items(self) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for record in self.clients.values():
            out[record.name] = {
                "name": record.name, "created": record.created, "last_seen": record.last_seen,
                "remote_addr": record.remote_addr, "version": record.version, "enabled": record.enabled,
                "online": False, "source": TunnelSource.DASHBOARD.value,
            }  # fmt: skip
        for name, s in self.sessions.items():
            item = out.setdefault(name, {"name": name, "created": None, "enabled": True,
                                         "source": "config"})  # fmt: skip
            item.update(online=True, remote_addr=s.remote_addr, version=s.version, last_seen=time.time())
        for member in self.members:  # a cluster: where each client has sessions
            for name in member.clients:
                if name in out:
                    out[name].setdefault("nodes", []).append(member.addr)
        sums: dict[str, list[Any]] = {}
        for client in out:
            for lasting in self._lasting.by_client.get(client, {}).values():
                c = lasting.counters
                acc = sums.setdefault(client, [0, 0, 0, lasting.since])
                acc[0] += c.bytes_in
                acc[1] += c.bytes_out
                acc[2] += c.conns_total
                acc[3] = min(acc[3], lasting.since)
        for name, item in out.items():
            b_in, b_out, conns, since = sums.get(name, (0, 0, 0, None))
            item.update(bytes_in=b_in, bytes_out=b_out, conns_total=conns, totals_since=since)
        return sorted(out.values(), key=lambda c: c["name"])

    async def traffic(self, client: str, tunnel: str, since: float) -> dict[str, Any]:
        """Per-minute (or hourly) buckets from ``since`` (default: the last hour), the current
        minute included from memory."""
        now = time.time()
        since = since or now - 3600
        step, rows = await self.store.traffic(client, tunnel, since, now)
        points = [{"ts": ts, "bytes_in": b_in, "bytes_out": b_out} for ts, b_in, b_out in rows]
        pending = self.pending_traffic(client, tunnel)
        b_in, b_out = sum(d.bytes_in for d in pending), sum(d.bytes_out for d in pending)
        if b_in or b_out:
            bucket = int(now) - int(now) % step
            if points and points[-1]["ts"] == bucket:
                last = points[-1]
                points[-1] = {"ts": bucket, "bytes_in": last["bytes_in"] + b_in, "bytes_out": last["bytes_out"] + b_out}
            else:
                points.append({"ts": bucket, "bytes_in": b_in, "bytes_out": b_out})
        return {"step": step, "points": points}

    def connections(self, client: str, tunnel: str) -> list[dict[str, Any]]:
        """A tunnel's last visitor connections, newest first: ``{addr, opened, closed, bytes_in,
        bytes_out}`` (Unix seconds; ``closed`` None while open).  ``NotFound`` for a tunnel
        relayd does not know (neither open, defined, refused, nor counted before)."""
        key = (client, tunnel)
        lasting = self._lasting.get(key)
        if lasting is None:
            session = self.sessions.get(client)
            known = key in self.defined or (session is not None and (tunnel in session.tunnels or
                                                                     tunnel in session.refusals))  # fmt: skip
            if not known:
                raise NotFound(f"no tunnel {client}/{tunnel}")
            return []
        recent = lasting.counters.recent
        return [record.as_dict() for record in reversed(recent)] if recent else []

    def visitor_refusals(self, client: str, tunnel: str) -> list[dict[str, Any]]:
        """The visitors a tunnel turned away lately, newest first: ``{at, addr, reason, text}``
        (``reason``: source, tunnel_full, client_full, client_busy).  ``NotFound`` as for
        ``connections``."""
        self.connections(client, tunnel)  # NotFound for a tunnel relayd does not know
        lasting = self._lasting.get((client, tunnel))
        refusals = lasting.counters.refusals if lasting is not None else None
        if not refusals:
            return []
        return [{"at": at, "addr": addr, "reason": reason, "text": text}
                for at, addr, reason, text in reversed(refusals)]  # fmt: skip

    def node_items(self, this_addr: str, fingerprint: str) -> list[dict[str, Any]]:
        """Each node with its health (seconds since its heartbeat) and the clients on it; without a
        shared store, this node alone."""
        now = time.time()
        if not self.members:
            return [{"addr": this_addr, "fingerprint": fingerprint, "heartbeat_age": 0.0,
                     "clients": sorted(self.sessions), "this": True}]  # fmt: skip
        return [{"addr": m.addr, "fingerprint": m.fingerprint, "heartbeat_age": round(now - m.heartbeat, 1),
                 "clients": sorted(self.sessions) if m.addr == this_addr else list(m.clients),
                 "this": m.addr == this_addr} for m in self.members]  # fmt: skip

    def clients_online(self) -> int:
        return len(self.sessions)

    def overview(self) -> dict[str, Any]:
        tunnels = self.tunnel_items()
        return {
            "clients_online": len(self.sessions),
            "clients_total": len(set(self.clients) | set(self.sessions)),
            "tunnels_active": sum(
                1 for t in tunnels if t["state"] in (TunnelState.ACTIVE.value, TunnelState.SERVICE_DOWN.value)
            ),
            "tunnels_total": len(tunnels),
            "conns_open": sum(t["conns_open"] for t in tunnels),
            "bytes_in": sum(t["bytes_in"] for t in tunnels),
            "bytes_out": sum(t["bytes_out"] for t in tunnels),
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _status(state: TunnelState, refusal: tuple[TunnelRefusal, str] | None) -> str:
    if state is TunnelState.REFUSED and refusal is not None:
        return f"refused: {refusal[1]}"
    return state.value


def places_of(tunnel: PublicTunnel) -> list[tuple[str, str]]:
    """What a tunnel holds that one client only may hold: its port (per transport) or domains."""
    kind = tunnel.spec.type
    if kind in (TunnelKind.TCP, TunnelKind.UDP):
        return [(kind.value, str(tunnel.port))] if tunnel.port else []
    if kind in (TunnelKind.HTTP, TunnelKind.HTTPS):
        return [("domain", domain) for domain, _ in tunnel.claim or ()]
    return []


def group_id(spec: TunnelSpec) -> str:
    """A group's name and a digest of its key: members of one group may share a place."""
    if not spec.group:
        return ""
    return f"{spec.group}:{hashlib.sha256(spec.group_key.encode()).hexdigest()[:32]}"


def _serves(defined: TunnelSpec, live: TunnelSpec) -> bool:
    """Whether the open tunnel ``live`` is the dashboard's ``defined`` (a port chosen for
    ``remote_port = 0`` aside)."""
    if not defined.remote_port:
        defined = dataclasses.replace(defined, remote_port=live.remote_port)
    return defined == live


def same_place(old: TunnelSpec, new: TunnelSpec) -> bool:
    """Whether ``new`` can replace the open tunnel ``old`` where it stands: the same kind, port
    (``remote_port = 0`` takes the one ``old`` has), domains, locations and group."""
    return (
        old.type is new.type
        and new.remote_port in (0, old.remote_port)
        and old.subdomain == new.subdomain  # domains and locations in another order are the same place
        and frozenset(old.custom_domains) == frozenset(new.custom_domains)
        and frozenset(old.locations) == frozenset(new.locations)
        and (old.group, old.group_key) == (new.group, new.group_key)
    )
