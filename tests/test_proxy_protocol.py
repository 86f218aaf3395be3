"""The PROXY protocol header relayc writes to a local service (HAProxy's spec, v1 and v2)."""

from __future__ import annotations

import struct

import pytest

from shared.proxy_protocol import V2_SIGNATURE, parse_address, proxy_header


def test_v1_as_the_spec_writes_it() -> None:
    assert proxy_header("v1", "192.168.0.1:56324", "192.168.0.11:443") == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert proxy_header("v1", "[2001:db8::1]:40000", "::1:22") == b"PROXY TCP6 2001:db8::1 ::1 40000 22\r\n"
    # one of each family: both as IPv6 (the IPv4 one mapped)
    assert proxy_header("v1", "::1:5555", "127.0.0.1:6000") == b"PROXY TCP6 ::1 ::ffff:7f00:1 5555 6000\r\n"


def test_v2_binary_layout() -> None:
    header = proxy_header("v2", "127.0.0.7:5555", "127.0.0.1:6000")
    assert header[:12] == V2_SIGNATURE and header[12] == 0x21 and header[13] == 0x11
    (length,) = struct.unpack("!H", header[14:16])
    assert length == 12 == len(header) - 16
    assert header[16:20] == bytes([127, 0, 0, 7]) and header[20:24] == bytes([127, 0, 0, 1])
    assert struct.unpack("!HH", header[24:28]) == (5555, 6000)
    six = proxy_header("v2", "[::1]:1", "[::2]:2")
    assert six[13] == 0x21 and struct.unpack("!H", six[14:16]) == (36,) and len(six) == 16 + 36


@pytest.mark.parametrize("bad", ["", "nothing", "1.2.3.4", "1.2.3.4:99999", "host.example:80", "1.2.3.4:-1"])
def test_an_address_that_is_not_one_gives_the_unknown_header(bad: str) -> None:
    assert parse_address(bad) is None
    assert proxy_header("v1", bad, "127.0.0.1:80") == b"PROXY UNKNOWN\r\n"
    assert proxy_header("v2", "127.0.0.1:80", bad) == V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL
    with pytest.raises(ValueError, match="not v1 or v2"):
        proxy_header("v3", "127.0.0.1:1", "127.0.0.1:2")
