from __future__ import annotations

import pytest

from shared.errors import RemoteProtocolError
from shared.frames import (
    HEADER_LEN,
    MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    Flag,
    FrameType,
    decode_header,
    frame_header,
    parse_preface,
    preface,
)


def test_preface_roundtrip() -> None:
    assert len(preface()) == 8
    assert parse_preface(preface()) == PROTOCOL_VERSION
    assert parse_preface(preface(7)) == 7


@pytest.mark.parametrize("junk", [b"GET / HT", b"\x16\x03\x01\x02\x00\x01\x00\x01", b"RELAY\x01\n\n", b"relay\x01\r\n"])
def test_bad_preface_names_what_came(junk: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not a relay peer"):
        parse_preface(junk)


@pytest.mark.parametrize(
    "ftype,flags,sid,length",
    [
        (FrameType.DATA, 0, 1, 0),
        (FrameType.DATA, Flag.SYN | Flag.FIN, 0xFFFFFFFF, MAX_FRAME_PAYLOAD),
        (FrameType.WINDOW_UPDATE, Flag.ACK, 2, 0x7FFFFFFF),
        (FrameType.PING, Flag.SYN, 0, 0xFFFFFFFF),
        (FrameType.GO_AWAY, 0, 0, 3),
    ],
)
def test_header_roundtrip(ftype: int, flags: int, sid: int, length: int) -> None:
    raw = frame_header(ftype, flags, sid, length)
    assert len(raw) == HEADER_LEN == 12
    assert decode_header(raw) == (ftype, flags, sid, length)
    assert decode_header(b"xx" + raw, 2) == (ftype, flags, sid, length)


def test_header_layout_is_network_order() -> None:
    raw = frame_header(FrameType.WINDOW_UPDATE, Flag.SYN | Flag.ACK, 0x01020304, 0x0A0B0C0D)
    assert raw == bytes([PROTOCOL_VERSION, 1, 0, 3, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D])


def test_header_errors() -> None:
    with pytest.raises(RemoteProtocolError, match="protocol version 9"):
        decode_header(bytes([9, 0, 0, 0]) + bytes(8))
    with pytest.raises(RemoteProtocolError, match="unknown frame type 4"):
        decode_header(bytes([PROTOCOL_VERSION, 4]) + bytes(10))
    with pytest.raises(RemoteProtocolError, match="unknown flags"):
        decode_header(bytes([PROTOCOL_VERSION, 0, 0, 0x10]) + bytes(8))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        decode_header(frame_header(FrameType.DATA, 0, 1, MAX_FRAME_PAYLOAD + 1))
    # the length of a WINDOW_UPDATE is a credit, not a payload: any value is a valid header
    assert decode_header(frame_header(FrameType.WINDOW_UPDATE, 0, 1, MAX_FRAME_PAYLOAD + 1))[3] == MAX_FRAME_PAYLOAD + 1
