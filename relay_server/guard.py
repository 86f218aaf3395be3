"""Failed-login accounting: slow down, then block, guessers, without locking out their neighbours.

Theory of operation
===================

A ``LoginGuard`` counts failed logins in a sliding window (``window`` seconds) on two levels:

* per *pair* (address, name): the name is the client name a relayc sent (or ``""`` where there is
  no name, as on the dashboard).  Each failure of a pair makes its next answer slower (0.25 s,
  0.5 s, ... 8 s), and ``block_after`` failures block that pair for ``block_seconds``: it is then
  answered "blocked until T" without its proof being checked.  A misconfigured relayc (wrong
  token) behind a campus NAT therefore blocks only itself: relayc's of other names behind the
  same address keep logging in.
* per *address*: failures from one address are counted too, with the distinct names they named.
  The whole address is blocked (and dropped at accept time, before any TLS work) only when it
  reached ``block_after`` failures naming at least ``names_to_block_address`` different names:
  that is a scanner or a brute-forcer, not one broken client.  The dashboard uses
  ``names_to_block_address = 1`` and no names, so there every block is an address block.

Addresses are counted as they are for IPv4 and by their /64 for IPv6 (one host commonly has a
whole /64 to pick from).  Every table here is keyed by something the peer chooses (its address,
the name it sent), so every table is bounded (``max_entries``; the least recently touched entry
that is not blocked goes first, so a flood of failures from elsewhere cannot lift a block) and
entries leave once their window or block is over.  Time is passed in (``now``, monotonic
seconds); only ``blocks()`` also takes the wall-clock time, to report ``until`` as a Unix time.
No I/O, no clock, no logging here.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeVar

MAX_DELAY: Final = 8.0
# Distinct names remembered per address: only "at least names_to_block_address" matters.
_NAMES_KEPT: Final = 16
_K = TypeVar("_K", str, tuple[str, str])


def address_key(addr: str) -> str:
    """What failures are counted by: an IPv4 address, or the /64 of an IPv6 one (one host commonly
    has a whole /64 to pick addresses from)."""
    if ":" not in addr:
        return addr
    try:
        ip = ipaddress.IPv6Address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class BlockKind(str, enum.Enum):
    ADDRESS = "address"
    CLIENT = "client"


class BlockScope(str, enum.Enum):
    RELAYC = "relayc"
    DASHBOARD = "dashboard"


@dataclass(frozen=True, slots=True)
class Block:
    """One active block, as listed by ``GET /api/v1/blocks``."""

    kind: BlockKind
    value: str  # the address, or the client name
    scope: BlockScope
    failures: int
    until: float  # Unix time
    address: str = ""  # for a client block: the address it is blocked from

    def as_dict(self) -> dict[str, object]:
        item: dict[str, object] = {
            "kind": self.kind.value, "value": self.value, "scope": self.scope.value,
            "failures": self.failures, "until": round(self.until, 3),
        }  # fmt: skip
        if self.kind is BlockKind.CLIENT:
            item["address"] = self.address
        return item


@dataclass(frozen=True, slots=True)
class Failure:
    """What a recorded failure means: the delay before answering, and whether a block started."""

    delay: float
    failures: int  # failures of the pair (or of the address, without a name) in the window
    pair_blocked: bool
    address_blocked: bool


class _Failures:
    """Failure times of one pair or address within the window, and its block."""

    __slots__ = ("blocked_until", "names", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.blocked_until = 0.0
        self.names: dict[str, None] = {}  # addresses only: distinct names, oldest first

    def add(self, now: float, window: float, keep: int) -> int:
        times = self.times
        times.append(now)
        while times and times[0] <= now - window:
            times.popleft()
        while len(times) > keep:  # only "at least block_after" matters
            times.popleft()
        return len(times)

    def stale(self, now: float, window: float) -> bool:
        return self.blocked_until <= now and (not self.times or self.times[-1] <= now - window)


class LoginGuard:
    """Slows down, then blocks, (address, name) pairs and addresses whose logins keep failing."""

    def __init__(
        self,
        scope: BlockScope = BlockScope.RELAYC,
        *,
        window: float = 600.0,
        block_after: int = 10,
        block_seconds: float = 600.0,
        names_to_block_address: int = 3,
        max_entries: int = 10_000,
    ) -> None:
        self.scope = scope
        self.window = window
        self.block_after = max(1, block_after)
        self.block_seconds = block_seconds
        self.names_to_block_address = max(1, names_to_block_address)
        self.max_entries = max_entries
        self._pairs: dict[tuple[str, str], _Failures] = {}
        self._addresses: dict[str, _Failures] = {}

    # --- queries --------------------------------------------------------------------------------

    def address_blocked_until(self, addr: str, now: float) -> float | None:
        """Monotonic time until which ``addr`` is blocked, or None.  Checked before TLS."""
        entry = self._addresses.get(address_key(addr))
        if entry is None or entry.blocked_until <= now:
            return None
        return entry.blocked_until

    def pair_blocked_until(self, addr: str, name: str, now: float) -> float | None:
        """Monotonic time until which ``name`` may not log in from ``addr`` (address blocks included)."""
        until = self.address_blocked_until(addr, now)
        entry = self._pairs.get((address_key(addr), name)) if name else None
        if entry is not None and entry.blocked_until > now:
            until = max(until or 0.0, entry.blocked_until)
        return until

    def blocks(self, now: float, wall_now: float) -> list[Block]:
        """The blocks in force, addresses first, each with ``until`` as a Unix time."""
        out: list[Block] = []
        for addr, entry in self._addresses.items():
            if entry.blocked_until > now:
                out.append(Block(BlockKind.ADDRESS, addr, self.scope, len(entry.times),
                                 wall_now + entry.blocked_until - now))  # fmt: skip
        for (addr, name), entry in self._pairs.items():
            if entry.blocked_until > now:
                out.append(Block(BlockKind.CLIENT, name, self.scope, len(entry.times),
                                 wall_now + entry.blocked_until - now, addr))  # fmt: skip
        return out

    # --- changes --------------------------------------------------------------------------------

    def record_failure(self, addr: str, name: str, now: float) -> Failure:
        """Count a failed login of ``name`` from ``addr``: how long to wait before answering, and
        whether this failure started a block."""
        addr = address_key(addr)
        self._prune(now)
        count = 0
        pair_blocked = address_blocked = False
        if name:
            pair = self._touch(self._pairs, (addr, name), now)
            count = pair.add(now, self.window, self.block_after)
            if count >= self.block_after and pair.blocked_until <= now:
                pair.blocked_until = now + self.block_seconds
                pair_blocked = True
        entry = self._touch(self._addresses, addr, now)
        total = entry.add(now, self.window, self.block_after)
        names = entry.names
        names.pop(name, None)
        names[name] = None
        if len(names) > _NAMES_KEPT:
            del names[next(iter(names))]
        if total >= self.block_after and len(names) >= self.names_to_block_address and entry.blocked_until <= now:
            entry.blocked_until = now + self.block_seconds
            address_blocked = True
        slow = count if name else total
        return Failure(min(0.25 * 2 ** (slow - 1), MAX_DELAY), count or total, pair_blocked, address_blocked)

    def record_success(self, addr: str, name: str) -> None:
        """A login succeeded: its pair starts over.  The address keeps its count (failures age
        out of the window): a scanner that also holds one valid token, or shares its address with
        someone who signs in (a dashboard reached through ssh -L, a metrics scraper), does not get
        its record wiped."""
        if name:
            self._pairs.pop((address_key(addr), name), None)

    def impose(self, kind: BlockKind, addr: str, name: str, until: float, now: float) -> None:
        """A block another node of the cluster made: the pair (``name`` from ``addr``) or the
        address is refused until ``until`` (monotonic) here too."""
        addr = address_key(addr)
        if kind is BlockKind.ADDRESS:
            entry = self._touch(self._addresses, addr, now)
        elif name:
            entry = self._touch(self._pairs, (addr, name), now)
        else:
            return
        entry.blocked_until = max(entry.blocked_until, until)

    def unblock(self, kind: BlockKind, value: str) -> bool:
        """Lift the blocks of an address, or of a client name from every address, and forget their
        failures.  False when no such block was in force."""
        found = False
        if kind is BlockKind.ADDRESS:
            value = address_key(value)
            entry = self._addresses.pop(value, None)
            found = entry is not None and entry.blocked_until > 0
            for key in [k for k in self._pairs if k[0] == value]:
                del self._pairs[key]
        else:
            for key in [k for k in self._pairs if k[1] == value]:
                found = found or self._pairs[key].blocked_until > 0
                del self._pairs[key]
        return found

    # --- internals ------------------------------------------------------------------------------

    def _touch(self, table: dict[_K, _Failures], key: _K, now: float) -> _Failures:
        """The entry for ``key``, made or moved to the end (tables are ordered oldest-touched first)."""
        entry = table.pop(key, None)
        if entry is None:
            if len(table) >= self.max_entries:
                self._evict(table, now)
            entry = _Failures()
        table[key] = entry
        return entry

    @staticmethod
    def _evict(table: dict[_K, _Failures], now: float) -> None:
        """Make room: the least recently touched entry that is not blocked goes (a flood of new
        failures from elsewhere must not lift a block), or, if the first few are all blocked, the
        oldest of them."""
        victim = None
        for i, (key, entry) in enumerate(table.items()):
            if entry.blocked_until <= now:
                victim = key
                break
            if i == 64:
                break
        del table[victim if victim is not None else next(iter(table))]

    def _prune(self, now: float) -> None:
        """Drop a few entries whose window and block are over, oldest first (amortized O(1))."""
        self._prune_table(self._pairs, now)
        self._prune_table(self._addresses, now)

    def _prune_table(self, table: dict[_K, _Failures], now: float) -> None:
        for _ in range(4):
            if not table:
                return
            key = next(iter(table))
            if not table[key].stale(now, self.window):
                return
            del table[key]

    def __len__(self) -> int:
        return len(self._pairs) + len(self._addresses)
