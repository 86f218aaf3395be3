"""relayd's data plane: the control listener, the login handshake, and the registry of sessions.

Theory of operation
===================

A relayc connects (TLS unless disabled), sends the preface and opens stream 1, the control stream.
Before login only stream 1 may exist, only hello and login may be sent, the control decoder caps
a message at 64 KiB, and the whole handshake must finish within ``handshake_timeout``.

  relayc -> hello {name, client_nonce}      relayd -> challenge {server_nonce}
  relayc -> login {proof}                   relayd -> login_ok {proof} | login_failed {reason}

``proof`` is an HMAC of the token over both nonces, the name and relayd's certificate fingerprint
(``shared.auth``); the token itself never crosses the wire.  Failed logins are counted per
(address, name) by ``guard.LoginGuard``: each is answered after a growing delay, and a pair that
keeps failing is answered "blocked until T" without its proof being checked; an address whose
failures name several clients is dropped at accept time, before any TLS work.

  HELLO -> CHALLENGED -> READY                      (proof good, name free)
                      -> CHECKING -> READY | FAILED (proof good, a session holds the name)
                      -> FAILED                     (wrong token, blocked, bad name)

A login under the name of a session that exists PINGs that session (``LIVENESS_PROBE_TIMEOUT``):
if it answers, the newcomer is refused with the live one's address and login time (two relayc
with one name must not flap); if it does not, the newcomer replaces it at once (the old one is
closed with GO_AWAY REPLACED), so a lab machine that crashed takes over again in seconds.

After login the client registers tunnels (``tunnel_add`` -> ``tunnel_status``), each checked by
the config's rules and counted against ``max_tunnels_per_client``; each tcp tunnel becomes a
``PublicTunnel`` listener, and every visitor it accepts becomes a stream that relayd opens (even
id) starting with a ``stream_open`` message.  When a session ends, its listeners close, the
visitors still connected are reset, and everything relayd kept about it goes with it.

Memory: before login a connection may owe its peer at most ``PRELOGIN_OUTPUT_LIMIT`` bytes or it
is dropped.  After login, while relayd cannot write to a relayc, replies that relayc provokes past
``REPLY_DEBT_LIMIT`` make relayd stop reading it until they drained; visitor bytes waiting for its
credit past ``SEND_BACKLOG_LIMIT`` stop every visitor of it; and a control stream with more than
``CONTROL_QUEUE_LIMIT`` bytes waiting for credit ends the session.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay_server.guard import BlockScope, Failure, LoginGuard, address_key
from relay_server.store import Store
from relay_server.tunnels import PortPolicy, PublicTunnel, TunnelRefused
from relay_server.vhost import HttpVisitor, SniVisitor, VhostRouter
from shared import __version__, auth
from shared.aio import ControlChannel, LoopLagMonitor, MuxConnection, StreamHandler
from shared.burst import BurstLog
from shared.config import (
    ServerConfig,
    check_domain,
    check_host_rewrite,
    check_label,
    check_locations,
    check_name,
    check_sources,
    resolve_path,
    tunnel_kind_problem,
)
from shared.errors import RemoteProtocolError
from shared.frames import GoAwayCode, go_away_name
from shared.limits import TokenBucket
from shared.messages import (
    Challenge,
    Hello,
    Login,
    LoginFailed,
    LoginOk,
    LoginRefusal,
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
# Before login a connection may owe its peer at most this much (answers it has not read).
PRELOGIN_OUTPUT_LIMIT = 64 * 1024
# Control messages waiting for credit a relayc withholds: over this it is disconnected (replies to
# its own tunnel_add wait for the queue to drain first, so only a client that withholds credit for
# CONTROL_STALL_TIMEOUT, or floods the dashboard's pushes, gets there).
CONTROL_QUEUE_LIMIT = 1024 * 1024
CONTROL_STALL_TIMEOUT = 10.0
# While relayd cannot write to a relayc: replies it provoked (PING answers, refused streams)
# queued past this, and it is not read until they drained.
REPLY_DEBT_LIMIT = 64 * 1024
# Visitor bytes waiting for a relayc's credit, all its streams together: over this every visitor
# of that client stops being read until the backlog halves (a client that withholds credit or
# reads slowly cannot make relayd hold more).
SEND_BACKLOG_LIMIT = 16 * 1024 * 1024
# A login under the name of a live session: how long the old one has to answer a PING.
LIVENESS_PROBE_TIMEOUT = 2.0
NAME_IN_USE_RETRY = 60.0
# Per session: refusals remembered for the dashboard; per client name: refusals logged one line
# each before one line per burst.
REFUSALS_KEPT = 256
REFUSALS_LOGGED_EACH = 32
# tunnel_add messages waiting: past HIGH the control stream's credit is held back (the client can
# then send one window more); MAX would take a client that ignores flow control.
PENDING_ADDS_HIGH = 64
PENDING_ADDS_MAX = 8192


class SessionState(enum.Enum):
    """Where one relayc connection is, from accept to close."""

    HELLO = "hello"  # waiting for hello
    CHALLENGED = "challenged"  # challenge sent, waiting for login
    CHECKING = "checking"  # proof good, but a session of that name exists: is it alive?
    READY = "ready"  # logged in
    FAILED = "failed"  # refused, closing
    CLOSED = "closed"


class ClientSession:
    """One relayc connection, from accept to close."""

    def __init__(self, server: Relayd) -> None:
        self.server = server
        self.remote_addr = ""
        self.name = ""
        self.version = ""
        self.state = SessionState.HELLO
        self.tunnels: dict[str, PublicTunnel] = {}
        self.refusals: dict[str, str] = {}  # tunnel name -> why it is not active (bounded)
        self.visitors_open = 0
        self.connected_at = time.time()
        self.logged_in_at = 0.0
        self._client_nonce = ""
        self._server_nonce = ""
        self.control: ControlChannel | None = None
        self.mux = MuxConnection(
            client=False,
            keepalive_timeout=server.config.keepalive_timeout,
            on_stream_opened=self._stream_opened,
            on_go_away=self._go_away,
            on_closed=self._closed,
            reply_debt_limit=REPLY_DEBT_LIMIT,
            send_backlog_limit=SEND_BACKLOG_LIMIT,
        )
        self.mux.output_limit = PRELOGIN_OUTPUT_LIMIT  # lifted at login
        rate = server.config.limits.bandwidth_per_client
        self.bucket = TokenBucket(rate, asyncio.get_running_loop().time()) if rate else None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # tunnel_add messages waiting to be handled, one at a time by one task (the port policy
        # must see each result before the next; binding awaits); bounded, see _on_tunnel_add
        self._pending_adds: deque[TunnelAdd] = deque()
        self._adding: asyncio.Task[None] | None = None
        self.pushed: set[str] = set()  # names of the dashboard tunnels pushed to this session

    @property
    def ready(self) -> bool:
        return self.state is SessionState.READY

    def backlog(self) -> int:
        """Visitor bytes waiting for this client's credit, all its streams together."""
        session = self.mux.session
        return session.send_buffered_total if session is not None else 0

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

    # --- mux callbacks --------------------------------------------------------------------------

    def _stream_opened(self, mux: MuxConnection, stream_id: int) -> StreamHandler | None:
        if stream_id == CONTROL_STREAM_ID and self.control is None:
            self.control = ControlChannel(mux, self._on_message, self._control_closed, max_queued=CONTROL_QUEUE_LIMIT)
            self.control.stream_id = stream_id
            return self.control
        if not self.ready:  # before login only the control stream may exist: not a client, drop it
            mux.drop(RemoteProtocolError(f"stream {stream_id} opened before login"))
            return None
        # relayc may not open other streams: nothing on relayd is reachable through the tunnel.
        return None

    def _go_away(self, mux: MuxConnection, code: int) -> None:
        log.info("client %s: going away (%s)", self.name or self.remote_addr, go_away_name(code))
        self.release_tunnels()

    def _closed(self, mux: MuxConnection, exc: BaseException | None) -> None:
        self.cancel_handshake_timer()
        was_ready = self.ready
        self.state = SessionState.CLOSED
        for task in self._tasks:
            task.cancel()
        self.release_tunnels()
        self.refusals.clear()
        self.server.session_closed(self)
        if was_ready:
            why = f": {exc}" if exc else ""
            log.info("client %s (%s) disconnected%s", self.name, self.remote_addr, why)

    def _control_closed(self) -> None:
        self.mux.close()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.ready:
            log.warning(
                "client from %s: no login within %.0f s; closing",
                self.remote_addr,
                self.server.config.handshake_timeout,
            )
            self.mux.abort()

    # --- control messages -----------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        state = self.state
        try:
            if isinstance(message, Hello) and state is SessionState.HELLO:
                self._on_hello(message)
            elif isinstance(message, Login) and state is SessionState.CHALLENGED:
                self._on_login(message)
            elif isinstance(message, TunnelAdd) and state is SessionState.READY:
                self._on_tunnel_add(message)
            elif isinstance(message, TunnelPushRefused) and state is SessionState.READY:
                self._on_push_refused(message)
            else:
                raise RemoteProtocolError(f"unexpected {message.type} message in state {state.value}")
        except RemoteProtocolError as exc:
            self.mux.fail(exc)

    def send(self, message: Any) -> None:
        if self.control is not None and self.mux.is_open:
            self.control.send(message)

    def _on_hello(self, hello: Hello) -> None:
        self.version = hello.version
        try:
            self.name = check_name(hello.name)
        except ValueError as exc:
            self.server.burst_log.warning(f"bad-name:{self.remote_addr}", "login refused: client from %s sent the "
                                          "name %r: %s", self.remote_addr, hello.name, exc)  # fmt: skip
            self._refuse(LoginFailed(reason=f"client name {hello.name!r} {exc}", code=LoginRefusal.BAD_NAME.value))
            return
        self._client_nonce = hello.client_nonce
        self._server_nonce = auth.new_nonce()
        self.state = SessionState.CHALLENGED
        self.send(Challenge(server_nonce=self._server_nonce))

    def _on_login(self, login: Login) -> None:
        server = self.server
        now = time.monotonic()
        until = server.guard.pair_blocked_until(self.remote_addr, self.name, now)
        if until is not None:  # not even checked: blocked means no more guesses
            self._refuse(_blocked(until, now))
            return
        token = server.token_for(self.name)
        args = (self.name, self._client_nonce, self._server_nonce, server.fingerprint)
        if token is None or not auth.proofs_equal(login.proof, auth.client_proof(token, *args)):
            self.state = SessionState.FAILED
            # counted now, not after the delay: parallel guesses are counted as they come
            failure = server.guard.record_failure(self.remote_addr, self.name, now)
            self._spawn(self._refuse_wrong_token(failure))
            return
        server.guard.record_success(self.remote_addr, self.name)
        old = server.sessions.get(self.name)
        if old is not None and old is not self and old.ready:
            self.state = SessionState.CHECKING
            self._spawn(self._settle_name_clash(old, auth.server_proof(token, *args)))
            return
        self._complete_login(auth.server_proof(token, *args))

    async def _settle_name_clash(self, old: ClientSession, proof: str) -> None:
        """A session of this name exists: take over only if it is dead (so a restart after the lab
        machine crashed takes over in seconds), else refuse (two live relayc never flap)."""
        alive = await old.mux.probe(LIVENESS_PROBE_TIMEOUT)
        if self.state is not SessionState.CHECKING:
            return  # this connection closed meanwhile
        holder = self.server.sessions.get(self.name)
        if holder is None or holder is self or not holder.ready or (holder is old and not alive):
            self._complete_login(proof)
            return
        since = _iso(holder.logged_in_at)
        self.server.burst_log.warning(
            f"name-in-use:{self.name}",
            "login refused: client %r from %s: the name is in use by a live session from %s (logged in at %s)",
            self.name, self.remote_addr, holder.remote_addr, since,
        )  # fmt: skip
        self._refuse(
            LoginFailed(
                reason=f"client name {self.name!r} is in use by a live session from {holder.remote_addr}, logged "
                f"in at {since}: stop that relayc, or give this one another name",
                code=LoginRefusal.NAME_IN_USE.value,
                retry_after=int(NAME_IN_USE_RETRY),
            )
        )

    def _complete_login(self, proof: str) -> None:
        server = self.server
        server.left_preauth(self)
        self.state = SessionState.READY
        self.logged_in_at = time.time()
        self.mux.output_limit = 0  # from now on a backed-up connection pauses its reading instead
        self.mux.label = f"client {self.name} ({self.remote_addr})"
        self.cancel_handshake_timer()
        server.register(self)
        now = time.monotonic()
        server.vhosts.owner_returned(self.name, now)
        server.ports.owner_returned(self.name, now)
        self.send(LoginOk(proof=proof, version=__version__))
        log.info("client %s logged in from %s (relayc %s)", self.name, self.remote_addr, self.version or "?")
        server.client_ready(self)

    async def _refuse_wrong_token(self, failure: Failure) -> None:
        guard, addr, name = self.server.guard, self.remote_addr, self.name
        burst = self.server.burst_log
        burst.warning(f"login:{addr}:{name}", "login failed: client %r from %s: wrong token", name, addr)
        if failure.pair_blocked:
            log.warning("login: client %r from %s blocked for %.0f s after %d failed logins", name, addr,
                        guard.block_seconds, failure.failures)  # fmt: skip
        if failure.address_blocked:
            log.warning("login: address %s blocked for %.0f s: its failed logins name several clients (a scanner)",
                        addr, guard.block_seconds)  # fmt: skip
        await asyncio.sleep(failure.delay)
        now = time.monotonic()
        until = guard.pair_blocked_until(addr, name, now)
        self._refuse(_blocked(until, now) if until is not None else LoginFailed(
            reason="wrong token", code=LoginRefusal.WRONG_TOKEN.value))  # fmt: skip

    def _refuse(self, answer: LoginFailed) -> None:
        """Answer a refused login and close the connection."""
        self.state = SessionState.FAILED
        self.send(answer)
        self.mux.close(GoAwayCode.AUTH_FAILED)

    # --- tunnels --------------------------------------------------------------------------------

    def _on_tunnel_add(self, message: TunnelAdd) -> None:
        """Queue a registration.  Past ``PENDING_ADDS_HIGH`` waiting, the control stream's credit
        is held back, so the client can send at most one more window of them; a client that still
        piles up ``PENDING_ADDS_MAX`` is breaking the protocol."""
        pending = self._pending_adds
        if len(pending) >= PENDING_ADDS_MAX:
            raise RemoteProtocolError(f"over {PENDING_ADDS_MAX} tunnel_add messages waiting")
        pending.append(message)
        if len(pending) > PENDING_ADDS_HIGH and self.control is not None:
            self.control.hold_credit()
        if self._adding is None:
            self._adding = asyncio.get_running_loop().create_task(self._add_tunnels())
            self.track(self._adding)

    async def _add_tunnels(self) -> None:
        pending = self._pending_adds
        try:
            while pending and self.ready:
                if self.control is not None:
                    # relayc reads our answers slowly (or withholds credit): wait for them to go
                    # out before making more, and give up on a client that never lets them
                    try:
                        await asyncio.wait_for(self.control.drained(), CONTROL_STALL_TIMEOUT)
                    except asyncio.TimeoutError:
                        self.mux.fail(RemoteProtocolError("the client does not read its control stream"))
                        return
                message = pending.popleft()
                if len(pending) <= PENDING_ADDS_HIGH // 2 and self.control is not None:
                    self.control.release_credit()
                await self._add_tunnel(message)
        finally:
            self._adding = None

    async def _add_tunnel(self, message: TunnelAdd) -> None:
        spec = message.tunnel
        server = self.server
        problem = tunnel_problem(spec)
        cap = server.config.max_tunnels_per_client
        if problem is None and cap and spec.name not in self.tunnels and len(self.tunnels) >= cap:
            problem = f"client {self.name!r} already has max_tunnels_per_client={cap} tunnels"
        if problem is not None:
            self.refuse_tunnel(spec.name, problem)
            return
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
            self.refuse_tunnel(spec.name, str(exc))
            return
        self.refusals.pop(spec.name, None)
        if not self.ready:  # the session ended while we were binding
            server.release_tunnel(tunnel, client_gone=True)
            return
        self.tunnels[spec.name] = tunnel
        where = f"{server.config.public_bind_addr}:{tunnel.port}" if spec.kind == "tcp" else url
        log.info("client %s tunnel %s (%s): %s -> %s:%d", self.name, spec.name, spec.kind, where,
                 spec.local_ip, spec.local_port)  # fmt: skip
        self.send(TunnelStatus(name=spec.name, ok=True, remote_port=tunnel.port, url=url))

    def refuse_tunnel(self, name: str, reason: str) -> None:
        """Tell relayc why a tunnel is refused, remember it for the dashboard, log it (the first few
        per session one by one, then one line per burst: a client cannot flood the log)."""
        self._remember_refusal(name, reason)
        if self.server.count_refusal_log(self.name) <= REFUSALS_LOGGED_EACH:
            log.warning("client %s tunnel %s refused: %s", self.name, name, reason)
        else:
            self.server.burst_log.warning(f"tunnel-refused:{self.name}", "client %s tunnel %s refused: %s",
                                          self.name, name, reason)  # fmt: skip
        self.send(TunnelStatus(name=name, ok=False, error=reason[:4096]))

    def _remember_refusal(self, name: str, reason: str) -> None:
        refusals = self.refusals
        refusals.pop(name, None)
        refusals[name] = reason
        if len(refusals) > REFUSALS_KEPT:
            del refusals[next(iter(refusals))]

    def _on_push_refused(self, message: TunnelPushRefused) -> None:
        if message.name not in self.pushed:
            return  # not a tunnel relayd pushed to this client: nothing to remember
        log.warning("client %s refused pushed tunnel %s: %s", self.name, message.name, message.error)
        self._remember_refusal(message.name, message.error)

    def push(self, spec: TunnelSpec) -> None:
        """Offer relayc a dashboard tunnel (it answers with tunnel_add or tunnel_push_refused)."""
        self.pushed.add(spec.name)
        self.send(TunnelPush(tunnel=spec))

    def unpush(self, name: str) -> None:
        """A dashboard tunnel was deleted or disabled: close it here and tell relayc."""
        self.pushed.discard(name)
        self.refusals.pop(name, None)
        tunnel = self.tunnels.pop(name, None)
        if tunnel is not None:
            self.server.release_tunnel(tunnel, client_gone=False)
        self.send(TunnelRemove(name=name))

    # --- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        self.track(asyncio.get_running_loop().create_task(coro))

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # a bug, not the peer's doing: say so, and drop this session rather than leave it half-done
            log.error("client %s: internal error", self.name or self.remote_addr, exc_info=task.exception())
            self.mux.close(GoAwayCode.INTERNAL_ERROR)

    def end(self, code: int) -> None:
        """Close this session now for relayd's own reasons (replaced, kicked): nothing it still
        has in flight may land after this."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.FAILED
        self._pending_adds.clear()
        for task in list(self._tasks):
            task.cancel()
        self.release_tunnels()
        self.mux.close(code)

    def cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def release_tunnels(self) -> None:
        """Close this client's listeners and routes, resetting their visitors."""
        for tunnel in self.tunnels.values():
            self.server.release_tunnel(tunnel, client_gone=True)
        self.tunnels.clear()


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _blocked(until: float, now: float) -> LoginFailed:
    """The answer to a login from a blocked (address, name): "blocked until T", with T as UTC."""
    left = max(0.0, until - now)
    return LoginFailed(reason=f"wrong token, blocked until {_iso(time.time() + left)}",
                       code=LoginRefusal.BLOCKED.value, retry_after=math.ceil(left))  # fmt: skip


def tunnel_problem(spec: TunnelSpec) -> str | None:
    """What is wrong with a tunnel a relayc asked for, by the same rules as relayc.toml (a peer's
    names end up in logs, routes and request heads), or None."""
    try:
        check_name(spec.name)
        if check_label(spec.subdomain) != spec.subdomain:
            raise ValueError(f"subdomain {spec.subdomain!r} must be written in lowercase")
        for domain in spec.custom_domains:
            if check_domain(domain) != domain:
                raise ValueError(f"custom domain {domain!r} must be written in lowercase, without a trailing dot")
        check_locations(list(spec.locations))
        check_sources(list(spec.allow_sources))
        check_host_rewrite(spec.host_header_rewrite)
        for field_name in ("http_user", "http_password"):
            if not getattr(spec, field_name).isprintable():
                raise ValueError(f"{field_name} holds control characters")
    except ValueError as exc:
        return f"tunnel {spec.name!r}: {exc}"
    problem = tunnel_kind_problem(spec.kind, spec)
    return f"tunnel {spec.name!r}: {problem[0]}: {problem[1]}" if problem else None


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
        self.guard = LoginGuard(
            BlockScope.RELAYC,
            window=auth_cfg.failure_window,
            block_after=auth_cfg.block_after_failures,
            block_seconds=auth_cfg.block_seconds,
        )
        self.loop_lag = LoopLagMonitor()
        self.burst_log = BurstLog(log)
        self._preauth: dict[str, dict[ClientSession, None]] = {}
        self._preauth_all: dict[ClientSession, None] = {}
        self.sessions: dict[str, ClientSession] = {}
        self.connections: set[ClientSession] = set()
        self.fingerprint = ""
        self.tls_context: ssl.SSLContext | None = None
        self.store: Store | None = Store(self.state_dir / "relayd.db") if config.dashboard is not None else None
        self._traffic_seen: dict[tuple[str, str], tuple[int, int]] = {}
        self._refusal_logs: dict[str, int] = {}  # client name -> refusals logged one by one
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

    def refusals(self) -> dict[tuple[str, str], str]:
        """Why each refused tunnel of a connected client is not active: (client, tunnel) -> reason.
        Built on each call: call it once per view."""
        return {(name, t): why for name, s in self.sessions.items() for t, why in s.refusals.items()}

    def count_refusal_log(self, client: str) -> int:
        """How many tunnel refusals of ``client`` were logged one by one so far (this one included)."""
        counts = self._refusal_logs
        n = counts.pop(client, 0) + 1
        counts[client] = n
        if len(counts) > 1024:  # names come from peers: keep the most recent ones only
            del counts[next(iter(counts))]
        return n

    # --- dashboard support ----------------------------------------------------------------------

    def client_ready(self, session: ClientSession) -> None:
        """After login: remember it, and push the client's dashboard tunnels (again)."""
        if self.store is None:
            return
        if self.store.client(session.name) is not None:
            self.store.touch_client(session.name, session.remote_addr, session.version)
        for row in self.store.tunnels(session.name):
            if row["enabled"]:
                session.push(spec_of(row))

    def push_tunnel(self, row: dict[str, Any]) -> None:
        session = self.sessions.get(row["client"])
        if session is not None and session.ready:
            session.push(spec_of(row))

    def unpush_tunnel(self, client: str, name: str) -> None:
        session = self.sessions.get(client)
        if session is not None:
            session.unpush(name)

    def kick(self, client: str) -> bool:
        session = self.sessions.get(client)
        if session is None:
            return False
        log.info("client %s: kicked by the operator", client)
        session.end(GoAwayCode.KICKED)
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
        self.loop_lag.start()

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
        if self.guard.address_blocked_until(addr, time.monotonic()) is not None:
            return None
        limits = self.config.limits
        session = ClientSession(self)
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
        self.burst_log.warning(f"preauth:{session.remote_addr}",
                               "too many connections from %s that have not logged in: closing the oldest",
                               session.remote_addr)  # fmt: skip
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
        self.loop_lag.stop()
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
        domains = self.vhosts.add(tunnel, time.monotonic())
        tunnel.port = port
        default = 80 if kind == "http" else 443
        suffix = "" if port == default else f":{port}"
        return ", ".join(f"{kind}://{d}{suffix}" for d in domains)

    def release_tunnel(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        if tunnel.spec.kind == "tcp":
            self.ports.release(tunnel, client_gone)
        else:
            self.vhosts.remove(tunnel, client_gone, time.monotonic())
            tunnel.close()
        self.burst_log.forget(f"refuse:{tunnel.client.name}:{tunnel.name}")

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
            old.end(GoAwayCode.REPLACED)
        self.sessions[session.name] = session

    def session_closed(self, session: ClientSession) -> None:
        self.left_preauth(session)
        self.connections.discard(session)
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            self.burst_log.forget(f"tunnel-refused:{session.name}")


def spec_of(row: dict[str, Any]) -> TunnelSpec:
    """The wire form of a dashboard tunnel row."""
    return TunnelSpec(
        name=row["name"], kind=row["type"], local_ip=row["local_ip"], local_port=row["local_port"],
        remote_port=row["remote_port"], subdomain=row["subdomain"], custom_domains=tuple(row["custom_domains"]),
    )  # fmt: skip
