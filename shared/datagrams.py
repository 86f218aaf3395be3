"""Datagrams over a stream: how a UDP flow travels through the multiplexed connection.

Each datagram is a 2-byte big-endian length and that many bytes (an empty datagram is a length
of 0).  ``DatagramDecoder`` is sans-IO: feed it the stream's bytes, take whole datagrams out; it
holds at most one partial datagram (``MAX_DATAGRAM + 2`` bytes), so a peer cannot make it buffer
more.  A stream carries one flow: the datagrams between one visitor address and the local service.
"""

from __future__ import annotations

import struct
from typing import Final

MAX_DATAGRAM: Final = 65535
_LEN = struct.Struct("!H")


def encode_datagram(payload: bytes | memoryview) -> bytes:
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(payload)} bytes exceeds {MAX_DATAGRAM}")
    return _LEN.pack(len(payload)) + bytes(payload)


class DatagramDecoder:
    """Splits a stream's bytes into datagrams."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Add bytes; return the datagrams now whole (in order)."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            (size,) = _LEN.unpack_from(buf, pos)
            if end - pos - 2 < size:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
