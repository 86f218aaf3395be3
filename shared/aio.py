"""The thin asyncio shell around the sans-IO session.

``MuxConnection`` is an ``asyncio.Protocol`` that runs one ``Session`` over a (TLS) transport: it
feeds received bytes in, dispatches events to one handler per stream, writes what the session
queued (coalesced: at most one write per loop iteration), and arms one timer for keepalive.

``StreamBridge`` is the ``asyncio.Protocol`` of a TCP socket joined to one stream, modelled on
asyncssh's forwarder: socket bytes go to the stream; stream bytes go to the socket and their credit
is returned only once the socket's transport is not paused (so a slow reader pushes back all the
way to the remote sender); FIN <-> ``write_eof``; an aborted socket resets the stream and a reset
stream aborts the socket; TCP_NODELAY on every socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from shared.errors import PeerTimeoutError, RemoteProtocolError
from shared.frames import GoAwayCode, ResetCode
from shared.limits import TokenBucket
from shared.messages import Message, MessageDecoder, encode_message
from shared.mux import (
    CONTROL_FRAMES_PER_CALL,
    PRELOGIN_FRAMES_PER_CALL,
    SEND_BUFFER_HIGH,
    DataReceived,
    GoAwayReceived,
    PingAnswered,
    Session,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)

log = logging.getLogger(__name__)
# Bytes the connection's transport may hold before we stop producing frames for it.
_TRANSPORT_HIGH = 1024 * 1024
# Before login, bytes of replies (PING answers, refused streams) a peer may provoke in one read.
_PRELOGIN_REPLIES = 1024
_WRITE_SLICE = 256 * 1024
T = TypeVar("T")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the socket may already be closing; nothing to tune then


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Run ``main`` on uvloop when importable, else on the default asyncio loop.

    ``RELAY_LOOP=asyncio`` in the environment forces the standard loop (a way out should a uvloop
    bug bite: 0.23 aborts on transports left open after EOF both ways, which relay never does).
    """
    if use_uvloop and os.environ.get("RELAY_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            uvloop = None  # type: ignore[assignment]
        if uvloop is not None:
            if sys.version_info >= (3, 11):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(main)
            uvloop.install()  # pragma: no cover
    return asyncio.run(main)


_malloc_trim: Callable[[int], int] | None = None


def release_free_memory() -> bool:
    """Hand the free pages of the C heap back to the OS (glibc's ``malloc_trim``); False where
    there is no such call.  ctypes is imported on first use only, not at start-up (idle RSS)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = lambda pad: 0  # noqa: E731 - not glibc: nothing to trim
            return False
    return bool(_malloc_trim(0))


class StreamHandler(Protocol):
    """What a ``MuxConnection`` calls for the events of one stream."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, code: int) -> None: ...
    def on_writable(self) -> None: ...
    def pause_input(self) -> None: ...
    def resume_input(self) -> None: ...


class MuxConnection(asyncio.Protocol):
    """Runs one ``Session`` over one transport."""

    def __init__(
        self,
        client: bool,
        *,
        keepalive_timeout: float = 30.0,
        on_stream_opened: Callable[[MuxConnection, int], StreamHandler | None] | None = None,
        on_go_away: Callable[[MuxConnection, int], None] | None = None,
        on_closed: Callable[[MuxConnection, BaseException | None], None] | None = None,
        on_connected: Callable[[MuxConnection, asyncio.Transport], bool] | None = None,
        label: str = "",
        reply_debt_limit: int = 0,
        send_backlog_limit: int = 0,
    ) -> None:
        self.client = client
        self.label = label
        # relayd's bounds on what a peer can make it hold (0 = none, as on relayc):
        # * reply_debt_limit: while our writes are blocked, a peer that keeps provoking replies
        #   (PINGs, streams we refuse) past this many queued bytes is not read until they drained.
        #   Only replies count: a connection whose buffer is full of visitor data keeps being
        #   read, so the other direction, credit and PING answers flow on (and two ends that both
        #   stopped reading while blocked could never unblock).
        # * send_backlog_limit: when the bytes waiting for the peer's credit on all streams
        #   together pass it, every stream stops its input until the backlog is under half.
        self._reply_debt_limit = reply_debt_limit
        self._send_backlog_limit = send_backlog_limit
        self._reading_paused = False
        self._backlog_paused = False
        self._inputs_paused = False
        # When non-zero (before login), the most the connection may owe the peer (queued in the
        # session plus buffered in the transport) after a read, and replies it may provoke are few:
        # over either, the peer is dropped.
        self._output_limit = 0
        self._continue_scheduled = False
        self._ping_waiters: list[asyncio.Future[bool]] = []
        self._keepalive_timeout = keepalive_timeout
        self._on_stream_opened = on_stream_opened
        self._on_go_away = on_go_away
        self._on_closed = on_closed
        self._on_connected = on_connected
        self._handlers: dict[int, StreamHandler] = {}
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.loop = self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._write_paused = False
        self._streams_at_trim = 0  # session.streams_opened when the heap was last trimmed
        self.rtt: float | None = None
        self.closed = asyncio.get_event_loop().create_future()
        self.error: BaseException | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if self._on_connected is not None and not self._on_connected(self, transport):
            transport.abort()
            return
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=_TRANSPORT_HIGH, low=_TRANSPORT_HIGH // 4)
        self.session = Session(self.client, self._loop.time(), keepalive_timeout=self._keepalive_timeout)
        self._apply_reply_limit()
        self._arm_timer()
        self._flush()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or session.closed:
            return
        if self._ping_waiters:
            self._wake_ping_waiters(True)  # any bytes from the peer show it is alive
        try:
            events = session.receive_data(data, self._loop.time())
        except RemoteProtocolError as exc:
            self.fail(exc)
            return
        handlers = self._handlers
        for ev in events:
            if type(ev) is DataReceived:
                h = handlers.get(ev.stream_id)
                if h is not None:
                    h.on_data(ev.data)
                else:
                    session.consume(ev.stream_id, len(ev.data))
            elif type(ev) is StreamOpened:
                opened = self._on_stream_opened(self, ev.stream_id) if self._on_stream_opened else None
                if opened is None:
                    session.reset_stream(ev.stream_id, ResetCode.NOT_ALLOWED)
                else:
                    handlers[ev.stream_id] = opened
            elif type(ev) is StreamEnded:
                h = handlers.get(ev.stream_id)
                if h is not None:
                    h.on_end()
            elif type(ev) is StreamReset:
                h = handlers.pop(ev.stream_id, None)
                if h is not None:
                    h.on_reset(ev.code)
            elif type(ev) is StreamWritable:
                h = handlers.get(ev.stream_id)
                if h is not None:
                    h.on_writable()
            elif type(ev) is PingAnswered:
                self.rtt = ev.rtt
                self._wake_ping_waiters(True)
            elif type(ev) is GoAwayReceived:
                if self._on_go_away is not None:
                    self._on_go_away(self, ev.code)
            if session.closed:
                break
        self._flush()
        transport = self.transport
        if transport is None or session.closed:
            return
        if self._output_limit:
            owed = transport.get_write_buffer_size() + session.pending_output()
            if owed > self._output_limit or session.input_held:
                why = "floods control frames" if session.input_held else f"does not read ({owed} bytes owed)"
                self.drop(RemoteProtocolError(f"peer {why} before login"))
                return
        if session.input_held:
            if not self._reading_paused:
                self._reading_paused = True  # replies the peer provoked are backed up: stop reading it
                transport.pause_reading()
        elif session.more_input and not self._continue_scheduled:
            # a read full of tiny frames: go on in the next loop iteration, reading nothing meanwhile
            self._continue_scheduled = True
            if not self._reading_paused:
                transport.pause_reading()
            self._loop.call_soon(self._continue_input)
        if self._backlog_paused and session.send_buffered_total <= self._send_backlog_limit // 2:
            self._backlog_paused = False
            self._update_inputs()

    def _continue_input(self) -> None:
        self._continue_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.data_received(b"")
        if not self._continue_scheduled and not self._reading_paused and not transport.is_closing():
            transport.resume_reading()

    def drop(self, exc: RemoteProtocolError) -> None:
        """Abort the connection at once (no goodbye: the peer is not reading anyway)."""
        self.error = exc
        log.warning("%s: dropping the connection: %s", self.label or "session", exc)
        if self.session is not None:
            self.session.close()
        if self.transport is not None:
            self.transport.abort()

    @property
    def output_limit(self) -> int:
        return self._output_limit

    @output_limit.setter
    def output_limit(self, value: int) -> None:
        self._output_limit = value
        self._apply_reply_limit()

    def _apply_reply_limit(self) -> None:
        """How many bytes of replies the peer may provoke before its input is held: few before
        login (``_PRELOGIN_REPLIES``), ``reply_debt_limit`` while our writes are blocked, else no
        limit (they are written out as they come).  Before login, too, few frames are parsed per
        read (``PRELOGIN_FRAMES_PER_CALL``)."""
        session = self.session
        if session is None:
            return
        session.frames_per_call = PRELOGIN_FRAMES_PER_CALL if self._output_limit else CONTROL_FRAMES_PER_CALL
        if self._output_limit:
            session.reply_debt_limit = min(_PRELOGIN_REPLIES, self._output_limit)
        elif self._write_paused:
            session.reply_debt_limit = self._reply_debt_limit
        else:
            session.reply_debt_limit = 0

    def pause_writing(self) -> None:
        # Frames stay queued in the session (as views of the bytes already read) instead of piling
        # up as ciphertext in the transport: no buffer churn, no bufferbloat.
        self._write_paused = True
        self._apply_reply_limit()
        self._update_inputs()

    def resume_writing(self) -> None:
        self._write_paused = False
        session = self.session
        self._apply_reply_limit()
        self._flush()
        if self._write_paused:  # the flush filled the transport again
            return
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            if not self._continue_scheduled:
                self.transport.resume_reading()
            if session is not None and session.has_input_buffered:
                self.data_received(b"")  # the input held back while our replies were queued
        self._update_inputs()

    def _update_inputs(self) -> None:
        """Pause or resume every stream's input when the reasons to pause (our writes blocked, or
        too much waiting for the peer's credit) come or go."""
        want = self._write_paused or self._backlog_paused
        if want == self._inputs_paused:
            return
        self._inputs_paused = want
        for h in list(self._handlers.values()):
            if want:
                h.pause_input()
            else:
                h.resume_input()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.close()
        handlers = list(self._handlers.values())
        self._handlers.clear()
        for h in handlers:
            h.on_reset(ResetCode.SESSION_CLOSING)
        if self.error is None and exc is not None:
            self.error = exc
        self._wake_ping_waiters(False)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self, self.error)

    # --- API for stream handlers and owners ----------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.session is not None and not self.session.closed and self.transport is not None

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def inputs_paused(self) -> bool:
        """Stream handlers should not read their sockets now (our writes are blocked, or too much
        waits for the peer's credit)."""
        return self._inputs_paused

    @property
    def stream_count(self) -> int:
        return len(self._handlers)

    def open_stream(self, handler: StreamHandler, data: bytes = b"") -> int:
        assert self.session is not None
        sid = self.session.open_stream(data)
        self._handlers[sid] = handler
        self._schedule_flush()
        return sid

    def set_handler(self, stream_id: int, handler: StreamHandler) -> None:
        if stream_id in self._handlers:
            self._handlers[stream_id] = handler

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue data on a stream; True means the caller should pause its input."""
        session = self.session
        if session is None or session.closed:
            return False
        pending = session.send_data(stream_id, data)
        self._schedule_flush()
        if (
            self._send_backlog_limit
            and not self._backlog_paused
            and session.send_buffered_total > self._send_backlog_limit
        ):
            self._backlog_paused = True
            self._update_inputs()
        return pending > SEND_BUFFER_HIGH

    def end(self, stream_id: int) -> None:
        if self.session is not None and not self.session.closed:
            self.session.end_stream(stream_id)
            self._schedule_flush()

    def reset(self, stream_id: int, code: int = ResetCode.ABORTED) -> None:
        self._handlers.pop(stream_id, None)
        if self.session is not None and not self.session.closed:
            self.session.reset_stream(stream_id, code)
            self._schedule_flush()

    def forget(self, stream_id: int) -> None:
        """The handler is done with a stream that ended normally."""
        self._handlers.pop(stream_id, None)

    def consume(self, stream_id: int, n: int) -> None:
        if self.session is not None and not self.session.closed:
            self.session.consume(stream_id, n)
            self._schedule_flush()

    async def probe(self, timeout: float) -> bool:
        """Whether the peer answers a PING within ``timeout`` seconds (an answer to a keepalive
        PING already on its way counts).  False at once when the connection is closed."""
        session, transport = self.session, self.transport
        if session is None or session.closed or transport is None or transport.is_closing():
            return False
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._ping_waiters.append(waiter)
        if not session.ping_outstanding:
            session.ping(self._loop.time())
            self._flush(force=True)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if waiter in self._ping_waiters:
                self._ping_waiters.remove(waiter)

    def _wake_ping_waiters(self, answered: bool) -> None:
        waiters, self._ping_waiters = self._ping_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(answered)

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        if self.session is not None and not self.session.closed:
            self.session.go_away(code)
            self._flush(force=True)

    def close(self, code: int | None = None) -> None:
        """Close the connection; with ``code``, send a GO_AWAY first."""
        if code is not None:
            self.go_away(code)
        self._flush(force=True)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def fail(self, exc: BaseException) -> None:
        """The peer broke the protocol or timed out: say GO_AWAY (the mux's own errors queued it
        already), close.  Only the first failure counts (and is logged)."""
        session = self.session
        if self.error is not None and (session is None or session.closed):
            return
        self.error = exc
        log.warning("%s: closing session: %s", self.label or "session", exc)
        if session is not None and not session.closed:
            session.go_away(exc.code if isinstance(exc, RemoteProtocolError) else GoAwayCode.INTERNAL_ERROR)
        self._flush(force=True)
        if session is not None:
            session.close()
        if self.transport is not None:
            if not self.transport.is_closing():
                self.transport.pause_reading()  # nothing it sends now matters: do not decrypt it
            self.transport.close()
            # A peer that does not read must not keep us around.
            self._loop.call_later(5.0, self.abort)

    # --- internals ------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self, force: bool = False) -> None:
        self._flush_scheduled = False
        if self.session is None or self.transport is None or (self._write_paused and not force):
            return
        session, transport = self.session, self.transport
        # Feed the transport a slice at a time: a TLS transport encrypts whatever it is given into
        # one buffer, so handing it megabytes at once means megabyte allocations and page faults.
        while not transport.is_closing() and (force or not self._write_paused):
            pieces = session.data_to_send_list(_WRITE_SLICE)
            if not pieces:
                break
            if len(pieces) == 1:
                transport.write(pieces[0])
            else:
                transport.writelines(pieces)

    def _arm_timer(self) -> None:
        if self.session is not None and not self.session.closed:
            self._timer = self._loop.call_at(self.session.get_timer(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is None or self.session.closed:
            return
        try:
            self.session.handle_timer(self._loop.time())
        except PeerTimeoutError as exc:
            self.error = exc
            log.warning("%s: %s; closing the session", self.label or "session", exc)
            self.session.close()
            if self.transport is not None:
                self.transport.abort()
            return
        self._flush()
        self._arm_timer()
        opened = self.session.streams_opened
        if opened != self._streams_at_trim and all(type(h) is ControlChannel for h in self._handlers.values()):
            # Streams came and went, none but the control stream is left: the buffers of the
            # traffic just carried are free, but the C heap keeps them (a bulk transfer with 64 MiB
            # of session window in flight leaves relayc at ~95 MiB, against 29 MiB idle).
            self._streams_at_trim = opened
            release_free_memory()


class StreamBridge(asyncio.Protocol):
    """Joins one stream of a ``MuxConnection`` to one TCP socket.

    May be created before its socket exists (relayc dials after the stream opened): stream bytes
    that arrive meanwhile wait here, uncredited, so the peer's window bounds them.
    """

    __slots__ = (
        "_done",
        "_fin_received",
        "_fin_sent",
        "_paused_local",
        "_paused_rate",
        "_paused_session",
        "_paused_window",
        "_pending",
        "_reading_paused",
        "_unacked",
        "_write_paused",
        "buckets",
        "counters",
        "mux",
        "record",
        "stream_id",
        "transport",
    )

    def __init__(self, mux: MuxConnection, counters: TrafficCounters | None = None) -> None:
        self.mux = mux
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.counters = counters
        self.record: ConnectionRecord | None = None  # this visitor connection in its tunnel's recent list
        self._pending: list[bytes] | None = None
        self._unacked = 0
        self._write_paused = False
        self._paused_window = False
        self._paused_session = mux.inputs_paused if mux is not None else False
        self._paused_rate = False
        self._paused_local = False  # a subclass's own reason (say, a parser with a backlog)
        self.buckets: tuple[TokenBucket, ...] = ()  # bandwidth limits (tunnel, client), both directions
        self._reading_paused = False
        self._fin_sent = False
        self._fin_received = False
        self._done = False

    # --- the TCP socket side --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # No set_nodelay here: uvloop and asyncio set TCP_NODELAY on every transport they create
        # with create_server/create_connection (checked by tests/test_aio.py), so a syscall per
        # connection is saved.
        if self._done:
            transport.abort()
            return
        self._update_reading()
        pending = self._pending
        self._pending = None
        if pending:
            for chunk in pending:
                self.on_data(chunk)
        if self._fin_received:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._reading_paused and self.transport is not None:
            # uvloop ignores pause_reading() in connection_made (it starts reading right after):
            # a bridge paused from its start gets one read anyway, and is paused for real here
            self.transport.pause_reading()
        counters = self.counters
        if counters is not None:
            counters.bytes_in += len(data)
            record = self.record
            if record is not None:
                record.bytes_in += len(data)
        if self.mux.send(self.stream_id, data):
            self._paused_window = True
            self._update_reading()
        if self.buckets:
            delay = self._rate_delay(len(data))
            if delay > 0:
                self._paused_rate = True
                self._update_reading()
                asyncio.get_running_loop().call_later(delay, self._rate_resume)

    def eof_received(self) -> bool:
        if not self._done and not self._fin_sent:
            self._fin_sent = True
            self.mux.end(self.stream_id)
            self._maybe_finish()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked:
            n = self._unacked
            self._unacked = 0
            self.mux.consume(self.stream_id, n)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.counters is not None:
            self.counters.conns_open -= 1
            self.counters = None
        if not self._done:
            self._done = True
            self.mux.reset(self.stream_id, ResetCode.ABORTED)

    # --- the stream side ------------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(bytes(data))  # do not pin the whole read buffer while dialing
            return
        if self._done:
            return
        counters = self.counters
        if counters is not None:
            counters.bytes_out += len(data)
            record = self.record
            if record is not None:
                record.bytes_out += len(data)
        transport.write(data)
        if self._write_paused:
            self._unacked += len(data)
        elif self.buckets and (delay := self._rate_delay(len(data))) > 0:
            # hold the credit back: the remote sender slows down to the limit
            asyncio.get_running_loop().call_later(delay, self.mux.consume, self.stream_id, len(data))
        else:
            self.mux.consume(self.stream_id, len(data))

    def on_end(self) -> None:
        self._fin_received = True
        if self.transport is not None:
            self._write_eof()

    def on_reset(self, code: int) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.abort()

    def on_writable(self) -> None:
        self._paused_window = False
        self._update_reading()

    def pause_input(self) -> None:
        self._paused_session = True
        self._update_reading()

    def bind(self, mux: MuxConnection, stream_id: int) -> None:
        """Join this bridge to ``stream_id`` of ``mux`` (a visitor routed after its first bytes):
        it starts paused if that session's connection is backed up right now."""
        self.mux = mux
        self.stream_id = stream_id
        self._paused_session = mux.inputs_paused
        self._update_reading()

    def resume_input(self) -> None:
        self._paused_session = False
        self._update_reading()

    def abort(self) -> None:
        """Tear down both sides now (RST on the stream, abort on the socket)."""
        if not self._done:
            self._done = True
            self.mux.reset(self.stream_id, ResetCode.ABORTED)
        if self.transport is not None:
            self.transport.abort()

    # --- internals ------------------------------------------------------------------------------

    def _write_eof(self) -> None:
        transport = self.transport
        assert transport is not None
        if self._done or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._fin_sent and self._fin_received and not self._done:
            self._done = True
            self.mux.forget(self.stream_id)
            if self._unacked:
                self.mux.consume(self.stream_id, self._unacked)
                self._unacked = 0
            if self.transport is not None:
                self.transport.close()

    def _rate_delay(self, n: int) -> float:
        now = asyncio.get_running_loop().time()
        return max(bucket.take(n, now) for bucket in self.buckets)

    def _rate_resume(self) -> None:
        self._paused_rate = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._paused_window or self._paused_session or self._paused_rate or self._paused_local
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()


RECENT_CONNECTIONS = 100  # visitor connections a tunnel's counters remember (the newest)
RECENT_REFUSALS = 100  # visitors turned away that a tunnel's counters remember (the newest)


class ConnectionRecord:
    """One visitor connection of a tunnel, as the dashboard lists it: its address, when it opened
    and closed (Unix seconds; ``closed`` None while open), and its bytes.  Its visitor adds to it
    next to the tunnel's counters, so keeping it costs O(1) per connection and per read."""

    __slots__ = ("addr", "bytes_in", "bytes_out", "closed", "opened")

    def __init__(self, addr: str, opened: float) -> None:
        self.addr = addr
        self.opened = opened
        self.closed: float | None = None
        self.bytes_in = 0  # from the visitor
        self.bytes_out = 0  # to the visitor

    def as_dict(self) -> dict[str, Any]:
        return {"addr": self.addr, "opened": self.opened, "closed": self.closed, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}  # fmt: skip


class TrafficCounters:
    """Per-tunnel traffic numbers, kept in memory and read by the dashboard and metrics, and the
    last ``RECENT_CONNECTIONS`` visitor connections (a ring, made on the first one)."""

    __slots__ = ("bytes_in", "bytes_out", "conns_open", "conns_total", "recent", "refusals", "refused_by")

    def __init__(self) -> None:
        self.bytes_in = 0  # visitor -> lab machine
        self.bytes_out = 0  # lab machine -> visitor
        self.conns_open = 0
        self.conns_total = 0
        self.recent: deque[ConnectionRecord] | None = None
        # visitors turned away: (when, address, reason, text), the newest; counts per reason
        self.refusals: deque[tuple[float, str, str, str]] | None = None
        self.refused_by: dict[str, int] | None = None

    def forget_recent(self) -> None:
        """Drop the recent connections and refusals (the totals stay)."""
        self.recent = self.refusals = self.refused_by = None

    def refused(self, addr: str, reason: str, text: str, now: float) -> None:
        """Remember a visitor turned away (``reason`` is one of a few fixed words; ``text`` says
        why in a sentence)."""
        refusals = self.refusals
        if refusals is None:
            refusals = self.refusals = deque(maxlen=RECENT_REFUSALS)
            self.refused_by = {}
        refusals.append((now, addr, reason, text))
        assert self.refused_by is not None
        self.refused_by[reason] = self.refused_by.get(reason, 0) + 1

    def opened(self, addr: str, now: float) -> ConnectionRecord:
        """Count a new visitor connection from ``addr`` and remember it (the oldest of the ring
        goes); its visitor adds its bytes to the record returned and closes it."""
        self.conns_open += 1
        self.conns_total += 1
        record = ConnectionRecord(addr, now)
        recent = self.recent
        if recent is None:
            recent = self.recent = deque(maxlen=RECENT_CONNECTIONS)
        recent.append(record)
        return record

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "conns_open": self.conns_open,
            "conns_total": self.conns_total,
        }


class ControlChannel:
    """The stream handler of the control stream (id 1): length-prefixed JSON messages both ways.

    Credit is returned as soon as bytes are decoded (unless the owner holds it back while it is
    behind, ``hold_credit``); the decoder refuses any message over ``MAX_MESSAGE_SIZE``, so a peer
    cannot make us buffer more than that here.

    At most ``MESSAGES_PER_TURN`` messages are decoded and handled per turn of the event loop: a
    window full of small messages (thousands of ``tunnel_add``) would otherwise hold the loop for
    as long as they take, and every visitor with it.  The rest wait in the decoder for the next
    turn, their credit not returned yet, so what waits is bounded by the stream's window.
    """

    MESSAGES_PER_TURN = 32

    def __init__(
        self,
        mux: MuxConnection,
        on_message: Callable[[Message], None],
        on_closed: Callable[[], None],
        max_queued: int = 0,
    ) -> None:
        self.mux = mux
        self.stream_id = 0
        self.max_queued = max_queued  # 0: unbounded (relayc, whose peer is relayd)
        self._decoder = MessageDecoder()
        self._held: int | None = None  # while the owner is behind: bytes whose credit is held back
        self._drained: asyncio.Event | None = None  # set while fewer than SEND_BUFFER_HIGH bytes wait
        self._on_message = on_message
        self._on_closed = on_closed
        self._uncredited = 0  # bytes received whose credit is neither returned nor held yet
        self._next_turn: asyncio.Handle | None = None  # scheduled while whole messages wait
        self._ended = False  # the peer ended the stream while messages still waited

    def send(self, message: Message) -> None:
        """Queue a message.  With ``max_queued``, a peer that leaves more than that waiting (it
        withholds credit on the control stream) is disconnected rather than fed."""
        mux = self.mux
        backed_up = mux.send(self.stream_id, encode_message(message))
        if backed_up and self._drained is not None:
            self._drained.clear()
        if self.max_queued and mux.session is not None and mux.session.send_buffered(self.stream_id) > self.max_queued:
            mux.fail(
                RemoteProtocolError(
                    f"the control stream is backed up (over {self.max_queued} bytes waiting): "
                    "the peer does not grant credit"
                )
            )

    async def drained(self) -> None:
        """Return once fewer than ``SEND_BUFFER_HIGH`` bytes wait for the peer's credit (a producer
        of replies waits here, so a peer that reads slowly slows it down instead of piling up)."""
        session = self.mux.session
        if session is None or session.send_buffered(self.stream_id) <= SEND_BUFFER_HIGH:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        self._drained.clear()
        await self._drained.wait()

    def hold_credit(self) -> None:
        """The owner is behind with the messages it got: stop returning credit, so the peer can
        send at most one more window of them."""
        if self._held is None:
            self._held = 0

    def release_credit(self) -> None:
        held, self._held = self._held, None
        if held:
            self.mux.consume(self.stream_id, held)

    def on_data(self, data: bytes | memoryview) -> None:
        self._uncredited += len(data)
        if self._next_turn is not None:  # messages from earlier reads still wait: keep order
            self._decoder.append(data)  # bounded: their credit is not returned before their turn
            return
        self._handle_some(data)

    def _handle_some(self, data: bytes | memoryview = b"") -> None:
        """Decode and handle up to ``MESSAGES_PER_TURN`` messages; schedule the next turn if more
        may wait; return the credit of what is no longer waiting."""
        self._next_turn = None
        limit = self.MESSAGES_PER_TURN
        try:
            messages = self._decoder.feed(data, limit)
        except RemoteProtocolError as exc:
            self._stop(exc)
            return
        if len(messages) >= limit and self._decoder.buffered >= 4:
            self._next_turn = asyncio.get_running_loop().call_soon(self._handle_some)
            # whole messages still wait: their credit comes back once they are handled
            self._credit(self._uncredited - self._decoder.buffered)
        else:
            # what remains is part of one message: credit it, or a message larger than the
            # window could never arrive
            self._credit(self._uncredited)
        mux = self.mux
        try:
            for message in messages:
                if not mux.is_open:
                    break
                self._on_message(message)
        except Exception as exc:  # a bug of ours: end this session, not the others (nor the loop)
            log.exception("handling a control message failed")
            self._stop(exc)
            return
        if self._ended and self._next_turn is None:
            self._ended = False
            self._on_closed()

    def _credit(self, n: int) -> None:
        if n <= 0:
            return
        self._uncredited -= n
        if self._held is None:
            self.mux.consume(self.stream_id, n)
        else:
            self._held += n

    def _stop(self, exc: Exception) -> None:
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None
        self.mux.fail(exc)

    def on_end(self) -> None:
        if self._next_turn is not None:
            self._ended = True  # messages sent before the end are handled first, then the end
            return
        self._on_closed()

    def on_reset(self, code: int) -> None:
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None
        self._on_closed()

    def on_writable(self) -> None:
        if self._drained is not None:
            self._drained.set()

    def pause_input(self) -> None:
        """Nothing to pause: control messages are produced by this program, not read from a socket."""

    def resume_input(self) -> None:
        """See pause_input."""


class LoopLagMonitor:
    """Measures how late the event loop runs a timer: the worst stall since the last reading.

    A timer every ``interval`` seconds notes how much later than asked it ran; a callback that
    blocks the loop (a slow parse, a synchronous call) shows up as that lateness.  ``take_worst()``
    returns the worst lateness seen since the previous call and starts over (relayd's /metrics
    exports it as ``relay_event_loop_lag_seconds``, so each scrape sees its own interval).
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._worst = 0.0
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        lag = now - self._due
        if lag > self._worst:
            self._worst = lag
        self._due = now + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def take_worst(self) -> float:
        """The worst lag (seconds) since the previous call, including a stall still going on."""
        worst = self._worst
        if self._timer is not None:
            worst = max(worst, asyncio.get_running_loop().time() - self._due)
        self._worst = 0.0
        return max(worst, 0.0)
