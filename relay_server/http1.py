"""A sans-IO reader of the visitor->server half of an HTTP/1.x connection.

Theory of operation
===================

relayd routes every request by its own Host header, so it must find where each request head
starts, which means following request bodies.  ``RequestReader`` is fed the bytes a visitor sends
and returns events, without I/O and without a clock:

  * ``RequestHead``: a complete head (method, target, version, headers in order);
  * ``Body``: bytes that belong to the current request's body, to forward untouched;
  * ``Tunnel``: the request asked to switch protocols (WebSocket) or was a CONNECT; every later
    byte is opaque and returned as ``Body``.

Framing follows RFC 9112 section 6: ``Transfer-Encoding: chunked`` wins over ``Content-Length``;
without either a request has no body.  Chunked bodies are passed through as they are (chunk sizes,
extensions, trailers), only tracked to find their end.  Responses are never parsed: they flow back
untouched, so streamed answers (server-sent events, chunked, long polling) reach the browser as
they are produced.

Errors raise ``HttpError`` with the status relayd answers: 400 for a malformed line or header, or
conflicting lengths; 431 when a head exceeds ``max_head`` bytes (64 KiB by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Union

MAX_HEAD: Final = 64 * 1024
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A head is matched by two regular expressions, in C, rather than line by line in Python: the
# request line, then every header field (name, optional whitespace, value, optional whitespace).
# They run on the head decoded once as latin-1 (one str per head rather than one per field); the
# token and version patterns only match ASCII, and the target is checked to be ASCII.
_REQUEST_LINE = re.compile(r"(" + _TOKEN + r") ([^ \r\n]+) (HTTP/1\.[01])\r\n")
_FIELD = re.compile(r"(" + _TOKEN + r"):([^\r\n]*)\r\n")  # no lazy match: no backtracking
_FIELDS = re.compile(r"(?:" + _TOKEN + r":[^\r\n]*\r\n)*")


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

    def get(self, name: str) -> str | None:
        values = self.index.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return self.index.get(name.lower(), [])

    @property
    def path(self) -> str:
        """The path of the target, whatever its form (origin or absolute)."""
        target = self.target
        if target.startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
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
    """From here on the connection is opaque bytes (after an Upgrade or CONNECT request)."""


Event = Union[RequestHead, Body, Tunnel]


class RequestReader:
    """Splits a visitor's byte stream into request heads and body bytes."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._buf = bytearray()
        self._state = "head"  # head | length | chunk_size | chunk_data | chunk_crlf | trailers | tunnel
        self._remaining = 0
        self.head_in_progress = False  # bytes of a head arrived but the head is not complete

    @property
    def in_tunnel(self) -> bool:
        return self._state == "tunnel"

    @property
    def between_requests(self) -> bool:
        return self._state == "head" and not self._buf

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

    def _drain(self, events: list[Event]) -> list[Event]:
        while self._buf:
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
                    self._state = "head"
            elif state == "tunnel":
                events.append(Body(bytes(self._buf)))
                self._buf.clear()
            elif not self._read_chunked(events):
                break
        self.head_in_progress = self._state == "head" and bool(self._buf)
        return events

    def _read_head(self, events: list[Event]) -> bool:
        buf = self._buf
        # tolerate blank lines between requests (RFC 9112 section 2.2)
        while buf[:2] == b"\r\n":
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_head:
                raise HttpError(431, f"request head larger than {self.max_head} bytes")
            return False
        if end + 4 > self.max_head:
            raise HttpError(431, f"request head larger than {self.max_head} bytes")
        head = self._parse_head(bytes(buf[: end + 2]))
        del buf[: end + 4]
        self._start_request(head, events)
        return True

    def _start_request(self, head: RequestHead, events: list[Event]) -> None:
        """A head was read (and removed from the buffer): emit it and frame what follows."""
        events.append(head)
        if head.is_upgrade:
            self._state = "tunnel"
            events.append(Tunnel())
            if self._buf:
                events.append(Body(bytes(self._buf)))
                self._buf.clear()
            return
        te = ",".join(head.index.get("transfer-encoding", ())).lower()
        lengths = head.index.get("content-length")
        if te:
            if [t.strip() for t in te.split(",")][-1] != "chunked":
                raise HttpError(400, "Transfer-Encoding must end with chunked")
            self._state = "chunk_size"
        elif lengths:
            values = {v.strip() for v in ",".join(lengths).split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise HttpError(400, "invalid or conflicting Content-Length")
            self._remaining = int(next(iter(values)))
            self._state = "length" if self._remaining else "head"

    def _parse_head(self, raw: bytes) -> RequestHead:
        """``raw`` is a head up to its last line's CRLF (without the empty line)."""
        text = raw.decode("latin-1")
        if "\0" in text:
            raise HttpError(400, "invalid character in a header value")
        line = _REQUEST_LINE.match(text)
        if line is None:
            raise HttpError(400, "malformed request line")
        start = line.end()
        if _FIELDS.fullmatch(text, start) is None:
            raise HttpError(400, "malformed header line")
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
        method, target, version = line.groups()
        if not target.isascii():
            raise HttpError(400, "request target is not ASCII")
        return RequestHead(method, target, version, headers, index, raw)

    def _read_chunked(self, events: list[Event]) -> bool:
        buf = self._buf
        state = self._state
        if state == "chunk_size":
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    raise HttpError(400, "chunk size line too long")
                return False
            size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(400, "malformed chunk size") from None
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
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise HttpError(400, "chunk not followed by CRLF")
            events.append(Body(b"\r\n"))
            del buf[:2]
            self._state = "chunk_size"
        else:  # trailers: lines until an empty one
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise HttpError(431, "trailers too large")
                return False
            events.append(Body(bytes(buf[: end + 2])))
            del buf[: end + 2]
            if end == 0:
                self._state = "head"
        return True
