from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_server import http1
from relay_server.http1 import AnswerStatusReader, Body, Event, HttpError, RequestHead, RequestReader, Tunnel

GET = b"GET /a?x=1 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: b.example\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: c.example\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: d.example\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
           b"\x81\x85raw-frame-bytes")  # fmt: skip
UPGRADE_HEAD = UPGRADE[: UPGRADE.index(b"\r\n\r\n") + 4]
CONNECT = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
CHUNKS = [None, 1]  # every malformed case is fed whole, then one byte at a time


def feed(r: RequestReader, data: bytes, chunk: int | None, answer: int | None = None) -> list[Event]:
    """Feed ``data`` whole or in pieces; with ``answer``, answer every Upgrade/CONNECT at once."""
    events: list[Event] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        events += r.feed(piece)
        while answer is not None and r.awaiting_answer:
            events += r.answer(answer)
    return events


def run(data: bytes, chunk: int | None = None, answer: int | None = None) -> tuple[list[RequestHead], bytes, bool]:
    events = feed(RequestReader(), data, chunk, answer)
    heads = [e for e in events if isinstance(e, RequestHead)]
    body = b"".join(e.data for e in events if isinstance(e, Body))
    return heads, body, any(isinstance(e, Tunnel) for e in events)


def fails(data: bytes, chunk: int | None, status: int = 400, match: str | None = None) -> None:
    with pytest.raises(HttpError, match=match) as info:
        feed(RequestReader(), data, chunk)
    assert info.value.status == status


def one_head(data: bytes, chunk: int | None = None) -> RequestHead:
    heads, _, _ = run(data, chunk)
    assert len(heads) == 1
    return heads[0]


def get(target: str, method: str = "GET", host: str = "a.example") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1")


@pytest.mark.parametrize("chunk", [None, 1, 3, 17])
def test_pipelined_requests_whole_and_byte_at_a_time(chunk: int | None) -> None:
    heads, body, tunnel = run(GET + POST + CHUNKED + GET, chunk)
    assert [h.get("host") for h in heads] == ["a.example", "b.example", "c.example", "a.example"]
    assert heads[0].path == "/a" and heads[0].method == "GET"
    assert body == b"hello" + CHUNKED[CHUNKED.index(b"\r\n\r\n") + 4 :]  # chunked passed through as is
    assert not tunnel


@pytest.mark.parametrize("chunk", [None, 1])
def test_upgrade_makes_the_rest_opaque(chunk: int | None) -> None:
    heads, body, tunnel = run(UPGRADE + GET, chunk, answer=101)
    assert len(heads) == 1 and heads[0].is_upgrade and tunnel
    assert body == b"\x81\x85raw-frame-bytes" + GET  # not parsed as a request any more


def test_encode_roundtrip() -> None:
    (head,), _, _ = run(GET)
    assert head.encode() == GET


def test_absolute_form_path() -> None:
    (head,), _, _ = run(b"GET http://x.example/p/q?z HTTP/1.1\r\nHost: x.example\r\n\r\n")
    assert head.path == "/p/q"


@pytest.mark.parametrize("chunk", CHUNKS)
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
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # no Host (an HTTP/1.1 request)
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, 431),  # too big even before the head ends
    ],
)
def test_errors_carry_the_status(data: bytes, status: int, chunk: int | None) -> None:
    fails(data, chunk, status)


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
        assert exc.status in (400, 431, 501)


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
    skip = ("content-length", "transfer-encoding", "upgrade", "host")  # one Host, added first
    fields = [("Host", "h.example"), *[(k, v) for k, v in fields if k.lower() not in skip]]
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
    assert isinstance(whole[0], RequestHead) and isinstance(pieces[0], RequestHead)
    assert isinstance(two[0], RequestHead)
    assert whole[0].raw == pieces[0].raw == two[0].raw == head[:-2].encode("latin-1")
    assert whole[0].route_path == pieces[0].route_path == two[0].route_path == "/p"
    assert whole[0].headers == [(k, v.strip(" \t")) for k, v in fields]
    assert b"".join(e.data for e in whole[1:] if isinstance(e, Body)) == body
    assert b"".join(e.data for e in pieces[1:] if isinstance(e, Body)) == body
    assert b"".join(e.data for e in two[1:] if isinstance(e, Body)) == body and reader.between_requests


def test_non_ascii_target_is_refused_whole_or_in_pieces() -> None:
    data = "GET /caf\u00e9 HTTP/1.1\r\nHost: a\r\n\r\n".encode("latin-1")
    for chunk in (None, 1):
        with pytest.raises(HttpError, match="not ASCII"):
            run(data, chunk)


# --- Content-Length and Transfer-Encoding ------------------------------------------------------


def post(*fields: str, version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    lines = "".join(f"{f}\r\n" for f in fields)
    text = f"POST /p {version}\r\nHost: a.example\r\n{lines}\r\n"
    # as bytes: '²' as the one byte 0xb2 (which latin-1 decodes to '²' again), '\u0665' in UTF-8
    return (text.encode("latin-1") if max(text) <= "\xff" else text.encode()) + body


BAD_LENGTHS = ["\u00b2", "5\u00b2", "\u0665", "-1", "+5", "5_0", "5 5", "0x5", "", "5,6", "5, 05", "5,", ",5", "1" * 19,
               "5\t,\t6", "1e3", "5.0", "\u2075"]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("value", BAD_LENGTHS)
def test_malformed_content_length_is_400(value: str, chunk: int | None) -> None:
    fails(post(f"Content-Length: {value}", body=b"hello"), chunk, 400, "Content-Length")


CONFLICTING_LENGTHS = [
    ("Content-Length: 5", "Content-Length: 6"), ("Content-Length: 5", "Content-Length: 5, 6"),
    ("Content-Length: 5", "Content-Length: 05"), ("Content-Length: 5", "Content-Length:"),
]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("fields", CONFLICTING_LENGTHS)
def test_conflicting_content_length_fields_are_400(fields: tuple[str, ...], chunk: int | None) -> None:
    fails(post(*fields, body=b"hello"), chunk, 400, "Content-Length")


EQUAL_LENGTHS = [
    ("Content-Length: 5",), ("Content-Length: 5, 5",), ("Content-Length: 5", "content-length: 5"),
    ("Content-Length: \t5 ",), ("Content-Length: 5 ,5",), ("Content-Length: 000000000000000005",),
]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("fields", EQUAL_LENGTHS)
def test_equal_content_lengths_are_one(fields: tuple[str, ...], chunk: int | None) -> None:
    heads, body, _ = run(post(*fields, body=b"hello") + GET, chunk)
    assert body == b"hello" and len(heads) == 2


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "data,status,match",
    [
        (post("Transfer-Encoding: chunked", "Content-Length: 5"), 400, "Content-Length"),
        (post("Content-Length: 5", "Transfer-Encoding: chunked"), 400, "Content-Length"),
        (post("Content-Length: 5", "Transfer-Encoding: gzip"), 400, "Content-Length"),
        (post("Transfer-Encoding: chunked", version="HTTP/1.0"), 400, "HTTP/1.0"),
        (post("Transfer-Encoding: gzip", version="HTTP/1.0"), 400, "HTTP/1.0"),
        (post("Transfer-Encoding: gzip"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: gzip, chunked"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: chunked, chunked"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: chunked,"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: identity"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding:"), 501, "unsupported Transfer-Encoding"),
        (post("Transfer-Encoding: chunk"), 501, "unsupported Transfer-Encoding"),
        # U+017F, whose upper() is 'S', sent as UTF-8
        (post("Transfer-Encoding: \u017fchunked"), 501, "unsupported Transfer-Encoding"),
    ],
)
def test_transfer_encoding_rules(data: bytes, status: int, match: str, chunk: int | None) -> None:
    fails(data, chunk, status, match)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("value", ["chunked", "Chunked", " CHUNKED\t", "cHuNkEd"])
def test_chunked_in_any_case(value: str, chunk: int | None) -> None:
    heads, body, _ = run(post(f"Transfer-Encoding: {value}", body=b"1\r\nx\r\n0\r\n\r\n") + GET, chunk)
    assert body == b"1\r\nx\r\n0\r\n\r\n" and len(heads) == 2


CHUNKED_HEAD = post("Transfer-Encoding: chunked")


BAD_CHUNK_LINES = [
    b"0x1a", b"+1a", b"1_a", b" 1a", b"", b"-1", b"1a ", b"1a\t", b"g", b"1" * 17, b"1a;\x01", b"1a;x\x7f",
    b"1a;x\x00", b"1a;x\ry", b"1a;x\ny", b"1a x", b"\xd9\xa1", b"\xb2", b";x", b"1a\x0b", b"0 x",
]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("line", BAD_CHUNK_LINES)
def test_malformed_chunk_size_line_is_400(line: bytes, chunk: int | None) -> None:
    fails(CHUNKED_HEAD + line + b"\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n", chunk, 400, "chunk")


CHUNK_LINES = [b"1a", b"1A", b"001a", b"000000000000001a", b"1a;x", b'1a;name=value;n2="q v"', b"1a ;x", b"1a\t;x",
               b"1a;", b"1a; x\t\x80\xff"]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("line", CHUNK_LINES)
def test_valid_chunk_size_lines(line: bytes, chunk: int | None) -> None:
    body = line + b"\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    heads, got, _ = run(CHUNKED_HEAD + body + GET, chunk)
    assert got == body and len(heads) == 2


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunk_size_line_is_bounded_the_same_whole_or_in_pieces(chunk: int | None) -> None:
    fine = b"1;" + b"x" * 4093  # 4095 bytes before the CRLF
    _, got, _ = run(CHUNKED_HEAD + fine + b"\r\nx\r\n0\r\n\r\n", chunk)
    assert got.startswith(fine)
    fails(CHUNKED_HEAD + fine + b"x\r\nx\r\n0\r\n\r\n", chunk, 400, "too long")
    fails(CHUNKED_HEAD + fine + b"xx", chunk, 400, "too long")  # before its end arrives


BAD_CHUNK_ENDS = [
    b"1\r\nxy\r\n", b"1\r\nx\n\r\n", b"1\r\nx\rx", b"0\r\nX\r\n\r\n", b"0\r\nX: a\nGET /admin HTTP/1.1\r\n\r\n",
    b"0\r\n folded: x\r\n\r\n", b"0\r\nX : a\r\n\r\n", b"0\r\nX: \x01\r\n\r\n",
]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rest", BAD_CHUNK_ENDS)
def test_malformed_chunk_end_or_trailers_are_400(rest: bytes, chunk: int | None) -> None:
    fails(CHUNKED_HEAD + rest, chunk, 400)


# --- the head's lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("char", [0x00, 0x01, 0x07, 0x08, 0x0B, 0x0C, 0x0E, 0x1B, 0x1F, 0x7F])
def test_control_characters_in_values_are_400(char: int, chunk: int | None) -> None:
    for value in (bytes([char]), b"a" + bytes([char]) + b"b", b"ab" + bytes([char])):
        fails(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + value + b"\r\n\r\n", chunk, 400, "header value")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_htab_space_vchar_and_obs_text_are_values(chunk: int | None) -> None:
    value = bytes([0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)]) + b"z"
    head = one_head(b"GET / HTTP/1.1\r\nHost: a\r\nX: a" + value + b"\r\n\r\n", chunk)
    assert head.get("x") == ("a" + value.decode("latin-1"))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "data,match",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n", "malformed header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n", "malformed header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): x\r\n\r\n", "malformed header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: x\r\n\r\n", "malformed header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nY: b\r\n\r\n", "header value"),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "request line"),
        (b"G\xc9T / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", "request line"),
        (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "request line"),
        (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
    ],
)
def test_malformed_lines_are_400(data: bytes, match: str, chunk: int | None) -> None:
    fails(data, chunk, 400, match)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "data,match",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "more than one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "more than one Host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHOST: b\r\n\r\n", "more than one Host"),
        (b"GET / HTTP/1.1\r\nX: a\r\n\r\n", "without a Host"),
        (b"GET http://a.example/ HTTP/1.1\r\n\r\n", "without a Host"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a.example:80@evil\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a.example:x\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a\xe9b\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/1.1\r\nHost: a?b\r\n\r\n", "invalid Host"),
    ],
)
def test_host_rules(data: bytes, match: str, chunk: int | None) -> None:
    fails(data, chunk, 400, match)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("host", ["a.example", "a.example:8080", "A.Example.", "[::1]:80", "[::1]", "10.0.0.1:", ""])
def test_valid_hosts(host: str, chunk: int | None) -> None:
    assert one_head(get("/", host=host), chunk).get("host") == host


@pytest.mark.parametrize("chunk", CHUNKS)
def test_http_1_0_needs_no_host(chunk: int | None) -> None:
    head = one_head(b"GET http://a.example/x HTTP/1.0\r\n\r\n", chunk)
    assert head.get("host") is None and head.route_path == "/x"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "method,target,match",
    [
        ("GET", "a", "malformed request target"),
        ("GET", "a/b", "malformed request target"),
        ("GET", "/a\x7fb", "invalid character"),
        ("GET", "/a\x01", "invalid character"),
        ("GET", "/a\tb", "invalid character"),
        ("GET", "/a\x00", "invalid character"),
        ("GET", "/caf\xe9", "not ASCII"),
        ("GET", "/a#b", "fragment"),
        ("GET", "/admin#/../x", "fragment"),
        ("GET", "/a?b#c", "fragment"),
        ("GET", "http://a.example/#x", "fragment"),
        ("GET", "*", "only for OPTIONS"),
        ("POST", "*", "only for OPTIONS"),
        ("OPTIONS", "**", "malformed request target"),
        ("GET", "a.example:443", "malformed request target"),
        ("CONNECT", "/x", "CONNECT"),
        ("CONNECT", "*", "only for OPTIONS"),
        ("CONNECT", "http://a.example/", "CONNECT"),
        ("CONNECT", "a.example", "CONNECT"),
        ("CONNECT", "a.example:", "CONNECT"),
        ("CONNECT", ":443", "CONNECT"),
        ("CONNECT", "user@a.example:443", "CONNECT"),
        ("CONNECT", "a.example:443/x", "CONNECT"),
        ("GET", "ftp://a.example/", "malformed request target"),
        ("GET", "HTTP://a.example/", "malformed request target"),
        ("GET", "http:/a.example/", "malformed request target"),
        ("GET", "http://", "malformed request target"),
        ("GET", "http:///x", "malformed request target"),
        ("GET", "http://:80/x", "malformed request target"),
        ("GET", "http://user@a.example/", "malformed request target"),
        ("GET", "http://a.example:x/", "malformed request target"),
        ("GET", "http://a b/", "request line"),
    ],
)
def test_malformed_targets_are_400(method: str, target: str, match: str, chunk: int | None) -> None:
    fails(get(target, method), chunk, 400, match)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "method,target,path,route_path",
    [
        ("GET", "/", "/", "/"),
        ("GET", "/a/b?c=d&e=/f?g", "/a/b", "/a/b"),
        ("GET", "http://a.example", "/", "/"),
        ("GET", "http://a.example?x=/y", "/", "/"),
        ("GET", "https://a.example:8443/p/q?z", "/p/q", "/p/q"),
        ("GET", "http://[::1]:80/x", "/x", "/x"),
        ("GET", "http://a.example//x/../y", "//x/../y", "/y"),
        ("OPTIONS", "*", "*", "*"),
        ("OPTIONS", "/x", "/x", "/x"),
        ("CONNECT", "a.example:443", "a.example:443", "a.example:443"),
        ("CONNECT", "[::1]:443", "[::1]:443", "[::1]:443"),
        ("GET", "/!$&'()*+,;=:@-._~\"<>[]^`{|}", "/!$&'()*+,;=:@-._~\"<>[]^`{|}", "/!$&'()*+,;=:@-._~\"<>[]^`{|}"),
    ],
)
def test_valid_targets(method: str, target: str, path: str, route_path: str, chunk: int | None) -> None:
    head = one_head(get(target, method), chunk)
    assert (head.method, head.target, head.path, head.route_path) == (method, target, path, route_path)


# --- route_path ----------------------------------------------------------------------------------


ATTACKS = ["/%61dmin", "//admin", "/./admin", "/x/../admin", "/%2e/admin", "/x/%2E%2e/admin", "///admin",
           "/a/b/../../admin", "/%61%64min", "http://a.example//admin", "/x/.%2e/admin", "/%61dmin?x=/"]  # fmt: skip


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("target", ATTACKS)
def test_attack_paths_route_as_admin(target: str, chunk: int | None) -> None:
    raw = get(target)
    head = one_head(raw, chunk)
    assert head.route_path == "/admin"
    assert head.target == target and head.encode() == raw and head.raw == raw[:-2]  # forwarded unchanged


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "target,match",
    [
        ("/a/%2e%2e/%2e%2e/x", "above the root"),
        ("/../x", "above the root"),
        ("/..", "above the root"),
        ("/a/../..", "above the root"),
        ("/a/./../../x", "above the root"),
        ("/%2F", "encoded slash"),
        ("/%2f", "encoded slash"),
        ("/a%2fb", "encoded slash"),
        ("/a%5cb", "encoded slash"),
        ("/a%5Cb", "encoded slash"),
        ("/%00", "encoded slash"),
        ("/a\\b", "backslash"),
        ("/a\\..\\..\\x", "backslash"),
        ("/%4", "percent-escape"),
        ("/%", "percent-escape"),
        ("/%zz", "percent-escape"),
        ("/%%30", "percent-escape"),
        ("/%4g", "percent-escape"),
        ("/%+1", "percent-escape"),
        ("/a//../b", "empty segment"),
        ("//../b", "empty segment"),
        ("/a/.//../b", "empty segment"),
        ("http://a.example/../x", "above the root"),
        ("http://a.example/%2F", "encoded slash"),
    ],
)
def test_refused_paths_are_400(target: str, match: str, chunk: int | None) -> None:
    fails(get(target), chunk, 400, match)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "target,route_path",
    [
        ("/a/./b//c/", "/a/b/c/"),
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/%41", "/A"),
        ("/%e2%82%ac", "/%E2%82%AC"),
        ("/%E2%82%ac/x", "/%E2%82%AC/x"),
        ("/%20%3f%23%25", "/%20%3F%23%25"),  # decoded, these would change what the path is
        ("/%252e%252e/x", "/%252e%252e/x"),  # decoded once only
        ("/admin?x=/..", "/admin"),
        ("/admin?x=%2F&y=\\&z=%zz", "/admin"),  # the query is not routed, nor checked
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/%2e", "/a/b/"),
        ("/a/..", "/"),
        ("/a/../", "/"),
        ("/.", "/"),
        ("//", "/"),
        ("/a/..//b", "/b"),
        ("/a/b/../c", "/a/c"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/.b/..c/c../...", "/a/.b/..c/c../..."),
        ("/a%2e/b", "/a./b"),
        ("/%2d%2e%5f%7e%30%39%5a%7a", "/-._~09Zz"),
    ],
)
def test_route_path_normalization(target: str, route_path: str, chunk: int | None) -> None:
    raw = get(target)
    head = one_head(raw, chunk)
    assert head.route_path == route_path
    assert head.target == target and head.encode() == raw and head.raw == raw[:-2]
    assert head.path == target.split("?")[0]  # path stays as received (for messages)


@pytest.mark.parametrize("target", ["/", "/a/b.c/d-e_f~g", "/x?y=%zz&z=//..", "/a.b/c", "/index.html?v=1"])
def test_ordinary_paths_are_not_normalized(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: str) -> str:
        raise AssertionError("normalized a path that needs no work")

    monkeypatch.setattr(http1, "normalize_path", boom)
    head = one_head(get(target))
    assert head.route_path == head.path == target.split("?")[0]
    if "?" not in target:
        assert head.route_path is head.target  # the very string: no work at all


# --- Upgrade and CONNECT: waiting for the answer -------------------------------------------------

FRAMES = b"\x81\x85\x01\x02\x03\x04GET / HTTP/1.1\r\n\r\n\x88\x80\x00\x00\x00\x00"  # any bytes at all


@pytest.mark.parametrize("chunk", CHUNKS)
def test_upgrade_waits_for_the_answer_and_holds_what_follows(chunk: int | None) -> None:
    r = RequestReader()
    events = feed(r, UPGRADE_HEAD + GET, chunk)
    assert [type(e) for e in events] == [RequestHead]  # no Tunnel yet, and GET held
    assert r.awaiting_answer and not r.in_tunnel and not r.between_requests and not r.head_in_progress
    assert r.feed(b"more") == []
    assert r.answer(101) == [Tunnel(), Body(GET + b"more")]
    assert not r.awaiting_answer and r.in_tunnel
    assert r.feed(FRAMES) == [Body(FRAMES)]  # websocket frames pass untouched


@pytest.mark.parametrize("chunk", CHUNKS)
def test_upgrade_answered_101_with_nothing_held(chunk: int | None) -> None:
    r = RequestReader()
    feed(r, UPGRADE_HEAD, chunk)
    assert r.answer(101) == [Tunnel()]
    assert feed(r, FRAMES, chunk) == [Body(FRAMES)] if chunk is None else [Body(bytes([b])) for b in FRAMES]


NEXT = b"GET /%61dmin/./x HTTP/1.1\r\nHost: e.example\r\nContent-Length: 3\r\n\r\nabc"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("status", [400, 200, 204, 302, 403, 426, 500, 100, 199, 600])
@pytest.mark.parametrize("held", [True, False])
def test_declined_upgrade_goes_on_parsing(status: int, held: bool, chunk: int | None) -> None:
    r = RequestReader()
    events = feed(r, UPGRADE_HEAD + (NEXT if held else b""), chunk)
    assert [type(e) for e in events] == [RequestHead] and r.awaiting_answer
    events = r.answer(status)
    if not held:
        assert events == [] and r.between_requests
        events = feed(r, NEXT, chunk)
    assert not r.awaiting_answer and not r.in_tunnel and Tunnel() not in events
    head = events[0]
    assert isinstance(head, RequestHead) and head.get("host") == "e.example" and head.route_path == "/admin/x"
    assert b"".join(e.data for e in events[1:] if isinstance(e, Body)) == b"abc"
    assert r.between_requests


@pytest.mark.parametrize("chunk", CHUNKS)
def test_held_requests_get_every_check_after_a_declined_upgrade(chunk: int | None) -> None:
    for bad, match in [
        (b"GET /../x HTTP/1.1\r\nHost: a\r\n\r\n", "above the root"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "more than one Host"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", "Content-Length"),
        (b"\x81\x85\x01\x02\x03\x04abcde\r\n\r\n", "request line"),  # frames sent too early
    ]:
        r = RequestReader()
        feed(r, UPGRADE_HEAD + bad, chunk)
        with pytest.raises(HttpError, match=match) as info:
            r.answer(404)
        assert info.value.status == 400


@pytest.mark.parametrize("chunk", CHUNKS)
def test_held_bytes_are_bounded(chunk: int | None) -> None:
    r = RequestReader(max_head=1000)
    feed(r, UPGRADE_HEAD + b"x" * 1000, chunk)  # max_head bytes held: fine
    assert r.answer(101) == [Tunnel(), Body(b"x" * 1000)]
    r = RequestReader(max_head=1000)
    with pytest.raises(HttpError, match="while waiting for the answer to an Upgrade/CONNECT request") as info:
        feed(r, UPGRADE_HEAD + b"x" * 1001, chunk)
    assert info.value.status == 400


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "status,tunnel", [(200, True), (204, True), (299, True), (101, True), (403, False), (407, False), (502, False)]
)
def test_connect(status: int, tunnel: bool, chunk: int | None) -> None:
    r = RequestReader()
    events = feed(r, CONNECT + GET, chunk)
    assert events[0] == one_head(CONNECT) and len(events) == 1 and r.awaiting_answer
    assert isinstance(events[0], RequestHead) and events[0].route_path == "db.internal:5432"
    events = r.answer(status)
    if tunnel:
        assert events == [Tunnel(), Body(GET)] and r.in_tunnel
    else:
        assert [type(e) for e in events] == [RequestHead] and events[0] == one_head(GET) and r.between_requests


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("status", [200, 201, 299])
def test_2xx_declines_an_upgrade_that_is_not_connect(status: int, chunk: int | None) -> None:
    heads, body, tunnel = run(UPGRADE_HEAD + GET + GET, chunk, answer=status)
    assert len(heads) == 3 and not tunnel and body == b""


@pytest.mark.parametrize("chunk", CHUNKS)
def test_an_upgrade_request_with_a_body(chunk: int | None) -> None:
    head = UPGRADE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    r = RequestReader()
    events = feed(r, head + b"hello" + GET, chunk)
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"hello"  # the body, not GET
    assert r.answer(400) == [one_head(GET)]
    chunked = UPGRADE_HEAD.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    r = RequestReader()
    events = feed(r, chunked + b"2\r\nhi\r\n0\r\n\r\n" + GET, chunk)
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"2\r\nhi\r\n0\r\n\r\n"
    assert r.answer(101) == [Tunnel(), Body(GET)]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_an_answer_before_the_end_of_the_upgrade_requests_body(chunk: int | None) -> None:
    head = UPGRADE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    r = RequestReader()
    assert [type(e) for e in feed(r, head + b"he", chunk)] == [RequestHead] + [Body] * (1 if chunk is None else 2)
    assert r.awaiting_answer
    assert r.answer(401) == []  # declined early: the body is still framed, what follows is parsed
    assert feed(r, b"llo" + GET, None) == [Body(b"llo"), one_head(GET)]
    r = RequestReader()
    feed(r, head + b"he", chunk)
    assert r.answer(101) == [Tunnel()]  # accepted early: the rest is opaque at once
    assert r.feed(b"llo" + GET) == [Body(b"llo" + GET)]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_declined_upgrade_then_another_upgrade(chunk: int | None) -> None:
    r = RequestReader()
    feed(r, UPGRADE_HEAD + UPGRADE_HEAD + b"frames", chunk)
    events = r.answer(426)
    assert [type(e) for e in events] == [RequestHead] and r.awaiting_answer  # the second one waits in turn
    assert r.answer(101) == [Tunnel(), Body(b"frames")]


def test_answer_only_when_awaiting() -> None:
    r = RequestReader()
    with pytest.raises(RuntimeError):
        r.answer(101)
    r.feed(GET)
    with pytest.raises(RuntimeError):
        r.answer(400)
    r.feed(UPGRADE_HEAD)
    r.answer(400)
    with pytest.raises(RuntimeError):
        r.answer(101)
    r.feed(UPGRADE_HEAD)
    r.answer(101)
    with pytest.raises(RuntimeError):
        r.answer(101)


# --- AnswerStatusReader --------------------------------------------------------------------------


def status_of(data: bytes, chunk: int | None) -> int | None:
    """The status found (checking it comes exactly at the end of its status line), or None."""
    r = AnswerStatusReader()
    if chunk is None:
        return r.feed(data)
    line_end = data.find(b"\r\n")
    for i in range(0, len(data), chunk):
        status = r.feed(memoryview(data)[i : i + chunk])
        if status is not None:
            assert data.rfind(b"\r\n", 0, i + chunk) >= line_end  # not before a status line's end
            with pytest.raises(RuntimeError):
                r.feed(b"x")
            return status
    return None


WS_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"


@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
@pytest.mark.parametrize(
    "data,status",
    [
        (WS_101, 101),
        (b"HTTP/1.1 101 Switching Protocols\r\n", 101),
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\n", 400),
        (b"HTTP/1.0 200 Connection established\r\n\r\n", 200),
        (b"HTTP/1.1 200\r\n\r\n", 200),  # no reason, nor the space before it (as h11 accepts)
        (b"HTTP/1.1 204 \r\n\r\n", 204),
        (b"HTTP/1.1 426 \t\x80\xff weird reason\r\n", 426),
        (b"HTTP/1.1 999 x\r\n", 999),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + WS_101, 101),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n", 403),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nLink: </t.js>\r\n\r\n" + WS_101, 101),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: HTTP/1.1 101 x\r\n\r\nHTTP/1.1 503 x\r\n", 503),
        (b"HTTP/1.1 199\r\n\r\nHTTP/1.1 101 x\r\n", 101),
    ],
)
def test_answer_status(data: bytes, status: int, chunk: int | None) -> None:
    assert status_of(data, chunk) == status


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize(
    "data", [b"", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 103 x\r\nLink: <a>\r\n"]
)
def test_answer_status_needs_more(data: bytes, chunk: int | None) -> None:
    assert status_of(data, chunk) is None


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n",
        b"HTTP/2.0 200 OK\r\n",
        b"HTTP/1.2 200 OK\r\n",
        b"http/1.1 200 OK\r\n",
        b"HTTP/1.1  200 OK\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1 +20 OK\r\n",
        b"HTTP/1.1 099 Too low\r\n",
        b"HTTP/1.1 000\r\n",
        b"HTTP/1.1 200 O\x00K\r\n",
        b"HTTP/1.1 200 O\x7fK\r\n",
        b"HTTP/1.1 200 OK\nX: y\r\n",  # a bare LF
        b"HTTP/1.1 200 O\rK\r\n",
        b"HTTP/1.1 200OK\r\n",
        b"HTTP/1.1 \xd9\xa2\xd9\xa0\xd9\xa0 OK\r\n",  # Arabic-Indic digits
        b" HTTP/1.1 200 OK\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x81\x02hi\x81\x02hi\x81\x02hi",  # no line at all, but already no HTTP
        b"HTTP/1.1 100 Continue\r\n\r\nnot http at all\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\r\n",
    ],
)
def test_malformed_answer_is_502(data: bytes, chunk: int | None) -> None:
    with pytest.raises(HttpError, match="malformed answer from the app") as info:
        status_of(data, chunk)
    assert info.value.status == 502


@pytest.mark.parametrize("chunk", [None, 1000])
def test_answer_reader_is_bounded(chunk: int | None) -> None:
    with pytest.raises(HttpError) as info:
        status_of(b"HTTP/1.1 200 " + b"x" * 70_000 + b"\r\n", chunk)
    assert info.value.status == 502
    with pytest.raises(HttpError) as info:
        status_of(b"HTTP/1.1 100 Continue\r\nX: " + b"x" * 70_000 + b"\r\n\r\nHTTP/1.1 101 x\r\n", chunk)
    assert info.value.status == 502
    many = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 5000  # each interim head is dropped
    assert status_of(many + WS_101, chunk) == 101


def test_answer_reader_does_not_change_what_it_reads() -> None:
    data = bytearray(WS_101)
    view = memoryview(data)
    assert AnswerStatusReader().feed(view) == 101
    assert bytes(data) == WS_101


def test_upgrade_end_to_end_with_both_readers() -> None:
    # what the vhost does: visitor bytes through RequestReader, the app's through AnswerStatusReader
    for answer, expect_tunnel in ((b"HTTP/1.1 100 Continue\r\n\r\n" + WS_101, True), (b"HTTP/1.1 404 x\r\n", False)):
        visitor = RequestReader()
        events = visitor.feed(UPGRADE_HEAD + NEXT)
        assert visitor.awaiting_answer
        app = AnswerStatusReader()
        status = None
        for i in range(len(answer)):
            status = app.feed(answer[i : i + 1])
            if status is not None:
                events += visitor.answer(status)
                break
        assert (Tunnel() in events) == expect_tunnel
        heads = [e for e in events if isinstance(e, RequestHead)]
        assert [h.route_path for h in heads] == (["/ws"] if expect_tunnel else ["/ws", "/admin/x"])


@pytest.mark.parametrize(
    "location,normalized",
    [("/", "/"), ("/admin", "/admin"), ("/admin/", "/admin/"), ("/a/./b//c", "/a/b/c"), ("/%61pi", "/api")],
)
def test_normalize_path_for_locations(location: str, normalized: str) -> None:
    # vhost.py normalizes configured locations the same way, so that they compare with route paths
    assert http1.normalize_path(location) == normalized
    assert http1.normalize_path(normalized) == normalized
    assert one_head(get(location)).route_path == normalized


@pytest.mark.parametrize("location", ["", "api", "*", "/../x", "/a%2Fb"])
def test_normalize_path_refuses(location: str) -> None:
    with pytest.raises(HttpError):
        http1.normalize_path(location)


def drain(reader: RequestReader, data: bytes) -> tuple[list[Event], int]:
    """Feed ``data`` whole, then go on with ``feed(b"")`` while the reader says there is more."""
    events = reader.feed(data)
    calls = 1
    while reader.more:
        events += reader.feed(b"")
        calls += 1
        assert calls < 10_000
    return events, calls


def test_work_per_feed_is_bounded_and_body_bytes_come_joined() -> None:
    chunks = b"".join(b"1\r\nx\r\n" for _ in range(20_000)) + b"0\r\n\r\n"
    head = b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader = RequestReader()
    first = reader.feed(head + chunks)
    assert reader.more  # 60,000 parsing steps are not done in one call
    assert sum(1 for e in first if isinstance(e, Body)) == 1  # joined: one write, not three per chunk
    events, calls = drain(reader, b"")
    assert calls > 100
    body = b"".join(e.data for e in first + events if isinstance(e, Body))
    assert body == chunks  # the framing is forwarded as it came


def test_pipelined_requests_are_parsed_a_batch_per_call() -> None:
    one = b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n"
    events, calls = drain(RequestReader(), one * 2000)
    assert sum(1 for e in events if isinstance(e, RequestHead)) == 2000
    assert calls >= 2000 // 256


def test_endless_blank_lines_are_not_a_request() -> None:
    reader = RequestReader()
    reader.feed(b"\r\n\r\n")
    with pytest.raises(HttpError) as err:
        for _ in range(10):
            reader.feed(b"\r\n")
    assert err.value.status == 400
