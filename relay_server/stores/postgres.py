"""The shared store: PostgreSQL through asyncpg, for several relayd nodes (``[store] url``).

Theory of operation
===================

Every node keeps the same tables as the embedded store (clients, dashboard tunnels as spec JSON,
lasting totals, traffic buckets) plus ``members`` (each node's public address, certificate
fingerprint and heartbeat) and ``port_choices`` (the port chosen once, cluster-wide, for a
``remote_port = 0`` tunnel).  The schema is created and migrated by relayd itself, under a
PostgreSQL advisory lock, so nodes starting together do not race.

Change feed: every write that changes what a node must do sends ``NOTIFY relay_changes`` with
the change as JSON, in the same transaction as the write; every node (the writer too) LISTENs on
a connection of its own and announces each notification to its registry, which reads the current
state back.  So a dashboard change on any node reaches the relayc sessions of every node within
the notification's round trip.  When the listening connection is lost (PostgreSQL restarted or
unreachable) the node retries every ``RETRY_EVERY`` seconds and, once back, announces a full
resync (``ChangeKind.ALL``), since notifications sent meanwhile are lost.

While PostgreSQL is unreachable the registry keeps serving from its cache (logins, running
tunnels); writes raise ``StoreUnavailable``, which the dashboard answers with 503 and a sentence.
Traffic that cannot be recorded stays pending in the registry and is written once it is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from relay_server.stores.base import (
    HOUR_KEEP,
    MINUTE_KEEP,
    Change,
    ChangeKind,
    ClientRecord,
    Member,
    Store,
    Totals,
    TrafficDelta,
    TunnelRecord,
    log,
)
from shared.errors import Conflict, NotFound, StoreUnavailable
from shared.schema import SchemaError
from shared.tunnel import TunnelSpec

T = TypeVar("T")
SCHEMA_VERSION = 1
CHANNEL = "relay_changes"
BLOCKS_CHANNEL = "relay_blocks"  # login blocks, so that one node's block holds on every node
ACME_CHANNEL = "relay_acme"  # challenge answers and new certificates, for every node
RETRY_EVERY = 2.0
MIGRATION_LOCK = 0x72656C6179  # "relay": the advisory lock held while the schema is created
COMMAND_TIMEOUT = 5.0

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS clients (
        name TEXT PRIMARY KEY, token TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION, remote_addr TEXT NOT NULL DEFAULT '', version TEXT NOT NULL DEFAULT '',
        enabled BOOLEAN NOT NULL DEFAULT TRUE)""",
    """CREATE TABLE IF NOT EXISTS tunnels (
        client TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, enabled BOOLEAN NOT NULL DEFAULT TRUE,
        created DOUBLE PRECISION NOT NULL, PRIMARY KEY (client, name))""",
    """CREATE TABLE IF NOT EXISTS totals (
        client TEXT NOT NULL, tunnel TEXT NOT NULL, bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL,
        conns_total BIGINT NOT NULL, since DOUBLE PRECISION NOT NULL, PRIMARY KEY (client, tunnel))""",
    """CREATE TABLE IF NOT EXISTS traffic_minute (
        ts BIGINT NOT NULL, client TEXT NOT NULL, tunnel TEXT NOT NULL, bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL, PRIMARY KEY (ts, client, tunnel))""",
    """CREATE TABLE IF NOT EXISTS traffic_hour (
        ts BIGINT NOT NULL, client TEXT NOT NULL, tunnel TEXT NOT NULL, bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL, PRIMARY KEY (ts, client, tunnel))""",
    """CREATE TABLE IF NOT EXISTS members (
        addr TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL, clients TEXT NOT NULL DEFAULT '[]')""",
    """CREATE TABLE IF NOT EXISTS acme (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS acme_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
        until DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS claims (kind TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL,
        grp TEXT NOT NULL DEFAULT '', held DOUBLE PRECISION NOT NULL, PRIMARY KEY (kind, key))""",
    """CREATE TABLE IF NOT EXISTS port_choices (
        client TEXT NOT NULL, tunnel TEXT NOT NULL, transport TEXT NOT NULL, port INTEGER NOT NULL,
        PRIMARY KEY (client, tunnel, transport))""",
]


class PostgresStore(Store):
    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._pool: Any = None
        self._listener: Any = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- plumbing -------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(connection)``; ``StoreUnavailable`` when PostgreSQL cannot be reached."""
        import asyncpg

        if self._pool is None:
            raise StoreUnavailable("the database is not connected")
        try:
            async with self._pool.acquire(timeout=COMMAND_TIMEOUT) as conn:
                return await fn(conn)
        except (OSError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.InterfaceError,
                asyncpg.exceptions.AdminShutdownError) as exc:  # fmt: skip
            raise StoreUnavailable(f"the database (PostgreSQL) is not reachable: {_reason(exc)}") from None

    async def _write(self, fn: Callable[[Any], Awaitable[T]], changes: Callable[[T], list[Change]]) -> T:
        """A write and its NOTIFYs in one transaction (the feed then announces them on every node).
        Shielded: a cancelled caller does not cancel a write half-way."""

        async def run(conn: Any) -> T:
            async with conn.transaction():
                result = await fn(conn)
                for change in changes(result):
                    payload = json.dumps({"kind": change.kind.value, "client": change.client, "tunnel": change.tunnel})
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
                return result

        return await asyncio.shield(self._call(run))

    async def open(self) -> None:
        import asyncpg

        self._loop = asyncio.get_running_loop()
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=0, max_size=4, timeout=COMMAND_TIMEOUT,
                                                   command_timeout=COMMAND_TIMEOUT)  # fmt: skip
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to the database at {_safe(self.url)}: {_reason(exc)}") from None
        await self._call(_migrate)
        await self._listen()

    async def _listen(self) -> None:
        import asyncpg

        self._listener = await asyncpg.connect(self.url, timeout=COMMAND_TIMEOUT)
        self._listener.add_termination_listener(self._listener_lost)
        await self._listener.add_listener(CHANNEL, self._notified)
        await self._listener.add_listener(BLOCKS_CHANNEL, self._block_notified)
        await self._listener.add_listener(ACME_CHANNEL, self._acme_notified)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            change = Change(ChangeKind(data["kind"]), str(data["client"]), str(data.get("tunnel", "")))
        except (ValueError, KeyError, TypeError):
            log.warning("store: ignoring a malformed notification %r", payload[:200])
            return
        self.announce(change)

    def _block_notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if isinstance(event, dict):
            self.announce_block(event)

    def _acme_notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if isinstance(event, dict):
            self.announce_acme(event)

    async def publish_acme(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event)
        if len(payload) > 7000:  # NOTIFY payloads are limited to 8000 bytes
            raise ValueError("ACME event too large to publish")
        await self._call(lambda c: c.execute("SELECT pg_notify($1, $2)", ACME_CHANNEL, payload))

    async def acme_get(self, key: str) -> str | None:
        row = await self._call(lambda c: c.fetchrow("SELECT value FROM acme WHERE key = $1", key))
        return str(row["value"]) if row else None

    async def acme_put(self, key: str, value: str) -> None:
        await self._call(lambda c: c.execute("INSERT INTO acme (key, value) VALUES ($1, $2) ON CONFLICT (key) "
                                             "DO UPDATE SET value = excluded.value", key, value))  # fmt: skip

    async def acme_lease(self, name: str, holder: str, seconds: float) -> bool:
        now = time.time()
        row = await self._call(lambda c: c.fetchrow(
            "INSERT INTO acme_leases (name, holder, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE "
            "SET holder = excluded.holder, until = excluded.until WHERE acme_leases.until < $4 "
            "OR acme_leases.holder = excluded.holder RETURNING holder", name, holder, now + seconds, now))  # fmt: skip
        return row is not None and row["holder"] == holder

    async def publish_block(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event)[:4000]
        await self._call(lambda c: c.execute("SELECT pg_notify($1, $2)", BLOCKS_CHANNEL, payload))

    def _listener_lost(self, conn: Any) -> None:
        if self._closing or self._loop is None:
            return
        log.warning("store: lost the database's change feed; reconnecting every %.0f s", RETRY_EVERY)
        if self._listen_task is None or self._listen_task.done():
            self._listen_task = self._loop.create_task(self._relisten())

    async def _relisten(self) -> None:
        while not self._closing:
            await asyncio.sleep(RETRY_EVERY)
            try:
                await self._listen()
            except Exception as exc:  # still down: try again
                log.debug("store: change feed still down: %s", exc)
                continue
            log.info("store: the database is back; reading everything again")
            self.announce(Change(ChangeKind.ALL, ""))
            return

    async def close(self) -> None:
        self._closing = True
        if self._listen_task is not None:
            self._listen_task.cancel()
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.close(), 2)
            except Exception:  # already gone
                self._listener.terminate()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 2)
            except Exception:
                self._pool.terminate()

    # --- clients --------------------------------------------------------------------------------

    async def clients(self) -> list[ClientRecord]:
        return await self._call(lambda c: _fetch(c, "SELECT * FROM clients ORDER BY name", _client))

    async def client(self, name: str) -> ClientRecord | None:
        rows = await self._call(lambda c: _fetch(c, "SELECT * FROM clients WHERE name = $1", _client, name))
        return rows[0] if rows else None

    async def create_client(self, name: str, token: str) -> ClientRecord:
        now = time.time()

        async def insert(conn: Any) -> bool:
            done = await conn.execute("INSERT INTO clients (name, token, created) VALUES ($1, $2, $3) "
                                      "ON CONFLICT (name) DO NOTHING", name, token, now)  # fmt: skip
            return str(done).endswith(" 1")

        if not await self._write(insert, lambda ok: [Change(ChangeKind.CLIENT, name)] if ok else []):
            raise Conflict(f"client {name!r} already exists")
        return ClientRecord(name=name, token=token, created=now)

    async def set_client_token(self, name: str, token: str) -> None:
        await self._write(lambda c: c.execute("UPDATE clients SET token = $1 WHERE name = $2", token, name),
                          lambda _: [Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def set_client_enabled(self, name: str, enabled: bool) -> None:
        await self._write(lambda c: c.execute("UPDATE clients SET enabled = $1 WHERE name = $2", enabled, name),
                          lambda _: [Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def delete_client(self, name: str) -> None:
        async def delete(conn: Any) -> list[str]:
            names = [r["name"] for r in await conn.fetch("SELECT name FROM tunnels WHERE client = $1", name)]
            await conn.execute("DELETE FROM tunnels WHERE client = $1", name)
            await conn.execute("DELETE FROM totals WHERE client = $1", name)
            await conn.execute("DELETE FROM port_choices WHERE client = $1", name)
            await conn.execute("DELETE FROM clients WHERE name = $1", name)
            return names

        await self._write(delete, lambda tunnels: [*(Change(ChangeKind.TUNNEL, name, t) for t in tunnels),
                                                   Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def touch_client(self, name: str, remote_addr: str, version: str, when: float) -> None:
        await self._call(lambda c: c.execute("UPDATE clients SET last_seen = $1, remote_addr = $2, version = $3 "
                                             "WHERE name = $4", when, remote_addr, version, name))  # fmt: skip

    # --- dashboard tunnels ----------------------------------------------------------------------

    async def tunnels(self, client: str | None = None) -> list[TunnelRecord]:
        if client is None:
            rows = await self._call(lambda c: _fetch(c, "SELECT * FROM tunnels ORDER BY client, name", _tunnel))
        else:
            rows = await self._call(lambda c: _fetch(c, "SELECT * FROM tunnels WHERE client = $1 ORDER BY name",
                                                     _tunnel, client))  # fmt: skip
        return [t for t in rows if t is not None]

    async def tunnel(self, client: str, name: str) -> TunnelRecord | None:
        rows = await self._call(lambda c: _fetch(c, "SELECT * FROM tunnels WHERE client = $1 AND name = $2",
                                                 _tunnel, client, name))  # fmt: skip
        return rows[0] if rows else None

    async def add_tunnel(self, record: TunnelRecord) -> None:
        spec = json.dumps(record.spec.to_dict())

        async def insert(conn: Any) -> bool:
            done = await conn.execute(
                "INSERT INTO tunnels (client, name, spec, enabled, created) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (client, name) DO NOTHING",
                record.client, record.spec.name, spec, record.enabled, record.created or time.time())  # fmt: skip
            return str(done).endswith(" 1")

        change = Change(ChangeKind.TUNNEL, record.client, record.spec.name)
        if not await self._write(insert, lambda ok: [change] if ok else []):
            raise Conflict(f"client {record.client!r} already has a tunnel named {record.spec.name!r}")

    async def set_tunnel_enabled(self, client: str, name: str, enabled: bool) -> None:
        await self._write(lambda c: c.execute("UPDATE tunnels SET enabled = $1 WHERE client = $2 AND name = $3",
                                              enabled, client, name),
                          lambda _: [Change(ChangeKind.TUNNEL, client, name)])  # fmt: skip

    async def update_tunnel(self, client: str, spec: TunnelSpec, enabled: bool) -> None:
        data = json.dumps(spec.to_dict())

        async def update(conn: Any) -> bool:
            done = await conn.execute("UPDATE tunnels SET spec = $1, enabled = $2 WHERE client = $3 AND name = $4",
                                      data, enabled, client, spec.name)  # fmt: skip
            return str(done).endswith(" 1")

        change = Change(ChangeKind.TUNNEL, client, spec.name)
        if not await self._write(update, lambda ok: [change] if ok else []):
            raise NotFound(f"no dashboard tunnel {client}/{spec.name}")

    async def delete_tunnel(self, client: str, name: str) -> None:
        async def delete(conn: Any) -> None:
            await conn.execute("DELETE FROM tunnels WHERE client = $1 AND name = $2", client, name)
            await conn.execute("DELETE FROM totals WHERE client = $1 AND tunnel = $2", client, name)
            await conn.execute("DELETE FROM port_choices WHERE client = $1 AND tunnel = $2", client, name)

        await self._write(delete, lambda _: [Change(ChangeKind.TUNNEL, client, name)])

    # --- traffic --------------------------------------------------------------------------------

    async def totals(self) -> dict[tuple[str, str], Totals]:
        rows = await self._call(lambda c: c.fetch("SELECT * FROM totals"))
        return {(r["client"], r["tunnel"]): Totals(r["bytes_in"], r["bytes_out"], r["conns_total"], r["since"])
                for r in rows}  # fmt: skip

    async def record_traffic(self, minute: int, deltas: list[TrafficDelta]) -> None:
        hour = minute - minute % 3600

        async def record(conn: Any) -> None:
            async with conn.transaction():
                for d in deltas:
                    await conn.execute(
                        "INSERT INTO totals (client, tunnel, bytes_in, bytes_out, conns_total, since) "
                        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client, tunnel) DO UPDATE SET "
                        "bytes_in = totals.bytes_in + excluded.bytes_in, "
                        "bytes_out = totals.bytes_out + excluded.bytes_out, "
                        "conns_total = totals.conns_total + excluded.conns_total",
                        d.client, d.tunnel, d.bytes_in, d.bytes_out, d.conns, d.since)  # fmt: skip
                    if not (d.bytes_in or d.bytes_out):
                        continue
                    for table, ts in (("traffic_minute", minute), ("traffic_hour", hour)):
                        await conn.execute(
                            f"INSERT INTO {table} (ts, client, tunnel, bytes_in, bytes_out) "
                            "VALUES ($1, $2, $3, $4, $5) "
                            f"ON CONFLICT (ts, client, tunnel) DO UPDATE SET bytes_in = {table}.bytes_in + "
                            f"excluded.bytes_in, bytes_out = {table}.bytes_out + excluded.bytes_out",
                            ts, d.client, d.tunnel, d.bytes_in, d.bytes_out)  # fmt: skip
                await conn.execute("DELETE FROM traffic_minute WHERE ts < $1", minute - MINUTE_KEEP)
                await conn.execute("DELETE FROM traffic_hour WHERE ts < $1", hour - HOUR_KEEP)

        await self._call(record)

    async def drop_totals(self, client: str, tunnel: str) -> None:
        await self._call(lambda c: c.execute("DELETE FROM totals WHERE client = $1 AND tunnel = $2", client, tunnel))

    async def traffic(
        self, client: str, tunnel: str, since: float, now: float
    ) -> tuple[int, list[tuple[int, int, int]]]:
        table, step = ("traffic_minute", 60) if now - since <= MINUTE_KEEP else ("traffic_hour", 3600)
        where, args = ["ts >= $1"], [int(since) - int(since) % step]
        if client:
            args.append(client)  # type: ignore[arg-type]
            where.append(f"client = ${len(args)}")
        if tunnel:
            args.append(tunnel)  # type: ignore[arg-type]
            where.append(f"tunnel = ${len(args)}")
        query = f"SELECT ts, SUM(bytes_in) AS i, SUM(bytes_out) AS o FROM {table} WHERE {' AND '.join(where)} " \
                "GROUP BY ts ORDER BY ts"  # fmt: skip
        rows = await self._call(lambda c: c.fetch(query, *args))
        return step, [(int(r["ts"]), int(r["i"]), int(r["o"])) for r in rows]

    # --- the cluster ----------------------------------------------------------------------------

    async def heartbeat(self, addr: str, fingerprint: str, started: float, clients: tuple[str, ...] = ()) -> None:
        await self._call(lambda c: c.execute(
            "INSERT INTO members (addr, fingerprint, started, heartbeat, clients) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (addr) DO UPDATE SET fingerprint = excluded.fingerprint, started = excluded.started, "
            "heartbeat = excluded.heartbeat, clients = excluded.clients", addr, fingerprint, started, time.time(),
            json.dumps(list(clients))))  # fmt: skip

    async def members(self, max_age: float) -> list[Member]:
        rows = await self._call(lambda c: c.fetch("SELECT * FROM members WHERE heartbeat > $1 ORDER BY addr",
                                                  time.time() - max_age))  # fmt: skip
        return [Member(r["addr"], r["fingerprint"], r["started"], r["heartbeat"], _names(r["clients"]))
                for r in rows]  # fmt: skip

    async def leave(self, addr: str) -> None:
        await self._call(lambda c: c.execute("DELETE FROM members WHERE addr = $1", addr))

    async def choose_port(self, client: str, tunnel: str, transport: str, port: int) -> int:
        async def choose(conn: Any) -> int:
            await conn.execute("INSERT INTO port_choices (client, tunnel, transport, port) VALUES ($1, $2, $3, $4) "
                               "ON CONFLICT DO NOTHING", client, tunnel, transport, port)  # fmt: skip
            row = await conn.fetchrow("SELECT port FROM port_choices WHERE client = $1 AND tunnel = $2 AND "
                                      "transport = $3", client, tunnel, transport)  # fmt: skip
            return int(row["port"])

        return await self._call(choose)

    async def claim_places(self, places: list[tuple[str, str]], owner: str, group: str,
                           stale_after: float) -> tuple[str, str] | None:  # fmt: skip
        async def claim(conn: Any) -> tuple[str, str] | None:
            now = time.time()
            async with conn.transaction():
                for kind, key in places:
                    row = await conn.fetchrow(
                        "INSERT INTO claims (kind, key, owner, grp, held) VALUES ($1, $2, $3, $4, $5) "
                        "ON CONFLICT (kind, key) DO UPDATE SET owner = excluded.owner, grp = excluded.grp, "
                        "held = excluded.held WHERE claims.owner = excluded.owner OR claims.held < $6 "
                        "RETURNING owner", kind, key, owner, group, now, now - stale_after)  # fmt: skip
                    if row is not None:
                        continue
                    held = await conn.fetchrow("SELECT owner, grp FROM claims WHERE kind = $1 AND key = $2", kind, key)
                    if held is not None and group and held["grp"] == group:
                        await conn.execute("UPDATE claims SET held = $3 WHERE kind = $1 AND key = $2", kind, key, now)
                        continue  # the place of our group: a member may serve it
                    return f"{kind} {key}", str(held["owner"]) if held is not None else "?"
            return None

        return await self._call(claim)

    async def release_places(self, places: list[tuple[str, str]], owner: str) -> None:
        await self._call(lambda c: c.execute(
            "DELETE FROM claims WHERE owner = $3 AND (kind, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            [k for k, _ in places], [v for _, v in places], owner))  # fmt: skip

    async def refresh_places(self, places: list[tuple[str, str]]) -> None:
        if places:
            await self._call(lambda c: c.execute(
                "UPDATE claims SET held = $3 WHERE (kind, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [k for k, _ in places], [v for _, v in places], time.time()))  # fmt: skip

    async def chosen_port(self, client: str, tunnel: str, transport: str) -> int:
        query = "SELECT port FROM port_choices WHERE client = $1 AND tunnel = $2 AND transport = $3"
        row = await self._call(lambda c: c.fetchrow(query, client, tunnel, transport))
        return int(row["port"]) if row else 0


async def _fetch(conn: Any, query: str, convert: Callable[[Any], T], *args: Any) -> list[T]:
    return [convert(r) for r in await conn.fetch(query, *args)]


async def _migrate(conn: Any) -> None:
    """Create or migrate the schema, one node at a time (an advisory lock held meanwhile)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        async with conn.transaction():
            for statement in SCHEMA:
                await conn.execute(statement)
            version = await conn.fetchval("SELECT max(version) FROM relay_schema")
            if version is not None and version > SCHEMA_VERSION:
                raise RuntimeError(f"the database has schema version {version}, newer than this relayd's "
                                   f"{SCHEMA_VERSION}")  # fmt: skip
            if version is None:
                await conn.execute("INSERT INTO relay_schema (version) VALUES ($1)", SCHEMA_VERSION)
                log.info("store: created the schema (version %d) in PostgreSQL", SCHEMA_VERSION)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _client(row: Any) -> ClientRecord:
    return ClientRecord(name=row["name"], token=row["token"], created=row["created"], last_seen=row["last_seen"],
                        remote_addr=row["remote_addr"], version=row["version"], enabled=row["enabled"])  # fmt: skip


def _tunnel(row: Any) -> TunnelRecord | None:
    try:
        spec = TunnelSpec.parse(json.loads(row["spec"]))
    except (ValueError, SchemaError) as exc:
        log.warning("store: dashboard tunnel %s/%s is not valid any more and is left out: %s", row["client"],
                    row["name"], exc)  # fmt: skip
        return None
    return TunnelRecord(client=row["client"], spec=spec, enabled=row["enabled"], created=row["created"])


def _names(text: str) -> tuple[str, ...]:
    try:
        names = json.loads(text)
    except ValueError:
        return ()
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def _reason(exc: BaseException) -> str:
    return " ".join((str(exc) or exc.__class__.__name__).split())[:300]


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
