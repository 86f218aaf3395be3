from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, PeerTimeoutError, RemoteProtocolError
from shared.frames import MAX_FRAME_PAYLOAD, Flag, FrameType, GoAwayCode, ResetCode, frame_header, preface
from shared.mux import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    SEND_BUFFER_HIGH,
    GoAwayReceived,
    PingAnswered,
    Session,
    StreamOpened,
    StreamWritable,
)
from tests.mux_pair import Pair


def server_after_preface() -> Session:
    s = Session(False, 0.0)
    s.receive_data(preface(), 0.0)
    s.data_to_send()
    return s


def data_frame(sid: int, payload: bytes, flags: int = 0) -> bytes:
    return frame_header(FrameType.DATA, flags, sid, len(payload)) + payload


# --- basic behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_open_write_half_close_both_ways(chunk: int | None) -> None:
    pair = Pair(chunk=chunk)
    c, s = pair.client.session, pair.server.session
    sid = c.open_stream(b"hello")
    assert sid == 1
    pair.pump()
    assert pair.server.opened == [1]
    c.send_data(sid, b" world")
    c.end_stream(sid)
    pair.pump()
    assert bytes(pair.server.received[1]) == b"hello world"
    assert 1 in pair.server.ended
    # the other direction is still open after the client's FIN (half-close)
    s.send_data(1, b"reply")
    s.end_stream(1)
    pair.pump()
    assert bytes(pair.client.received[1]) == b"reply"
    assert 1 in pair.client.ended
    assert c.stream_count == 0 and s.stream_count == 0


def test_server_opens_even_ids_client_odd() -> None:
    pair = Pair()
    pair.pump()
    assert pair.server.session.open_stream(b"x") == 2
    assert pair.server.session.open_stream(b"y") == 4
    assert pair.client.session.open_stream() == 1
    pair.pump()
    assert pair.client.opened == [2, 4]
    assert pair.server.opened == [1]


def test_first_frame_back_carries_ack() -> None:
    pair = Pair()
    pair.client.session.open_stream(b"x")
    pair.pump()
    pair.server.session.send_data(1, b"y")
    wire = pair.server.session.data_to_send()
    assert wire[3] & Flag.ACK


def test_reset_reaches_peer_with_code_and_late_frames_are_dropped() -> None:
    pair = Pair()
    c, s = pair.client.session, pair.server.session
    sid = c.open_stream(b"a")
    pair.pump()
    s.send_data(sid, b"in flight")  # queued by the server before it learns of the reset
    c.reset_stream(sid, ResetCode.REFUSED)
    pair.pump()
    assert pair.server.resets == {sid: ResetCode.REFUSED}
    assert pair.client.received.get(sid) is None
    assert c.stream_count == 0 and s.stream_count == 0


def test_send_after_end_is_local_error() -> None:
    pair = Pair()
    sid = pair.client.session.open_stream()
    pair.client.session.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        pair.client.session.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        pair.client.session.send_data(99, b"x")


# --- flow control -------------------------------------------------------------------------------


def test_sender_never_exceeds_credit_and_credit_returns_on_consume_only() -> None:
    pair = Pair()
    pair.server.auto_consume = False
    c = pair.client.session
    sid = c.open_stream()
    pending = c.send_data(sid, os.urandom(3 * INITIAL_STREAM_WINDOW))
    assert pending == 2 * INITIAL_STREAM_WINDOW
    pair.pump()
    assert len(pair.server.received[sid]) == INITIAL_STREAM_WINDOW
    assert c.send_buffered(sid) == 2 * INITIAL_STREAM_WINDOW
    # consuming returns credit: half a window unlocks at least half a window more
    pair.server.session.consume(sid, INITIAL_STREAM_WINDOW // 2)
    pair.pump()
    assert len(pair.server.received[sid]) >= INITIAL_STREAM_WINDOW * 3 // 2


def test_writer_is_told_to_pause_and_then_resume() -> None:
    pair = Pair()
    pair.server.auto_consume = False
    c = pair.client.session
    sid = c.open_stream()
    assert c.send_data(sid, bytes(SEND_BUFFER_HIGH * 3)) > SEND_BUFFER_HIGH
    pair.pump()
    assert not any(isinstance(e, StreamWritable) for e in pair.client.events)
    pair.server.auto_consume = True
    pair.server.session.consume(sid, len(pair.server.received[sid]))
    pair.pump()
    assert any(isinstance(e, StreamWritable) and e.stream_id == sid for e in pair.client.events)


def test_window_grows_for_a_fast_drained_stream_only() -> None:
    pair = Pair()
    c = pair.client.session
    fast = c.open_stream()
    c.send_data(fast, bytes(8 * 1024 * 1024))
    pair.pump()
    slow = c.open_stream()
    pair.server.auto_consume = False
    c.send_data(slow, bytes(2 * 1024 * 1024))
    pair.pump()
    srv = pair.server.session._streams
    assert srv[fast].recv_window > 4 * INITIAL_STREAM_WINDOW
    assert srv[slow].recv_window == INITIAL_STREAM_WINDOW


def test_stalled_stream_does_not_stall_another_on_same_session() -> None:
    """One stream never read; another still moves 50 MB, and buffering stays under the cap."""
    pair = Pair()
    c, s = pair.client.session, pair.server.session
    stalled = c.open_stream()
    moving = c.open_stream()
    pair.pump()
    consumed_other = 0
    pair.server.auto_consume = False
    c.send_data(stalled, bytes(10 * 1024 * 1024))
    total = 50 * 1024 * 1024
    block = bytes(1024 * 1024)
    sent = 0
    max_unconsumed = 0
    while consumed_other < total:
        if sent < total and c.send_buffered(moving) < 2 * len(block):
            c.send_data(moving, block)
            sent += len(block)
        pair.pump()
        got = len(pair.server.received[moving]) - consumed_other
        if got:
            s.consume(moving, got)
            consumed_other += got
        unconsumed = sum(st.recv_unconsumed for st in s._streams.values())
        max_unconsumed = max(max_unconsumed, unconsumed)
        assert sent <= total
    assert consumed_other == total
    assert len(pair.server.received[stalled]) == INITIAL_STREAM_WINDOW  # stalled stays at its window
    assert max_unconsumed <= s._session_window


def test_session_cap_bounds_buffered_bytes_across_many_slow_streams() -> None:
    pair = Pair(session_window=INITIAL_SESSION_WINDOW)
    pair.server.auto_consume = False
    c, s = pair.client.session, pair.server.session
    ids = [c.open_stream() for _ in range(200)]  # 200 x 256 KiB of stream credit = 50 MiB > 16 MiB cap
    for sid in ids:
        c.send_data(sid, bytes(INITIAL_STREAM_WINDOW))
    pair.pump()
    buffered = sum(len(pair.server.received[sid]) for sid in ids)
    assert buffered <= INITIAL_SESSION_WINDOW
    assert buffered == INITIAL_SESSION_WINDOW  # the cap is reached, not more
    # consuming one stream's bytes lets the blocked streams progress again
    s.consume(ids[0], len(pair.server.received[ids[0]]))
    s.consume(ids[1], len(pair.server.received[ids[1]]))
    before = buffered
    pair.pump()
    assert sum(len(pair.server.received[sid]) for sid in ids) > before


def test_peer_over_stream_window_is_protocol_error() -> None:
    s = server_after_preface()
    s.receive_data(data_frame(1, b"x", Flag.SYN), 0)
    big = bytes(MAX_FRAME_PAYLOAD)
    with pytest.raises(RemoteProtocolError, match="window exceeded"):
        for _ in range(2):  # 2 x 256 KiB > the 256 KiB initial window
            s.receive_data(data_frame(1, big), 0)
    assert s.closed
    assert frame_header(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR) in s.data_to_send()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire,match",
    [
        (b"GET / HTTP/1.1\r\n", "not a relay peer"),
        (b"RELAY\x02\r\n", "protocol version 2"),
        (preface() + bytes([1, 9]) + bytes(10), "unknown frame type"),
        (preface() + frame_header(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1), "exceeds the maximum"),
        (preface() + data_frame(5, b"x"), "unknown stream 5"),
        (preface() + data_frame(2, b"x", Flag.SYN), "parity"),
        (preface() + data_frame(3, b"x", Flag.SYN) + data_frame(1, b"x", Flag.SYN), "reopened"),
        (preface() + data_frame(1, b"x", Flag.SYN | Flag.FIN) + data_frame(1, b"y"), "after FIN"),
        (preface() + data_frame(0, b"x"), "stream 0"),
        (preface() + frame_header(FrameType.PING, Flag.SYN, 3, 0), "PING on stream 3"),
        (preface() + frame_header(FrameType.PING, 0, 0, 0), "PING with flags"),
        (preface() + frame_header(FrameType.GO_AWAY, 0, 1, 0), "GO_AWAY on stream 1"),
        (preface() + frame_header(FrameType.WINDOW_UPDATE, 0, 0, 0x7FFFFFFF), "overflow"),
        (preface() + frame_header(FrameType.DATA, Flag.RST | Flag.SYN, 1, 9) + bytes(9), "RST frame"),
    ],
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_bad_input_raises_remote_protocol_error(wire: bytes, match: str, chunk: int | None) -> None:
    s = Session(False, 0.0)
    with pytest.raises(RemoteProtocolError, match=match):
        if chunk is None:
            s.receive_data(wire, 0)
        else:
            for i in range(len(wire)):
                s.receive_data(wire[i : i + 1], 0)
    assert s.closed
    assert s.receive_data(b"more garbage", 0) == []  # a failed session ignores the rest


def test_data_for_closed_stream_is_error_but_window_update_is_ignored() -> None:
    pair = Pair()
    c, s = pair.client.session, pair.server.session
    sid = c.open_stream(b"x")
    c.end_stream(sid)
    pair.pump()
    s.end_stream(sid)
    pair.pump()
    assert s.stream_count == 0
    assert s.receive_data(frame_header(FrameType.WINDOW_UPDATE, 0, sid, 10), 0) == []
    with pytest.raises(RemoteProtocolError, match="closed stream"):
        s.receive_data(data_frame(sid, b"late"), 0)


def test_partial_frame_is_buffered_not_misparsed() -> None:
    s = server_after_preface()
    frame = data_frame(1, b"abcdef", Flag.SYN)
    assert s.receive_data(frame[:5], 0) == []
    events = s.receive_data(frame[5:14], 0)
    assert [type(e).__name__ for e in events] == ["StreamOpened", "DataReceived"]
    events += s.receive_data(frame[14:], 0)
    assert b"".join(e.data for e in events if hasattr(e, "data")) == b"abcdef"
    assert len(s._inbuf) == 0


def test_max_streams_refuses_with_rst_and_discards_their_data() -> None:
    pair = Pair(max_streams=2)
    c = pair.client.session
    ids = [c.open_stream(b"x") for _ in range(3)]
    pair.pump()
    assert pair.server.opened == ids[:2]
    assert pair.client.resets == {ids[2]: ResetCode.REFUSED}


# --- keepalive and go-away ----------------------------------------------------------------------


def test_keepalive_ping_and_dead_peer_detection() -> None:
    pair = Pair(keepalive_timeout=30.0)
    c = pair.client.session
    pair.pump()
    assert c.get_timer() == pytest.approx(10.0)
    pair.now = 10.0
    c.handle_timer(10.0)
    pair.pump()
    assert any(isinstance(e, PingAnswered) for e in pair.client.events)
    # now the peer goes silent: no bytes delivered any more
    c.handle_timer(20.0)  # sends a PING that is never answered
    assert c.data_to_send()
    assert c.get_timer() == pytest.approx(40.0)
    with pytest.raises(PeerTimeoutError, match="silent"):
        c.handle_timer(40.0)


def test_go_away_refuses_new_streams_but_existing_finish() -> None:
    pair = Pair()
    c, s = pair.client.session, pair.server.session
    sid = c.open_stream(b"before")
    pair.pump()
    s.go_away(GoAwayCode.NORMAL)
    pair.pump()
    assert any(isinstance(e, GoAwayReceived) for e in pair.client.events)
    with pytest.raises(LocalProtocolError, match="going away"):
        c.open_stream()
    c.send_data(sid, b" after")
    c.end_stream(sid)
    pair.pump()
    assert bytes(pair.server.received[sid]) == b"before after"


def test_stream_opened_event_precedes_data() -> None:
    pair = Pair()
    pair.client.session.open_stream(b"abc")
    pair.pump()
    assert isinstance(pair.server.events[0], StreamOpened)


# --- properties ---------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.integers(0, 5)),
        st.tuples(st.just("write"), st.integers(0, 5), st.integers(0, 300_000)),
        st.tuples(st.just("end"), st.integers(0, 5)),
        st.tuples(st.just("reset"), st.integers(0, 5)),
        st.tuples(st.just("pump"), st.integers(0, 0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from([None, 1000, 65536]), st.booleans())
def test_random_operations_deliver_exact_bytes_in_order(
    script: list[tuple[int | str, ...]], chunk: int | None, server_opens: bool
) -> None:
    pair = Pair(chunk=chunk)
    opener = pair.server if server_opens else pair.client
    receiver = pair.client if server_opens else pair.server
    pair.pump()
    streams: list[int] = []
    sent: dict[int, bytearray] = {}
    ended: set[int] = set()
    reset: set[int] = set()
    counter = 0
    for op in script:
        kind = op[0]
        if kind == "open":
            sid = opener.session.open_stream()
            streams.append(sid)
            sent[sid] = bytearray()
        elif not streams:
            continue
        elif kind == "write":
            sid = streams[int(op[1]) % len(streams)]
            if sid in ended or sid in reset:
                continue
            n = int(op[2])
            data = bytes((counter + i) % 251 for i in range(n)) if n < 1000 else os.urandom(n)
            counter += n
            opener.session.send_data(sid, data)
            sent[sid] += data
        elif kind == "end":
            sid = streams[int(op[1]) % len(streams)]
            if sid not in reset:
                opener.session.end_stream(sid)
                ended.add(sid)
        elif kind == "reset":
            sid = streams[int(op[1]) % len(streams)]
            if sid not in reset and sid not in ended:
                opener.session.reset_stream(sid)
                reset.add(sid)
        else:
            pair.pump()
    pair.pump()
    for sid in streams:
        got = bytes(receiver.received.get(sid, b""))
        if sid in reset:
            assert sent[sid].startswith(got)  # a prefix, never garbage
        else:
            assert got == bytes(sent[sid])
            assert (sid in receiver.ended) == (sid in ended)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_parse_or_raise_protocol_error(data: bytes, with_preface: bool) -> None:
    s = Session(False, 0.0)
    try:
        s.receive_data((preface() if with_preface else b"") + data, 0.0)
    except RemoteProtocolError:
        assert s.closed


frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from([0, Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST, Flag.SYN | Flag.FIN]),
        st.integers(0, 6),
        st.integers(0, 70000),
    ),
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(frames_strategy)
def test_random_well_formed_frames_never_crash(frames: list[tuple[int, int, int, int]]) -> None:
    """Syntactically valid frames in a random order: events or RemoteProtocolError, nothing else."""
    s = Session(False, 0.0)
    wire = bytearray(preface())
    for ftype, flags, sid, length in frames:
        if ftype == FrameType.DATA:
            length = min(length, 5000)
            payload = struct.pack("!I", 1) if flags & Flag.RST else bytes(length)
            wire += frame_header(ftype, flags, sid, len(payload)) + payload
        else:
            wire += frame_header(ftype, flags, sid, length)
    try:
        s.receive_data(bytes(wire), 0.0)
        s.data_to_send()
    except RemoteProtocolError:
        assert s.closed


def test_a_peer_provoking_replies_it_does_not_read_is_held_back() -> None:
    server = Session(False, 0.0)
    server.receive_data(preface(), 0.0)
    server.data_to_send()
    server.reply_debt_limit = 1200  # set by the adapter while its writes are blocked
    pings = b"".join(frame_header(FrameType.PING, Flag.SYN, 0, i) for i in range(1000))
    opens = b"".join(frame_header(FrameType.DATA, Flag.SYN | Flag.FIN, i, 0) for i in range(3, 2003, 2))
    server.receive_data(pings + opens, 0.0)
    queued = server.pending_output()
    assert 1200 < queued <= 1200 + 16  # parsing stopped right after the limit
    assert server.input_held and server.has_input_buffered
    # nothing is parsed while the replies are still queued
    server.receive_data(b"", 0.0)
    assert server.pending_output() == queued
    # once they were written out, parsing goes on where it stopped
    answered = 0
    for _ in range(10_000):
        out = server.data_to_send()
        answered += out.count(frame_header(FrameType.PING, Flag.ACK, 0, 0)[:4])
        if not server.has_input_buffered:
            break
        server.receive_data(b"", 0.0)
    assert not server.has_input_buffered
    server.reply_debt_limit = 0
    assert answered >= 1000  # every PING answered, in bounded pieces


def test_bytes_waiting_for_credit_are_counted_across_streams() -> None:
    pair = Pair()
    pair.server.auto_consume = False
    ids = [pair.client.session.open_stream() for _ in range(3)]
    pair.pump()
    for sid in ids:
        pair.client.session.send_data(sid, b"x" * (INITIAL_STREAM_WINDOW + 1000))
    pair.pump()
    assert pair.client.session.send_buffered_total == 3 * 1000
    pair.client.session.reset_stream(ids[0])
    assert pair.client.session.send_buffered_total == 2 * 1000
    for sid in ids[1:]:
        pair.server.session.consume(sid, INITIAL_STREAM_WINDOW)
    pair.pump()
    assert pair.client.session.send_buffered_total == 0


def test_a_read_full_of_tiny_frames_is_handled_over_several_calls() -> None:
    server = Session(False, 0.0)
    server.receive_data(preface(), 0.0)
    server.data_to_send()
    pings = b"".join(frame_header(FrameType.PING, Flag.SYN, 0, i) for i in range(3000))
    server.receive_data(pings, 0.0)
    calls, answered = 1, server.data_to_send().count(b"\x01\x02\x00\x02")  # version, PING, flags ACK
    assert server.more_input and answered < 3000
    while server.more_input:
        server.receive_data(b"", 0.0)
        answered += server.data_to_send().count(b"\x01\x02\x00\x02")
        calls += 1
    assert answered == 3000 and calls == 3
    # whole DATA frames are not counted: a bulk read is handled in one call
    pair = Pair()
    sid = pair.client.session.open_stream()
    pair.pump()
    for _ in range(2000):
        pair.client.session.send_data(sid, b"x" * 100)
    events = pair.server.session.receive_data(pair.client.session.data_to_send(), 0.0)
    assert not pair.server.session.more_input and len(events) == 2000


def test_frames_per_call_is_the_share_of_one_call() -> None:
    """relayd lowers it before login (PRELOGIN_FRAMES_PER_CALL), so a stranger's read full of
    stream openings is looked at a few at a time: the first one is seen, and the connection
    dropped, before thousands are parsed."""
    server = Session(False, 0.0)
    server.frames_per_call = 16
    server.receive_data(preface(), 0.0)
    opens = b"".join(frame_header(FrameType.WINDOW_UPDATE, Flag.SYN, sid, 0) for sid in range(1, 2000, 2))
    events = server.receive_data(opens, 0.0)
    assert len(events) == 16 and server.more_input
    events = server.receive_data(b"", 0.0)
    assert len(events) == 16 and server.more_input
