"""Many light relay clients in one process, each holding a session with every node of a cluster.

    python -m tests.e2e.many_sessions -c SESSIONS.toml [--log-level error]

SESSIONS.toml: ``count`` (clients c0..c{count-1}), ``servers`` (["127.0.0.1:PORT", ...], the
cluster's nodes), ``fingerprints`` (their certificates, pinned: no trust-on-first-use file is
written), ``token`` and optionally ``keepalive_timeout``.

Each client is a real ``relay_client.client.Relayc`` with no tunnels: for every node it runs the
real ``NodeLink`` loop (TLS, pin check, login, reconnect with relayc's backoff), so 1,000 clients
cost one process instead of 1,000 relayc processes.  Printed on stdout, for a test to wait on:

* ``LOGGED IN n/total t=T refused=.. dropped=.. timeouts=.. ended=.. failures=..`` whenever the
  number of logged-in sessions (client x node) or a counter changed, at most 5 lines a second, but
  at once when the number reaches 0 or the total.  ``T`` is ``time.monotonic()`` (one clock for
  every process of the machine), so the test can tell when the count changed, not when it read
  the line.
* ``ERRORS {type: count}`` after such a line when failed attempts were added: by exception type.
* ``LOGIN FAILURE client node: reason`` for every refused login (``AuthError``: relayd answered
  login_failed, or could not prove the token) and every pin mismatch (``TrustError``).
* ``LEARNED client node``: a client connected to a node not in ``servers`` (the member lists should
  name exactly the configured nodes).

Runs until killed (SIGTERM prints a last ``LOGGED IN`` line and exits).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
import time
from pathlib import Path

from relay_client.client import NodeLink, Relayc
from shared.aio import run
from shared.cli import raise_fd_limit
from shared.config import ClientConfig, parse_config
from shared.errors import AuthError, TrustError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRINT_EVERY = 0.2  # seconds: at most 5 progress lines a second
POLL = 0.02


class Counters:
    def __init__(self, total: int) -> None:
        self.total = total
        self.logged_in = 0
        self.failures = 0  # refused logins and pin mismatches
        self.refused = 0  # TCP connection refused (expected while the nodes restart)
        self.dropped = 0  # closed or reset by relayd before the login finished (its handshake_timeout, ...)
        # relayc gave up: connect, TLS handshake (asyncio's ConnectionAbortedError) or a login step took
        # longer than its step timeout (10 s)
        self.timeouts = 0
        self.ended = 0  # logged-in sessions that ended (a node went away)
        self.errors: collections.Counter[str] = collections.Counter()  # failed attempts by exception type

    def line(self) -> str:
        return (
            f"LOGGED IN {self.logged_in}/{self.total} t={time.monotonic():.3f} refused={self.refused} "
            f"dropped={self.dropped} timeouts={self.timeouts} ended={self.ended} failures={self.failures}"
        )


class CountingLink(NodeLink):
    """relayc's own node loop, counting how each attempt ends."""

    counters: Counters

    async def run_once(self) -> bool:
        counters = self.counters
        try:
            served = await super().run_once()
        except Exception as exc:
            counters.errors[type(exc).__name__] += 1
            if isinstance(exc, (AuthError, TrustError)):
                counters.failures += 1
                print(f"LOGIN FAILURE {self.relayc.config.name} {self.server_key}: {exc}", flush=True)
            elif isinstance(exc, (asyncio.TimeoutError, ConnectionAbortedError)):
                counters.timeouts += 1
            elif isinstance(exc, ConnectionRefusedError):
                counters.refused += 1
            else:
                counters.dropped += 1
            raise
        if served:
            counters.ended += 1
        return served


class LightClient(Relayc):
    """A ``Relayc`` without tunnels whose node links count logins (``link_up``/``link_down``)."""

    def __init__(self, config: ClientConfig, config_path: Path, counters: Counters) -> None:
        super().__init__(config, config_path)
        self.counters = counters
        self.up: set[str] = set()
        links: dict[str, NodeLink] = {}
        for key, link in self.links.items():
            counting = CountingLink(self, link.host, link.port)
            counting.counters = counters
            links[key] = counting
        self.links = links

    def link_up(self, link: NodeLink) -> None:
        super().link_up(link)
        if link.server_key not in self.up:
            self.up.add(link.server_key)
            self.counters.logged_in += 1
        if not isinstance(link, CountingLink):
            print(f"LEARNED {self.config.name} {link.server_key}", flush=True)

    def link_down(self, link: NodeLink) -> None:
        super().link_down(link)
        if link.server_key in self.up:
            self.up.discard(link.server_key)
            self.counters.logged_in -= 1


async def report(counters: Counters, stop: asyncio.Event) -> None:
    shown: tuple[int, ...] = ()
    errors: collections.Counter[str] = collections.Counter()
    last = 0.0
    while not stop.is_set():
        c = counters
        state = (c.logged_in, c.refused, c.dropped, c.timeouts, c.ended, c.failures)
        now = time.monotonic()
        if state != shown and (now - last >= PRINT_EVERY or c.logged_in in (0, c.total)):
            print(c.line(), flush=True)
            if c.errors != errors:
                print(f"ERRORS {dict(c.errors.most_common())}", flush=True)
                errors = collections.Counter(c.errors)
            shown, last = state, now
        try:
            await asyncio.wait_for(stop.wait(), POLL)
        except asyncio.TimeoutError:
            pass
    print(counters.line(), flush=True)


async def main(config_path: Path) -> None:
    spec = tomllib.loads(config_path.read_text())
    count = int(spec["count"])
    servers = list(spec["servers"])
    counters = Counters(count * len(servers))
    clients = []
    for i in range(count):
        data = {
            "server_addr": servers,
            "name": f"c{i}",
            "keepalive_timeout": float(spec.get("keepalive_timeout", 30.0)),
            "auth": {"token": spec["token"]},
            "tls": {"server_fingerprint": list(spec["fingerprints"])},
        }
        clients.append(LightClient(parse_config(ClientConfig, data, f"client c{i}"), config_path, counters))
    print(f"STARTING {count} clients x {len(servers)} nodes", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reporter = loop.create_task(report(counters, stop))
    tasks = [loop.create_task(c.run()) for c in clients]
    await stop.wait()
    for c in clients:
        c.stop()
    await asyncio.wait(tasks, timeout=5)
    await reporter


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.many_sessions")
    parser.add_argument("-c", "--config", required=True, type=Path)
    parser.add_argument("--log-level", default="error", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args()
    raise_fd_limit()
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(main(args.config))
