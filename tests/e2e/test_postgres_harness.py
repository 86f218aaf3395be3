"""The PostgreSQL harness itself: ``url`` reaches the ``relay`` database with its password (and TCP
wants one), LISTEN/NOTIFY works between two connections, ``stop_server()`` / ``start_server()`` take
the server down and bring it back on the same URL, ``kill()`` and ``pause()`` / ``resume()`` do what
they say, and ``stop()`` leaves no process behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.postgres import Postgres, available, process_alive
from tests.waiting import wait_until, wait_until_async

try:
    import asyncpg
except ImportError:  # pragma: no cover - the project depends on it
    asyncpg = None

MISSING = available() or (None if asyncpg is not None else "asyncpg not installed (pip install asyncpg)")
if MISSING is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must install PostgreSQL and asyncpg for the PostgreSQL tests: {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

CONNECT_TIMEOUT = 10.0


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Postgres]:
    with Postgres(tmp_path) as server:
        yield server


async def connect(url: str, timeout: float = CONNECT_TIMEOUT) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=timeout)


async def test_url_reaches_the_relay_database_on_loopback_only(pg: Postgres) -> None:
    conn = await connect(pg.url)
    try:
        user, database, version = await conn.fetchrow(
            "SELECT current_user, current_database(), current_setting('server_version_num')::int"
        )
        assert (user, database) == ("relay", "relay")
        assert version // 10000 == pg.version
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW fsync") == "off"
        await conn.execute("CREATE TABLE tunnels (name text PRIMARY KEY, port int NOT NULL)")
        await conn.execute("INSERT INTO tunnels VALUES ($1, $2), ($3, $4)", "ssh", 2222, "web", 8080)
        assert await conn.fetch("SELECT name, port FROM tunnels ORDER BY name") == [("ssh", 2222), ("web", 8080)]
    finally:
        await conn.close()

    admin = await connect(pg.admin_url)
    try:
        assert await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is True
        assert (
            await admin.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'relay'") == "relay"
        )
    finally:
        await admin.close()

    wrong = pg.url.replace(pg.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(wrong)
    assert pg.admin_sql("SELECT count(*) FROM tunnels", database="relay").strip() == "2"


async def test_listen_notify_round_trip(pg: Postgres) -> None:
    listener, notifier = await connect(pg.url), await connect(pg.url)
    try:
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await listener.add_listener(
            "tunnels", lambda _conn, pid, channel, payload: got.put_nowait((pid, channel, payload))
        )
        await notifier.execute("SELECT pg_notify('tunnels', 'ssh is up')")
        pid, channel, payload = await asyncio.wait_for(got.get(), timeout=10)
        assert (channel, payload) == ("tunnels", "ssh is up")
        assert pid == notifier.get_server_pid()
    finally:
        await listener.close()
        await notifier.close()


async def test_stop_server_then_start_server_on_the_same_url(pg: Postgres) -> None:
    conn = await connect(pg.url)
    await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
    url, port, old = pg.url, pg.port, pg.pid

    await asyncio.to_thread(pg.stop_server)  # the loop keeps running: conn sees the server go
    assert pg.pid is None and pg.processes() == [] and not process_alive(old or 0)
    await wait_until_async(conn.is_closed, 10, "the open connection to be closed by the shutdown")
    with pytest.raises(OSError):  # connection refused
        await connect(url)

    await asyncio.to_thread(pg.start_server)
    assert pg.url == url and pg.port == port and pg.pid not in (None, old)
    again = await connect(url)
    try:
        assert await again.fetchval("SELECT n FROM kept") == 42
    finally:
        await again.close()

    with pg.down(), pytest.raises(OSError):
        await connect(url)
    again = await connect(url)
    await again.close()
    assert "database system is shut down" in pg.log()


async def test_kill_then_recovery_and_pause_then_resume(tmp_path: Path) -> None:
    with Postgres(tmp_path, synchronous_commit=True) as pg:  # an acknowledged commit survives kill()
        await kill_then_recovery_and_pause_then_resume(pg)


async def kill_then_recovery_and_pause_then_resume(pg: Postgres) -> None:
    assert await asyncio.to_thread(pg.admin_sql, "SHOW synchronous_commit") == "on\n"
    conn = await connect(pg.url)
    await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
    await conn.close()

    pids = pg.processes()
    await asyncio.to_thread(pg.kill)
    assert not any(map(process_alive, pids)) and pg.pid is None
    with pytest.raises(OSError):
        await connect(pg.url)
    await asyncio.to_thread(pg.start_server)
    assert "not properly shut down; automatic recovery in progress" in pg.log()
    conn = await connect(pg.url)
    try:
        assert await conn.fetchval("SELECT n FROM kept") == 7
    finally:
        await conn.close()

    pg.pause()
    try:
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # accepted by the kernel, never answered
            await connect(pg.url, timeout=1)
    finally:
        pg.resume()
    conn = await connect(pg.url)
    await conn.close()


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    pg = Postgres(tmp_path).start()
    pids, socket_dir = pg.processes(), pg.socket_dir
    assert len(pids) >= 2 and socket_dir is not None and socket_dir.is_dir()
    assert pids[0] == int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    pg.pause()  # even a frozen server is stopped
    pg.stop()
    wait_until(lambda: not any(map(process_alive, pids)), 10, f"PostgreSQL processes {pids} to be gone")
    assert pg.pid is None and pg.processes() == []
    assert not socket_dir.exists()
    assert "database system is shut down" in pg.log()
    pg.stop()  # idempotent
