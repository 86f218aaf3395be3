"""Datagrams over a stream: how a UDP flow travels through the multiplexed connection.

Each datagram is a 2-byte big-endian length and that many bytes (an empty datagram is a length
of 0).  ``DatagramDecoder`` is sans-IO: feed it the stream's bytes, take whole datagrams out, a
bounded number at a time; what it holds is bytes the peer sent within its window (credit is
returned only for datagrams taken out), so a peer cannot make it buffer more than that.  A stream
carries one flow: the datagrams between one visitor address and the local service.
"""

from __future__ import annotations

import struct
from typing import Final

MAX_DATAGRAM: Final = 65535
PER_CALLBACK: Final = 256  # datagrams handled in one event-loop callback (then the loop goes on)
DATAGRAM_OVERHEAD: Final = 28  # what a datagram costs besides its payload (IP + UDP headers), for limits
_LEN = struct.Struct("!H")


def encode_datagram(payload: bytes | memoryview) -> bytes:
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(payload)} bytes exceeds {MAX_DATAGRAM}")
    return _LEN.pack(len(payload)) + bytes(payload)


class DatagramDecoder:
    """Splits a stream's bytes into datagrams.

    ``feed(data, limit)`` returns at most ``limit`` datagrams (0: all); what is left stays
    buffered, and ``consumed`` says how many stream bytes the datagrams returned took, so that the
    caller returns credit only for those (the peer's window then bounds the buffer).  ``more``:
    a whole datagram is still buffered (call ``feed(b"", limit)`` again, later)."""

    __slots__ = ("_buf", "consumed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.consumed = 0

    def feed(self, data: bytes | memoryview, limit: int = 0) -> list[bytes]:
        """Add bytes; return the datagrams now whole (in order), at most ``limit`` of them."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 2 and not (limit and len(out) >= limit):
            (size,) = _LEN.unpack_from(buf, pos)
            if end - pos - 2 < size:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        self.consumed = pos
        return out

    @property
    def more(self) -> bool:
        """A whole datagram is buffered."""
        buf = self._buf
        return len(buf) >= 2 and len(buf) - 2 >= _LEN.unpack_from(buf, 0)[0]

    @property
    def buffered(self) -> int:
        return len(self._buf)
