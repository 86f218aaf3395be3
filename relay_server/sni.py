"""Reading the server name (SNI) from a TLS ClientHello, without terminating TLS.  Pure bytes.

``ClientHelloReader`` is fed the visitor's bytes as they arrive and answers None until the whole
ClientHello handshake message is in, then the server name; or it raises ``SniError``.  It walks
the record stream once: a partial record header (under 5 bytes), the count of payload bytes left
in the current record and the handshake bytes gathered so far are all it carries from one feed to
the next, so each feed costs time proportional to its own bytes, however the hello is split into
records and reads.  Handshake bytes are gathered only up to the end of the ClientHello; anything
after it (in the same record or not) is not parsed, only kept.

The bytes are not modified: ``received()`` gives back everything fed, exactly as it came, which
relayd forwards to the lab's app (the TLS session is between the visitor and the app).

Bounds: the ClientHello message (4-byte header included) is at most MAX_CLIENT_HELLO, split into
at most MAX_HELLO_RECORDS records, and complete within the first MAX_RAW_HELLO bytes of the
stream.  The server name must be a DNS
host name by the rule relayd's config uses for domains, so nothing else (control characters,
spaces, '_', IPv6 literals) ever reaches a route lookup or a log line.

``read_sni`` is the one-shot form: a fresh reader fed everything received so far.
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = object()
MAX_CLIENT_HELLO: Final = 64 * 1024
# Raw stream bound.  A record header costs 5 bytes, so a hello split into 1-byte records takes 6x
# its size: this accepts any hello of up to 22,016 bytes however it is split (16 KiB in 1-byte
# records is 96 KiB), and a 64 KiB hello in records of 5 bytes or more.  Real clients put the
# whole hello, 0.5-2 KiB, in one record; the bound only stops a dribbler from holding memory.
MAX_RAW_HELLO: Final = MAX_CLIENT_HELLO * 2 + 1024
MAX_RECORD: Final = 16384 + 2048  # TLSCiphertext's limit; a plaintext record is smaller still
# Records a ClientHello may be split into.  Browsers use one (two with a large post-quantum key
# share); tools that fragment the hello against SNI filtering use tens to hundreds; a visitor that
# sends one byte per record only makes relayd work ~2 us per record, so the count is capped.
MAX_HELLO_RECORDS: Final = 1024

# Raw chunks shorter than this are appended to a bytearray instead of being kept as list items:
# a visitor sending one byte per read would otherwise cost a list slot (and object) per byte.
_SMALL_CHUNK: Final = 512
ACME_TLS_ALPN: Final = b"acme-tls/1"
_HOST_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."


class SniError(Exception):
    """Not a TLS ClientHello, a malformed one, or one without a valid server name."""


class ClientHelloReader:
    """Sans-IO reader of one connection's ClientHello; see the module docstring."""

    __slots__ = ("_done", "_handshake", "_header", "_need", "_raw", "_record_left", "_records", "_seen", "acme_alpn")

    def __init__(self) -> None:
        self._raw: list[bytes | bytearray] = []
        self._seen = 0  # stream bytes parsed (all bytes fed, until the reader is done)
        self._header = bytearray()  # a record header split across feeds
        self._record_left = 0  # payload bytes of the current record not yet read
        self._records = 0  # records started
        self._handshake = bytearray()  # the ClientHello's bytes so far, header included
        self._need = 0  # the ClientHello's full length, once its 4-byte header is in (0 before)
        self._done = False
        self.acme_alpn = False  # the hello offers ALPN "acme-tls/1": an ACME TLS-ALPN-01 validation

    def feed(self, data: bytes | bytearray | memoryview) -> str | None:
        """Take the next bytes; return None for more, the server name, or raise ``SniError``.

        The name is lowercased, without a trailing dot.  Once it returned a name or raised, the
        reader is finished: a further feed is a caller's bug (RuntimeError).
        """
        if self._done:
            raise RuntimeError("ClientHelloReader fed after it returned a name or raised")
        # bytes are immutable, so kept as they are; anything else may be a reused buffer: copied
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._keep(chunk)
        room = MAX_RAW_HELLO - self._seen
        view = memoryview(chunk)[:room]
        self._seen += len(view)
        try:
            name = self._read(view)
            # past the bound only if the hello did not end within it: then whole and split
            # feeds of the same stream always agree
            if name is None and len(chunk) > room:
                raise SniError("ClientHello too large")
        except SniError:
            self._done = True
            raise
        if name is not None:
            self._done = True
        return name

    def received(self) -> bytes:
        """Everything fed so far, exactly as received."""
        return b"".join(self._raw)

    def _keep(self, chunk: bytes) -> None:
        raw = self._raw
        if len(chunk) >= _SMALL_CHUNK:
            raw.append(chunk)
        elif raw and isinstance(raw[-1], bytearray):
            raw[-1] += chunk
        else:
            raw.append(bytearray(chunk))

    def _read(self, view: memoryview) -> str | None:
        pos, end = 0, len(view)
        header, handshake = self._header, self._handshake
        while pos < end:
            if self._record_left == 0:
                take = min(5 - len(header), end - pos)
                header += view[pos : pos + take]
                pos += take
                if len(header) < 5:
                    return None
                if header[0] != 0x16 or header[1] != 3:
                    raise SniError("not a TLS handshake")
                length = header[3] << 8 | header[4]
                if length == 0 or length > MAX_RECORD:
                    raise SniError(f"bad TLS record length {length}")
                self._records += 1
                if self._records > MAX_HELLO_RECORDS:
                    raise SniError(f"ClientHello split into more than {MAX_HELLO_RECORDS} records")
                self._record_left = length
                header.clear()
                continue
            # Copy no further than what is awaited (the 4-byte message header, then the rest of
            # the ClientHello), so bytes after the hello are never gathered.
            take = min((self._need or 4) - len(handshake), self._record_left, end - pos)
            handshake += view[pos : pos + take]
            pos += take
            self._record_left -= take
            if not self._need and len(handshake) == 4:
                if handshake[0] != 1:
                    raise SniError("first handshake message is not a ClientHello")
                self._need = 4 + int.from_bytes(handshake[1:4], "big")
                if self._need > MAX_CLIENT_HELLO:
                    raise SniError("ClientHello too large")
            if len(handshake) == self._need:
                name, self.acme_alpn = _parse_client_hello(bytes(handshake[4:]))
                return name
        return None


def read_sni(data: bytes) -> str | object:
    """Return the SNI host name (lowercase), ``NEED_MORE``, or raise ``SniError``."""
    name = ClientHelloReader().feed(data)
    return NEED_MORE if name is None else name


def _u16(b: bytes, pos: int) -> int:
    return b[pos] << 8 | b[pos + 1]  # IndexError if truncated, unlike int.from_bytes of a slice


def _parse_client_hello(body: bytes) -> tuple[str, bool]:
    """(server name, whether ALPN offers acme-tls/1)."""
    name: str | None = None
    acme_alpn = False
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + _u16(body, pos)  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos > len(body):
            raise IndexError
        if pos == len(body):
            raise SniError("ClientHello has no extensions (no SNI)")
        end = pos + 2 + _u16(body, pos)
        pos += 2
        if end > len(body):
            raise SniError("ClientHello extensions overrun")
        while pos < end:
            if pos + 4 > end:
                raise SniError("ClientHello extension header overruns")
            ext_type, ext_len = _u16(body, pos), _u16(body, pos + 2)
            pos += 4
            if pos + ext_len > end:
                raise SniError("ClientHello extension overruns")
            if ext_type == 0 and name is None:  # server_name
                name = _server_name(body[pos : pos + ext_len])
            elif ext_type == 16:  # application_layer_protocol_negotiation
                acme_alpn = _offers(body[pos : pos + ext_len], ACME_TLS_ALPN)
            pos += ext_len
    except IndexError:
        raise SniError("truncated ClientHello") from None
    if name is None:
        raise SniError("ClientHello carries no server name (SNI)")
    return name, acme_alpn


def _offers(ext: bytes, protocol: bytes) -> bool:
    """Whether an ALPN extension's body lists ``protocol`` (RFC 7301 section 3.1)."""
    if len(ext) < 2 or 2 + _u16(ext, 0) != len(ext):
        raise SniError("ALPN extension length mismatch")
    p = 2
    while p < len(ext):
        n = ext[p]
        if n == 0 or p + 1 + n > len(ext):
            raise SniError("ALPN protocol name overruns")
        if ext[p + 1 : p + 1 + n] == protocol:
            return True
        p += 1 + n
    return False


def _server_name(ext: bytes) -> str:
    """The host_name entry of a server_name extension's body (RFC 6066 section 3)."""
    if len(ext) < 2 or 2 + _u16(ext, 0) != len(ext):
        raise SniError("server_name extension length mismatch")
    p = 2
    while p < len(ext):
        if p + 3 > len(ext):
            raise SniError("server_name entry overruns")
        name_type, name_len = ext[p], _u16(ext, p + 1)
        p += 3
        if p + name_len > len(ext):
            raise SniError("server_name entry overruns")
        if name_type == 0:  # host_name; RFC 6066 allows one, so the first is the one
            return _host_name(ext[p : p + name_len])
        p += name_len
    raise SniError("server_name extension holds no host name")


def _host_name(raw: bytes) -> str:
    """``raw`` as a lowercase DNS host name, or SniError.

    The rule is shared/config.check_domain's (letters, digits and '-' in labels of 1-63 that do
    not start or end with '-', at most 253 in all), so every configurable domain can match and
    nothing else gets through: no control characters, spaces or '_'.  IPv4 literals (RFC 6066
    forbids them in SNI) pass, as they do in the config, and then simply match no route; IPv6
    ones fail on ':'.  Messages show the name through repr, never its raw bytes.
    """
    name = raw[:-1] if raw.endswith(b".") else raw  # one trailing dot: the absolute form
    if not name:
        raise SniError("server name is empty")
    if len(name) > 253:
        raise SniError(f"server name is {len(name)} bytes long (at most 253)")
    bad = name.translate(None, _HOST_BYTES)
    if bad:
        shown = name if len(name) <= 64 else name[:64] + b"..."
        raise SniError(f"server name {shown!r} holds {bad[:1]!r} (only letters, digits, '-' and '.')")
    for label in name.split(b"."):
        if not label:
            raise SniError(f"server name {name!r} has an empty label")
        if len(label) > 63:
            raise SniError(f"server name label {label[:16]!r}... is {len(label)} bytes long (at most 63)")
        if label[:1] == b"-" or label[-1:] == b"-":
            raise SniError(f"server name label {label!r} starts or ends with '-'")
    return name.decode("ascii").lower()
