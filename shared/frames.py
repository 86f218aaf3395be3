"""The frame header codec and the connection preface: pure bytes, no I/O.

See docs/protocol.md for the rules.  Every frame starts with a 12-byte header::

    version:u8  type:u8  flags:u16  stream_id:u32  length:u32      (network byte order)

For DATA, ``length`` is the payload size that follows.  For WINDOW_UPDATE it is the credit
added, for PING an opaque value echoed back, for GO_AWAY an error code; those frames carry no
payload.
"""

from __future__ import annotations

import struct
from typing import Final

from shared.errors import RemoteProtocolError

PROTOCOL_VERSION: Final = 1
PREFACE_MAGIC: Final = b"RELAY"
PREFACE_LEN: Final = 8


def preface(version: int = PROTOCOL_VERSION) -> bytes:
    """The 8 bytes each side sends first: ``RELAY``, the version byte, ``\\r\\n``."""
    return PREFACE_MAGIC + bytes([version]) + b"\r\n"


def parse_preface(data: bytes) -> int:
    """Return the protocol version in an 8-byte preface, or raise ``RemoteProtocolError``."""
    if len(data) != PREFACE_LEN or data[:5] != PREFACE_MAGIC or data[6:8] != b"\r\n":
        raise RemoteProtocolError(
            f"not a relay peer: expected preface {preface()!r}, got {bytes(data[:PREFACE_LEN])!r}",
            code=GoAwayCode.PROTOCOL_ERROR,
        )
    return data[5]


class FrameType:
    DATA: Final = 0
    WINDOW_UPDATE: Final = 1
    PING: Final = 2
    GO_AWAY: Final = 3


FRAME_TYPE_NAMES: Final = {0: "DATA", 1: "WINDOW_UPDATE", 2: "PING", 3: "GO_AWAY"}


class Flag:
    SYN: Final = 0x1
    ACK: Final = 0x2
    FIN: Final = 0x4
    RST: Final = 0x8


KNOWN_FLAGS: Final = Flag.SYN | Flag.ACK | Flag.FIN | Flag.RST


class GoAwayCode:
    NORMAL: Final = 0
    PROTOCOL_ERROR: Final = 1
    INTERNAL_ERROR: Final = 2
    UNSUPPORTED_VERSION: Final = 3
    AUTH_FAILED: Final = 4
    REPLACED: Final = 5  # a newer session of the same client logged in
    KICKED: Final = 6


class ResetCode:
    """Why a stream was reset; carried as a 4-byte payload on a DATA frame with RST."""

    ABORTED: Final = 0  # one side's socket was aborted
    REFUSED: Final = 1  # the target refused the connection or could not be reached
    NOT_ALLOWED: Final = 2  # policy forbids this stream (allow_targets, stream limits)
    SESSION_CLOSING: Final = 3
    FLOW_CONTROL: Final = 4
    INTERNAL: Final = 5
    UNKNOWN_TUNNEL: Final = 6


def _names(codes: type) -> dict[int, str]:
    return {v: k for k, v in vars(codes).items() if k.isupper() and isinstance(v, int)}


# Codes stay plain ints (compared per frame on the hot path); these give their names for logs.
_GO_AWAY_NAMES: Final = _names(GoAwayCode)
_RESET_NAMES: Final = _names(ResetCode)


def go_away_name(code: int) -> str:
    """``5`` -> ``"REPLACED"``; a code this version does not know -> ``"code 42"``."""
    return _GO_AWAY_NAMES.get(code, f"code {code}")


def reset_name(code: int) -> str:
    return _RESET_NAMES.get(code, f"code {code}")


HEADER = struct.Struct("!BBHII")
HEADER_LEN: Final = HEADER.size  # 12
MAX_FRAME_PAYLOAD: Final = 256 * 1024
MAX_STREAM_ID: Final = 0xFFFFFFFF
MAX_WINDOW: Final = 0x7FFFFFFF

_pack = HEADER.pack


def frame_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode one header (the payload, for DATA, follows it on the wire)."""
    return _pack(PROTOCOL_VERSION, frame_type, flags, stream_id, length)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """Decode and validate the header at ``offset``: returns (type, flags, stream_id, length).

    Raises ``RemoteProtocolError`` for a wrong version, an unknown type or flag, or a DATA length
    above ``MAX_FRAME_PAYLOAD``.  The caller checks stream-level rules.
    """
    version, frame_type, flags, stream_id, length = HEADER.unpack_from(data, offset)
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"frame with protocol version {version}, expected {PROTOCOL_VERSION}",
            code=GoAwayCode.UNSUPPORTED_VERSION,
        )
    if frame_type > FrameType.GO_AWAY:
        raise RemoteProtocolError(f"unknown frame type {frame_type}")
    if flags & ~KNOWN_FLAGS:
        raise RemoteProtocolError(f"unknown flags 0x{flags:04x} on {FRAME_TYPE_NAMES[frame_type]} frame")
    if frame_type == FrameType.DATA and length > MAX_FRAME_PAYLOAD:
        raise RemoteProtocolError(f"DATA frame length {length} exceeds the maximum {MAX_FRAME_PAYLOAD}")
    return frame_type, flags, stream_id, length
