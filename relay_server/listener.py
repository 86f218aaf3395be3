"""relayd's control listener: accepts relayc connections, admits them before any TLS work, runs
the TLS handshake, and hands each connection to a ``control.ClientSession``; graceful shutdown.

Admission: addresses the login guard blocks are dropped at accept time.  Connections that have not
logged in yet are capped per address and in total; over a cap the *oldest* is closed, so a flood
of idle connections cannot lock a real client out (it logs in within its handshake time while the
flood keeps evicting itself).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path

from relay_server.control import ClientSession
from relay_server.guard import address_key
from relay_server.registry import Registry
from shared import __version__
from shared.config import ServerConfig, resolve_path
from shared.frames import GoAwayCode
from shared.tls import ensure_self_signed, fingerprint_of_pem_file, server_context

log = logging.getLogger("relayd")


class ControlListener:
    def __init__(self, config: ServerConfig, config_path: str | Path, state_dir: Path, registry: Registry) -> None:
        self.config = config
        self.config_path = Path(config_path)
        self.state_dir = state_dir
        self.registry = registry
        self.fingerprint = ""
        self.tls_context: ssl.SSLContext | None = None
        self.connections: set[ClientSession] = set()
        self._preauth: dict[str, dict[ClientSession, None]] = {}
        self._preauth_all: dict[ClientSession, None] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        cfg = self.config
        if cfg.tls.enable:
            if cfg.tls.cert_file:
                cert = resolve_path(self.config_path, cfg.tls.cert_file)
                key = resolve_path(self.config_path, cfg.tls.key_file)
            else:
                cert, key = ensure_self_signed(self.state_dir)
            self.tls_context = server_context(cert, key)
            self.fingerprint = fingerprint_of_pem_file(cert)
        else:
            log.warning(
                "TLS is disabled (tls.enable = false): traffic between relayc and relayd is readable on the path"
            )
        family = socket.getaddrinfo(cfg.bind_addr, cfg.bind_port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((cfg.bind_addr, cfg.bind_port), family=family, backlog=1024)
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(listener))
        self.port = listener.getsockname()[1]
        log.info("relayd %s listening for relayc on %s:%d (TLS %s)", __version__, cfg.bind_addr, self.port,
                 "on" if self.tls_context else "OFF")  # fmt: skip
        if self.fingerprint:
            log.info("TLS certificate fingerprint: %s", self.fingerprint)

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept control connections ourselves: the address is known before a byte is read, so
        admission (blocked addresses, pre-login caps) happens before any TLS work."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                self.registry.burst_log.warning("accept", "cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            session = self.admit(str(peer[0]))
            if session is None:
                conn.close()
                continue
            session.accepted(conn, str(peer[0]))
            session.track(loop.create_task(self._handshake(conn, session)))

    async def _handshake(self, conn: socket.socket, session: ClientSession) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: session.mux, sock=conn, ssl=self.tls_context,
                ssl_handshake_timeout=self.config.handshake_timeout if self.tls_context else None,
            )  # fmt: skip
        except asyncio.CancelledError:
            if session.mux.transport is None:
                conn.close()
            raise
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.debug("TLS handshake with %s failed: %s", session.remote_addr, exc)
            conn.close()
            session.cancel_handshake_timer()
            self.session_closed(session)

    def admit(self, addr: str) -> ClientSession | None:
        """A TCP connection from ``addr`` arrived: None to drop it at once, else its session."""
        if self.registry.guard.address_blocked_until(addr, time.monotonic()) is not None:
            return None
        limits = self.config.limits
        session = ClientSession(self, self.registry)
        per_ip = self._preauth.setdefault(address_key(addr), {})
        per_ip[session] = None
        self._preauth_all[session] = None
        if len(per_ip) > limits.max_preauth_per_ip:
            self._evict(next(iter(per_ip)))
        if len(self._preauth_all) > limits.max_preauth_total:
            self._evict(next(iter(self._preauth_all)))
        self.connections.add(session)
        return session

    def _evict(self, session: ClientSession) -> None:
        self.registry.burst_log.warning(f"preauth:{session.remote_addr}", "too many connections from %s that have "
                                        "not logged in: closing the oldest", session.remote_addr)  # fmt: skip
        self.left_preauth(session)
        session.abort()

    def left_preauth(self, session: ClientSession) -> None:
        """The session logged in or closed: it no longer counts against the pre-login caps."""
        self._preauth_all.pop(session, None)
        key = address_key(session.remote_addr)
        per_ip = self._preauth.get(key)
        if per_ip is not None:
            per_ip.pop(session, None)
            if not per_ip:
                del self._preauth[key]

    def session_closed(self, session: ClientSession) -> None:
        self.left_preauth(session)
        self.connections.discard(session)

    def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, tell every client GO_AWAY, let open streams finish for ``grace`` s."""
        self.stop_accepting()
        sessions = list(self.connections)
        for s in sessions:
            for tunnel in list(s.tunnels.values()):
                self.registry.stop_accepting(tunnel)
            s.mux.go_away(GoAwayCode.NORMAL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s.mux.stream_count > 1 for s in sessions if s.mux.is_open):
            await asyncio.sleep(0.05)
        for s in sessions:
            s.mux.close()
        for s in sessions:
            s.release_tunnels()
        await asyncio.sleep(0)
