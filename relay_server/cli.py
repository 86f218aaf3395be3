"""The ``relayd`` command."""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from relay_server.acme import AcmeManager
from relay_server.certs import CertStore
from relay_server.certs import load as certs_load
from relay_server.frontends.http import HttpFrontend
from relay_server.frontends.secret import SecretFrontend
from relay_server.frontends.sni import SniFrontend
from relay_server.frontends.tcp import TcpFrontend
from relay_server.frontends.udp import UdpFrontend
from relay_server.guard import BlockScope, LoginGuard
from relay_server.listener import ControlListener
from relay_server.registry import Registry, TunnelOpened
from relay_server.stores.base import Store
from relay_server.stores.postgres import PostgresStore
from relay_server.stores.sqlite import SqliteStore
from shared.aio import LoopLagMonitor, run
from shared.burst import BurstLog
from shared.cli import (
    base_parser,
    install_service,
    install_stop_handlers,
    load_or_exit,
    raise_fd_limit,
    setup_logging,
    tune_malloc,
)
from shared.config import ServerConfig, resolve_path
from shared.errors import ConfigError, StoreUnavailable
from shared.messages import ClusterMembers
from shared.tunnel import TunnelKind

log = logging.getLogger("relayd")
HEARTBEAT_EVERY = 3.0  # seconds between a cluster node's heartbeats
MEMBER_MAX_AGE = 10.0  # a node whose heartbeat is older is not a live member


class Relayd:
    """One relayd node, wired: store -> registry -> frontends -> control listener -> dashboard.

    The only place that knows every part; nothing imports it but the CLI (and tests)."""

    def __init__(self, config: ServerConfig, config_path: str | Path) -> None:
        self.config = config
        self.config_path = Path(config_path)
        self.state_dir = resolve_path(config_path, config.state_dir)
        self.burst_log = BurstLog(log)
        self.loop_lag = LoopLagMonitor()
        self.store: Store = PostgresStore(config.store.url) if config.store.url else \
            SqliteStore(self.state_dir / "relayd.db")  # fmt: skip
        self.started = time.time()
        self._heartbeat_task: asyncio.Task[None] | None = None
        a = config.auth
        guard = LoginGuard(BlockScope.RELAYC, window=a.failure_window, block_after=a.block_after_failures,
                           block_seconds=a.block_seconds)  # fmt: skip
        self.registry = Registry(config, self.store, guard, self.burst_log)
        bind = config.public_bind_addr
        cluster = bool(config.store.url)  # nodes on one host share public and vhost ports (SO_REUSEPORT)
        self.registry.add_frontend(TcpFrontend(self.registry.ports, self.burst_log, reuse_port=cluster))
        self.registry.add_frontend(UdpFrontend(self.registry.ports, self.burst_log,
                                               config.limits.max_udp_flows_per_tunnel))  # fmt: skip
        self.registry.add_frontend(SecretFrontend(self.registry.find_secret, lambda: self.listener.fingerprint,
                                                  self.registry.has_own_token))  # fmt: skip
        self.http = HttpFrontend(self.registry.domains, bind, config.vhost_http_port, config.vhost_header_timeout)
        self.https = SniFrontend(self.registry.domains, bind, config.vhost_https_port, config.vhost_header_timeout)
        self.http.reuse_port = self.https.reuse_port = cluster
        self.registry.add_frontend(self.http)
        self.registry.add_frontend(self.https)
        self.certs = load_certificates(config, self.config_path)
        if self.certs.files or config.acme.enable:
            self.https.terminate_with(self.certs, self.http)
            self.http.certs = self.certs
        self.acme: AcmeManager | None = None
        if config.acme.enable:
            self.acme = AcmeManager(config.acme, self.config_path, self.state_dir, self.certs, self.registry.domains,
                                    config.max_tunnels_per_client, self.store,
                                    config.public_address())  # fmt: skip
            self.http.acme_tokens = self.acme.http_tokens
            self.http.acme_enabled = True
            self.https.alpn_contexts = self.acme.alpn_contexts
            acme = self.acme
            self.registry.subscribe(lambda e: acme.poke() if isinstance(e, TunnelOpened) and e.kind is TunnelKind.HTTP
                                    else None)  # fmt: skip
        self.listener = ControlListener(config, self.config_path, self.state_dir, self.registry)
        self.dashboard: Any = None
        self._traffic_task: asyncio.Task[None] | None = None

    # what tests and the dashboard read
    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def fingerprint(self) -> str:
        return self.listener.fingerprint

    @property
    def sessions(self) -> dict[str, Any]:
        return self.registry.sessions

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.registry.load()
        for frontend in self.registry.frontends.values():
            await frontend.start()
        self.http.https_port = self.https.bound_port
        if self.acme is not None:
            self.acme.start()
        await self.listener.start()
        if self.config.dashboard is not None:
            from relay_server.dashboard.app import Dashboard, NodeInfo  # FastAPI is imported only when used

            node = NodeInfo(self.config.bind_addr, self.listener.port, self.listener.fingerprint, self.certificates,
                            self.public_address)  # fmt: skip
            self.dashboard = Dashboard(self.registry, node, self.loop_lag, self.config.dashboard, self.state_dir,
                                       self.config_path)  # fmt: skip
            await self.dashboard.start()
        self._traffic_task = asyncio.get_running_loop().create_task(self.registry.record_traffic_forever())
        if self.store.shared:
            await self.heartbeat()
            self._heartbeat_task = asyncio.get_running_loop().create_task(self.heartbeat_forever())
        self.loop_lag.start()

    @property
    def public_address(self) -> str:
        return self.config.public_address(self.listener.port)

    async def heartbeat(self) -> None:
        """Say this node is alive; learn which others are (for relayc's login answer)."""
        try:
            await self.store.heartbeat(self.public_address, self.listener.fingerprint, self.started,
                                       tuple(sorted(self.registry.sessions)))  # fmt: skip
            members = await self.store.members(MEMBER_MAX_AGE)
            await self.store.refresh_places(self.registry.held_places())
        except StoreUnavailable as exc:
            log.warning("cluster: %s (members as last known: %d)", exc, len(self.registry.members))
            return
        before = {(m.addr, m.fingerprint) for m in self.registry.members}
        self.registry.members = members
        if {(m.addr, m.fingerprint) for m in members} != before:
            log.info("cluster: %d live nodes: %s", len(members), ", ".join(m.addr for m in members))
            message = ClusterMembers(members=tuple(f"{m.addr} {m.fingerprint}" for m in members[:64]))
            for session in list(self.registry.sessions.values()):
                if session.ready:
                    session.send(message)

    async def heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            await self.heartbeat()

    def certificates(self) -> list[dict[str, Any]]:
        """The API's view of the certificates served on vhost_https_port."""
        served = [d for d, _ in self.registry.domains.http_domains() if self.certs.from_file(d) is not None]
        return self.certs.items(served + (self.acme.wanted() if self.acme is not None else []))

    async def shutdown(self, grace: float = 5.0) -> None:
        self.listener.stop_accepting()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:
                await self.store.leave(self.public_address)
            except StoreUnavailable:
                pass  # its heartbeat ages out instead
        if self.acme is not None:
            await self.acme.stop()
        for frontend in self.registry.frontends.values():
            await frontend.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self._traffic_task is not None:
            self._traffic_task.cancel()
        self.loop_lag.stop()
        await self.listener.shutdown(grace)
        try:
            await self.registry.flush_traffic()
        except Exception:
            log.exception("could not record the last traffic")
        await self.registry.close()
        await self.store.close()


def load_certificates(config: ServerConfig, config_path: Path) -> CertStore:
    """The ``[[certificates]]`` of relayd.toml, loaded; ``ConfigError`` naming the key of one that
    cannot be served (not PEM, a key that does not match)."""
    certs = CertStore()
    for i, files in enumerate(config.certificates):
        try:
            served = certs_load(resolve_path(config_path, files.cert_file), resolve_path(config_path, files.key_file),
                                "file")  # fmt: skip
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise ConfigError(str(config_path), f"certificates[{i}].cert_file",
                              f"cannot serve {files.cert_file!r} with {files.key_file!r}: {exc}") from None  # fmt: skip
        certs.add_file(served)
        log.info("certificate %s for %s (until %s)", files.cert_file, ", ".join(served.names),
                 time.strftime("%Y-%m-%d", time.gmtime(served.not_after)))  # fmt: skip
    return certs


async def serve(relayd: Relayd) -> None:
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    await relayd.start()
    await stop.wait()
    await relayd.shutdown(grace=5.0)
    log.info("relayd stopped")


def hash_password_command(argv: list[str]) -> int:
    """`relayd hash-password`: read a password (twice from a terminal, once from a pipe), print its hash."""
    import getpass

    from relay_server.passwords import hash_password

    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: relayd hash-password\n\nReads a password and prints the password_hash for relayd.toml [dashboard]."
        )
        return 0
    if sys.stdin.isatty():
        password = getpass.getpass("Dashboard password: ")
        if password != getpass.getpass("Again: "):
            print("relayd: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("relayd: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        return hash_password_command(argv[1:])
    if argv[:1] == ["install-service"]:
        return install_service("relayd", "relay_server.cli", ServerConfig, argv[1:])
    parser = base_parser("relayd", "relay server: accepts relayc clients and opens their public ports", "relayd.toml")
    parser.epilog = ("Also: relayd hash-password (prints a password_hash for [dashboard]); "
                     "relayd install-service [-c FILE] [--user] [--print] (a systemd unit).")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = load_or_exit("relayd", ServerConfig, args.config)
    if args.check:
        print(f"relayd: {args.config}: configuration is valid")
        return 0
    raise_fd_limit()
    tune_malloc()
    try:
        relayd = Relayd(config, args.config)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        run(serve(relayd))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
