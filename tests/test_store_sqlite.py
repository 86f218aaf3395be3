"""The embedded store: a real SQLite file, its migration, its change feed, totals that last."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from relay_server.stores.base import Change, ChangeKind, TrafficDelta, TunnelRecord
from relay_server.stores.sqlite import SCHEMA_VERSION, SqliteStore
from shared.errors import Conflict
from shared.tunnel import TunnelKind, TunnelSpec

FIRST_LAYOUT = """
CREATE TABLE clients (name TEXT PRIMARY KEY, token TEXT NOT NULL, created REAL NOT NULL, last_seen REAL,
    remote_addr TEXT NOT NULL DEFAULT '', version TEXT NOT NULL DEFAULT '', enabled INTEGER NOT NULL DEFAULT 1);
CREATE TABLE tunnels (client TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, local_ip TEXT NOT NULL,
    local_port INTEGER NOT NULL, remote_port INTEGER NOT NULL DEFAULT 0, subdomain TEXT NOT NULL DEFAULT '',
    custom_domains TEXT NOT NULL DEFAULT '[]', enabled INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL,
    PRIMARY KEY (client, name));
"""


async def test_a_file_of_the_first_layout_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "relayd.db"
    db = sqlite3.connect(path)
    db.executescript(FIRST_LAYOUT)
    db.execute("INSERT INTO clients (name, token, created) VALUES ('lab', 'tok', 1)")
    db.execute("INSERT INTO tunnels VALUES ('lab', 'web', 'http', '127.0.0.1', 8888, 0, 'jup', ?, 0, 2)",
               (json.dumps(["lab.example.org"]),))  # fmt: skip
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        (record,) = await store.tunnels()
        assert record.client == "lab" and not record.enabled and record.created == 2
        assert record.spec.type is TunnelKind.HTTP and record.spec.subdomain == "jup"
        assert record.spec.custom_domains == ["lab.example.org"] and record.spec.local_port == 8888
        assert (await store.client("lab")).token == "tok"  # type: ignore[union-attr]
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_writes_are_announced_and_calls_run_off_the_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relayd.db")
    changes: list[Change] = []
    store.subscribe(changes.append)
    await store.open()
    try:
        await store.create_client("lab", "t1")
        with pytest.raises(Conflict, match="client 'lab' already exists"):
            await store.create_client("lab", "t2")
        spec = TunnelSpec.parse({"name": "ssh", "local_port": 22, "remote_port": 6000})
        await store.add_tunnel(TunnelRecord("lab", spec, True, time.time()))
        with pytest.raises(Conflict, match="already has a tunnel named 'ssh'"):
            await store.add_tunnel(TunnelRecord("lab", spec, True, time.time()))
        await store.set_tunnel_enabled("lab", "ssh", False)
        await store.set_client_token("lab", "t3")
        await store.delete_client("lab")
        assert changes == [Change(ChangeKind.CLIENT, "lab"), Change(ChangeKind.TUNNEL, "lab", "ssh"),
                           Change(ChangeKind.TUNNEL, "lab", "ssh"), Change(ChangeKind.CLIENT, "lab"),
                           Change(ChangeKind.TUNNEL, "lab", "ssh"), Change(ChangeKind.CLIENT, "lab")]  # fmt: skip
        assert await store.tunnels() == [] and await store.client("lab") is None
        worker = await store._run(lambda db: threading.get_ident())
        assert worker != threading.get_ident()  # SQLite never runs on the event loop's thread
    finally:
        await store.close()


async def test_totals_add_up_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relayd.db"
    store = SqliteStore(path)
    await store.open()
    now = int(time.time())
    minute = now - now % 60
    await store.record_traffic(minute - 60, [TrafficDelta("lab", "ssh", 100, 10, 1, 1000.0)])
    await store.record_traffic(minute, [TrafficDelta("lab", "ssh", 5, 7, 2, 2000.0),
                                        TrafficDelta("lab", "web", 0, 0, 1, 3000.0)])  # fmt: skip
    step, points = await store.traffic("lab", "ssh", now - 600, now)
    assert step == 60 and points == [(minute - 60, 100, 10), (minute, 5, 7)]
    await store.close()
    store = SqliteStore(path)
    await store.open()
    try:
        totals = await store.totals()
        ssh = totals[("lab", "ssh")]
        assert (ssh.bytes_in, ssh.bytes_out, ssh.conns_total, ssh.since) == (105, 17, 3, 1000.0)
        assert totals[("lab", "web")].conns_total == 1
        await store.drop_totals("lab", "web")
        assert ("lab", "web") not in await store.totals()
    finally:
        await store.close()
