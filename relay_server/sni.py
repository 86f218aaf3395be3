"""Reading the server name (SNI) from a TLS ClientHello, without terminating TLS.  Pure bytes.

The ClientHello may span several TLS records; ``read_sni`` is given everything received so far
and answers NEED_MORE until the whole handshake message is there.  The bytes are not modified:
relayd forwards them as they came, and the TLS session is between the visitor and the lab's app.
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = object()
MAX_CLIENT_HELLO: Final = 64 * 1024


class SniError(Exception):
    """Not a TLS ClientHello, a malformed one, or one without a server name."""


def read_sni(data: bytes) -> str | object:
    """Return the SNI host name (lowercase), ``NEED_MORE``, or raise ``SniError``."""
    handshake = bytearray()
    pos = 0
    need: int | None = None
    while need is None or len(handshake) < need:
        if len(data) - pos < 5:
            return _need_more(data)
        content_type, major, _minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != 0x16 or major != 3:
            raise SniError("not a TLS handshake")
        if length == 0 or length > 16384 + 2048:
            raise SniError(f"bad TLS record length {length}")
        if len(data) - pos - 5 < length:
            return _need_more(data)
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need is None and len(handshake) >= 4:
            if handshake[0] != 1:
                raise SniError("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise SniError("ClientHello too large")
    return _parse_client_hello(bytes(handshake[4:need]))


def _need_more(data: bytes) -> object:
    if len(data) > MAX_CLIENT_HELLO + 1024:
        raise SniError("ClientHello too large")
    return NEED_MORE


def _parse_client_hello(body: bytes) -> str:
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos + 2 > len(body):
            raise SniError("ClientHello has no extensions (no SNI)")
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        if end > len(body):
            raise SniError("ClientHello extensions overrun")
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            pos += 4
            if pos + ext_len > end:
                raise SniError("ClientHello extension overruns")
            if ext_type == 0:  # server_name
                ext = body[pos : pos + ext_len]
                list_len = int.from_bytes(ext[0:2], "big")
                p = 2
                while p + 3 <= 2 + list_len:
                    name_type = ext[p]
                    name_len = int.from_bytes(ext[p + 1 : p + 3], "big")
                    name = ext[p + 3 : p + 3 + name_len]
                    if name_type == 0 and len(name) == name_len:
                        try:
                            return name.decode("ascii").lower().rstrip(".")
                        except UnicodeDecodeError:
                            raise SniError("server name is not ASCII") from None
                    p += 3 + name_len
                raise SniError("server_name extension holds no host name")
            pos += ext_len
    except IndexError:
        raise SniError("truncated ClientHello") from None
    raise SniError("ClientHello carries no server name (SNI)")
