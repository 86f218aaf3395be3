"""Property tests of relay_server.http1.RequestReader.

Whatever bytes a visitor sends, the reader returns events or raises HttpError (nothing else), and
the same ones whether the bytes came in one read or one byte at a time.  A stream it accepts is
framed into the same requests as h11 frames it (no request smuggling between relayd and an app),
and an accepted path routes as both ways apps resolve dot segments and repeated slashes.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from itertools import cycle

import h11
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay_server.http1 import MAX_HEAD, Body, Event, HttpError, RequestHead, RequestReader

Outcome = tuple[list[tuple[object, ...]], "int | None"]


def normalized(events: list[Event]) -> list[tuple[object, ...]]:
    """Events with consecutive bodies merged (pieces split them differently) and heads in full."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, Body):
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + e.data)  # type: ignore[operator]
            elif e.data:
                out.append(("body", e.data))
        elif isinstance(e, RequestHead):
            out.append(("head", e.method, e.target, e.version, tuple(e.headers), e.raw, e.route_path, e.is_upgrade))
        else:
            out.append(("tunnel",))
    return out


def outcome(data: bytes, pieces: bool, max_head: int = MAX_HEAD, answers: tuple[int, ...] = ()) -> Outcome:
    """The events (normalized) and the status of the HttpError that ended them, if one did.

    With ``answers``, every Upgrade/CONNECT waiting once all bytes are fed gets the next one.
    """
    reader = RequestReader(max_head)
    events: list[Event] = []
    statuses = cycle(answers)
    try:
        for piece in [data[i : i + 1] for i in range(len(data))] if pieces else [data]:
            events += reader.feed(piece)
        while answers and reader.awaiting_answer:
            events += reader.answer(next(statuses))
    except HttpError as exc:  # anything else fails the test
        return normalized(events), exc.status
    return normalized(events), None


def check_same_whole_and_in_pieces(data: bytes, max_head: int = MAX_HEAD, answers: tuple[int, ...] = ()) -> None:
    whole, whole_error = outcome(data, False, max_head, answers)
    pieces, pieces_error = outcome(data, True, max_head, answers)
    assert whole_error == pieces_error
    if whole_error is None:
        assert whole == pieces
    else:
        assert whole_error in (400, 431, 501)


GET = b"GET /a?x=1 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n"
CORPUS = [
    GET,
    b"POST /up HTTP/1.1\r\nHost: b.example\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: c.example\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: d.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"\x81\x85\x01\x02\x03\x04abcde",
    b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: e.example\r\n\r\n",
    b"GET http://f.example/%61dmin/./x//y?q=/.. HTTP/1.1\r\nHost: f.example\r\n\r\n",
    b"GET /x HTTP/1.0\r\n\r\n",
    b"\r\n",
]
SNIPPETS = [
    b"\r\n", b"\r", b"\n", b" ", b"\t", b"\x00", b":", b"/", b"/..", b"/.", b"%2e", b"%2F", b"%", b"?", b"#", b"\\",
    b"0", b"9", b"f", b"g", b";", b",", b"\x7f", b"\x80", b"\xff", b"-", b"+", b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Host: x\r\n", b"Connection: upgrade\r\nUpgrade: h2c\r\n", b"0\r\n\r\n",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes] = CORPUS) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(corpus), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        snippet = draw(st.sampled_from(SNIPPETS) | st.binary(min_size=1, max_size=2))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "insert":
            data[pos:pos] = snippet
        elif op == "replace":
            data[pos : pos + len(snippet)] = snippet
        else:
            del data[pos : pos + draw(st.integers(1, 4))]
    return bytes(data)


_answers = st.lists(st.sampled_from([101, 200, 204, 400, 403, 426, 500]), max_size=3).map(tuple)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([64, 300, MAX_HEAD]), _answers)
def test_arbitrary_bytes(data: bytes, max_head: int, answers: tuple[int, ...]) -> None:
    check_same_whole_and_in_pieces(data, max_head, answers)


@settings(max_examples=600, deadline=None)
@given(mutated(), st.sampled_from([100, 300, MAX_HEAD]), _answers)
def test_mutated_requests(data: bytes, max_head: int, answers: tuple[int, ...]) -> None:
    check_same_whole_and_in_pieces(data, max_head, answers)


@settings(max_examples=300, deadline=None)
@given(mutated(), st.lists(st.sampled_from([200, 400, 403, 426]), min_size=1, max_size=3))
def test_an_early_refusal_changes_nothing(data: bytes, answers: list[int]) -> None:
    # An app may refuse an Upgrade before the request's body is in, or long after: the events
    # are the same (here answered right after each byte, there once every byte was fed).
    late, late_error = outcome(data, False, MAX_HEAD, tuple(answers))
    reader = RequestReader()
    events: list[Event] = []
    statuses = cycle(answers)
    error = None
    try:
        for i in range(len(data)):
            events += reader.feed(data[i : i + 1])
            while reader.awaiting_answer:
                events += reader.answer(next(statuses))
    except HttpError as exc:
        error = exc.status
    assert error == late_error
    if error is None:
        assert normalized(events) == late


# --- the same framing as h11 ---------------------------------------------------------------------

_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])
_targets = st.sampled_from(["/", "/a/b?c=d", "*", "http://a.example/x", "/%61/./b", "//x", "/a b", "/\x01"])
_hosts = st.sampled_from([["a.example"], ["a.example:8080"], [], ["a", "a"], [""], ["a b"]])
_field_names = st.sampled_from(
    ["X-A", "Accept", "Cookie", "Connection", "Expect", "Transfer-Encoding"]
) | st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,8}", fullmatch=True)
_field_values = st.text(st.sampled_from("ab ,;=\t\x01\x7f\x80\xff0123456789"), max_size=8)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method, target = draw(_methods), draw(_targets)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    fields = [("Host", h) for h in draw(_hosts)] + draw(st.lists(st.tuples(_field_names, _field_values), max_size=3))
    body = draw(st.binary(max_size=12))
    framing = draw(st.sampled_from(["none", "length", "length", "chunked", "chunked", "both", "two lengths"]))
    if framing in ("length", "both", "two lengths"):
        fields.append(("Content-Length", str(len(body))))
    if framing == "two lengths":
        fields.append(("Content-Length", draw(st.sampled_from([str(len(body)), str(len(body) + 1), "0"]))))
    if framing in ("chunked", "both"):
        fields.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked", "gzip, chunked"]))))
        cut = draw(st.integers(0, len(body)))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        ext = draw(st.sampled_from([b"", b";x=1", b";"]))
        body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts) + b"0\r\n"
        body += draw(st.sampled_from([b"", b"T: 1\r\n", b"T:\x01\r\n"])) + b"\r\n"
    draw(st.permutations(fields))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + body


@st.composite
def stream(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(request(), min_size=1, max_size=3)))
    if draw(st.booleans()):
        data = draw(mutated([data]))
    return data


def comparable(fields: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Fields but the two that h11 rewrites (Content-Length '5, 5' as '5', lowercased 'chunked')."""
    return tuple((k, v) for k, v in fields if k.lower() not in ("content-length", "transfer-encoding"))


def h11_heads(data: bytes) -> tuple[list[tuple[object, ...]], str]:
    """The heads h11 reads as a server, and how it ended: "refused", "stopped" or "open".

    h11 stops framing at an Upgrade or CONNECT request, and after a request that closes the
    connection (HTTP/1.0, Connection: close); relayd goes on (or holds the bytes after an Upgrade).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    heads: list[tuple[object, ...]] = []
    fed_in_cycle = 0
    i = 0
    try:
        while i < len(data):
            if fed_in_cycle == 0 and data[i : i + 2] == b"\r\n":
                i += 2  # relayd ignores empty lines before a request line (RFC 9112 2.2); h11 does not
                continue
            conn.receive_data(data[i : i + 1])
            i += 1
            fed_in_cycle += 1
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Request):
                    fields = comparable(
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()
                    )
                    version = "HTTP/" + event.http_version.decode()
                    heads.append((event.method.decode(), event.target.decode(), version, fields))
                elif isinstance(event, h11.EndOfMessage):
                    if conn.their_state is not h11.DONE:
                        return heads, "stopped"  # HTTP/1.0, Connection: close, an Upgrade
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                    if conn.our_state is not h11.DONE:
                        return heads, "stopped"
                    conn.start_next_cycle()
                    fed_in_cycle = 0
                elif event is h11.PAUSED:
                    return heads, "stopped"  # a CONNECT
    except h11.RemoteProtocolError:
        return heads, "refused"
    return heads, "open"


@settings(max_examples=500, deadline=None)
@given(stream())
def test_accepted_streams_are_framed_as_h11_frames_them(data: bytes) -> None:
    # chunk extensions after whitespace are allowed by RFC 9112 (BWS) but refused by h11
    assume(re.search(rb"[0-9A-Fa-f][ \t]+;", data) is None)
    reader = RequestReader()
    events: list[Event] = []
    error = None
    try:
        for i in range(len(data)):
            events += reader.feed(data[i : i + 1])
    except HttpError as exc:
        error = exc.status
    ours = [(e.method, e.target, e.version, comparable(e.headers)) for e in events if isinstance(e, RequestHead)]
    theirs, end = h11_heads(data)
    n = min(len(ours), len(theirs))
    assert ours[:n] == theirs[:n]  # the same requests, as long as both read
    if end == "refused":
        # relayd refused it too, at the same request or before, or is still waiting for the end
        # of what h11 refused early (such as a request line ending in a bare CR)
        assert len(ours) <= len(theirs)
        assert error is not None or not reader.between_requests
    elif end == "open" and error is None:
        assert len(ours) == len(theirs)


# --- route_path ----------------------------------------------------------------------------------

_UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
SEGMENTS = ["a", "b", "", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "%61", "%7e", "%e2%82%ac", "%20", "~x",
            "..a", ".b", "%2f", "%5C", "%00", "%", "%4", "\\", "%zz"]  # fmt: skip


def decoded(path: str) -> str:
    def one(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else "%" + m.group(1).upper()

    return re.sub(r"%([0-9A-Fa-f]{2})", one, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, word for word."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":
            inp = "/" + inp[4:]
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            end = inp.find("/", 1)
            end = len(inp) if end < 0 else end
            out, inp = out + inp[:end], inp[end:]
    return out


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS), max_size=8), st.sampled_from(["", "?x=/../%2F"]), st.booleans())
def test_route_path_is_what_apps_resolve_either_way(segments: list[str], query: str, absolute: bool) -> None:
    path = "/" + "/".join(segments)
    target = ("http://a.example" if absolute else "") + path + query
    data = f"GET {target} HTTP/1.1\r\nHost: a.example\r\n\r\n".encode()
    events, error = outcome(data, False)
    assert (events, error) == outcome(data, True)
    if error is not None:
        assert error == 400
        # refused only for what the rules name: an escape or backslash refused, or a '..'
        refused = re.search(r"%(?![0-9A-Fa-f]{2})|%2[fF]|%5[cC]|%00|\\", path)
        assert refused or ".." in decoded(path).split("/")
        return
    (head,) = events
    route_path = head[6]
    assert isinstance(route_path, str)
    clean = decoded(path)
    # RFC 3986 first, then repeated slashes merged ...
    assert route_path == re.sub("/+", "/", remove_dot_segments(clean))
    # ... or slashes merged first, then dot segments (as nginx does): the same path
    assert route_path.rstrip("/") == posixpath.normpath("/" + re.sub("/+", "/", clean).lstrip("/")).rstrip("/")
    # and a route path is its own route path
    again = f"GET {route_path} HTTP/1.1\r\nHost: a.example\r\n\r\n".encode()
    assert outcome(again, False)[0][0][6] == route_path
