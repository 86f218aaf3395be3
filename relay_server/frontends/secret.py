"""Secret tunnels: no public port; another relayc that is allowed visits them through relayd.

Theory of operation
===================

A secret tunnel is registered like any other (``tunnel_add``), but its frontend opens nothing:
it is reachable only by a *visit*.  A logged-in relayc (its own session, or a visitor-only one
from ``relayc connect``) opens a stream (odd id) whose first message is ``visit_open {client,
tunnel, proof}``; relayd reads it (at most ``VISIT_PREAMBLE_MAX`` bytes), and:

  * finds the secret tunnel ``tunnel`` that client ``client`` has open now (else ``not_found``);
  * lets the visitor in if its client name is in the tunnel's ``allow_visitors`` and it logged in
    with a token of its own (a name taken with relayd's shared token proves nothing), or if ``proof``
    is the HMAC of the tunnel's ``secret_key`` over (visitor name, client, tunnel, relayd's
    certificate fingerprint) (``shared.auth.visit_proof``; the key itself is never sent); else
    ``not_allowed``.  Past ``WRONG_KEYS_MAX`` wrong keys from a client name in ``WRONG_KEY_WINDOW``,
    its proofs are refused unchecked (no online guessing).  The tunnel's ``allow_sources`` applies
    to the visitor's address and its connection limits to visits (``busy``);
  * opens a stream to the owner (``stream_open``, as for any visitor) and answers ``visit_result
    {ok}`` on the visitor's stream; any refusal is ``visit_result {ok: false, code, error}`` and
    the visitor's stream is ended.

A stream that does not start with a well-formed ``visit_open`` is reset (``NOT_ALLOWED``), as any
other stream a relayc opens always was; the session goes on.

From then on the two streams are joined (``JoinedEnd``): bytes go across as they come; credit
for what one side sends is returned only while the other side's send buffer and session are not
backed up, so relayd holds at most one window per direction.  A FIN is carried across as a FIN,
a reset as a reset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay_server.frontends.base import Frontend
from relay_server.tunnels import PublicTunnel, Refusal
from shared import auth
from shared.aio import ConnectionRecord, MuxConnection, TrafficCounters
from shared.errors import RemoteProtocolError
from shared.frames import ResetCode
from shared.limits import TokenBucket
from shared.messages import MessageDecoder, VisitOpen, VisitRefusal, VisitResult, decode_first, encode_message
from shared.tunnel import TunnelKind

if TYPE_CHECKING:
    from relay_server.control import ClientSession

VISIT_PREAMBLE_MAX = 4096  # bytes of a visit_open message
VISITS_PER_SESSION = 1024  # visit streams one relayc session may have open
WRONG_KEYS_MAX = 10  # wrong secret_key proofs per visitor name and window; then refused unchecked
WRONG_KEY_WINDOW = 600.0


class SecretFrontend(Frontend):
    """Opens nothing: a secret tunnel is found by ``find`` when a visit names it."""

    kind = TunnelKind.SECRET

    def __init__(self, find: Callable[[str, str], PublicTunnel | None], fingerprint: Callable[[], str],
                 own_token: Callable[[ClientSession], bool] = lambda session: True) -> None:  # fmt: skip
        self.find = find
        self.fingerprint = fingerprint
        # whether a session logged in with a token of its own (a dashboard client): only such a
        # name is proof of who visits; anyone with relayd's shared token may log in under any name
        self.own_token = own_token
        self._wrong_keys: dict[str, tuple[int, float]] = {}  # visitor name -> (wrong keys, window start)

    async def claim(self, tunnel: PublicTunnel) -> str:
        return self.update(tunnel)

    def update(self, tunnel: PublicTunnel) -> str:
        allowed = ", ".join(tunnel.spec.allow_visitors)
        who = [f"visitors {allowed}"] if allowed else []
        if tunnel.spec.secret_key:
            who.append("secret_key")
        return f"secret ({' or '.join(who) or 'nobody allowed'})"

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        tunnel.reset_visitors()

    def peer_stream(self, session: ClientSession, mux: MuxConnection, stream_id: int) -> VisitStream | None:
        """A stream a logged-in relayc opened: a visit, unless it has too many open."""
        if session.visits_open >= VISITS_PER_SESSION:
            return None
        return VisitStream(self, session, mux, stream_id)

    def admit(self, session: ClientSession, visit: VisitOpen) -> tuple[PublicTunnel | None, VisitRefusal, str]:
        """The tunnel ``visit`` may join, or why not."""
        target = f"{visit.client}/{visit.tunnel}"
        tunnel = self.find(visit.client, visit.tunnel)
        if tunnel is None or tunnel.spec.type is not TunnelKind.SECRET:
            return None, VisitRefusal.NOT_FOUND, f"no secret tunnel {target} is open now (is its client online?)"
        spec = tunnel.spec
        named = session.name in spec.allow_visitors
        allowed = named and self.own_token(session)
        if not allowed and spec.secret_key and visit.proof:
            if self._guessing(session.name, time.monotonic()):
                why = f"too many wrong secret_key attempts from client {session.name!r}; try later"
                return None, VisitRefusal.NOT_ALLOWED, f"not allowed to visit {target}: {why}"
            expected = auth.visit_proof(spec.secret_key, session.name, visit.client, visit.tunnel, self.fingerprint())
            allowed = auth.proofs_equal(visit.proof, expected)
            if not allowed:
                self._count_wrong_key(session.name, time.monotonic())
        if not allowed:
            if visit.proof:
                why = "wrong secret_key"
            elif named:
                why = (f"client {session.name!r} logged in with relayd's shared token, which any client may use "
                       "under any name: allow_visitors names only clients with a token of their own (create it in "
                       "the dashboard), or use secret_key")  # fmt: skip
            else:
                why = f"client {session.name!r} is not in its allow_visitors"
            return None, VisitRefusal.NOT_ALLOWED, f"not allowed to visit {target}: {why}"
        refusal = tunnel.refusal(session.remote_addr)
        if refusal is not None:
            code = VisitRefusal.NOT_ALLOWED if refusal is Refusal.SOURCE else VisitRefusal.BUSY
            return None, code, f"{target}: {tunnel.refusal_text(refusal, session.remote_addr)}"
        return tunnel, VisitRefusal.NOT_FOUND, ""

    def _guessing(self, name: str, now: float) -> bool:
        count, start = self._wrong_keys.get(name, (0, now))
        return now - start < WRONG_KEY_WINDOW and count >= WRONG_KEYS_MAX

    def _count_wrong_key(self, name: str, now: float) -> None:
        count, start = self._wrong_keys.pop(name, (0, now))
        if now - start >= WRONG_KEY_WINDOW:
            count, start = 0, now
        self._wrong_keys[name] = (count + 1, start)
        if len(self._wrong_keys) > 10_000:  # names come from logins: keep the most recent ones
            del self._wrong_keys[next(iter(self._wrong_keys))]


class VisitStream:
    """A stream a relayc opened: reads ``visit_open``, then joins it to the owner's stream."""

    def __init__(self, frontend: SecretFrontend, session: ClientSession, mux: MuxConnection, stream_id: int) -> None:
        self.frontend = frontend
        self.session = session
        self.mux = mux
        self.stream_id = stream_id
        self._decoder: MessageDecoder | None = None
        self._ended = False
        session.visits_open += 1
        self._counted = True

    def on_data(self, data: bytes | memoryview) -> None:
        mux, sid = self.mux, self.stream_id
        try:
            if self._decoder is None:
                found = decode_first(data, VISIT_PREAMBLE_MAX)
                if found is not None:
                    message, rest = found[0], bytes(data[found[1] :])
                else:
                    self._decoder = MessageDecoder(max_size=VISIT_PREAMBLE_MAX)
            if self._decoder is not None:
                messages = self._decoder.feed(data, limit=1)
                if not messages:
                    mux.consume(sid, len(data))
                    return
                message, rest = messages[0], self._decoder.take_rest()
        except RemoteProtocolError as exc:
            self._not_a_visit(str(exc), len(data))
            return
        if not isinstance(message, VisitOpen):
            self._not_a_visit(f"expected visit_open first, got {message.type}", len(data))
            return
        mux.consume(sid, len(data))  # the rest goes to the owner at once, with stream_open
        self._visit(message, rest)

    def _not_a_visit(self, why: str, n: int) -> None:
        """Not a visit: the stream is reset as any other stream a relayc opens; the session goes on."""
        session = self.session
        session.registry.burst_log.warning(f"visit:{session.name}", "client %s (%s): stream %d reset: %s",
                                           session.name, session.remote_addr, self.stream_id, why[:200])  # fmt: skip
        self.mux.consume(self.stream_id, n)
        self.mux.reset(self.stream_id, ResetCode.NOT_ALLOWED)
        self._uncount()

    def _visit(self, visit: VisitOpen, rest: bytes) -> None:
        session, mux, sid = self.session, self.mux, self.stream_id
        tunnel, code, why = self.frontend.admit(session, visit)
        if tunnel is None:
            session.registry.burst_log.warning(
                f"visit:{session.name}", "client %s (%s): visit refused: %s", session.name, session.remote_addr, why
            )
            mux.send(sid, encode_message(VisitResult(ok=False, code=code.value, error=why)))
            mux.end(sid)
            mux.forget(sid)
            self._uncount()
            return
        visitor_end = JoinedEnd(mux, sid, inbound=True)
        owner_end = JoinedEnd(None, 0, inbound=False)
        visitor_end.other, owner_end.other = owner_end, visitor_end
        owner_end.on_close = visitor_end.on_close = self._uncount
        mux.send(sid, encode_message(VisitResult(ok=True)))
        if not tunnel.attach(owner_end, f"{session.name}@{session.remote_addr}", first=rest):
            mux.reset(sid, ResetCode.REFUSED)
            self._uncount()
            return
        visitor_end.counters = owner_end.counters  # the tunnel's: visitor -> lab counted as bytes_in
        visitor_end.record = owner_end.record
        visitor_end.buckets = owner_end.buckets  # and its bandwidth limits, both ways
        owner_end.tunnel = tunnel
        mux.set_handler(sid, visitor_end)
        if self._ended:
            visitor_end.on_end()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.session.visits_open -= 1

    def on_end(self) -> None:
        self._ended = True

    def on_reset(self, code: int) -> None:
        self._uncount()

    def on_writable(self) -> None:
        """Nothing sent before the visit is admitted."""

    def pause_input(self) -> None:
        """Credit is returned as the preamble is read; it is at most VISIT_PREAMBLE_MAX."""

    def resume_input(self) -> None:
        """See pause_input."""


class JoinedEnd:
    """One end of two joined streams (a visit and the owner's stream): what its peer sends goes
    out on the other end's stream.  Is a ``tunnels.Visitor`` for the owner's end."""

    __slots__ = ("_fin_in", "_fin_out", "_held", "_paused_other", "_paused_session", "buckets", "counters", "done",
                 "inbound", "mux", "on_close", "other", "record", "stream_id", "tunnel")  # fmt: skip

    def __init__(self, mux: MuxConnection | None, stream_id: int, inbound: bool) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.inbound = inbound  # this end's peer is the visitor (its bytes count as bytes_in)
        self.other: JoinedEnd | None = None
        self.counters: TrafficCounters | None = None
        self.record: ConnectionRecord | None = None  # the visit in the tunnel's recent connections
        self.buckets: tuple[TokenBucket, ...] = ()
        self.tunnel: PublicTunnel | None = None
        self.on_close: Callable[[], None] | None = None
        self.done = False
        self._held = 0  # credit not returned to this end's peer yet
        self._paused_other = False  # the other end's stream has too much waiting
        self._paused_session = False  # the other end's connection is backed up
        self._fin_in = self._fin_out = False

    def bind(self, mux: MuxConnection, stream_id: int) -> None:
        self.mux = mux
        self.stream_id = stream_id
        if mux.inputs_paused and self.other is not None:
            self.other._paused_session = True

    # --- what this end's peer sends -------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        other, mux = self.other, self.mux
        assert mux is not None
        n = len(data)
        if self.done or other is None or other.done or other.mux is None:
            mux.consume(self.stream_id, n)
            return
        counters = self.counters
        if counters is not None:
            record = self.record
            if self.inbound:
                counters.bytes_in += n
                if record is not None:
                    record.bytes_in += n
            else:
                counters.bytes_out += n
                if record is not None:
                    record.bytes_out += n
        if other.mux.send(other.stream_id, bytes(data)):
            self._paused_other = True
        delay = 0.0
        if self.buckets:
            now = asyncio.get_running_loop().time()
            delay = max(bucket.take(n, now) for bucket in self.buckets)
        if self._paused_other or self._paused_session:
            self._held += n
        elif delay > 0:
            asyncio.get_running_loop().call_later(delay, mux.consume, self.stream_id, n)
        else:
            mux.consume(self.stream_id, n)

    def on_end(self) -> None:
        self._fin_in = True
        other = self.other
        if other is not None and other.mux is not None and not other.done:
            other.mux.end(other.stream_id)
            other._fin_out = True
        self._maybe_finish()

    def on_reset(self, code: int) -> None:
        other = self.other
        self._close()
        if other is not None and not other.done and other.mux is not None:
            other.mux.reset(other.stream_id, code if code else ResetCode.ABORTED)
            other._close()

    # --- what the other end asks of this one ----------------------------------------------------

    def on_writable(self) -> None:
        """This end's stream drained: the other end's peer may have its credit back."""
        other = self.other
        if other is not None:
            other._paused_other = False
            other._release()

    def pause_input(self) -> None:
        if self.other is not None:
            self.other._paused_session = True

    def resume_input(self) -> None:
        other = self.other
        if other is not None:
            other._paused_session = False
            other._release()

    def _release(self) -> None:
        if self._held and not self._paused_other and not self._paused_session and self.mux is not None:
            n, self._held = self._held, 0
            self.mux.consume(self.stream_id, n)

    def abort(self) -> None:
        """Reset both streams (the tunnel closed)."""
        self.on_reset(ResetCode.ABORTED)
        if self.mux is not None:
            self.mux.reset(self.stream_id, ResetCode.ABORTED)

    def _maybe_finish(self) -> None:
        other = self.other
        if self._fin_in and self._fin_out and other is not None and other._fin_in and other._fin_out:
            for end in (self, other):
                if end.mux is not None:
                    end.mux.forget(end.stream_id)
                end._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.counters is not None and not self.inbound:
            self.counters.conns_open -= 1
        if self.tunnel is not None:
            self.tunnel.detach(self)
        if self.on_close is not None:
            self.on_close()
