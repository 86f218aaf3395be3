"""One relayc connection from accept to close: the login handshake and its control messages.

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
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from relay_server.guard import BlockKind, Failure
from relay_server.tunnels import PublicTunnel
from shared import __version__, auth
from shared.aio import ControlChannel, MuxConnection, StreamHandler
from shared.checks import check_name
from shared.errors import PeerTimeoutError, RemoteProtocolError, TunnelRefusal, TunnelRefused
from shared.frames import GoAwayCode, go_away_name
from shared.limits import TokenBucket
from shared.messages import (
    Challenge,
    Hello,
    Login,
    LoginFailed,
    LoginOk,
    LoginRefusal,
    Message,
    TunnelAdd,
    TunnelHealth,
    TunnelPush,
    TunnelPushRefused,
    TunnelRemove,
    TunnelStatus,
)
from shared.tunnel import InvalidTunnel, TunnelKind, TunnelSpec

if TYPE_CHECKING:
    from relay_server.listener import ControlListener
    from relay_server.registry import Registry

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
# Per session: refusals remembered for the dashboard, and how much of each one's text.
REFUSALS_KEPT = 256
REFUSAL_TEXT_MAX = 1024
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

    def __init__(self, listener: ControlListener, registry: Registry) -> None:
        self.listener = listener
        self.registry = registry
        config = listener.config
        self.token_used = ""  # the token this session logged in with (a new one ends it)
        self.remote_addr = ""
        self.name = ""
        self.version = ""
        self.state = SessionState.HELLO
        self.tunnels: dict[str, PublicTunnel] = {}
        self.refusals: dict[str, tuple[TunnelRefusal, str]] = {}  # tunnel name -> why it is not active (bounded)
        self.visitors_open = 0
        self.visits_open = 0  # streams this relayc opened to visit secret tunnels
        self.role = ""  # "visitor": a visitor-only session (relayc connect), no tunnels of its own
        self.connected_at = time.time()
        self.logged_in_at = 0.0
        self._client_nonce = ""
        self._server_nonce = ""
        self.control: ControlChannel | None = None
        self.mux = MuxConnection(
            client=False,
            keepalive_timeout=config.keepalive_timeout,
            on_stream_opened=self._stream_opened,
            on_go_away=self._go_away,
            on_closed=self._closed,
            reply_debt_limit=REPLY_DEBT_LIMIT,
            send_backlog_limit=SEND_BACKLOG_LIMIT,
        )
        self.mux.output_limit = PRELOGIN_OUTPUT_LIMIT  # lifted at login
        rate = config.limits.bandwidth_per_client
        self.bucket = TokenBucket(rate, asyncio.get_running_loop().time()) if rate else None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # tunnel_add messages waiting to be handled, one at a time by one task (the port policy
        # must see each result before the next; binding awaits); bounded, see _on_tunnel_add
        self._pending_adds: deque[TunnelAdd | TunnelRemove] = deque()  # in order: a remove after its add
        self._adding: asyncio.Task[None] | None = None
        self.pushed: dict[str, TunnelSpec] = {}  # dashboard tunnels pushed to this session, by name

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
            self.listener.config.handshake_timeout, self._handshake_expired
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
        # The only other stream a relayc may open is a visit to a secret tunnel (its first message
        # says which; anything else closes the session).  Nothing on relayd itself is reachable.
        return self.registry.peer_stream(self, mux, stream_id)

    def _go_away(self, mux: MuxConnection, code: int) -> None:
        who = self.name or self.remote_addr
        if code == GoAwayCode.NORMAL:
            log.info("client %s: relayc is stopping (GO_AWAY NORMAL)", who)
        else:
            log.info("client %s: relayc ends the session (GO_AWAY %s)", who, go_away_name(code))
        self.release_tunnels()

    def _closed(self, mux: MuxConnection, exc: BaseException | None) -> None:
        self.cancel_handshake_timer()
        was_ready = self.ready
        self.state = SessionState.CLOSED
        for task in self._tasks:
            task.cancel()
        self.release_tunnels()
        self.refusals.clear()
        self.listener.session_closed(self)
        self.registry.session_closed(self)
        if was_ready:
            session = self.mux.session
            if isinstance(exc, PeerTimeoutError):
                why = f": no answer from it for {self.listener.config.keepalive_timeout:g} s (keepalive_timeout)"
            elif exc is None and session is not None and session.go_away_sent and session.go_away_received is None:
                why = " (relayd closed the session)"  # relayd stopping, the client kicked or replaced
            else:
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
                self.listener.config.handshake_timeout,
            )
            self.mux.abort()

    # --- control messages -----------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        state = self.state
        try:
            if isinstance(message, Hello) and state is SessionState.HELLO:
                self._on_hello(message)
            elif isinstance(message, Login) and state is SessionState.CHALLENGED:
                self._on_login(message)
            elif isinstance(message, (TunnelAdd, TunnelRemove)) and state is SessionState.READY and not self.role:
                self._on_tunnel_add(message)
            elif isinstance(message, TunnelHealth) and state is SessionState.READY and not self.role:
                self.registry.set_health(self, message.name, message.healthy, message.error)
            elif isinstance(message, TunnelPushRefused) and state is SessionState.READY:
                self._on_push_refused(message)
            else:
                raise RemoteProtocolError(f"unexpected {message.type} message in state {state.value}")
        except RemoteProtocolError as exc:
            self.mux.fail(exc)

    def send(self, message: Message) -> None:
        if self.control is not None and self.mux.is_open:
            self.control.send(message)

    def _on_hello(self, hello: Hello) -> None:
        self.version = hello.version
        self.role = hello.role
        try:
            self.name = check_name(hello.name)
        except ValueError as exc:
            self.registry.burst_log.warning(f"bad-name:{self.remote_addr}", "login refused: client from %s sent the "
                                          "name %r: %s", self.remote_addr, hello.name, exc)  # fmt: skip
            self._refuse(LoginFailed(reason=f"client name {hello.name!r} {exc}", code=LoginRefusal.BAD_NAME.value))
            return
        self._client_nonce = hello.client_nonce
        self._server_nonce = auth.new_nonce()
        self.state = SessionState.CHALLENGED
        self.send(Challenge(server_nonce=self._server_nonce))

    def _on_login(self, login: Login) -> None:
        registry = self.registry
        guard = registry.guard
        now = time.monotonic()
        until = guard.pair_blocked_until(self.remote_addr, self.name, now)
        if until is not None:  # not even checked: blocked means no more guesses
            self._refuse(_blocked(until, now))
            return
        token = registry.token_for(self.name)
        args = (self.name, self._client_nonce, self._server_nonce, self.listener.fingerprint)
        if token is None or not auth.proofs_equal(login.proof, auth.client_proof(token, *args)):
            self.state = SessionState.FAILED
            # counted now, not after the delay: parallel guesses are counted as they come
            failure = guard.record_failure(self.remote_addr, self.name, now)
            self._spawn(self._refuse_wrong_token(failure))
            return
        guard.record_success(self.remote_addr, self.name)
        self.token_used = token
        old = registry.sessions.get(self.name)
        if old is not None and old is not self and old.ready and not self.role:
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
        holder = self.registry.sessions.get(self.name)
        if holder is None or holder is self or not holder.ready or (holder is old and not alive):
            self._complete_login(proof)
            return
        since = _iso(holder.logged_in_at)
        self.registry.burst_log.warning(
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
        if self.registry.token_for(self.name) != self.token_used:
            # disabled, deleted or given a new token while the name clash was being settled
            self._refuse(LoginFailed(reason="wrong token", code=LoginRefusal.WRONG_TOKEN.value))
            return
        if self.role and not self.registry.visitor_slot(self.name):
            self._refuse(LoginFailed(reason=f"client {self.name!r} has too many visitor sessions open",
                                     code=LoginRefusal.TOO_MANY_SESSIONS.value, retry_after=10))  # fmt: skip
            return
        self.listener.left_preauth(self)
        self.state = SessionState.READY
        self.logged_in_at = time.time()
        self.mux.output_limit = 0  # from now on a backed-up connection pauses its reading instead
        self.mux.label = f"client {self.name} ({self.remote_addr})"
        self.cancel_handshake_timer()
        members = tuple(f"{m.addr} {m.fingerprint}" for m in self.registry.members[:64])
        self.send(LoginOk(proof=proof, version=__version__, members=members))
        if self.role:
            log.info("client %s: visitor session from %s (relayc %s)", self.name, self.remote_addr, self.version or "?")
            self.registry.register_visitor(self)
            return
        log.info("client %s logged in from %s (relayc %s)", self.name, self.remote_addr, self.version or "?")
        self.registry.register(self)

    async def _refuse_wrong_token(self, failure: Failure) -> None:
        guard, addr, name = self.registry.guard, self.remote_addr, self.name
        burst = self.registry.burst_log
        burst.warning(f"login:{addr}:{name}", "login failed: client %r from %s: wrong token", name, addr)
        if failure.pair_blocked:
            log.warning("login: client %r from %s blocked for %.0f s after %d failed logins", name, addr,
                        guard.block_seconds, failure.failures)  # fmt: skip
            self.registry.share_block(BlockKind.CLIENT, addr, name, guard.block_seconds)
        if failure.address_blocked:
            log.warning("login: address %s blocked for %.0f s: its failed logins name several clients (a scanner)",
                        addr, guard.block_seconds)  # fmt: skip
            self.registry.share_block(BlockKind.ADDRESS, addr, "", guard.block_seconds)
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

    def _on_tunnel_add(self, message: TunnelAdd | TunnelRemove) -> None:
        """Queue a registration (or a removal: it is handled in order with the adds, so a remove
        never overtakes the add it follows).  Past ``PENDING_ADDS_HIGH`` waiting, the control
        stream's credit is held back, so the client can send at most one more window of them; a
        client that still piles up ``PENDING_ADDS_MAX`` is breaking the protocol."""
        if isinstance(message, TunnelRemove):
            try:
                check_name(message.name)
            except ValueError as exc:
                raise RemoteProtocolError(f"bad tunnel_remove message: field name: {exc}") from None
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
                if isinstance(message, TunnelRemove):
                    self._remove_tunnel(message.name)
                else:
                    await self._add_tunnel(message)
                # an add that opened no listener awaited nothing: let visitors and other
                # sessions in between registrations (6,000 in one go held the loop 0.4 s)
                await asyncio.sleep(0)
        finally:
            self._adding = None

    async def _add_tunnel(self, message: TunnelAdd) -> None:
        spec = message.tunnel
        if isinstance(spec, InvalidTunnel):
            self.refuse_tunnel(spec.name, TunnelRefusal.BAD_SPEC, spec.problem)
            return
        try:
            tunnel = await self.registry.open_tunnel(self, spec)
        except TunnelRefused as exc:
            self.refuse_tunnel(spec.name, exc.reason, str(exc))
            return
        if tunnel is None:  # the session ended meanwhile
            return
        log.info("client %s tunnel %s (%s): %s -> %s:%d", self.name, spec.name, spec.type.value, tunnel.public,
                 spec.local_ip, spec.local_port)  # fmt: skip
        url = "" if spec.type is TunnelKind.TCP else tunnel.public
        self.send(TunnelStatus(name=spec.name, ok=True, remote_port=tunnel.port, url=url))

    def _remove_tunnel(self, name: str) -> None:
        """relayc's ``tunnel_remove`` (its config was reloaded without that tunnel): close it and
        forget why it was refused; a name it has nothing open under is no error (a refused tunnel,
        or one relayd closed meanwhile)."""
        self.refusals.pop(name, None)
        tunnel = self.tunnels.pop(name, None)
        if name in self.pushed:  # relayd's own tunnel: the client does not serve it any more
            self.remember_refusal(name, TunnelRefusal.CLIENT_REFUSED, "removed by the client")
        if tunnel is None:
            return
        self.registry.close_tunnel(tunnel, client_gone=False)
        log.info("client %s tunnel %s: removed by the client", self.name, name)

    def refuse_tunnel(self, name: str, reason: TunnelRefusal, text: str) -> None:
        """Tell relayc why a tunnel is refused; the registry remembers and logs it."""
        self.registry.refused(self, name, reason, text)
        self.send(TunnelStatus(name=name, ok=False, error=text[:4096], code=reason.value))

    def remember_refusal(self, name: str, reason: TunnelRefusal, text: str) -> None:
        refusals = self.refusals
        refusals.pop(name, None)
        refusals[name] = (reason, text[:REFUSAL_TEXT_MAX])
        if len(refusals) > REFUSALS_KEPT:
            del refusals[next(iter(refusals))]

    def _on_push_refused(self, message: TunnelPushRefused) -> None:
        if message.name not in self.pushed:
            return  # not a tunnel relayd pushed to this client: nothing to remember
        log.warning("client %s refused pushed tunnel %s: %s", self.name, message.name, message.error)
        self.remember_refusal(message.name, TunnelRefusal.CLIENT_REFUSED, message.error)

    def push(self, spec: TunnelSpec) -> None:
        """Offer relayc a dashboard tunnel (it answers with tunnel_add or tunnel_push_refused)."""
        self.pushed[spec.name] = spec
        self.send(TunnelPush(tunnel=spec))

    def unpush(self, name: str) -> None:
        """A dashboard tunnel was deleted or disabled: close it here and tell relayc."""
        self.pushed.pop(name, None)
        self.refusals.pop(name, None)
        tunnel = self.tunnels.pop(name, None)
        if tunnel is not None:
            self.registry.close_tunnel(tunnel, client_gone=False)
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
            self.registry.close_tunnel(tunnel, client_gone=True)
        self.tunnels.clear()


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _blocked(until: float, now: float) -> LoginFailed:
    """The answer to a login from a blocked (address, name): "blocked until T", with T as UTC."""
    left = max(0.0, until - now)
    return LoginFailed(reason=f"wrong token, blocked until {_iso(time.time() + left)}",
                       code=LoginRefusal.BLOCKED.value, retry_after=math.ceil(left))  # fmt: skip
