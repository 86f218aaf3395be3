"""The embedded store: one SQLite file (stdlib sqlite3, WAL) in ``state_dir``.

``relayd.db``, mode 0600 (it holds client tokens: the login proof needs the server to know each
token, so they are stored as they are, like ssh host keys).  Every call runs in one thread of its
own, one at a time, so the event loop only ever waits for a future; the change feed is announced
on the loop once a write is committed.

Schema versions (``PRAGMA user_version``): 0 = the first layout (a column per tunnel field);
2 = a tunnel is its spec's JSON (a new field needs no new column) plus lasting totals.  ``open``
migrates older files in one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from relay_server.stores.base import (
    HOUR_KEEP,
    MINUTE_KEEP,
    Change,
    ChangeKind,
    ClientRecord,
    Store,
    Totals,
    TrafficDelta,
    TunnelRecord,
    log,
)
from shared.errors import Conflict, NotFound
from shared.schema import SchemaError
from shared.tunnel import TunnelSpec

T = TypeVar("T")
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL,
    remote_addr TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    enabled INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS tunnels (
    client TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    PRIMARY KEY (client, name)
);
CREATE TABLE IF NOT EXISTS totals (
    client TEXT NOT NULL, tunnel TEXT NOT NULL,
    bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, conns_total INTEGER NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (client, tunnel)
);
CREATE TABLE IF NOT EXISTS traffic_minute (
    ts INTEGER NOT NULL, client TEXT NOT NULL, tunnel TEXT NOT NULL,
    bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
    PRIMARY KEY (ts, client, tunnel)
);
CREATE TABLE IF NOT EXISTS traffic_hour (
    ts INTEGER NOT NULL, client TEXT NOT NULL, tunnel TEXT NOT NULL,
    bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
    PRIMARY KEY (ts, client, tunnel)
);
"""


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="relayd-sqlite")
        self._db: sqlite3.Connection | None = None

    # --- plumbing -------------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn)

    async def _commit(self, fn: Callable[[sqlite3.Connection], T], changes: Callable[[T], list[Change]]) -> T:
        """Run a write and announce what it changed.  Shielded: a caller that is cancelled while
        the write runs (a dashboard request whose client went away) still gets it announced, so
        no stored change is missed by the feed."""

        async def write() -> T:
            result = await self._run(fn)
            for change in changes(result):
                self.announce(change)
            return result

        return await asyncio.shield(write())

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError("the store is closed")
        return fn(self._db)

    def _connect(self) -> None:
        path = self.path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        _migrate(db)
        self._db = db

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._connect)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)

    # --- clients --------------------------------------------------------------------------------

    async def clients(self) -> list[ClientRecord]:
        return await self._run(lambda db: [_client(r) for r in db.execute("SELECT * FROM clients ORDER BY name")])

    async def client(self, name: str) -> ClientRecord | None:
        def get(db: sqlite3.Connection) -> ClientRecord | None:
            row = db.execute("SELECT * FROM clients WHERE name = ?", (name,)).fetchone()
            return _client(row) if row else None

        return await self._run(get)

    async def create_client(self, name: str, token: str) -> ClientRecord:
        now = time.time()

        def insert(db: sqlite3.Connection) -> bool:
            try:
                db.execute("INSERT INTO clients (name, token, created) VALUES (?, ?, ?)", (name, token, now))
            except sqlite3.IntegrityError:
                return False
            return True

        if not await self._commit(insert, lambda ok: [Change(ChangeKind.CLIENT, name)] if ok else []):
            raise Conflict(f"client {name!r} already exists")
        return ClientRecord(name=name, token=token, created=now)

    async def set_client_token(self, name: str, token: str) -> None:
        await self._commit(lambda db: db.execute("UPDATE clients SET token = ? WHERE name = ?", (token, name)),
                           lambda _: [Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def set_client_enabled(self, name: str, enabled: bool) -> None:
        await self._commit(lambda db: db.execute("UPDATE clients SET enabled = ? WHERE name = ?", (int(enabled), name)),
                           lambda _: [Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def delete_client(self, name: str) -> None:
        def delete(db: sqlite3.Connection) -> list[str]:
            with db:
                names = [r[0] for r in db.execute("SELECT name FROM tunnels WHERE client = ?", (name,))]
                db.execute("DELETE FROM tunnels WHERE client = ?", (name,))
                db.execute("DELETE FROM totals WHERE client = ?", (name,))
                db.execute("DELETE FROM clients WHERE name = ?", (name,))
            return names

        await self._commit(delete, lambda tunnels: [*(Change(ChangeKind.TUNNEL, name, t) for t in tunnels),
                                                    Change(ChangeKind.CLIENT, name)])  # fmt: skip

    async def touch_client(self, name: str, remote_addr: str, version: str, when: float) -> None:
        await self._run(lambda db: db.execute(
            "UPDATE clients SET last_seen = ?, remote_addr = ?, version = ? WHERE name = ?",
            (when, remote_addr, version, name),
        ))  # fmt: skip

    # --- dashboard tunnels ----------------------------------------------------------------------

    async def tunnels(self, client: str | None = None) -> list[TunnelRecord]:
        def get(db: sqlite3.Connection) -> list[TunnelRecord]:
            if client is None:
                rows = db.execute("SELECT * FROM tunnels ORDER BY client, name")
            else:
                rows = db.execute("SELECT * FROM tunnels WHERE client = ? ORDER BY name", (client,))
            return [t for t in (_tunnel(r) for r in rows) if t is not None]

        return await self._run(get)

    async def tunnel(self, client: str, name: str) -> TunnelRecord | None:
        def get(db: sqlite3.Connection) -> TunnelRecord | None:
            row = db.execute("SELECT * FROM tunnels WHERE client = ? AND name = ?", (client, name)).fetchone()
            return _tunnel(row) if row else None

        return await self._run(get)

    async def add_tunnel(self, record: TunnelRecord) -> None:
        spec = json.dumps(record.spec.to_dict())

        def insert(db: sqlite3.Connection) -> bool:
            try:
                db.execute(
                    "INSERT INTO tunnels (client, name, spec, enabled, created) VALUES (?, ?, ?, ?, ?)",
                    (record.client, record.spec.name, spec, int(record.enabled), record.created or time.time()),
                )
            except sqlite3.IntegrityError:
                return False
            return True  # fmt: skip

        change = Change(ChangeKind.TUNNEL, record.client, record.spec.name)
        if not await self._commit(insert, lambda ok: [change] if ok else []):
            raise Conflict(f"client {record.client!r} already has a tunnel named {record.spec.name!r}")

    async def set_tunnel_enabled(self, client: str, name: str, enabled: bool) -> None:
        await self._commit(lambda db: db.execute("UPDATE tunnels SET enabled = ? WHERE client = ? AND name = ?",
                                                 (int(enabled), client, name)),
                           lambda _: [Change(ChangeKind.TUNNEL, client, name)])  # fmt: skip

    async def update_tunnel(self, client: str, spec: TunnelSpec, enabled: bool) -> None:
        data = json.dumps(spec.to_dict())

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute("UPDATE tunnels SET spec = ?, enabled = ? WHERE client = ? AND name = ?",
                                (data, int(enabled), client, spec.name))  # fmt: skip
            return cursor.rowcount > 0

        change = Change(ChangeKind.TUNNEL, client, spec.name)
        if not await self._commit(update, lambda ok: [change] if ok else []):
            raise NotFound(f"no dashboard tunnel {client}/{spec.name}")

    async def delete_tunnel(self, client: str, name: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM tunnels WHERE client = ? AND name = ?", (client, name))
                db.execute("DELETE FROM totals WHERE client = ? AND tunnel = ?", (client, name))

        await self._commit(delete, lambda _: [Change(ChangeKind.TUNNEL, client, name)])

    # --- traffic --------------------------------------------------------------------------------

    async def totals(self) -> dict[tuple[str, str], Totals]:
        def get(db: sqlite3.Connection) -> dict[tuple[str, str], Totals]:
            return {(r["client"], r["tunnel"]): Totals(r["bytes_in"], r["bytes_out"], r["conns_total"], r["since"])
                    for r in db.execute("SELECT * FROM totals")}  # fmt: skip

        return await self._run(get)

    async def record_traffic(self, minute: int, deltas: list[TrafficDelta]) -> None:
        hour = minute - minute % 3600

        def record(db: sqlite3.Connection) -> None:
            with db:
                for d in deltas:
                    db.execute(
                        "INSERT INTO totals (client, tunnel, bytes_in, bytes_out, conns_total, since) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client, tunnel) DO UPDATE SET "
                        "bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out, "
                        "conns_total = conns_total + excluded.conns_total",
                        (d.client, d.tunnel, d.bytes_in, d.bytes_out, d.conns, d.since),
                    )
                    if not (d.bytes_in or d.bytes_out):
                        continue
                    for table, ts in (("traffic_minute", minute), ("traffic_hour", hour)):
                        db.execute(
                            f"INSERT INTO {table} (ts, client, tunnel, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (ts, client, tunnel) DO UPDATE SET bytes_in = bytes_in + excluded.bytes_in, "
                            "bytes_out = bytes_out + excluded.bytes_out",
                            (ts, d.client, d.tunnel, d.bytes_in, d.bytes_out),
                        )
                db.execute("DELETE FROM traffic_minute WHERE ts < ?", (minute - MINUTE_KEEP,))
                db.execute("DELETE FROM traffic_hour WHERE ts < ?", (hour - HOUR_KEEP,))

        await self._run(record)

    async def drop_totals(self, client: str, tunnel: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM totals WHERE client = ? AND tunnel = ?", (client, tunnel)))

    async def traffic(
        self, client: str, tunnel: str, since: float, now: float
    ) -> tuple[int, list[tuple[int, int, int]]]:
        table, step = ("traffic_minute", 60) if now - since <= MINUTE_KEEP else ("traffic_hour", 3600)
        where, args = ["ts >= ?"], [int(since) - int(since) % step]
        if client:
            where.append("client = ?")
            args.append(client)  # type: ignore[arg-type]
        if tunnel:
            where.append("tunnel = ?")
            args.append(tunnel)  # type: ignore[arg-type]
        query = f"SELECT ts, SUM(bytes_in), SUM(bytes_out) FROM {table} WHERE {' AND '.join(where)}"

        def get(db: sqlite3.Connection) -> list[tuple[int, int, int]]:
            return [(r[0], r[1], r[2]) for r in db.execute(query + " GROUP BY ts ORDER BY ts", args)]

        return step, await self._run(get)


def _client(row: sqlite3.Row) -> ClientRecord:
    return ClientRecord(name=row["name"], token=row["token"], created=row["created"], last_seen=row["last_seen"],
                        remote_addr=row["remote_addr"], version=row["version"],
                        enabled=bool(row["enabled"]))  # fmt: skip


def _tunnel(row: sqlite3.Row) -> TunnelRecord | None:
    try:
        spec = TunnelSpec.parse(json.loads(row["spec"]))
    except (ValueError, SchemaError) as exc:  # written by an older or newer relayd with other rules
        log.warning("store: dashboard tunnel %s/%s is not valid any more and is left out: %s", row["client"],
                    row["name"], exc)  # fmt: skip
        return None
    return TunnelRecord(client=row["client"], spec=spec, enabled=bool(row["enabled"]), created=row["created"])


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the file to SCHEMA_VERSION, in one transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"relayd.db has schema version {version}, newer than this relayd's {SCHEMA_VERSION}")
    if version == SCHEMA_VERSION:
        return
    with db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(tunnels)")]
        old_rows: list[dict[str, Any]] = []
        if "local_port" in columns:  # version 0: one column per field
            old_rows = [dict(r) for r in db.execute("SELECT * FROM tunnels")]
            db.execute("DROP TABLE tunnels")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        for r in old_rows:
            spec = {"name": r["name"], "type": r["type"], "local_ip": r["local_ip"], "local_port": r["local_port"],
                    "remote_port": r["remote_port"], "subdomain": r["subdomain"],
                    "custom_domains": json.loads(r["custom_domains"])}  # fmt: skip
            db.execute("INSERT INTO tunnels (client, name, spec, enabled, created) VALUES (?, ?, ?, ?, ?)",
                       (r["client"], r["name"], json.dumps(spec), r["enabled"], r["created"]))  # fmt: skip
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if old_rows:
        log.info("store: %d dashboard tunnels migrated to schema version %d", len(old_rows), SCHEMA_VERSION)
