from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_server.http1 import Body, HttpError, RequestHead, RequestReader, Tunnel

GET = b"GET /a?x=1 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: b.example\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: c.example\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: d.example\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
           b"\x81\x85raw-frame-bytes")  # fmt: skip


def run(data: bytes, chunk: int | None = None) -> tuple[list[RequestHead], bytes, bool]:
    r = RequestReader()
    events = []
    if chunk is None:
        events = r.feed(data)
    else:
        for i in range(0, len(data), chunk):
            events += r.feed(data[i : i + chunk])
    heads = [e for e in events if isinstance(e, RequestHead)]
    body = b"".join(e.data for e in events if isinstance(e, Body))
    return heads, body, any(isinstance(e, Tunnel) for e in events)


@pytest.mark.parametrize("chunk", [None, 1, 3, 17])
def test_pipelined_requests_whole_and_byte_at_a_time(chunk: int | None) -> None:
    heads, body, tunnel = run(GET + POST + CHUNKED + GET, chunk)
    assert [h.get("host") for h in heads] == ["a.example", "b.example", "c.example", "a.example"]
    assert heads[0].path == "/a" and heads[0].method == "GET"
    assert body == b"hello" + CHUNKED[CHUNKED.index(b"\r\n\r\n") + 4 :]  # chunked passed through as is
    assert not tunnel


@pytest.mark.parametrize("chunk", [None, 1])
def test_upgrade_makes_the_rest_opaque(chunk: int | None) -> None:
    heads, body, tunnel = run(UPGRADE + GET, chunk)
    assert len(heads) == 1 and heads[0].is_upgrade and tunnel
    assert body == b"\x81\x85raw-frame-bytes" + GET  # not parsed as a request any more


def test_encode_roundtrip() -> None:
    (head,), _, _ = run(GET)
    assert head.encode() == GET


def test_absolute_form_path() -> None:
    (head,), _, _ = run(b"GET http://x.example/p/q?z HTTP/1.1\r\nHost: x.example\r\n\r\n")
    assert head.path == "/p/q"


@pytest.mark.parametrize(
    "data,status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),  # a bare CR inside a value
        (b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n", 400),  # a bare LF
        (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),  # obsolete line folding
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431),  # too big even before the head ends
    ],
)
def test_errors_carry_the_status(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        RequestReader().feed(data)
    assert info.value.status == status


def test_values_lose_surrounding_whitespace_only() -> None:
    (head,), _, _ = run(b"GET / HTTP/1.1\r\nHost: \t a.example \t\r\nX-Empty:\r\nX-Inner:  a  b  \r\n\r\n")
    assert head.headers == [("Host", "a.example"), ("X-Empty", ""), ("X-Inner", "a  b")]
    assert head.get("x-inner") == "a  b" and head.get_all("X-EMPTY") == [""]


def test_head_in_progress_flag() -> None:
    r = RequestReader()
    r.feed(b"GET / HT")
    assert r.head_in_progress
    r.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert not r.head_in_progress and r.between_requests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_parse_or_raise_http_error(data: bytes) -> None:
    try:
        RequestReader(max_head=300).feed(data)
    except HttpError as exc:
        assert exc.status in (400, 431)


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,11}", fullmatch=True)
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_names, _values), max_size=6),
    st.sampled_from(["GET", "POST", "OPTIONS"]),
    st.binary(max_size=10),
)
def test_a_whole_request_parses_as_it_does_byte_at_a_time(
    fields: list[tuple[str, str]], method: str, body: bytes
) -> None:
    # One request whole in one read takes the fast path; byte at a time, the general one.
    fields = [(k, v) for k, v in fields if k.lower() not in ("content-length", "transfer-encoding", "upgrade")]
    if body:
        fields.append(("Content-Length", str(len(body))))
    head = f"{method} /p?q=1 HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    data = head.encode("latin-1") + body
    whole = RequestReader().feed(data)
    reader = RequestReader()
    pieces = [ev for i in range(len(data)) for ev in reader.feed(data[i : i + 1])]
    reader = RequestReader()  # the head in one read (the fast path), its body in the next
    two = reader.feed(head.encode("latin-1")) + reader.feed(body)
    assert [type(e) for e in whole] == [RequestHead, *([Body] if body else [])]
    assert whole[0] == pieces[0] == two[0]
    assert whole[0].raw == pieces[0].raw == two[0].raw == head[:-2].encode("latin-1")
    assert whole[0].headers == [(k, v.strip(" \t")) for k, v in fields]
    assert b"".join(e.data for e in whole[1:]) == b"".join(e.data for e in pieces[1:]) == body
    assert b"".join(e.data for e in two[1:] if isinstance(e, Body)) == body and reader.between_requests


def test_non_ascii_target_is_refused_whole_or_in_pieces() -> None:
    data = "GET /caf\u00e9 HTTP/1.1\r\nHost: a\r\n\r\n".encode("latin-1")
    for chunk in (None, 1):
        with pytest.raises(HttpError, match="not ASCII"):
            run(data, chunk)
