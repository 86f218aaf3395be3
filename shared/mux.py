"""The sans-IO multiplexer session: streams, windows, keepalive, go-away.  No I/O, no clock.

Theory of operation
===================

One ``Session`` object represents one end of one connection between relayc and relayd.  The
caller feeds it the bytes read from the connection with ``receive_data(data, now)`` and gets back a
list of events (``StreamOpened``, ``DataReceived``, ``StreamEnded``, ``StreamReset``,
``StreamWritable``, ``PingAnswered``, ``GoAwayReceived``).  Everything the session wants to send
piles up in an output buffer that the caller drains with ``data_to_send()`` and writes to the
connection.  Time only enters as the ``now`` argument: ``get_timer()`` says when the caller should
next call ``handle_timer(now)``, which sends keepalive PINGs and raises ``PeerTimeoutError`` when the
peer has been silent for ``keepalive_timeout`` seconds.

Streams.  relayc (the *client* side) opens odd stream ids, relayd even ones; ids only grow.  A
stream is opened by the first frame carrying SYN; its acceptor sets ACK on the first frame it sends
back.  Each direction is closed independently with FIN (half-close, like TCP's shutdown(SHUT_WR));
RST tears down both directions at once and carries a 4-byte reason code.  A stream is forgotten
once FIN has gone both ways and the application has consumed everything delivered to it, or at
once after a RST.

Flow control has two levels, and both count DATA payload bytes only.
  * Per stream: the sender may have at most ``window`` bytes unacknowledged.  Every stream starts
    with ``INITIAL_STREAM_WINDOW`` in each direction.  The receiver returns credit with
    WINDOW_UPDATE only when the *application* calls ``consume(stream_id, n)``, i.e. after it
    actually wrote the bytes to its socket, so a paused local socket pushes back on the remote
    sender.  When a stream is drained as fast as it arrives (nothing left unconsumed when credit is
    returned) the receiver doubles the window, up to ``max_stream_window``: bulk streams grow to
    the bandwidth-delay product, idle and slow ones stay at 256 KiB.
  * Per session (stream id 0): all streams together may have at most the session window in
    flight, ``INITIAL_SESSION_WINDOW`` at first, raised by WINDOW_UPDATE on stream 0.  This is the
    cap on buffered bytes: thousands of slow streams cannot make the receiver hold more than the
    session window.  A single stream's window never exceeds half the session window, so one
    stalled stream can never block the others.
Exceeding either window is a protocol error.  A sender whose stream is out of credit keeps the
bytes in the stream's send buffer; ``send_data`` returns how many bytes are waiting so the caller
can stop reading its socket, and ``StreamWritable`` tells it when to start again.

Race tolerance.  Frames already in flight when this side reset or refused a stream are discarded
silently (their session credit is returned at once).  WINDOW_UPDATEs for finished streams are
ignored.  DATA for a stream id that was never opened, or after that stream's FIN, is an error.

Errors.  Anything the peer sends that breaks these rules raises ``RemoteProtocolError``; the
session has then queued a GO_AWAY with the matching code, and the caller should send what
``data_to_send()`` returns and close the connection.  Misuse by the local caller raises
``LocalProtocolError``.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, Union

from shared.errors import LocalProtocolError, PeerTimeoutError, RemoteProtocolError
from shared.frames import (
    HEADER,
    HEADER_LEN,
    MAX_FRAME_PAYLOAD,
    MAX_WINDOW,
    PREFACE_LEN,
    PREFACE_MAGIC,
    PROTOCOL_VERSION,
    Flag,
    FrameType,
    GoAwayCode,
    ResetCode,
    decode_header,
    frame_header,
    parse_preface,
    preface,
)

INITIAL_STREAM_WINDOW: Final = 256 * 1024
INITIAL_SESSION_WINDOW: Final = 16 * 1024 * 1024
DEFAULT_SESSION_WINDOW: Final = 64 * 1024 * 1024
DEFAULT_MAX_STREAM_WINDOW: Final = 16 * 1024 * 1024
DEFAULT_MAX_STREAMS: Final = 10_000
DEFAULT_KEEPALIVE_TIMEOUT: Final = 30.0
# A stream whose send buffer holds more than this asks its writer to pause.
SEND_BUFFER_HIGH: Final = 256 * 1024
# How many reset/refused stream ids are remembered so late frames for them are dropped quietly.
_DISCARD_MEMORY: Final = 4096
# Frames other than whole flag-less DATA frames handled per receive_data call (a PING, a window
# update, a stream opened or reset): 256 KiB of 12-byte frames is 21,000 of them, and each costs
# a few microseconds, so a read full of them is handled over several calls.
CONTROL_FRAMES_PER_CALL: Final = 1024
# Before login (see ``Session.frames_per_call``): a client sends a handful of frames then, so a
# read full of frames from a stranger is looked at a few at a time (1,024 stream openings from
# each of 40 strangers held relayd's loop ~200 ms before the first one got them dropped).
PRELOGIN_FRAMES_PER_CALL: Final = 16

_RST_CODE = struct.Struct("!I")
_pack_header = HEADER.pack  # frame_header() minus a call, for the send fast path
# data_to_send_list: payloads this big are passed through as they are; the first _HEAD_GLUE bytes
# of each go with the preceding small pieces so a header never travels alone in a TLS record.
_BIG_PIECE = 32 * 1024
_HEAD_GLUE = 4096


# --- events -------------------------------------------------------------------------------------
# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ costs three times as much
# (object.__setattr__ per field), and one event is made per frame received.


@dataclass(slots=True)
class StreamOpened:
    """The peer opened ``stream_id``; data for it follows in ``DataReceived`` events."""

    stream_id: int


@dataclass(slots=True)
class DataReceived:
    """Bytes for ``stream_id``.  Call ``Session.consume(stream_id, len(data))`` once written out."""

    stream_id: int
    data: bytes | memoryview  # a view into the bytes given to receive_data: use it or copy it


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id`` (FIN): no more data will come from it."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The peer reset ``stream_id``; ``code`` is a ``ResetCode``.  The stream is gone."""

    stream_id: int
    code: int


@dataclass(slots=True)
class StreamWritable:
    """The send buffer of ``stream_id`` drained below ``SEND_BUFFER_HIGH``: writing may resume."""

    stream_id: int


@dataclass(slots=True)
class PingAnswered:
    """Our keepalive PING came back after ``rtt`` seconds."""

    rtt: float


@dataclass(slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; existing ones may finish.  ``code`` is a GoAwayCode."""

    code: int


Event = Union[StreamOpened, DataReceived, StreamEnded, StreamReset, StreamWritable, PingAnswered, GoAwayReceived]


# --- per-stream state ---------------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "ack_pending",
        "fin_pending",
        "fin_received",
        "fin_sent",
        "recv_credit",
        "recv_to_return",
        "recv_unconsumed",
        "recv_window",
        "send_buffered",
        "send_chunks",
        "send_credit",
        "stream_id",
        "syn_pending",
        "wants_writable",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.send_credit = INITIAL_STREAM_WINDOW
        # made on the first byte queued and dropped when drained: an empty deque costs 600+ bytes,
        # and most streams of a relay (5,000 idle SSH sessions) never queue anything
        self.send_chunks: deque[bytes | memoryview] | None = None
        self.send_buffered = 0
        self.syn_pending = False
        self.ack_pending = False
        self.fin_pending = False
        self.fin_sent = False
        self.fin_received = False
        self.wants_writable = False
        self.recv_window = INITIAL_STREAM_WINDOW
        self.recv_credit = INITIAL_STREAM_WINDOW
        self.recv_unconsumed = 0
        self.recv_to_return = 0


class Session:
    """One end of a multiplexed connection.  ``client=True`` for relayc, ``False`` for relayd."""

    def __init__(
        self,
        client: bool,
        now: float,
        *,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        max_streams: int = DEFAULT_MAX_STREAMS,
        session_window: int = DEFAULT_SESSION_WINDOW,
        max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW,
    ) -> None:
        if session_window < INITIAL_SESSION_WINDOW or session_window > MAX_WINDOW:
            raise LocalProtocolError(f"session_window must be in [{INITIAL_SESSION_WINDOW}, {MAX_WINDOW}]")
        if keepalive_timeout <= 0:
            raise LocalProtocolError("keepalive_timeout must be positive")
        self.client = client
        self.keepalive_timeout = keepalive_timeout
        self.max_streams = max_streams
        self._max_stream_window = max(INITIAL_STREAM_WINDOW, min(max_stream_window, session_window // 2))
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if client else 2
        self._last_peer_id = 0
        # Ids whose late frames are dropped quietly: a set to look up, a deque for the oldest to
        # forget (deleting the first key of a dict over and over makes finding the next one slow).
        self._discard_ids: set[int] = set()
        self._discard_order: deque[int] = deque()
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._inbuf = bytearray()
        self._preface_received = False
        self._frame_stream: _Stream | None = None  # stream of the DATA frame whose payload is arriving
        self._frame_stream_id = 0
        self._frame_remaining = 0
        self._frame_flags = 0
        self._frame_discard = False
        # session-level flow control
        self._session_window = session_window
        self._session_send_credit = INITIAL_SESSION_WINDOW
        self._session_recv_credit = INITIAL_SESSION_WINDOW
        self._session_to_return = 0
        self._session_blocked: dict[int, None] = {}
        self._send_buffered_total = 0  # bytes waiting for credit, all streams together
        # Replies the peer provoked (PING answers, resets of streams it may not open) that are
        # still queued: a peer that keeps provoking them without reading is stopped, see
        # ``reply_debt_limit``.
        self._reply_debt = 0
        self.reply_debt_limit = 0  # 0: no limit
        self._more_input = False  # receive_data stopped after its share of frames, see more_input
        # frames other than whole DATA frames handled per receive_data call (the rest: more_input)
        self.frames_per_call = CONTROL_FRAMES_PER_CALL
        self._held_for_replies = False  # ... or because of reply_debt_limit, see input_held
        # keepalive
        self._last_received = now
        self._ping_sent_at: float | None = None
        self._ping_value = 0
        self.go_away_sent = False
        self.go_away_received: int | None = None
        self.closed = False
        if client:
            self._out.append(preface())
            self._raise_session_window()

    # --- inspection -----------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def streams_opened(self) -> int:
        """How many streams either side has opened so far."""
        return (self._next_local_id - (1 if self.client else 2)) // 2 + (self._last_peer_id + 1) // 2

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def send_buffered(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.send_buffered if st is not None else 0

    @property
    def send_buffered_total(self) -> int:
        """Bytes queued on all streams waiting for credit (what a peer that withholds credit, or
        does not read, makes this side hold)."""
        return self._send_buffered_total

    @property
    def more_input(self) -> bool:
        """The last ``receive_data`` stopped after ``frames_per_call`` frames other than
        whole DATA frames, with more input buffered: call ``receive_data(b"", now)`` again soon (a
        read full of tiny frames is handled over several calls, so no one call holds the loop)."""
        return self._more_input

    @property
    def input_held(self) -> bool:
        """The last ``receive_data`` left input unparsed because queued replies passed
        ``reply_debt_limit`` (it stays so after they are taken by ``data_to_send``): stop reading,
        and once the output drained call ``receive_data(b"", now)`` to go on."""
        return self._held_for_replies and bool(self._inbuf)

    @property
    def has_input_buffered(self) -> bool:
        return bool(self._inbuf)

    def pending_output(self) -> int:
        """Bytes queued for the wire and not yet taken by ``data_to_send``.  O(pieces queued): for
        checks on connections that queue little (before login), not for the hot path."""
        return sum(map(len, self._out))

    @property
    def ping_outstanding(self) -> bool:
        """A PING was sent and its answer has not come back yet."""
        return self._ping_sent_at is not None

    def is_local_stream(self, stream_id: int) -> bool:
        return (stream_id & 1) == (1 if self.client else 0)

    # --- output ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return and clear everything queued for the wire, as one buffer."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._reply_debt = 0
        return data

    def data_to_send_list(self, limit: int = 0) -> list[bytes | memoryview]:
        """Return and remove what is queued, as a list for ``writelines``, without joining big
        payloads: small neighbours (headers, window updates) are merged so that each piece is worth
        a TLS record of its own.  With ``limit``, stop after about that many bytes (whole frames)
        and leave the rest queued: a writer can then feed its transport in slices."""
        out = self._out
        if not out:
            return []
        if limit:
            taken = 0
            cut = 0
            while cut < len(out) and taken < limit:
                taken += len(out[cut])
                cut += 1
            if cut < len(out):
                self._out = out[cut:]
                out = out[:cut]
            else:
                self._out = []
                self._reply_debt = 0
        else:
            self._out = []
            self._reply_debt = 0
        pieces: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        small_len = 0
        for item in out:
            n = len(item)
            if n >= _BIG_PIECE:
                if small:
                    view = memoryview(item)  # slicing bytes would copy the whole payload
                    small.append(view[:_HEAD_GLUE])  # glue the header to the payload's first bytes
                    pieces.append(b"".join(small))
                    item = view[_HEAD_GLUE:]
                    small = []
                    small_len = 0
                pieces.append(item)
            else:
                small.append(item)
                small_len += n
        if small:
            pieces.append(b"".join(small) if len(small) > 1 else small[0])
        return pieces

    # --- local actions --------------------------------------------------------------------------

    def open_stream(self, data: bytes = b"") -> int:
        """Open a new stream and return its id; ``data`` (may be empty) rides on the SYN frame."""
        if self.closed:
            raise LocalProtocolError("session is closed")
        if self.go_away_sent or self.go_away_received is not None:
            raise LocalProtocolError("session is going away: no new streams")
        stream_id = self._next_local_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted")
        self._next_local_id += 2
        st = _Stream(stream_id)
        st.syn_pending = True
        self._streams[stream_id] = st
        if data:
            self._enqueue(st, data)
            self._flush_stream(st)
        else:
            self._out.append(frame_header(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0))
            st.syn_pending = False
        return stream_id

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue ``data`` on a stream; return the bytes still waiting for credit.

        When the result exceeds ``SEND_BUFFER_HIGH`` the writer should pause until
        ``StreamWritable``.  Writing to a stream that was reset is silently dropped (the caller has
        been or will be told by ``StreamReset``).
        """
        st = self._streams.get(stream_id)
        if st is None:
            self._check_known(stream_id)
            return 0
        if st.fin_pending:
            raise LocalProtocolError(f"stream {stream_id}: write after end_stream")
        n = len(data)
        if (
            not st.send_buffered
            and 0 < n <= st.send_credit
            and n <= self._session_send_credit
            and n <= MAX_FRAME_PAYLOAD
        ):
            # The usual case (nothing waiting, credit enough): one frame now, what _flush_stream
            # would do, without the queue.
            flags = self._opening_flags(st) if st.syn_pending or st.ack_pending else 0
            st.send_credit -= n
            self._session_send_credit -= n
            self._out.append(_pack_header(PROTOCOL_VERSION, FrameType.DATA, flags, stream_id, n))
            self._out.append(data)
            return 0
        if data:
            self._enqueue(st, data)
            self._flush_stream(st)
        if st.send_buffered > SEND_BUFFER_HIGH:
            st.wants_writable = True
        return st.send_buffered

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (FIN after any buffered data)."""
        st = self._streams.get(stream_id)
        if st is None:
            self._check_known(stream_id)
            return
        if st.fin_pending:
            return
        st.fin_pending = True
        self._flush_stream(st)

    def reset_stream(self, stream_id: int, code: int = ResetCode.ABORTED) -> None:
        """Abort both directions of a stream at once."""
        st = self._streams.get(stream_id)
        if st is None:
            self._check_known(stream_id)
            return
        self._send_rst(stream_id, code, st.syn_pending)
        if st.ack_pending:  # refusing a stream the peer just opened: a reply it provoked
            self._reply_debt += HEADER_LEN + 4
        self._forget(st)
        self._remember_discard(stream_id)

    def consume(self, stream_id: int, n: int) -> None:
        """The application wrote out ``n`` delivered bytes of ``stream_id``: return their credit."""
        if n <= 0:
            return
        st = self._streams.get(stream_id)
        if st is None:
            # The stream was reset meanwhile and its bytes were reclaimed then.
            return
        if n > st.recv_unconsumed:
            raise LocalProtocolError(f"stream {stream_id}: consumed {n} bytes, only {st.recv_unconsumed} delivered")
        st.recv_unconsumed -= n
        self._return_session_credit(n)
        if st.fin_received:
            self._maybe_forget(st)
            return
        st.recv_to_return += n
        if st.recv_to_return >= st.recv_window // 2:
            grow = 0
            if st.recv_unconsumed == 0 and st.recv_window < self._max_stream_window:
                grow = min(st.recv_window, self._max_stream_window - st.recv_window)
            delta = st.recv_to_return + grow
            st.recv_window += grow
            st.recv_credit += delta
            st.recv_to_return = 0
            flags = Flag.ACK if st.ack_pending else 0
            st.ack_pending = False
            self._out.append(frame_header(FrameType.WINDOW_UPDATE, flags, stream_id, delta))

    def ping(self, now: float) -> None:
        if self._ping_sent_at is None and not self.closed:
            self._ping_value = (self._ping_value + 1) & 0xFFFFFFFF
            self._ping_sent_at = now
            self._out.append(frame_header(FrameType.PING, Flag.SYN, 0, self._ping_value))

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Tell the peer we accept no new streams.  Existing streams continue."""
        if not self.go_away_sent and not self.closed:
            self.go_away_sent = True
            self._out.append(frame_header(FrameType.GO_AWAY, 0, 0, code))

    def close(self) -> list[int]:
        """Mark the session closed; return the ids of streams that were still open (now dead)."""
        self.closed = True
        ids = list(self._streams)
        self._streams.clear()
        self._send_buffered_total = 0
        self._session_blocked.clear()
        return ids

    # --- time -----------------------------------------------------------------------------------

    def get_timer(self) -> float:
        """The time at which ``handle_timer`` should next be called."""
        if self._ping_sent_at is not None:
            return self._last_received + self.keepalive_timeout
        return self._last_received + self.keepalive_timeout / 3

    def handle_timer(self, now: float) -> None:
        """Send a keepalive PING when idle; raise ``PeerTimeoutError`` when the peer went silent."""
        if self.closed:
            return
        idle = now - self._last_received
        if idle >= self.keepalive_timeout:
            raise PeerTimeoutError(f"peer silent for {idle:.1f} s (keepalive timeout {self.keepalive_timeout:g} s)")
        if idle >= self.keepalive_timeout / 3:
            self.ping(now)

    # --- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes read from the connection; return the events they produced.

        Raises ``RemoteProtocolError`` when the peer broke the protocol (a GO_AWAY has then been
        queued in ``data_to_send()``).
        """
        if self.closed:
            return []
        self._last_received = now
        self._more_input = self._held_for_replies = False
        if self._inbuf:
            self._inbuf += data
            buf: bytes | bytearray | memoryview = self._inbuf
        else:
            buf = data
        try:
            # Payload slices may be handed out as views only while ``buf`` is the caller's
            # immutable bytes; our own reassembly buffer is reused, so its slices are copied.
            pos = self._parse(memoryview(buf), zero_copy=type(buf) is bytes)
        except RemoteProtocolError as exc:
            self._inbuf = bytearray()
            if self._preface_received:  # a peer that is not speaking our protocol gets nothing back
                self.go_away(exc.code)
            self.closed = True
            raise
        if pos < len(buf):
            self._inbuf = bytearray(buf[pos:])
        elif self._inbuf:
            self._inbuf = bytearray()
        events = self._events
        self._events = []
        return events

    def _parse(self, mv: memoryview, zero_copy: bool) -> int:
        pos = 0
        end = len(mv)
        if not self._preface_received:
            if end < PREFACE_LEN:
                head = bytes(mv[: min(end, len(PREFACE_MAGIC))])
                if head != PREFACE_MAGIC[: len(head)]:
                    parse_preface(head)  # garbage (a port scanner, an HTTP request): fail at once
                return 0
            self._check_preface(bytes(mv[:PREFACE_LEN]))
            pos = PREFACE_LEN
        events = self._events
        streams = self._streams
        if self.reply_debt_limit and self._reply_debt > self.reply_debt_limit:
            self._held_for_replies = True
            return pos  # our replies are still queued: parse nothing more until they drained
        budget = self.frames_per_call
        while pos < end:
            if self._frame_remaining:
                take = min(self._frame_remaining, end - pos)
                chunk = mv[pos : pos + take] if zero_copy else bytes(mv[pos : pos + take])
                pos += take
                self._frame_remaining -= take
                if self._frame_discard:
                    self._return_session_credit(take)
                else:
                    st = self._frame_stream
                    assert st is not None
                    st.recv_unconsumed += take
                    events.append(DataReceived(self._frame_stream_id, chunk))
                if self._frame_remaining == 0:
                    self._end_of_data_frame()
                continue
            if end - pos < HEADER_LEN:
                break
            if not budget:
                self._more_input = True
                break
            frame_type, flags, stream_id, length = decode_header(mv, pos)
            if frame_type == FrameType.DATA and flags & Flag.RST:
                if length not in (0, 4):
                    raise RemoteProtocolError(f"RST frame on stream {stream_id} with length {length}, expected 0 or 4")
                if end - pos < HEADER_LEN + length:
                    break
                code = _RST_CODE.unpack_from(mv, pos + HEADER_LEN)[0] if length else ResetCode.ABORTED
                pos += HEADER_LEN + length
                budget -= 1
                self._handle_rst(stream_id, flags, code, length)
                if self.reply_debt_limit and self._reply_debt > self.reply_debt_limit:
                    self._held_for_replies = True
                    break
                continue
            pos += HEADER_LEN
            if frame_type == FrameType.DATA and not flags and 0 < length <= end - pos:
                # The usual case: a whole DATA frame, no flags, for an open stream within its
                # windows; what _start_data_frame and the payload branch above would do.
                st = streams.get(stream_id)
                if (
                    st is not None
                    and not st.fin_received
                    and length <= st.recv_credit
                    and length <= self._session_recv_credit
                ):
                    st.recv_credit -= length
                    self._session_recv_credit -= length
                    st.recv_unconsumed += length
                    chunk = mv[pos : pos + length] if zero_copy else bytes(mv[pos : pos + length])
                    pos += length
                    events.append(DataReceived(stream_id, chunk))
                    continue
            budget -= 1
            if frame_type == FrameType.DATA:
                self._start_data_frame(stream_id, flags, length)
                if length == 0:
                    self._end_of_data_frame()
            elif frame_type == FrameType.WINDOW_UPDATE:
                self._handle_window_update(stream_id, flags, length)
            elif frame_type == FrameType.PING:
                self._handle_ping(stream_id, flags, length)
            else:
                self._handle_go_away(stream_id, length)
            if self.reply_debt_limit and self._reply_debt > self.reply_debt_limit:
                self._held_for_replies = True
                break  # the rest waits in _inbuf until our replies drained (see input_held)
        return pos

    def _check_preface(self, data: bytes) -> None:
        version = parse_preface(data)
        self._preface_received = True
        if self.client:
            if version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"relayd speaks protocol version {version}, this relayc speaks {PROTOCOL_VERSION}: "
                    "install matching versions",
                    code=GoAwayCode.UNSUPPORTED_VERSION,
                )
            return
        self._out.append(preface())
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"relayc speaks protocol version {version}, this relayd speaks {PROTOCOL_VERSION}",
                code=GoAwayCode.UNSUPPORTED_VERSION,
            )
        self._raise_session_window()

    # --- frame handlers -------------------------------------------------------------------------

    def _start_data_frame(self, stream_id: int, flags: int, length: int) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("DATA frame on stream 0")
        st = self._lookup(stream_id, flags)
        if length > self._session_recv_credit:
            raise RemoteProtocolError(
                f"session window exceeded: {length} bytes sent with {self._session_recv_credit} of credit",
                code=GoAwayCode.PROTOCOL_ERROR,
            )
        self._session_recv_credit -= length
        self._frame_stream_id = stream_id
        self._frame_flags = flags
        self._frame_remaining = length
        if st is None:
            if length and stream_id not in self._discard_ids:
                raise RemoteProtocolError(f"DATA for closed stream {stream_id}")
            self._frame_stream = None
            self._frame_discard = True
            return
        if st.fin_received and length:
            raise RemoteProtocolError(f"DATA after FIN on stream {stream_id}")
        if length > st.recv_credit:
            raise RemoteProtocolError(
                f"stream {stream_id} window exceeded: {length} bytes sent with {st.recv_credit} of credit"
            )
        st.recv_credit -= length
        self._frame_stream = st
        self._frame_discard = False

    def _end_of_data_frame(self) -> None:
        st = self._frame_stream
        discard = self._frame_discard
        self._frame_stream = None
        self._frame_discard = False
        if discard or st is None:
            return
        if self._frame_flags & Flag.FIN:
            self._receive_fin(st)

    def _receive_fin(self, st: _Stream) -> None:
        if st.fin_received:
            return
        st.fin_received = True
        self._events.append(StreamEnded(st.stream_id))
        self._maybe_forget(st)

    def _handle_rst(self, stream_id: int, flags: int, code: int, length: int) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("RST on stream 0")
        st = self._lookup(stream_id, flags & ~Flag.RST)
        if st is None:
            return
        self._forget(st)
        self._events.append(StreamReset(stream_id, code))

    def _handle_window_update(self, stream_id: int, flags: int, delta: int) -> None:
        if stream_id == 0:
            if flags:
                raise RemoteProtocolError(f"WINDOW_UPDATE on stream 0 with flags 0x{flags:x}")
            self._session_send_credit += delta
            if self._session_send_credit > MAX_WINDOW:
                raise RemoteProtocolError("session window overflow")
            blocked = list(self._session_blocked)
            self._session_blocked.clear()
            for sid in blocked:
                blocked_st = self._streams.get(sid)
                if blocked_st is not None:
                    self._flush_stream(blocked_st, notify=True)
            return
        st = self._lookup(stream_id, flags)
        if st is None:
            return
        st.send_credit += delta
        if st.send_credit > MAX_WINDOW:
            raise RemoteProtocolError(f"stream {stream_id} window overflow")
        if flags & Flag.RST:
            self._forget(st)
            self._events.append(StreamReset(stream_id, ResetCode.ABORTED))
            return
        if flags & Flag.FIN:
            self._receive_fin(st)
        if st.send_buffered and stream_id in self._streams:
            self._flush_stream(st, notify=True)

    def _handle_ping(self, stream_id: int, flags: int, value: int) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"PING on stream {stream_id}, expected 0")
        if flags == Flag.SYN:
            if not self.closed:
                self._out.append(frame_header(FrameType.PING, Flag.ACK, 0, value))
                self._reply_debt += HEADER_LEN
        elif flags == Flag.ACK:
            if self._ping_sent_at is not None and value == self._ping_value:
                rtt = max(0.0, self._last_received - self._ping_sent_at)
                self._ping_sent_at = None
                self._events.append(PingAnswered(rtt))
        else:
            raise RemoteProtocolError(f"PING with flags 0x{flags:x}, expected SYN or ACK")

    def _handle_go_away(self, stream_id: int, code: int) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"GO_AWAY on stream {stream_id}, expected 0")
        if self.go_away_received is None:
            self.go_away_received = code
            self._events.append(GoAwayReceived(code))

    def _lookup(self, stream_id: int, flags: int) -> _Stream | None:
        """Find the stream a frame is for, opening it on SYN; None means drop the frame."""
        if flags & Flag.SYN:
            return self._accept_stream(stream_id)
        st = self._streams.get(stream_id)
        if st is not None:
            return st
        if stream_id in self._discard_ids:
            return None
        if self._was_opened(stream_id):
            return None
        raise RemoteProtocolError(f"frame for unknown stream {stream_id}")

    def _accept_stream(self, stream_id: int) -> _Stream | None:
        if self.is_local_stream(stream_id):
            side = "relayc" if self.client else "relayd"
            raise RemoteProtocolError(f"peer opened stream {stream_id}, whose parity belongs to {side}")
        if stream_id <= self._last_peer_id:
            raise RemoteProtocolError(f"peer reopened stream {stream_id} (last opened {self._last_peer_id})")
        self._last_peer_id = stream_id
        if self.go_away_sent or len(self._streams) >= self.max_streams:
            self._send_rst(stream_id, ResetCode.REFUSED if not self.go_away_sent else ResetCode.SESSION_CLOSING)
            self._reply_debt += HEADER_LEN + 4
            self._remember_discard(stream_id)
            return None
        st = _Stream(stream_id)
        st.ack_pending = True
        self._streams[stream_id] = st
        self._events.append(StreamOpened(stream_id))
        return st

    def _was_opened(self, stream_id: int) -> bool:
        if self.is_local_stream(stream_id):
            return 0 < stream_id < self._next_local_id
        return 0 < stream_id <= self._last_peer_id

    def _check_known(self, stream_id: int) -> None:
        if (not self.is_local_stream(stream_id) and stream_id > self._last_peer_id) or (
            self.is_local_stream(stream_id) and stream_id >= self._next_local_id
        ):
            raise LocalProtocolError(f"stream {stream_id} was never opened")

    # --- sending machinery ----------------------------------------------------------------------

    def _enqueue(self, st: _Stream, data: bytes | memoryview) -> None:
        chunks = st.send_chunks
        if chunks is None:
            st.send_chunks = chunks = deque()
        chunks.append(data)
        st.send_buffered += len(data)
        self._send_buffered_total += len(data)

    def _flush_stream(self, st: _Stream, notify: bool = False) -> None:
        out = self._out
        while st.send_buffered and st.send_credit > 0:
            if self._session_send_credit <= 0:
                self._session_blocked[st.stream_id] = None
                break
            n = min(st.send_credit, self._session_send_credit, MAX_FRAME_PAYLOAD, st.send_buffered)
            payload = self._take(st, n)
            self._send_buffered_total -= n
            flags = self._opening_flags(st)
            if st.fin_pending and not st.send_buffered:
                flags |= Flag.FIN
                st.fin_sent = True
            out.append(frame_header(FrameType.DATA, flags, st.stream_id, n))
            out.append(payload)
            st.send_credit -= n
            self._session_send_credit -= n
        if not st.send_buffered:
            st.send_chunks = None  # drained (or never used): no empty deque kept per stream
            if st.fin_pending and not st.fin_sent:
                out.append(frame_header(FrameType.DATA, self._opening_flags(st) | Flag.FIN, st.stream_id, 0))
                st.fin_sent = True
            if st.fin_sent:
                self._maybe_forget(st)
        if notify and st.wants_writable and st.send_buffered <= SEND_BUFFER_HIGH:
            st.wants_writable = False
            self._events.append(StreamWritable(st.stream_id))

    @staticmethod
    def _opening_flags(st: _Stream) -> int:
        flags = 0
        if st.syn_pending:
            flags |= Flag.SYN
            st.syn_pending = False
        if st.ack_pending:
            flags |= Flag.ACK
            st.ack_pending = False
        return flags

    @staticmethod
    def _take(st: _Stream, n: int) -> bytes | memoryview:
        chunks = st.send_chunks
        assert chunks is not None  # only called while send_buffered > 0
        st.send_buffered -= n
        first = chunks[0]
        if len(first) == n:
            return chunks.popleft()
        if len(first) > n:
            mv = memoryview(first)
            chunks[0] = mv[n:]
            return mv[:n]
        parts: list[bytes | memoryview] = []
        need = n
        while need:
            head = chunks[0]
            if len(head) <= need:
                parts.append(chunks.popleft())
                need -= len(head)
            else:
                mv = memoryview(head)
                parts.append(mv[:need])
                chunks[0] = mv[need:]
                need = 0
        return b"".join(parts)

    def _send_rst(self, stream_id: int, code: int, syn: bool = False) -> None:
        flags = Flag.RST | (Flag.SYN if syn else 0)
        self._out.append(frame_header(FrameType.DATA, flags, stream_id, 4) + _RST_CODE.pack(code))

    def _raise_session_window(self) -> None:
        extra = self._session_window - INITIAL_SESSION_WINDOW
        if extra > 0:
            self._session_recv_credit += extra
            self._out.append(frame_header(FrameType.WINDOW_UPDATE, 0, 0, extra))

    def _return_session_credit(self, n: int) -> None:
        self._session_to_return += n
        # Batch the updates, but never leave a sender that may be blocked waiting: when stalled
        # streams hold most of the window, every consumed byte must go back at once.
        if (
            self._session_to_return >= self._session_window // 4
            or self._session_recv_credit < self._session_window // 2
        ):
            delta = self._session_to_return
            self._session_to_return = 0
            self._session_recv_credit += delta
            self._out.append(frame_header(FrameType.WINDOW_UPDATE, 0, 0, delta))

    def _forget(self, st: _Stream) -> None:
        """Drop a stream at once (reset): reclaim what it held of the session window."""
        self._streams.pop(st.stream_id, None)
        self._session_blocked.pop(st.stream_id, None)
        if st.recv_unconsumed:
            self._return_session_credit(st.recv_unconsumed)
            st.recv_unconsumed = 0
        st.send_chunks = None
        self._send_buffered_total -= st.send_buffered
        st.send_buffered = 0
        if self._frame_stream is st:
            # the rest of the DATA frame being received is now for a dead stream
            self._frame_stream = None
            self._frame_discard = True

    def _maybe_forget(self, st: _Stream) -> None:
        if st.fin_sent and st.fin_received and not st.send_buffered and not st.recv_unconsumed:
            self._streams.pop(st.stream_id, None)

    def _remember_discard(self, stream_id: int) -> None:
        if stream_id in self._discard_ids:
            return
        self._discard_ids.add(stream_id)
        self._discard_order.append(stream_id)
        if len(self._discard_order) > _DISCARD_MEMORY:
            self._discard_ids.discard(self._discard_order.popleft())


__all__ = [
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_STREAMS",
    "INITIAL_SESSION_WINDOW",
    "INITIAL_STREAM_WINDOW",
    "SEND_BUFFER_HIGH",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingAnswered",
    "Session",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamWritable",
]
