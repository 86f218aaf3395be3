"""relayd's persistent state in SQLite (stdlib sqlite3, WAL): clients, dashboard tunnels, traffic.

One file, ``relayd.db`` in state_dir, mode 0600 (it holds client tokens: the login proof needs the
server to know each token, so they are stored as they are, like ssh host keys).  Calls are short
and local; they run on the event loop thread.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

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
    type TEXT NOT NULL,
    local_ip TEXT NOT NULL,
    local_port INTEGER NOT NULL,
    remote_port INTEGER NOT NULL DEFAULT 0,
    subdomain TEXT NOT NULL DEFAULT '',
    custom_domains TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    PRIMARY KEY (client, name)
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

MINUTE_KEEP = 7 * 86400
HOUR_KEEP = 90 * 86400


class Conflict(Exception):
    """A name or port already taken; the message says which."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        if new:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- clients --------------------------------------------------------------------------------

    def clients(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM clients ORDER BY name")]

    def client(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM clients WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def create_client(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        try:
            self.db.execute("INSERT INTO clients (name, token, created) VALUES (?, ?, ?)", (name, token, time.time()))
        except sqlite3.IntegrityError:
            raise Conflict(f"client {name!r} already exists") from None
        return token

    def rotate_token(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        self.db.execute("UPDATE clients SET token = ? WHERE name = ?", (token, name))
        return token

    def set_client_enabled(self, name: str, enabled: bool) -> None:
        self.db.execute("UPDATE clients SET enabled = ? WHERE name = ?", (int(enabled), name))

    def delete_client(self, name: str) -> None:
        self.db.execute("DELETE FROM tunnels WHERE client = ?", (name,))
        self.db.execute("DELETE FROM clients WHERE name = ?", (name,))

    def touch_client(self, name: str, remote_addr: str, version: str) -> None:
        self.db.execute(
            "UPDATE clients SET last_seen = ?, remote_addr = ?, version = ? WHERE name = ?",
            (time.time(), remote_addr, version, name),
        )

    # --- dashboard tunnels ----------------------------------------------------------------------

    def tunnels(self, client: str | None = None) -> list[dict[str, Any]]:
        if client is None:
            rows = self.db.execute("SELECT * FROM tunnels ORDER BY client, name")
        else:
            rows = self.db.execute("SELECT * FROM tunnels WHERE client = ? ORDER BY name", (client,))
        return [_tunnel_row(r) for r in rows]

    def tunnel(self, client: str, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM tunnels WHERE client = ? AND name = ?", (client, name)).fetchone()
        return _tunnel_row(row) if row else None

    def add_tunnel(self, t: dict[str, Any]) -> None:
        if t.get("remote_port"):
            clash = self.db.execute(
                "SELECT client, name FROM tunnels WHERE remote_port = ? AND type = 'tcp'", (t["remote_port"],)
            ).fetchone()
            if clash:
                raise Conflict(f"port {t['remote_port']} is already used by client {clash[0]!r} tunnel {clash[1]!r}")
        try:
            self.db.execute(
                "INSERT INTO tunnels (client, name, type, local_ip, local_port, remote_port, subdomain,"
                " custom_domains, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (t["client"], t["name"], t["type"], t["local_ip"], t["local_port"], t.get("remote_port", 0),
                 t.get("subdomain", ""), json.dumps(t.get("custom_domains", [])), time.time()),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise Conflict(f"client {t['client']!r} already has a tunnel named {t['name']!r}") from None

    def set_tunnel_enabled(self, client: str, name: str, enabled: bool) -> None:
        self.db.execute("UPDATE tunnels SET enabled = ? WHERE client = ? AND name = ?", (int(enabled), client, name))

    def delete_tunnel(self, client: str, name: str) -> None:
        self.db.execute("DELETE FROM tunnels WHERE client = ? AND name = ?", (client, name))

    # --- traffic --------------------------------------------------------------------------------

    def record_traffic(self, minute: int, rows: list[tuple[str, str, int, int]]) -> None:
        """Add per-tunnel byte deltas to the minute bucket (and its hour), and prune old buckets."""
        hour = minute - minute % 3600
        with self.db:
            for client, tunnel, b_in, b_out in rows:
                for table, ts in (("traffic_minute", minute), ("traffic_hour", hour)):
                    self.db.execute(
                        f"INSERT INTO {table} (ts, client, tunnel, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (ts, client, tunnel) DO UPDATE SET bytes_in = bytes_in + excluded.bytes_in, "
                        "bytes_out = bytes_out + excluded.bytes_out",
                        (ts, client, tunnel, b_in, b_out),
                    )
            self.db.execute("DELETE FROM traffic_minute WHERE ts < ?", (minute - MINUTE_KEEP,))
            self.db.execute("DELETE FROM traffic_hour WHERE ts < ?", (hour - HOUR_KEEP,))

    def traffic(self, client: str = "", tunnel: str = "", since: float = 0) -> dict[str, Any]:
        """Per-minute buckets when ``since`` is within 7 days, hourly ones otherwise."""
        now = time.time()
        if not since:
            since = now - 3600
        table, step = ("traffic_minute", 60) if now - since <= MINUTE_KEEP else ("traffic_hour", 3600)
        where, args = ["ts >= ?"], [int(since) - int(since) % step]
        if client:
            where.append("client = ?")
            args.append(client)  # type: ignore[arg-type]
        if tunnel:
            where.append("tunnel = ?")
            args.append(tunnel)  # type: ignore[arg-type]
        query = f"SELECT ts, SUM(bytes_in), SUM(bytes_out) FROM {table} WHERE {' AND '.join(where)}"
        rows = self.db.execute(query + " GROUP BY ts ORDER BY ts", args)
        return {"step": step, "points": [{"ts": r[0], "bytes_in": r[1], "bytes_out": r[2]} for r in rows]}


def _tunnel_row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["custom_domains"] = json.loads(d["custom_domains"])
    d["enabled"] = bool(d["enabled"])
    return d
