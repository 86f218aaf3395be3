"""How long relayd's event loop stalls while the store works, the store's way and the old way.

    python3 -m bench.store_lag [--clients N] [--tunnels N] [--minutes N]

Fills a fresh SQLite store (``relay_server.stores.sqlite``) with a week-like traffic history, then
runs the calls relayd makes (a minute's ``record_traffic`` for every tunnel, the dashboard's
``traffic`` query over a day, ``totals`` at start, ``tunnels``) while a ticker on the same loop
measures the worst gap between its 1 ms ticks.  The same calls are then run directly on the loop
thread (as the store before this one did: sqlite3 on the event loop), for the baseline.  Prints
the worst stall per call and mode; the figure that matters is the ``thread`` column staying at a
few milliseconds whatever the size.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay_server.stores.base import TrafficDelta
from relay_server.stores.sqlite import SqliteStore


class Ticker:
    """The worst gap between ticks meant to come every ``interval`` s, while running."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.worst = max(self.worst, now - last - self.interval)
            last = now

    def __enter__(self) -> Ticker:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def measure(call: Callable[[], Awaitable[Any]], repeat: int = 3) -> tuple[float, float]:
    """(worst stall, mean call time) in ms over ``repeat`` calls."""
    ticker = Ticker()
    spent = 0.0
    worst = 0.0
    for _ in range(repeat):
        await asyncio.sleep(0.01)
        with ticker:
            await asyncio.sleep(0.005)  # the ticker is running
            t0 = time.perf_counter()
            await call()
            spent += time.perf_counter() - t0
            await asyncio.sleep(0.005)
        worst = max(worst, ticker.worst)
    return worst * 1000, spent / repeat * 1000


async def main(clients: int, tunnels: int, minutes: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="store-lag-"))
    store = SqliteStore(work / "relayd.db")
    await store.open()
    now = int(time.time())
    minute = now - now % 60
    deltas = [TrafficDelta(f"c{c}", f"t{t}", 1000, 2000, 1, float(now)) for c in range(clients) for t in range(tunnels)]
    t0 = time.perf_counter()
    for m in range(minutes, 0, -1):  # history: every tunnel in every minute
        await store.record_traffic(minute - 60 * m, deltas)
    fill = time.perf_counter() - t0
    direct = sqlite3.connect(str(work / "relayd.db"), isolation_level=None)
    calls: list[tuple[str, Callable[[], Awaitable[Any]], Callable[[], Any]]] = [
        ("record_traffic (one minute, every tunnel)", lambda: store.record_traffic(minute, deltas),
         lambda: _record_direct(direct, minute, deltas)),
        ("traffic (all clients, last day)", lambda: store.traffic("", "", now - 86400, now),
         lambda: direct.execute("SELECT ts, SUM(bytes_in), SUM(bytes_out) FROM traffic_minute WHERE ts >= ? "
                                "GROUP BY ts ORDER BY ts", (now - 86400,)).fetchall()),
        ("totals (relayd start)", store.totals, lambda: direct.execute("SELECT * FROM totals").fetchall()),
    ]  # fmt: skip
    print(f"store of {clients} clients x {tunnels} tunnels, {minutes} minutes of history "
          f"({len(deltas) * minutes} minute rows, filled in {fill:.1f} s)")  # fmt: skip
    print(f"{'call':<45} {'thread: stall ms':>17} {'on the loop: stall ms':>22} {'call ms':>8}")
    for label, threaded, on_loop in calls:
        stall_thread, took = await measure(threaded)

        async def blocking(fn: Callable[[], Any] = on_loop) -> None:
            fn()

        stall_loop, _ = await measure(blocking)
        print(f"{label:<45} {stall_thread:>17.2f} {stall_loop:>22.2f} {took:>8.1f}")
    direct.close()
    await store.close()


def _record_direct(db: sqlite3.Connection, minute: int, deltas: list[TrafficDelta]) -> None:
    with db:
        for d in deltas:
            db.execute(
                "INSERT INTO traffic_minute (ts, client, tunnel, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (ts, client, tunnel) DO UPDATE SET bytes_in = bytes_in + excluded.bytes_in, "
                "bytes_out = bytes_out + excluded.bytes_out",
                (minute, d.client, d.tunnel, d.bytes_in, d.bytes_out),
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tunnels", type=int, default=5)
    ap.add_argument("--minutes", type=int, default=1440, help="minutes of history to fill first")
    a = ap.parse_args()
    asyncio.run(main(a.clients, a.tunnels, a.minutes))
