"""relayd's data plane: the control listener, the login handshake, and the registry of sessions.

Theory of operation
===================

A relayc connects (TLS unless disabled), sends the preface and opens stream 1, the control stream.
Before login only stream 1 may exist, only hello and login may be sent, the control decoder caps
a message at 64 KiB, and the whole handshake must finish within ``handshake_timeout``.

  relayc -> hello {name, client_nonce}      relayd -> challenge {server_nonce}
  relayc -> login {proof}                   relayd -> login_ok {proof} | login_failed {reason}

``proof`` is an HMAC of the token over both nonces, the name and relayd's certificate fingerprint
(``shared.auth``); the token itself never crosses the wire.  A failed login is answered after a
delay that grows with the failures of that address, and an address that keeps failing is refused
at accept time for a while.  After login the client registers tunnels (``tunnel_add`` ->
``tunnel_status``); each tcp tunnel becomes a ``PublicTunnel`` listener, and every visitor it
accepts becomes a stream that relayd opens (even id) starting with a ``stream_open`` message.
A client that logs in again under the same name replaces its old session (which is closed with
GO_AWAY REPLACED): a stale session never blocks a reconnect.  When a session ends, its listeners
close and the visitors still connected are reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay_server.store import Store
from relay_server.tunnels import PortPolicy, PublicTunnel, TunnelRefused
from relay_server.vhost import HttpVisitor, SniVisitor, VhostRouter
from shared import __version__, auth
from shared.aio import ControlChannel, MuxConnection, StreamHandler
from shared.burst import BurstLog
from shared.config import ServerConfig, resolve_path
from shared.errors import RemoteProtocolError
from shared.frames import GoAwayCode
from shared.limits import TokenBucket
from shared.messages import (
    Challenge,
    Hello,
    Login,
    LoginFailed,
    LoginOk,
    TunnelAdd,
    TunnelPush,
    TunnelPushRefused,
    TunnelRemove,
    TunnelSpec,
    TunnelStatus,
)
from shared.tls import ensure_self_signed, fingerprint_of_pem_file, server_context

log = logging.getLogger("relayd")

CONTROL_STREAM_ID = 1


class LoginGuard:
    """Slows down, then blocks for a while, an address whose logins keep failing."""

    def __init__(self, window: float = 600.0, block_after: int = 10, block_for: float = 600.0) -> None:
        self.window = window
        self.block_after = block_after
        self.block_for = block_for
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._last_log: dict[str, float] = {}

    def is_blocked(self, addr: str, now: float) -> bool:
        until = self._blocked_until.get(addr)
        if until is None:
            return False
        if now >= until:
            del self._blocked_until[addr]
            self._failures.pop(addr, None)
            return False
        return True

    def record_failure(self, addr: str, now: float) -> float:
        """Record a failure; return how long to wait before answering."""
        q = self._failures.setdefault(addr, deque())
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) >= self.block_after:
            self._blocked_until[addr] = now + self.block_for
            log.warning("login: %s blocked for %.0f s after %d failed logins", addr, self.block_for, len(q))
        if len(self._failures) > 10_000:  # forget the oldest addresses rather than grow forever
            oldest = next(iter(self._failures))
            del self._failures[oldest]
        return float(min(0.25 * 2 ** (len(q) - 1), 8.0))

    def record_success(self, addr: str) -> None:
        self._failures.pop(addr, None)

    def should_log(self, addr: str, now: float) -> bool:
        if now - self._last_log.get(addr, -1e9) >= 10.0:
            self._last_log[addr] = now
            return True
        return False


class ClientSession:
    """One relayc connection, from accept to close."""

    def __init__(self, server: Relayd) -> None:
        self.server = server
        self.remote_addr = ""
        self.name = ""
        self.version = ""
        self.state = "hello"  # hello -> challenged -> ready -> closed
        self.tunnels: dict[str, PublicTunnel] = {}
        self.connected_at = time.time()
        self._client_nonce = ""
        self._server_nonce = ""
        self.control: ControlChannel | None = None
        self.mux = MuxConnection(
            client=False,
            keepalive_timeout=server.config.keepalive_timeout,
            on_stream_opened=self._stream_opened,
            on_go_away=self._go_away,
            on_closed=self._closed,
        )
        rate = server.config.limits.bandwidth_per_client
        self.bucket = TokenBucket(rate, asyncio.get_running_loop().time()) if rate else None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tunnel_lock = asyncio.Lock()

    def accepted(self, conn: socket.socket, addr: str) -> None:
        """The TCP connection was admitted: start the deadline for TLS plus login."""
        self.remote_addr = addr
        self.mux.label = f"client from {addr}"
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self._handshake_expired
        )

    def abort(self) -> None:
        """Drop the connection now, whether TLS is finished or not."""
        if self.mux.transport is not None:
            self.mux.abort()
        else:
            for task in list(self._tasks):  # still in the TLS handshake: cancelling closes it
                task.cancel()

    def conns_open(self) -> int:
        return sum(t.counters.conns_open for t in self.tunnels.values())

    # --- mux callbacks --------------------------------------------------------------------------

    def _stream_opened(self, mux: MuxConnection, stream_id: int) -> StreamHandler | None:
        if stream_id == CONTROL_STREAM_ID and self.control is None:
            self.control = ControlChannel(mux, self._on_message, self._control_closed)
            self.control.stream_id = stream_id
            return self.control
        # relayc may not open other streams: nothing on relayd is reachable through the tunnel.
        return None

    def _go_away(self, mux: MuxConnection, code: int) -> None:
        log.info("client %s: going away (code %d)", self.name or self.remote_addr, code)
        self.release_tunnels()

    def _closed(self, mux: MuxConnection, exc: BaseException | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        was_ready = self.state == "ready"
        self.state = "closed"
        for task in self._tasks:
            task.cancel()
        self.release_tunnels()
        self.server.session_closed(self)
        if was_ready:
            why = f": {exc}" if exc else ""
            log.info("client %s (%s) disconnected%s", self.name, self.remote_addr, why)

    def _control_closed(self) -> None:
        self.mux.close()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.state != "ready":
            log.warning(
                "client from %s: no login within %.0f s; closing",
                self.remote_addr,
                self.server.config.handshake_timeout,
            )
            self.mux.abort()

    # --- control messages -----------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        try:
            if isinstance(message, Hello) and self.state == "hello":
                self._on_hello(message)
            elif isinstance(message, Login) and self.state == "challenged":
                self._on_login(message)
            elif isinstance(message, TunnelAdd) and self.state == "ready":
                self._spawn(self._add_tunnel(message))
            elif isinstance(message, TunnelPushRefused) and self.state == "ready":
                log.warning("client %s refused pushed tunnel %s: %s", self.name, message.name, message.error)
                self.server.refusals[(self.name, message.name)] = message.error
            else:
                raise RemoteProtocolError(f"unexpected {message.type} message in state {self.state}")
        except RemoteProtocolError as exc:
            self.mux.fail(exc)

    def send(self, message: Any) -> None:
        self._send(message)

    def _send(self, message: Any) -> None:
        if self.control is not None and self.mux.is_open:
            self.control.send(message)

    def _on_hello(self, hello: Hello) -> None:
        self.name = hello.name
        self.version = hello.version
        self._client_nonce = hello.client_nonce
        self._server_nonce = auth.new_nonce()
        self.state = "challenged"
        self._send(Challenge(server_nonce=self._server_nonce))

    def _on_login(self, login: Login) -> None:
        server = self.server
        token = server.token_for(self.name)
        args = (self.name, self._client_nonce, self._server_nonce, server.fingerprint)
        ok = token is not None and auth.proofs_equal(login.proof, auth.client_proof(token, *args))
        if not ok or token is None:
            self.state = "failed"
            self._spawn(self._refuse_login())
            return
        server.guard.record_success(self.remote_addr)
        server.left_preauth(self)
        self.state = "ready"
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        server.register(self)
        self._send(LoginOk(proof=auth.server_proof(token, *args), version=__version__))
        log.info("client %s logged in from %s (relayc %s)", self.name, self.remote_addr, self.version or "?")
        server.client_ready(self)

    async def _refuse_login(self) -> None:
        now = time.monotonic()
        delay = self.server.guard.record_failure(self.remote_addr, now)
        if self.server.guard.should_log(self.remote_addr, now):
            log.warning("login failed: client %r from %s: wrong token", self.name, self.remote_addr)
        await asyncio.sleep(delay)
        self._send(LoginFailed(reason="wrong token"))
        self.mux.close(GoAwayCode.AUTH_FAILED)

    async def _add_tunnel(self, message: TunnelAdd) -> None:
        # One at a time per session: the port policy checks (max_ports_per_client, who holds a
        # port) must see the previous registration's result, and there is an await in between.
        async with self._tunnel_lock:
            await self._add_tunnel_locked(message)

    async def _add_tunnel_locked(self, message: TunnelAdd) -> None:
        spec = message.tunnel
        server = self.server
        old = self.tunnels.pop(spec.name, None)
        if old is not None:
            server.release_tunnel(old, client_gone=False)
        tunnel = PublicTunnel(self, spec)
        url = ""
        try:
            if spec.kind == "tcp":
                await server.ports.bind(tunnel, server.config.public_bind_addr, spec.remote_port)
            else:
                url = server.add_vhost(tunnel)
        except TunnelRefused as exc:
            log.warning("client %s tunnel %s refused: %s", self.name, spec.name, exc)
            server.refusals[(self.name, spec.name)] = str(exc)
            self._send(TunnelStatus(name=spec.name, ok=False, error=str(exc)))
            return
        server.refusals.pop((self.name, spec.name), None)
        if self.state != "ready":  # the session ended while we were binding
            server.release_tunnel(tunnel, client_gone=True)
            return
        self.tunnels[spec.name] = tunnel
        where = f"{server.config.public_bind_addr}:{tunnel.port}" if spec.kind == "tcp" else url
        log.info("client %s tunnel %s (%s): %s -> %s:%d", self.name, spec.name, spec.kind, where,
                 spec.local_ip, spec.local_port)  # fmt: skip
        self._send(TunnelStatus(name=spec.name, ok=True, remote_port=tunnel.port, url=url))

    # --- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        self.track(asyncio.get_running_loop().create_task(coro))

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def release_tunnels(self) -> None:
        """Close this client's listeners and routes, resetting their visitors."""
        for tunnel in self.tunnels.values():
            self.server.release_tunnel(tunnel, client_gone=True)
        self.tunnels.clear()


class Relayd:
    """The relay server: owns the control listener, the sessions and the port policy."""

    def __init__(self, config: ServerConfig, config_path: str | Path) -> None:
        self.config = config
        self.config_path = Path(config_path)
        self.state_dir = resolve_path(config_path, config.state_dir)
        self.ports = PortPolicy(config.port_ranges, config.max_ports_per_client)
        self.vhosts = VhostRouter(config.subdomain_host)
        self._vhost_servers: list[asyncio.AbstractServer] = []
        auth_cfg = config.auth
        self.guard = LoginGuard(auth_cfg.failure_window, auth_cfg.block_after_failures, auth_cfg.block_seconds)
        self.burst_log = BurstLog(log)
        self._preauth: dict[str, dict[ClientSession, None]] = {}
        self._preauth_all: dict[ClientSession, None] = {}
        self.sessions: dict[str, ClientSession] = {}
        self.connections: set[ClientSession] = set()
        self.fingerprint = ""
        self.tls_context: ssl.SSLContext | None = None
        self.store: Store | None = Store(self.state_dir / "relayd.db") if config.dashboard is not None else None
        self.refusals: dict[tuple[str, str], str] = {}  # (client, tunnel) -> why it is not active
        self._traffic_seen: dict[tuple[str, str], tuple[int, int]] = {}
        self.dashboard: Any = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._traffic_task: asyncio.Task[None] | None = None
        self.port = 0
        self.vhost_http_port = 0
        self.vhost_https_port = 0

    def token_for(self, client_name: str) -> str | None:
        """A client created in the dashboard logs in with its own token (none while disabled);
        any other name with the shared ``[auth] token``."""
        if self.store is not None:
            row = self.store.client(client_name)
            if row is not None:
                return str(row["token"]) if row["enabled"] else None
        return self.config.auth.token or None

    # --- dashboard support ----------------------------------------------------------------------

    def client_ready(self, session: ClientSession) -> None:
        """After login: remember it, and push the client's dashboard tunnels (again)."""
        if self.store is None:
            return
        if self.store.client(session.name) is not None:
            self.store.touch_client(session.name, session.remote_addr, session.version)
        for row in self.store.tunnels(session.name):
            if row["enabled"]:
                session.send(TunnelPush(tunnel=spec_of(row)))

    def push_tunnel(self, row: dict[str, Any]) -> None:
        session = self.sessions.get(row["client"])
        if session is not None and session.state == "ready":
            session.send(TunnelPush(tunnel=spec_of(row)))

    def unpush_tunnel(self, client: str, name: str) -> None:
        self.refusals.pop((client, name), None)
        session = self.sessions.get(client)
        if session is None:
            return
        tunnel = session.tunnels.pop(name, None)
        if tunnel is not None:
            self.release_tunnel(tunnel, client_gone=False)
        session.send(TunnelRemove(name=name))

    def kick(self, client: str) -> bool:
        session = self.sessions.get(client)
        if session is None:
            return False
        log.info("client %s: kicked by the operator", client)
        session.mux.close(GoAwayCode.KICKED)
        return True

    def pending_traffic(self) -> tuple[list[tuple[str, str, int, int]], dict[tuple[str, str], tuple[int, int]]]:
        """Byte deltas per tunnel not yet recorded in the traffic buckets, and the counter values
        they were measured at.  Reads only: ``flush_traffic`` is what records them."""
        rows = []
        seen: dict[tuple[str, str], tuple[int, int]] = {}
        for session in self.sessions.values():
            for t in session.tunnels.values():
                key = (session.name, t.name)
                last_in, last_out = self._traffic_seen.get(key, (0, 0))
                c = t.counters
                if c.bytes_in < last_in or c.bytes_out < last_out:  # a new listener: counters restarted
                    last_in = last_out = 0
                if c.bytes_in != last_in or c.bytes_out != last_out:
                    rows.append((session.name, t.name, c.bytes_in - last_in, c.bytes_out - last_out))
                seen[key] = (c.bytes_in, c.bytes_out)
        return rows, seen

    async def _record_traffic_loop(self) -> None:
        assert self.store is not None
        while True:
            now = time.time()
            await asyncio.sleep(60 - now % 60 + 0.05)
            self.flush_traffic()

    def flush_traffic(self) -> None:
        """Record the pending deltas in the current minute's bucket (once a minute, and at exit)."""
        if self.store is not None:
            rows, seen = self.pending_traffic()
            self._traffic_seen = seen  # tunnels that are gone are forgotten
            if rows:
                now = int(time.time())
                self.store.record_traffic(now - now % 60, rows)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        loop = asyncio.get_running_loop()
        family = socket.getaddrinfo(cfg.bind_addr, cfg.bind_port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((cfg.bind_addr, cfg.bind_port), family=family, backlog=1024)
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = loop.create_task(self._accept_loop(listener))
        self.port = listener.getsockname()[1]
        vhost_factories: list[tuple[int, Callable[[], asyncio.Protocol], str]] = [
            (cfg.vhost_http_port, lambda: HttpVisitor(self), "http"),
            (cfg.vhost_https_port, lambda: SniVisitor(self), "https"),
        ]
        for port, factory, scheme in vhost_factories:
            if port:
                vhost = await loop.create_server(factory, cfg.public_bind_addr, port, reuse_address=True, backlog=1024)
                self._vhost_servers.append(vhost)
                bound = vhost.sockets[0].getsockname()[1]
                if scheme == "http":
                    self.vhost_http_port = bound
                else:
                    self.vhost_https_port = bound
                log.info("%s virtual hosts on %s:%d", scheme, cfg.public_bind_addr, bound)
        log.info(
            "relayd %s listening for relayc on %s:%d (TLS %s)",
            __version__,
            cfg.bind_addr,
            self.port,
            "on" if self.tls_context else "OFF",
        )
        if self.fingerprint:
            log.info("TLS certificate fingerprint: %s", self.fingerprint)
        if cfg.dashboard is not None:
            from relay_server.dashboard.app import Dashboard  # FastAPI is only imported when used

            self.dashboard = Dashboard(self, cfg.dashboard)
            await self.dashboard.start()
            self._traffic_task = loop.create_task(self._record_traffic_loop())

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
                self.burst_log.warning("accept", "cannot accept a connection: %s", exc)
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
        """A TCP connection from ``addr`` arrived: None to drop it at once, else its session.

        Addresses the login guard blocks are dropped before any TLS work.  Connections that have
        not logged in yet are capped per address and in total; over a cap the *oldest* is closed,
        so a flood of idle connections cannot lock a real client out (it logs in within its
        handshake time while the flood keeps evicting itself).
        """
        if self.guard.is_blocked(addr, time.monotonic()):
            return None
        limits = self.config.limits
        session = ClientSession(self)
        per_ip = self._preauth.setdefault(addr, {})
        per_ip[session] = None
        self._preauth_all[session] = None
        if len(per_ip) > limits.max_preauth_per_ip:
            self._evict(next(iter(per_ip)))
        if len(self._preauth_all) > limits.max_preauth_total:
            self._evict(next(iter(self._preauth_all)))
        self.connections.add(session)
        return session

    def _evict(self, session: ClientSession) -> None:
        self.burst_log.warning(f"preauth:{session.remote_addr}",
                               "too many connections from %s that have not logged in: closing the oldest",
                               session.remote_addr)  # fmt: skip
        self.left_preauth(session)
        session.abort()

    def left_preauth(self, session: ClientSession) -> None:
        """The session logged in or closed: it no longer counts against the pre-login caps."""
        self._preauth_all.pop(session, None)
        per_ip = self._preauth.get(session.remote_addr)
        if per_ip is not None:
            per_ip.pop(session, None)
            if not per_ip:
                del self._preauth[session.remote_addr]

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, tell every client GO_AWAY, let open streams finish for ``grace`` s."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        for vhost in self._vhost_servers:
            vhost.close()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self._traffic_task is not None:
            self._traffic_task.cancel()
            self.flush_traffic()
        sessions = list(self.connections)
        for s in sessions:
            for tunnel in list(s.tunnels.values()):
                tunnel.stop_accepting()
            s.mux.go_away(GoAwayCode.NORMAL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s.mux.stream_count > 1 for s in sessions if s.mux.is_open):
            await asyncio.sleep(0.05)
        for s in sessions:
            s.mux.close()
        for s in sessions:
            s.release_tunnels()
        await asyncio.sleep(0)

    # --- tunnels --------------------------------------------------------------------------------

    def add_vhost(self, tunnel: PublicTunnel) -> str:
        """Route an http/https tunnel's domains to it; return the visitor URL(s)."""
        kind = tunnel.spec.kind
        port = self.vhost_http_port if kind == "http" else self.vhost_https_port
        if not port:
            key = "vhost_http_port" if kind == "http" else "vhost_https_port"
            raise TunnelRefused(f"{kind} tunnels are off on this relayd ({key} is not set)")
        domains = self.vhosts.add(tunnel)
        tunnel.port = port
        default = 80 if kind == "http" else 443
        suffix = "" if port == default else f":{port}"
        return ", ".join(f"{kind}://{d}{suffix}" for d in domains)

    def release_tunnel(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        if tunnel.spec.kind == "tcp":
            self.ports.release(tunnel)
        else:
            self.vhosts.remove(tunnel, client_gone)
            tunnel.close()

    # --- registry -------------------------------------------------------------------------------

    def register(self, session: ClientSession) -> None:
        old = self.sessions.get(session.name)
        if old is not None and old is not session:
            log.info(
                "client %s: a new session from %s replaces the one from %s",
                session.name,
                session.remote_addr,
                old.remote_addr,
            )
            old.release_tunnels()
            old.mux.close(GoAwayCode.REPLACED)
        self.sessions[session.name] = session

    def session_closed(self, session: ClientSession) -> None:
        self.left_preauth(session)
        self.connections.discard(session)
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]


def spec_of(row: dict[str, Any]) -> TunnelSpec:
    """The wire form of a dashboard tunnel row."""
    return TunnelSpec(
        name=row["name"], kind=row["type"], local_ip=row["local_ip"], local_port=row["local_port"],
        remote_port=row["remote_port"], subdomain=row["subdomain"], custom_domains=tuple(row["custom_domains"]),
    )  # fmt: skip
