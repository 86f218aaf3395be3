"""The PROXY protocol header (HAProxy's spec, versions 1 and 2): tells a local service which
visitor a connection comes from, before the connection's own bytes.  Pure bytes, no I/O.

relayc writes it to the local service of a tunnel with ``proxy_protocol = "v1"`` or ``"v2"``;
the addresses come from relayd's ``stream_open`` (``visitor``: the visitor's ``ip:port``,
``public``: the ``ip:port`` of relayd's socket it reached).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY: Final = 0x21  # version 2, command PROXY
_V2_LOCAL: Final = 0x20  # version 2, command LOCAL (addresses unknown)
_TCP4: Final = 0x11
_TCP6: Final = 0x21

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def parse_address(text: str) -> Address | None:
    """``"1.2.3.4:5678"``, ``"::1:5678"`` or ``"[::1]:5678"`` as (address, port); None when it
    is not one (relayd formats them, but a peer sends them)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]), int(port)
    except ValueError:
        return None


def _same_family(source: Address, destination: Address) -> tuple[Address, Address]:
    """Both IPv4, or both IPv6 (an IPv4 one mapped into IPv6)."""
    if source[0].version == destination[0].version:
        return source, destination

    def six(a: Address) -> Address:
        ip = a[0]
        return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip), a[1]

    return six(source), six(destination)


def proxy_header(version: str, source: str, destination: str) -> bytes:
    """The header for a connection from ``source`` to ``destination`` (``ip:port`` each); when
    either is unknown, the header that says so (v1 ``UNKNOWN``, v2 ``LOCAL``)."""
    src, dst = parse_address(source), parse_address(destination)
    if version == "v1":
        if src is None or dst is None:
            return b"PROXY UNKNOWN\r\n"
        src, dst = _same_family(src, dst)
        family = "TCP4" if src[0].version == 4 else "TCP6"
        return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")
    if version != "v2":
        raise ValueError(f"PROXY protocol version {version!r} is not v1 or v2")
    if src is None or dst is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
    src, dst = _same_family(src, dst)
    addresses = src[0].packed + dst[0].packed + struct.pack("!HH", src[1], dst[1])
    family_byte = _TCP4 if src[0].version == 4 else _TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family_byte, len(addresses)) + addresses
