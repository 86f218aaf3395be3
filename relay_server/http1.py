"""A sans-IO reader of the visitor->server half of an HTTP/1.x connection.

Theory of operation
===================

relayd routes every request by its own Host header and path, so it must find where each request
head starts, which means following request bodies.  ``RequestReader`` is fed the bytes a visitor
sends and returns events, without I/O and without a clock:

  * ``RequestHead``: a complete head (method, target, version, headers in order), with
    ``route_path``, the path that routing and location-scoped auth must use;
  * ``Body``: bytes that belong to the current request's body, to forward untouched;
  * ``Tunnel``: the app accepted an Upgrade (101) or a CONNECT (2xx); every later byte is opaque
    and returned as ``Body``.

The reader is as strict as h11 (lenient only where RFC 9112 asks: empty lines before a request
line, whitespace before a chunk extension), and stricter where a lenient reading could let the app
see something relayd did not: whatever bytes are fed, ``feed`` returns events or raises
``HttpError``, and a first byte that cannot start a method is refused without waiting for more.
A head is the request line (origin-form, absolute-form with http/https, ``*`` for OPTIONS only,
host:port for CONNECT only; visible ASCII, no fragment), then field lines (token names; values of
HTAB, SP, VCHAR and obs-text only; no obs-fold), then an empty line, all with CRLF.  HTTP/1.1
needs exactly one Host, whose value is host[:port]; two Host lines are refused even if identical.

Framing follows RFC 9112 section 6, but every ambiguous case is refused rather than resolved,
since the app behind the tunnel may resolve it otherwise (request smuggling): Content-Length is
ASCII digits (repeated only if identical), ``Transfer-Encoding`` must be exactly ``chunked``
(else 501) and may not come with Content-Length nor in HTTP/1.0; without either a request has no
body.  Chunked bodies are passed through as they are (chunk sizes, extensions, trailers), checked
line by line (hex sizes, CRLF after each chunk, well-formed trailer fields) to find their end.

``route_path`` is the target's path with the query removed, percent-escapes of unreserved
characters decoded, dot segments removed and runs of ``/`` collapsed, so that ``/%61dmin``,
``//admin``, ``/./admin`` and ``/x/../admin`` all route (and get asked for credentials) as
``/admin``; the target itself is forwarded unchanged.  Escapes that an app could decode into a
separator (``%2F``, ``%5C``, ``%00``), a backslash, a malformed escape, a ``..`` above the root or
a ``..`` after an empty segment (where apps disagree on the result) are refused.  Most paths have
none of ``%``, ``//``, ``/.``, ``\\``: for them ``route_path`` is the path, found without work.

After the head (and body) of an Upgrade or CONNECT request the reader waits for the app's answer:
later visitor bytes are held (up to ``max_head``), not parsed.  Responses are otherwise never
parsed: they flow back untouched, so streamed answers (server-sent events, chunked, long polling)
reach the browser as they are produced.  Only the status line of the answer to an Upgrade/CONNECT
request is read, by ``AnswerStatusReader`` (which skips interim 1xx answers); the caller passes
that status to ``RequestReader.answer``.  On 101 (or 2xx to CONNECT) the connection becomes a
tunnel and the held bytes are its first opaque bytes; on any other status the app declined and
the held bytes are parsed as the next requests, routed and checked like any other.  The app's
first bytes after an Upgrade/CONNECT request are taken as its answer to that request (see
``AnswerStatusReader`` for a visitor that pipelines it behind other requests).

Errors raise ``HttpError`` with the status relayd answers: 400 for a malformed line or header,
conflicting lengths or a refused path; 431 when a head exceeds ``max_head`` bytes (64 KiB by
default); 501 for a transfer coding other than chunked; 502 for an answer from the app whose
status line is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Union

MAX_HEAD: Final = 64 * 1024
# Parsing steps (a head, a chunk's size line, data or CRLF, a trailer line) per feed: what one
# call may cost is bounded whatever a read holds (256 KiB of 1-byte chunks is 130,000 steps).
MAX_STEPS: Final = 256
MAX_BLANK_LINES: Final = 2
_MAX_CHUNK_LINE: Final = 4096
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# field-value characters: HTAB, SP, VCHAR, obs-text (a latin-1 str or bytes pattern alike)
_VALUE = r"[\t\x20-\x7e\x80-\xff]*"
# A head is matched by two regular expressions, in C, rather than line by line in Python: the
# request line, then every header field (name, optional whitespace, value, optional whitespace).
# They run on the head decoded once as latin-1 (one str per head rather than one per field); the
# token and version patterns only match ASCII.  The target is matched by two alternatives: an
# origin-form target of visible ASCII without '#' (nearly every request) is the first group, and
# needs no further check; anything else lands in the second group and goes to _other_target.
_REQUEST_LINE = re.compile(r"(" + _TOKEN + r") (?:(/[!-\"$-~]*)|([^ \r\n]+)) (HTTP/1\.[01])\r\n")
_FIELD = re.compile(r"(" + _TOKEN + r"):(" + _VALUE + r")\r\n")  # no lazy match: no backtracking
_FIELDS = re.compile(r"(?:" + _TOKEN + r":" + _VALUE + r"\r\n)*")
_FIELD_START = re.compile(_TOKEN + r":")
# RFC 3986 host (IP-literal or reg-name, pct-encoded loosely) and port: Host's value, and the
# authority of absolute-form and authority-form targets (without userinfo, refused by RFC 9110)
_HOST = r"(?:\[[0-9A-Za-z._~!$&'()*+,;=:%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)"
_HOST_VALUE = re.compile(_HOST + r"(?::[0-9]*)?")
_ABSOLUTE_FORM = re.compile(r"https?://(?=[^/?:])" + _HOST + r"(?::[0-9]*)?(/[^?]*)?(?:\?.*)?")
_AUTHORITY_FORM = re.compile(r"(?=[^:])" + _HOST + r":[0-9]{1,5}")
_VCHARS = re.compile(r"[!-~]+")
_DIGITS = re.compile(r"[0-9]{1,18}")  # not str.isdigit(): that takes '²' and other digits
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
# chunk-size, then chunk extensions (checked only for characters: they are passed through)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;" + _VALUE.encode() + rb")?\r\n")
_TRAILER_LINE = re.compile(_TOKEN.encode() + b":" + _VALUE.encode() + rb"\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: " + _VALUE.encode() + rb")?\r\n")
_STATUS_START = re.compile(rb"HTTP/1\.[01] [0-9]{3}")
_TCHARS: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, and one is made per request
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    # values by lowercased name, built once by the parser (every request is routed by its headers)
    index: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)
    # the head as received up to its last header line's CRLF, without the empty line that ends it
    # (checked well-formed by the parser)
    raw: bytes = field(default=b"", compare=False, repr=False)
    # the normalized path to route and authenticate by (see the module's docstring); set by the
    # parser, "" on a head built otherwise (which then matches no location)
    route_path: str = field(default="", compare=False, repr=False)

    def get(self, name: str) -> str | None:
        values = self.index.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return self.index.get(name.lower(), [])

    @property
    def path(self) -> str:
        """The path of the target as received (not normalized), whatever its form."""
        target = self.target
        if target[:1] != "/" and target.startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            # the authority ends at the path or the query (a '/' in the query is not the path's)
            ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
            target = rest[min(ends) :] if ends else "/"
        return target.split("?", 1)[0] or "/"

    @property
    def is_upgrade(self) -> bool:
        if self.method == "CONNECT":
            return True
        connection = self.index.get("connection")
        if not connection or "upgrade" not in self.index:
            return False
        return "upgrade" in [t.strip() for t in ",".join(connection).lower().split(",")]

    def encode(self, headers: list[tuple[str, str]] | None = None) -> bytes:
        """The head as bytes; with ``headers``, those instead of the parsed ones."""
        fields = "".join([f"{k}: {v}\r\n" for k, v in (self.headers if headers is None else headers)])
        return f"{self.method} {self.target} {self.version}\r\n{fields}\r\n".encode("latin-1")


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class Tunnel:
    """From here on the connection is opaque bytes (the app accepted an Upgrade or CONNECT)."""


Event = Union[RequestHead, Body, Tunnel]


def normalize_path(path: str) -> str:
    """The ``route_path`` of a path (starting with '/', without query); HttpError(400) if refused.

    The parser calls it only for a path with '%', '//', '/.' or a backslash: any other path is
    its own result.  Also for locations in a configuration, so that they compare with route paths.
    """
    if path[:1] != "/":
        raise HttpError(400, "the path does not start with '/'")
    if "\\" in path:
        raise HttpError(400, "backslash in the request path")
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            hex2 = part[:2]
            if _HEX2.fullmatch(hex2) is None:
                raise HttpError(400, "malformed percent-escape in the request path")
            byte = int(hex2, 16)  # safe: two ASCII hex digits
            if byte in (0x2F, 0x5C, 0x00):
                # an app that decodes before splitting would see another path than relayd
                raise HttpError(400, "encoded slash, backslash or NUL in the request path")
            out.append(chr(byte) if byte in _UNRESERVED else "%" + hex2.upper())
            out.append(part[2:])
        path = "".join(out)
    segments = path.split("/")
    stack: list[str] = []
    for segment in segments[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if not stack:
                raise HttpError(400, "the request path climbs above the root")
            if stack.pop() == "":
                # '/a//../b' is '/a/b' by RFC 3986 but '/b' once slashes are merged first (as
                # nginx does): the app may pick either, so neither can be routed safely
                raise HttpError(400, "'..' after an empty segment in the request path")
            continue
        stack.append(segment)
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 1
    kept = [s for s in stack if s]
    return "/" + "/".join(kept) + ("/" if trailing and kept else "")


def _route_path(path: str) -> str:
    if "%" in path or "//" in path or "/." in path or "\\" in path:
        return normalize_path(path)
    return path


def _other_target(method: str, target: str) -> str:
    """Check a target that is not a plain origin-form one; return its route path."""
    if not target.isascii():
        raise HttpError(400, "request target is not ASCII")
    if _VCHARS.fullmatch(target) is None:
        raise HttpError(400, "invalid character in the request target")
    if "#" in target:
        # never sent by browsers; an app that cuts it off would see another path than relayd
        raise HttpError(400, "fragment (#) in the request target")
    if target == "*":
        if method != "OPTIONS":
            raise HttpError(400, "request target '*' is only for OPTIONS")
        return "*"
    if method == "CONNECT":
        if _AUTHORITY_FORM.fullmatch(target) is None:
            raise HttpError(400, "CONNECT needs a host:port request target")
        return target
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise HttpError(400, "malformed request target")
    return _route_path(match.group(1) or "/")


def _content_length(values: list[str]) -> int:
    """The length from the Content-Length field values (already stripped of surrounding OWS)."""
    if len(values) == 1 and _DIGITS.fullmatch(values[0]) is not None:
        return int(values[0])  # the usual case: one field, one value
    elements = {v.strip(" \t") for v in ",".join(values).split(",")}
    if len(elements) != 1:
        raise HttpError(400, "conflicting Content-Length values")
    value = elements.pop()
    if _DIGITS.fullmatch(value) is None:
        raise HttpError(400, "malformed Content-Length")
    return int(value)


def _header_error(text: str, start: int) -> HttpError:
    """The reason the field lines of ``text`` from ``start`` did not match (only on errors)."""
    for line in text[start:].split("\r\n"):
        if line[:1] in (" ", "\t"):
            return HttpError(400, "obsolete line folding in the head")
        if _FIELD_START.match(line) is None:
            return HttpError(400, "malformed header line")
        if _FIELD.fullmatch(line + "\r\n") is None:
            return HttpError(400, "invalid character in a header value")
    return HttpError(400, "malformed header line")  # a bare CR or LF between lines


def _joined(events: list[Event]) -> list[Event]:
    """Adjacent Body events as one: the framing is forwarded as it came, so a run of chunk-size
    lines, chunks and CRLFs goes on as one write instead of three per chunk."""
    out: list[Event] = []
    pieces: list[bytes] = []
    for ev in events:
        if type(ev) is Body:
            pieces.append(ev.data)
            continue
        if pieces:
            out.append(Body(b"".join(pieces)))
            pieces = []
        out.append(ev)
    if pieces:
        out.append(Body(b"".join(pieces)))
    return out


class RequestReader:
    """Splits a visitor's byte stream into request heads and body bytes."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._buf = bytearray()
        # head | length | chunk_size | chunk_data | chunk_crlf | trailers | awaiting | tunnel
        self._state = "head"
        self._remaining = 0
        self._scanned = 0  # bytes of _buf already searched for the end of a head
        self._awaiting = False  # an Upgrade/CONNECT request's head was returned, answer() not called
        self._connect = False  # ... and that request is a CONNECT
        self._blank_lines = 0  # empty lines before the next request line
        self.head_in_progress = False  # bytes of a head arrived but the head is not complete
        # Work per feed is bounded (``MAX_STEPS``): a read of tiny chunks or pipelined requests is
        # parsed over several calls, ``feed(b"")`` going on where the last one stopped.
        self.more = False

    @property
    def in_tunnel(self) -> bool:
        return self._state == "tunnel"

    @property
    def between_requests(self) -> bool:
        return self._state == "head" and not self._buf

    @property
    def awaiting_answer(self) -> bool:
        """An Upgrade/CONNECT request was returned and ``answer`` has not been called yet.

        Its body (if any) is still returned as ``Body``; the bytes after it are held.
        """
        return self._awaiting

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self._state == "tunnel":
            if data:
                events.append(Body(bytes(data)))
            return events
        if not self._buf and self._state == "head" and data[-4:] == b"\r\n\r\n":
            # The usual keep-alive request: one whole head (no body) in one read, parsed from the
            # bytes as they came; anything else goes through the buffer below.
            end = data.find(b"\r\n\r\n")
            if end + 4 == len(data) and not data.startswith(b"\r\n") and end + 4 <= self.max_head:
                self._start_request(self._parse_head(data[: end + 2]), events)
                self.head_in_progress = False
                return events
        self._buf += data
        return self._drain(events)

    def answer(self, status: int) -> list[Event]:
        """The status of the app's final answer to the Upgrade/CONNECT request being waited on.

        101 (or 2xx to a CONNECT): returns ``Tunnel`` then the held bytes as ``Body``; from here
        on every byte fed is ``Body``.  Any other status: the app declined, and the held bytes
        are parsed as the next requests, whose events are returned (HttpError as from ``feed``).
        It may be called while that request's body is still arriving (an early answer): the body
        is then still framed, and the bytes after it are not held.
        """
        if not self._awaiting:
            raise RuntimeError("answer() called with no Upgrade/CONNECT request waiting for its answer")
        self._awaiting = False
        if status == 101 or (self._connect and 200 <= status < 300):
            self._state = "tunnel"
            self.head_in_progress = False
            events: list[Event] = [Tunnel()]
            if self._buf:
                events.append(Body(bytes(self._buf)))
                self._buf.clear()
            return events
        if self._state == "awaiting":
            self._state = "head"
        return self._drain([])

    def _drain(self, events: list[Event]) -> list[Event]:
        steps = 0
        self.more = False
        while self._buf:
            if steps == MAX_STEPS:
                self.more = True
                break
            steps += 1
            state = self._state
            if state == "head":
                if not self._read_head(events):
                    break
            elif state == "length":
                take = min(self._remaining, len(self._buf))
                events.append(Body(bytes(self._buf[:take])))
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "awaiting" if self._awaiting else "head"
            elif state == "awaiting":
                if len(self._buf) > self.max_head:
                    raise HttpError(
                        400,
                        f"more than {self.max_head} bytes sent while waiting for the answer to an "
                        "Upgrade/CONNECT request",
                    )
                break
            elif state == "tunnel":
                events.append(Body(bytes(self._buf)))
                self._buf.clear()
            elif not self._read_chunked(events):
                break
        self.head_in_progress = self._state == "head" and bool(self._buf)
        return _joined(events) if steps > 1 else events

    def _read_head(self, events: list[Event]) -> bool:
        buf = self._buf
        # tolerate a blank line or two between requests (RFC 9112 section 2.2), not an endless
        # trickle of them (a visitor keeping a connection open without ever sending a request)
        while buf[:2] == b"\r\n":
            del buf[:2]
            self._blank_lines += 1
            if self._blank_lines > MAX_BLANK_LINES:
                raise HttpError(400, "empty lines instead of a request")
        if not buf:
            return False
        if buf[0] not in _TCHARS and buf != b"\r":
            # not HTTP (a TLS hello on the http port, say): no need to wait for the head's end
            raise HttpError(400, "malformed request line")
        # resume the search where the last one stopped (a head trickling in one byte at a time
        # is searched once, not once per byte); it may end in the 3 bytes before that point
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buf)
            if len(buf) > self.max_head:
                raise HttpError(431, f"request head larger than {self.max_head} bytes")
            return False
        self._scanned = 0
        self._blank_lines = 0
        if end + 4 > self.max_head:
            raise HttpError(431, f"request head larger than {self.max_head} bytes")
        head = self._parse_head(bytes(buf[: end + 2]))
        del buf[: end + 4]
        self._start_request(head, events)
        return True

    def _start_request(self, head: RequestHead, events: list[Event]) -> None:
        """A head was read (and removed from the buffer): emit it and frame what follows."""
        events.append(head)
        index = head.index
        te = index.get("transfer-encoding")
        lengths = index.get("content-length")
        if head.is_upgrade:
            self._awaiting = True
            self._connect = head.method == "CONNECT"
        if te is not None:
            if lengths is not None:
                raise HttpError(400, "both Transfer-Encoding and Content-Length")
            if head.version == "HTTP/1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if len(te) != 1 or te[0].lower() != "chunked":
                raise HttpError(501, f"unsupported Transfer-Encoding {', '.join(te)!r}")
            self._state = "chunk_size"
        elif lengths is not None and (length := _content_length(lengths)):
            self._remaining = length
            self._state = "length"
        elif self._awaiting:
            self._state = "awaiting"

    def _parse_head(self, raw: bytes) -> RequestHead:
        """``raw`` is a head up to its last line's CRLF (without the empty line)."""
        text = raw.decode("latin-1")
        line = _REQUEST_LINE.match(text)
        if line is None:
            raise HttpError(400, "malformed request line")
        start = line.end()
        if _FIELDS.fullmatch(text, start) is None:
            raise _header_error(text, start)
        headers: list[tuple[str, str]] = []
        index: dict[str, list[str]] = {}
        for key, value in _FIELD.findall(text, start):
            value = value.strip(" \t")
            headers.append((key, value))
            lower = key.lower()
            if lower in index:
                index[lower].append(value)
            else:
                index[lower] = [value]
        method, origin, other, version = line.groups()
        if origin is not None:
            target = origin
            if method == "CONNECT":
                raise HttpError(400, "CONNECT needs a host:port request target")
            query = origin.find("?")
            path = origin if query < 0 else origin[:query]
            if "%" in path or "//" in path or "/." in path or "\\" in path:
                path = normalize_path(path)
        else:
            target = other
            path = _other_target(method, other)
        hosts = index.get("host")
        if hosts is None:
            if version == "HTTP/1.1":
                raise HttpError(400, "HTTP/1.1 request without a Host header")
        elif len(hosts) > 1:
            raise HttpError(400, "more than one Host header")
        elif _HOST_VALUE.fullmatch(hosts[0]) is None:
            raise HttpError(400, "invalid Host header")
        return RequestHead(method, target, version, headers, index, raw, path)

    def _read_chunked(self, events: list[Event]) -> bool:
        buf = self._buf
        state = self._state
        if state == "chunk_size":
            end = buf.find(b"\r\n")
            # the same bound whether the line came whole or byte by byte
            if (end < 0 and len(buf) > _MAX_CHUNK_LINE) or end >= _MAX_CHUNK_LINE:
                raise HttpError(400, "chunk size line too long")
            if end < 0:
                return False
            match = _CHUNK_LINE.fullmatch(buf, 0, end + 2)
            if match is None:
                raise HttpError(400, "malformed chunk size line")
            size = int(match.group(1), 16)  # safe: 1 to 16 ASCII hex digits
            events.append(Body(bytes(buf[: end + 2])))
            del buf[: end + 2]
            if size == 0:
                self._state = "trailers"
            else:
                self._remaining = size
                self._state = "chunk_data"
        elif state == "chunk_data":
            take = min(self._remaining, len(buf))
            events.append(Body(bytes(buf[:take])))
            del buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._state = "chunk_crlf"
        elif state == "chunk_crlf":
            if len(buf) < 2 and buf == b"\r":
                return False
            if buf[:2] != b"\r\n":
                raise HttpError(400, "chunk not followed by CRLF")
            events.append(Body(b"\r\n"))
            del buf[:2]
            self._state = "chunk_size"
        else:  # trailers: field lines until an empty one
            end = buf.find(b"\r\n")
            if (end < 0 and len(buf) > self.max_head) or end >= self.max_head:
                raise HttpError(431, "trailers too large")
            if end < 0:
                return False
            if end == 0:
                self._state = "awaiting" if self._awaiting else "head"
            elif _TRAILER_LINE.fullmatch(buf, 0, end + 2) is None:
                # checked, not only forwarded: an app reading a bare LF as a line end would see
                # the end of the trailers (and a request relayd never routed) elsewhere
                raise HttpError(400, "malformed trailer line")
            events.append(Body(bytes(buf[: end + 2])))
            del buf[: end + 2]
        return True


class AnswerStatusReader:
    """Finds the status of the app's final answer to an Upgrade/CONNECT request (sans-IO).

    Fed the app's bytes from the first one after that request; it neither changes nor holds them
    for forwarding (the caller forwards them as they are), and keeps only what it needs to find
    the status line: at most ``max_head`` bytes, else HttpError(502).  Interim answers (1xx but
    101) are skipped up to the empty line that ends them.  The first status line it finds is
    taken as the answer to the Upgrade/CONNECT request: feed it only the bytes the app sends after
    that request was forwarded.  With a visitor that pipelines it behind unanswered requests, an
    earlier request's answer comes first and is taken for its answer: never a 101 (only the
    request that asked for it gets one), so an Upgrade fails safe (relayd goes on parsing), but a
    2xx would open a CONNECT the app may have refused.
    """

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._buf = bytearray()
        self._interim = False  # the buffer starts with an interim answer's head, to skip
        self._scanned = 0  # bytes of _buf already searched
        self._done = False

    def feed(self, data: bytes | memoryview) -> int | None:
        """The status of the final answer once its status line is complete; None until then."""
        if self._done:
            raise RuntimeError("AnswerStatusReader fed after it returned the status")
        buf = self._buf
        buf += data
        while True:
            if self._interim:
                end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
                self._scanned = len(buf)
                # the same bound whether the head came whole or byte by byte
                if (end < 0 and len(buf) > self.max_head) or end + 4 > self.max_head:
                    raise HttpError(502, f"interim answer from the app larger than {self.max_head} bytes")
                if end < 0:
                    return None
                del buf[: end + 4]
                self._interim = False
                self._scanned = 0
                continue
            end = buf.find(b"\r\n", max(0, self._scanned - 1))
            self._scanned = len(buf)
            if (end < 0 and len(buf) > self.max_head) or end + 2 > self.max_head:
                raise HttpError(502, f"status line from the app longer than {self.max_head} bytes")
            if end < 0:
                # fail early on what cannot become a status line (say, an app speaking another
                # protocol) rather than after max_head bytes
                if len(buf) >= 12 and _STATUS_START.match(buf) is None:
                    raise HttpError(502, "malformed answer from the app")
                return None
            match = _STATUS_LINE.fullmatch(buf, 0, end + 2)
            if match is None:
                raise HttpError(502, "malformed answer from the app")
            status = int(match.group(1))  # safe: 3 ASCII digits
            if status < 100:
                raise HttpError(502, "malformed answer from the app")
            if status < 200 and status != 101:
                self._interim = True  # its head may end at this line's CRLF: search from 0
                self._scanned = 0
                continue
            self._done = True
            self._buf = bytearray()
            return status
