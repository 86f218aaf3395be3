"""relayc: keep one verified, authenticated session to relayd, forever.

Theory of operation
===================

``Relayc.run()`` loops: connect, verify, log in, register tunnels, serve until the session ends,
then wait (``ReconnectDelay``: exponential backoff with jitter, capped near 10 s; after a refused
login longer, by relayd's ``code`` and ``retry_after``: a wrong token 10 s doubling to 5 min, a
name held by a live session 60 s doubling to 10 min) and start again.  It never gives up, not
even when the first login fails: a lab machine left alone must come back by itself.

Verification happens right after the TLS handshake and before anything derived from the token
is sent.  Three modes:
  * ``tls.server_name`` set: the system CAs (or ``tls.ca_file``) verify the chain and the name;
  * ``tls.server_fingerprint`` set: the certificate's SHA-256 must equal the pin;
  * neither: trust on first use.  The fingerprint seen is remembered in ``relayc_known_servers``
    in relayc's ``state_dir`` (default: the config's folder), but only after relayd proved it
    knows the token (the ``login_ok`` proof); later a different certificate is refused, like
    ssh's known_hosts.

The config can change under a running relayc (``reload.py``: SIGHUP, or the file changed):
``apply_config`` sends every logged-in session ``tunnel_add`` for tunnels added or changed (relayd
replaces one of the same name) and ``tunnel_remove`` for those gone, and touches nothing else, so
the visitors of unchanged tunnels never notice.  ``snapshot`` is what ``relayc status`` shows
(``status.py``): per node whether it is logged in, per tunnel relayd's last ``tunnel_status`` and
the health verdict, and the connections and bytes ``IncomingStream`` counted as it joined streams
to local services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import ssl
import time
from pathlib import Path
from typing import Any

from relay_client.dialer import IncomingStream
from relay_client.health import HealthChecks
from relay_client.visitor import VisitorPorts
from shared import __version__, auth
from shared.aio import ControlChannel, MuxConnection, StreamHandler, TrafficCounters
from shared.burst import BurstLog
from shared.checks import split_host_port
from shared.config import ClientConfig, TargetPolicy, resolve_path
from shared.errors import AuthError, PeerTimeoutError, RelayError, RemoteProtocolError, TrustError
from shared.frames import GoAwayCode, go_away_name
from shared.messages import (
    Challenge,
    ClusterMembers,
    Hello,
    Login,
    LoginFailed,
    LoginOk,
    LoginRefusal,
    Message,
    TunnelAdd,
    TunnelPush,
    TunnelPushRefused,
    TunnelRemove,
    TunnelStatus,
    encode_message,
)
from shared.tls import client_context, fingerprint_of_der
from shared.tunnel import InvalidTunnel, TunnelSpec

log = logging.getLogger("relayc")

KNOWN_SERVERS_FILE = "relayc_known_servers"
BACKOFF_START = 0.5
BACKOFF_MAX = 10.0
STEP_TIMEOUT = 10.0
# After a refused login relayc waits longer: a wrong token will not fix itself in seconds, and a
# name held by a live session means another relayc runs under this name (retrying fast would make
# the two flap).  Each doubles per refusal in a row, up to its cap.
WRONG_TOKEN_BACKOFF = (10.0, 300.0)
NAME_IN_USE_BACKOFF = (60.0, 600.0)
RETRY_AFTER_MAX = 600.0
MAX_LEARNED_NODES = 64  # sessions relayc opens to nodes a cluster told it of (a member list holds 64)


class ReconnectDelay:
    """How long to wait before the next attempt, from how the last one ended.  No clock, no I/O;
    jitter is applied by the caller."""

    def __init__(self) -> None:
        self.failures = 0  # attempts in a row that did not log in
        self.refusals = 0  # of those, refused logins of the same kind in a row
        self._last_code = ""

    def next(self, served: bool, error: BaseException | None) -> float:
        if served:
            self.failures = self.refusals = 0
            self._last_code = ""
            return BACKOFF_START
        self.failures += 1
        if not isinstance(error, AuthError) or not error.code:
            self.refusals = 0
            self._last_code = ""
            return min(BACKOFF_MAX, BACKOFF_START * 2.0 ** (self.failures - 1))
        self.refusals = self.refusals + 1 if error.code == self._last_code else 1
        self._last_code = error.code
        start, cap = NAME_IN_USE_BACKOFF if error.code == LoginRefusal.NAME_IN_USE.value else WRONG_TOKEN_BACKOFF
        delay = min(cap, start * 2.0 ** (self.refusals - 1))
        return max(delay, min(float(error.retry_after), RETRY_AFTER_MAX))


class KnownServers:
    """Trust-on-first-use memory: lines of ``host:port sha256:...``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        try:
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    entries[parts[0]] = parts[1]
        except FileNotFoundError:
            pass
        return entries

    def get(self, server: str) -> str | None:
        return self._entries().get(server)

    def remember(self, server: str, fingerprint: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"{server} {fingerprint}\n")


class _ClientSession:
    """One attempt: a connection from TLS handshake to close."""

    def __init__(self, relayc: Relayc, link: NodeLink) -> None:
        self.relayc = relayc
        self.link = link
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.control: ControlChannel | None = None
        self.logged_in = False
        self.fingerprint = ""  # relayd's certificate, as verified ("" without TLS)
        self.go_away_code: int | None = None  # relayd's GO_AWAY, if it sent one
        self.mux = MuxConnection(
            client=True,
            keepalive_timeout=relayc.config.keepalive_timeout,
            on_stream_opened=self._stream_opened,
            on_go_away=self._go_away,
            on_closed=self._closed,
            label="relayd session",
        )

    def _stream_opened(self, mux: MuxConnection, stream_id: int) -> StreamHandler | None:
        if not self.logged_in or stream_id % 2:
            return None
        relayc = self.relayc
        return IncomingStream(mux, stream_id, relayc.tunnel_spec, relayc.burst_log, relayc.counters_for)

    def _go_away(self, mux: MuxConnection, code: int) -> None:
        self.go_away_code = code
        if not self.logged_in:
            # a refused login comes with GO_AWAY AUTH_FAILED: the login_failed reason is what
            # gets logged (once), not a "going away" before it
            log.debug("relayd sent GO_AWAY %s before login", go_away_name(code))
        elif code == GoAwayCode.REPLACED:
            log.warning("relayd closed this session: another relayc logged in as %r", self.relayc.config.name)
        else:
            log.info("relayd is going away (%s); will reconnect when the session ends", go_away_name(code))

    def _closed(self, mux: MuxConnection, exc: BaseException | None) -> None:
        self.messages.put_nowait(None)

    def on_message(self, message: Message) -> None:
        self.messages.put_nowait(message)

    async def next_message(self, timeout: float | None = STEP_TIMEOUT) -> Any:
        try:
            message = await asyncio.wait_for(self.messages.get(), timeout)
        except asyncio.TimeoutError:
            raise RelayError(f"no answer from relayd within {timeout:g} s") from None
        if message is None:
            raise RelayError(self.why_closed())
        return message

    def why_closed(self) -> str:
        """Who ended the session, and why: relayc itself (stopping, relayd silent or breaking the
        protocol) is never reported as "closed by relayd"."""
        err = self.mux.error
        if self.link.stopping:
            return "relayc is stopping"
        if isinstance(err, PeerTimeoutError):
            return f"no answer from relayd for {self.relayc.config.keepalive_timeout:g} s (keepalive_timeout)"
        if isinstance(err, RemoteProtocolError):
            return f"relayc closed the session: relayd broke the protocol: {err}"
        if self.go_away_code is not None:
            return f"connection closed by relayd (GO_AWAY {go_away_name(self.go_away_code)})"
        if isinstance(err, OSError):
            return f"connection to relayd lost: {err.strerror or err}"
        return f"connection closed by relayd{f': {err}' if err else ''}"


class NodeLink:
    """One relayd node: its own session loop (connect, verify, log in, register every tunnel,
    serve; reconnect with backoff).  A single relayd is one link; a cluster is one link per node.
    ``pin``: the fingerprint a cluster's member list gave for a node relayc learned of."""

    def __init__(self, relayc: Relayc, host: str, port: int, pin: str = "", learned: bool = False) -> None:
        self.relayc = relayc
        self.host = host
        self.port = port
        self.pin = pin
        self.learned = learned
        self.server_key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.pushed: set[str] = set()  # tunnels this node pushed (sent again after each login)
        self.current: _ClientSession | None = None
        self.answers: dict[str, TunnelStatus] = {}  # relayd's tunnel_status per tunnel, this session
        self.since: float | None = None  # when the last session logged in or ended (unix time)
        self.last_error = ""  # why the last attempt or session ended ("" while logged in)
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Connect and serve forever, reconnecting with backoff after any failure."""
        backoff = ReconnectDelay()
        while not self._stopping:
            error: BaseException | None = None
            message = ""
            try:
                served = await self.run_once()
            except (OSError, asyncio.TimeoutError, RelayError, ssl.SSLError) as exc:
                served = False
                error = exc
                message = str(exc) or exc.__class__.__name__
                if isinstance(exc, asyncio.TimeoutError):
                    message = "timed out"
                self.last_error = message
            except Exception:
                served = False
                self.last_error = "internal error"
                log.exception("unexpected error in the session with relayd at %s; reconnecting", self.server_key)
            if self._stopping:
                break
            if isinstance(error, (AuthError, TrustError)):
                log.error("%s", message)  # a refused login: its reason, once (no "going away" before it)
            elif error is not None:
                log.warning("cannot connect to relayd at %s: %s", self.server_key, message)
            if self.learned and self.server_key not in self.relayc.last_members:
                log.info("cluster: node %s is not a member any more; no more attempts to connect", self.server_key)
                break
            delay = backoff.next(served, error) * random.uniform(0.8, 1.2)
            if isinstance(error, AuthError) and error.code:
                log.warning("relayd refused the login (%s): reconnecting in %.0f s", error.code, delay)
            else:
                log.info("reconnecting in %.1f s (relayd at %s)", delay, self.server_key)
            try:
                await asyncio.wait_for(self._stop_event.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def open_session(self, role: str = "") -> _ClientSession:
        """Connect, verify relayd and log in (``role="visitor"``: a visitor-only session, which
        registers nothing and never conflicts with this client's own session)."""
        cfg = self.relayc.config
        loop = asyncio.get_running_loop()
        session = _ClientSession(self.relayc, self)
        ssl_ctx: ssl.SSLContext | None = None
        server_hostname: str | None = None
        if cfg.tls.enable:
            ca_file = str(resolve_path(self.relayc.config_path, cfg.tls.ca_file)) if cfg.tls.ca_file else ""
            ssl_ctx = client_context(cfg.tls.server_name, ca_file)
            server_hostname = cfg.tls.server_name or self.host
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: session.mux,
                    self.host,
                    self.port,
                    ssl=ssl_ctx,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=STEP_TIMEOUT if ssl_ctx else None,
                ),
                STEP_TIMEOUT * 2,
            )
        except asyncio.TimeoutError:
            raise RelayError(f"no answer from relayd within {STEP_TIMEOUT * 2:g} s (connecting)") from None
        try:
            session.fingerprint = self._verify_server(session.mux)
            await self._login(session, session.fingerprint, role)
        except BaseException:
            session.mux.close()
            raise
        return session

    async def run_once(self) -> bool:
        """One session.  Returns True if it logged in (so the backoff starts over)."""
        relayc = self.relayc
        session = await self.open_session()
        self.current = session
        self.answers.clear()
        self.since, self.last_error = time.time(), ""
        relayc.unpush_all(self)
        try:
            relayc.link_up(self)
            for spec in list(relayc.own_tunnels.values()):
                session.control.send(TunnelAdd(tunnel=spec))  # type: ignore[union-attr]
            relayc.health.report_to(session)
            while True:
                message = await session.next_message(timeout=None)
                self._on_message(message)
        except RelayError as exc:
            self.last_error = str(exc)
            if self._stopping:
                log.info("session with relayd at %s closed: relayc is stopping", self.server_key)
            else:
                log.warning("session with relayd at %s ended: %s", self.server_key, exc)
            return True
        finally:
            self.since = time.time()
            self.answers.clear()
            self.current = None
            relayc.link_down(self)
            session.mux.close()

    @property
    def logged_in(self) -> bool:
        session = self.current
        return session is not None and session.logged_in and session.mux.is_open

    def _verify_server(self, mux: MuxConnection) -> str:
        relayc = self.relayc
        cfg = relayc.config
        if not cfg.tls.enable:
            log.warning("TLS is disabled (tls.enable = false): relayd is not verified and traffic is readable")
            return ""
        assert mux.transport is not None
        ssl_object = mux.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise TrustError(f"relayd at {self.server_key} presented no certificate")
        fingerprint = fingerprint_of_der(der)
        if cfg.tls.server_name:
            return fingerprint  # chain and name were verified by the TLS handshake
        pins = [self.pin] if self.pin else cfg.tls.server_fingerprint
        if pins:
            if fingerprint not in pins:
                source = f"the cluster's member list ({self.pin})" if self.pin else \
                    f"tls.server_fingerprint {', '.join(pins)} in {relayc.config_path}"  # fmt: skip
                raise TrustError(
                    f"relayd at {self.server_key} presented certificate {fingerprint}, which does not match "
                    f"{source}: refusing to log in. "
                    "If relayd's certificate was replaced on purpose, set tls.server_fingerprint to the "
                    "fingerprint relayd logs at start."
                )
            return fingerprint
        known = relayc.known.get(self.server_key)
        if known is not None and known != fingerprint:
            raise TrustError(
                f"the certificate of relayd at {self.server_key} CHANGED: it is now {fingerprint}, but {known} "
                f"is remembered in {relayc.known.path}: refusing to log in (someone may be intercepting). "
                f"If relayd's certificate was regenerated on purpose, compare with the fingerprint relayd logs "
                f"at start, then delete the line for {self.server_key} from {relayc.known.path} or set "
                "tls.server_fingerprint."
            )
        return fingerprint

    async def _login(self, session: _ClientSession, fingerprint: str, role: str = "") -> None:
        relayc = self.relayc
        cfg = relayc.config
        mux = session.mux
        control = ControlChannel(mux, session.on_message, lambda: mux.close())
        session.control = control
        client_nonce = auth.new_nonce()
        control.stream_id = mux.open_stream(
            control, encode_message(Hello(name=cfg.name, version=__version__, client_nonce=client_nonce, role=role))
        )
        challenge = await session.next_message()
        if not isinstance(challenge, Challenge):
            raise RemoteProtocolError(f"expected a challenge from relayd, got {challenge.type}")
        args = (cfg.name, client_nonce, challenge.server_nonce, fingerprint)
        control.send(Login(proof=auth.client_proof(cfg.auth.token, *args)))
        answer = await session.next_message()
        if isinstance(answer, LoginFailed):
            if answer.code == LoginRefusal.NAME_IN_USE.value:
                hint = f"another relayc runs as {cfg.name!r}; set a unique name in {relayc.config_path}"
            elif answer.code == LoginRefusal.BAD_NAME.value:
                hint = f"check name in {relayc.config_path}"
            else:
                hint = "check auth.token against relayd.toml"
            raise AuthError(
                f"login to relayd at {self.server_key} failed: {answer.reason} ({hint})",
                code=answer.code,
                retry_after=answer.retry_after,
            )
        if not isinstance(answer, LoginOk):
            raise RemoteProtocolError(f"expected login_ok from relayd, got {answer.type}")
        if not auth.proofs_equal(answer.proof, auth.server_proof(cfg.auth.token, *args)):
            raise TrustError(f"relayd at {self.server_key} accepted the login but could not prove it knows the token")
        if cfg.tls.enable and not cfg.tls.server_name and not cfg.tls.server_fingerprint and not self.pin:
            if relayc.known.get(self.server_key) is None:
                relayc.known.remember(self.server_key, fingerprint)
                log.warning(
                    "trusting relayd at %s on first use: %s (remembered in %s)",
                    self.server_key,
                    fingerprint,
                    relayc.known.path,
                )
        session.logged_in = True
        log.info("logged in to relayd %s at %s as %r", answer.version or "?", self.server_key, cfg.name)
        if answer.members and not role:
            relayc.cluster_members(self, answer.members)

    def _on_message(self, message: Message) -> None:
        relayc = self.relayc
        if isinstance(message, TunnelPush):
            relayc.on_push(self, message.tunnel)
            return
        if isinstance(message, TunnelRemove):
            relayc.unpush(self, message.name)
            return
        if isinstance(message, ClusterMembers):
            relayc.cluster_members(self, message.members)
            return
        if isinstance(message, TunnelStatus):
            if relayc.tunnel_spec(message.name) is not None:
                self.answers[message.name] = message
            spec = relayc.tunnel_spec(message.name)
            where = f" (relayd at {self.server_key})" if len(relayc.links) > 1 else ""
            if message.ok:
                if self.current is not None:
                    relayc.health.tunnel_registered(self.current, message.name)
                target = f"{spec.local_ip}:{spec.local_port}" if spec else "?"
                if message.url:
                    log.info("tunnel %s: %s -> %s%s", message.name, message.url, target, where)
                else:
                    log.info("tunnel %s: relayd port %d -> %s%s", message.name, message.remote_port, target, where)
            else:
                log.error("tunnel %s refused by relayd: %s%s", message.name, message.error, where)
        else:
            raise RemoteProtocolError(f"unexpected {message.type} message from relayd")

    def stop(self) -> None:
        """Stop reconnecting; tell relayd we go away and close the current session."""
        self._stopping = True
        self._stop_event.set()
        if self.current is not None:
            self.current.mux.close(GoAwayCode.NORMAL)

    @property
    def stopping(self) -> bool:
        return self._stopping


class Relayc:
    """One relayc: its tunnels, its visitors and health checks, and a ``NodeLink`` per relayd node
    (``server_addr``, plus the nodes a cluster's member list names)."""

    def __init__(self, config: ClientConfig, config_path: str | Path) -> None:
        self.config = config
        self.config_path = Path(config_path)
        self.own_tunnels: dict[str, TunnelSpec] = {t.name: t for t in config.tunnels}
        self.pushed_specs: dict[str, TunnelSpec] = {}  # tunnels some node pushed, by name
        self.targets = TargetPolicy(config.allow_targets)
        self.burst_log = BurstLog(log)
        self.state_dir = resolve_path(config_path, config.state_dir)
        self.known = KnownServers(self.state_dir / KNOWN_SERVERS_FILE)
        self.links: dict[str, NodeLink] = {}
        self.last_members: set[str] = set()  # the nodes the last member list named
        for address in config.server_addr:
            host, port = split_host_port(address, config.server_port)
            link = NodeLink(self, host, port)
            self.links.setdefault(link.server_key, link)
        self.server_key = next(iter(self.links))  # the first configured node (for messages)
        self._stopping = False
        self.connected = asyncio.Event()  # some link is logged in
        self.health = HealthChecks(self)
        self.visitor_ports = VisitorPorts(config.visitors, self.current_visit_target, config.name)
        # visitor connections and bytes per tunnel, counted here as streams are joined to local
        # services (``relayc status``); a bridge counts from its socket's side, the local service
        self.counters: dict[str, TrafficCounters] = {}
        self.started = time.time()

    @property
    def tunnels(self) -> dict[str, TunnelSpec]:
        """Every tunnel this relayc serves: its own and those pushed (and still pushed) by relayd."""
        return {**self.pushed_specs, **self.own_tunnels}

    def tunnel_spec(self, name: str) -> TunnelSpec | None:
        spec = self.own_tunnels.get(name)
        if spec is not None:
            return spec
        spec = self.pushed_specs.get(name)
        if spec is not None and not self.targets.allows(spec.local_ip, spec.local_port):
            return None  # checked at push time already; checked again right before any dial
        return spec

    def counters_for(self, name: str) -> TrafficCounters:
        """The counters of tunnel ``name`` (one this relayc serves: its spec was just found)."""
        counters = self.counters.get(name)
        if counters is None:
            counters = self.counters[name] = TrafficCounters()
        return counters

    async def run(self) -> None:
        """Serve through every node forever."""
        await self.visitor_ports.start()
        for link in list(self.links.values()):
            self._start(link)
        while not self._stopping:
            tasks = [link.task for link in self.links.values() if link.task is not None]
            if not tasks:
                return
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for key, link in list(self.links.items()):
                if link.task is not None and link.task.done() and link.learned and self.links.get(key) is link:
                    del self.links[key]

    def _start(self, link: NodeLink) -> None:
        link.task = asyncio.get_running_loop().create_task(link.run())

    async def open_session(self, role: str = "") -> _ClientSession:
        """A session with the first configured node (``relayc connect``)."""
        return await self.links[self.server_key].open_session(role)

    def link_up(self, link: NodeLink) -> None:
        self.connected.set()

    def link_down(self, link: NodeLink) -> None:
        if not any(other.logged_in for other in self.links.values() if other is not link):
            self.connected.clear()

    def logged_in_sessions(self) -> list[_ClientSession]:
        return [link.current for link in self.links.values() if link.current is not None and link.logged_in]

    def current_visit_target(self) -> tuple[MuxConnection, str] | None:
        """A logged-in session's mux and relayd's fingerprint, for a visit (None: not connected)."""
        for session in self.logged_in_sessions():
            return session.mux, session.fingerprint
        return None

    # --- the cluster ----------------------------------------------------------------------------

    def cluster_members(self, via: NodeLink, members: tuple[str, ...] | list[str]) -> None:
        """A node's list of the cluster's live nodes ("host:port sha256:..."): keep a session with
        each (trusting each certificate because a verified node named it); stop those relayc
        learned of that are not listed any more (configured ones are kept, retried)."""
        listed: dict[str, tuple[str, int, str]] = {}
        for entry in members:
            address, _, fingerprint = entry.partition(" ")
            try:
                host, port = split_host_port(address, self.config.server_port)
            except ValueError:
                log.warning("relayd at %s listed a malformed member %r; ignored", via.server_key, entry[:100])
                continue
            key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listed[key] = (host, port, fingerprint)
        if self._stopping:
            return
        self.last_members = set(listed)
        for key, (host, port, fingerprint) in listed.items():
            known = self.links.get(key)
            learned = sum(1 for link in self.links.values() if link.learned and not link.stopping)
            if (known is None or known.stopping) and learned >= MAX_LEARNED_NODES:
                log.warning("cluster: not connecting to %s: already %d learned nodes", key, learned)
                continue
            if known is None or known.stopping:
                log.info("cluster: relayd at %s told of node %s (%s); connecting", via.server_key, key, fingerprint)
                link = self.links[key] = NodeLink(self, host, port, pin=fingerprint, learned=True)
                self._start(link)
        for key, link in list(self.links.items()):
            # a learned node missing from the list goes only if relayc has no live session with it:
            # a list made while the database was down may miss nodes that are fine
            if link.learned and key not in listed and not link.logged_in and not link.stopping:
                log.info("cluster: node %s left the cluster; no more attempts to connect", key)
                link.stop()

    # --- pushed tunnels -------------------------------------------------------------------------

    def on_push(self, link: NodeLink, spec: TunnelSpec | InvalidTunnel) -> None:
        """A tunnel defined on relayd: dial targets outside allow_targets are refused before any dial."""
        session = link.current
        control = session.control if session else None
        if control is None:
            return
        if isinstance(spec, InvalidTunnel):  # from a relayd with other rules than ours
            log.warning("tunnel %s pushed by relayd refused: %s", spec.name, spec.problem)
            control.send(TunnelPushRefused(name=spec.name, error=spec.problem))
            return
        if spec.name in self.own_tunnels:
            reason = f"a tunnel named {spec.name!r} is already defined in {self.config_path.name}"
        elif not self.targets.allows(spec.local_ip, spec.local_port):
            reason = (f"target {spec.local_ip}:{spec.local_port} is not in allow_targets of "
                      f"{self.config_path.name} ({', '.join(self.config.allow_targets)})")  # fmt: skip
        else:
            reason = ""
        if reason:
            log.warning("tunnel %s pushed by relayd refused: %s", spec.name, reason)
            control.send(TunnelPushRefused(name=spec.name, error=reason))
            return
        self.pushed_specs[spec.name] = spec
        link.pushed.add(spec.name)
        control.send(TunnelAdd(tunnel=spec))

    def unpush(self, link: NodeLink, name: str) -> None:
        if name in link.pushed:
            link.pushed.discard(name)
            if not any(name in other.pushed for other in self.links.values()):
                self.pushed_specs.pop(name, None)
            log.info("tunnel %s: removed by relayd", name)

    def unpush_all(self, link: NodeLink) -> None:
        """A node's session starts over: what it pushed will be pushed again."""
        for name in list(link.pushed):
            link.pushed.discard(name)
            if not any(name in other.pushed for other in self.links.values()):
                self.pushed_specs.pop(name, None)

    def stop(self) -> None:
        """Stop reconnecting; tell every relayd we go away and close the sessions."""
        self._stopping = True
        self.visitor_ports.close()
        self.health.stop()
        for link in self.links.values():
            link.stop()

    # --- reload ---------------------------------------------------------------------------------

    async def apply_config(self, new: ClientConfig, why: str) -> None:
        """Take a config read again (SIGHUP, or the file changed): tunnels added are registered,
        removed ones removed, changed ones replaced on every logged-in session; unchanged ones keep
        their visitors.  Visitor ports and ``allow_targets`` follow too; what only a restart can
        change (the nodes, the name, the token, TLS, timeouts, state_dir) is logged as such."""
        old = self.config
        path = self.config_path
        restart = [key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key)]
        wanted = {t.name: t for t in new.tunnels}
        for name in [n for n in wanted if n not in self.own_tunnels and n in self.pushed_specs]:
            log.error("tunnel %s in %s: not added: relayd serves a tunnel of that name defined in its dashboard; "
                      "rename one of them", name, path)  # fmt: skip
            del wanted[name]
        removed = [n for n in self.own_tunnels if n not in wanted]
        added = [n for n in wanted if n not in self.own_tunnels]
        changed = [n for n in wanted if n in self.own_tunnels and wanted[n] != self.own_tunnels[n]]
        self.own_tunnels = wanted
        self.config = dataclasses.replace(old, tunnels=list(wanted.values()), visitors=new.visitors,
                                          allow_targets=new.allow_targets)  # fmt: skip
        self.targets = TargetPolicy(new.allow_targets)
        for name in removed + changed:
            self.health.states.pop(name, None)  # a replaced tunnel is probed afresh
            for link in self.links.values():
                link.answers.pop(name, None)
        for name in removed:
            self.counters.pop(name, None)
        for session in self.logged_in_sessions():
            if session.control is None:
                continue
            for name in removed:
                session.control.send(TunnelRemove(name=name))
            for name in added + changed:
                session.control.send(TunnelAdd(tunnel=wanted[name]))
        visitors = await self.visitor_ports.update(new.visitors)
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", added), ("removed", removed), ("replaced", changed)) if names]  # fmt: skip
        if visitors:
            parts.append(visitors)
        log.info("reloaded %s (%s): %s", path, why, "; ".join(parts) if parts else "no tunnel or visitor changed")
        if restart:
            log.warning("%s: %s changed: that needs a restart of relayc; it goes on with the values it started with",
                        path, ", ".join(restart))  # fmt: skip

    # --- relayc status --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What ``relayc status`` shows: the nodes, and each tunnel's state, public address and
        traffic (``bytes_in``: visitors to the local service; ``bytes_out``: back to visitors)."""
        links = list(self.links.values())
        nodes = [{"addr": link.server_key, "connected": link.logged_in, "since": link.since,
                  "error": "" if link.logged_in else link.last_error} for link in links]  # fmt: skip
        tunnels = []
        own_first = {**self.own_tunnels, **{n: t for n, t in self.pushed_specs.items() if n not in self.own_tunnels}}
        for name, spec in own_first.items():
            answers = [(link, link.answers.get(name)) for link in links if link.logged_in]
            ok = [(link, a) for link, a in answers if a is not None and a.ok]
            refused = [a for _, a in answers if a is not None and not a.ok]
            public = ", ".join(dict.fromkeys(a.url or f"{link.host}:{a.remote_port}" for link, a in ok))
            error = ""
            if ok:
                state = "active"
                health = self.health.states.get(name)
                if health is not None and health.reported is False:
                    state, error = "service down", health.error
            elif refused:
                state, error = "refused", refused[0].error
            else:
                state = "pending"
                error = "waiting for relayd's answer" if answers else "not connected to relayd"
            counters = self.counters.get(name) or TrafficCounters()
            tunnels.append({
                "name": name,
                "type": spec.type.value,
                "source": "config" if name in self.own_tunnels else "relayd",
                "local": f"{spec.local_ip}:{spec.local_port}",
                "state": state,
                "public": public,
                "conns_open": counters.conns_open,
                "conns_total": counters.conns_total,
                "bytes_in": counters.bytes_out,  # the bridge's socket is the local service: swapped
                "bytes_out": counters.bytes_in,
                "error": error,
            })  # fmt: skip
        return {
            "client": self.config.name,
            "pid": os.getpid(),
            "version": __version__,
            "config": str(self.config_path.resolve()),
            "started": self.started,
            "nodes": nodes,
            "tunnels": tunnels,
            "visitors": self.visitor_ports.listening(),
        }


# what a reload cannot change: relayc says so and goes on with the values it started with
RESTART_KEYS = ("server_addr", "server_port", "name", "keepalive_timeout", "state_dir", "auth", "tls")
