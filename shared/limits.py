"""Traffic limits as pure logic (time passed in): token buckets and source-address allowlists."""

from __future__ import annotations

import ipaddress
import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}  # fmt: skip
# Linear: no two adjacent parts can match the same characters (a rate comes from peers too).
_RATE_RE = re.compile(r"(\d{1,15}(?:\.\d{1,6})?) ?([a-z]{0,3})(?:/s)?", re.I)
RATE_TEXT_MAX = 32


def parse_rate(value: object) -> int:
    """Bytes per second from ``1000000``, ``"10MB"``, ``"512KiB"`` or ``"1.5 GB/s"``; 0 = unlimited.
    Anything else is a ``ValueError`` (the value may come from a peer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must be >= 0 (0 = unlimited)")
        return value
    if not isinstance(value, str):
        raise ValueError('expected an integer (bytes per second) or a string like "10MB"')
    if len(value) > RATE_TEXT_MAX:
        raise ValueError(f"a rate is at most {RATE_TEXT_MAX} characters, like 10MB")
    m = _RATE_RE.fullmatch(value.strip())
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a rate like 10MB, 512KiB or 1000000 (bytes per second)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class TokenBucket:
    """``rate`` bytes per second with bursts of up to one second's worth.

    ``take(n, now)`` always accepts the bytes (they were already read) and returns how long the
    caller should wait before moving more: the debt divided by the rate.
    """

    __slots__ = ("level", "rate", "stamp")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.level = float(rate)
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        rate = self.rate
        self.level = min(float(rate), self.level + (now - self.stamp) * rate)
        self.stamp = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / rate

    def try_take(self, n: int, now: float) -> bool:
        """Take ``n`` only if they fit now (a datagram: sent whole or dropped, never owed)."""
        rate = self.rate
        self.level = min(float(rate), self.level + (now - self.stamp) * rate)
        self.stamp = now
        if self.level < n:
            return False
        self.level -= n
        return True


class SourceFilter:
    """Which visitor addresses may use a tunnel: a list of CIDRs (empty = everyone)."""

    def __init__(self, cidrs: list[str] | tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        return any(ip in net for net in self.networks)
