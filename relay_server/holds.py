"""Ports and domains reserved for a client that went offline.

When a client's connection drops (a network blip, a reboot of the lab machine), what it held must
not become anyone's for the taking: another logged-in client could otherwise grab
``jupyter.relay.example.org`` or port 6000 in the seconds before the lab reconnects, and serve a
look-alike login page to its visitors.  ``OfflineHolds`` keeps each such claim reserved for its
owner for ``hold`` seconds; when the owner logs in again, what it does not claim back within
``reclaim`` seconds is released (its configuration may have changed).

Every operation costs O(1), or O(what one owner holds); the table is bounded in total and per owner,
and when it is full the holds of the owner holding the most go first (a client that registers and
drops junk claims over and over evicts its own, not a lab's few).  Time is passed in (monotonic
seconds).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# How long an offline client's ports and domains stay reserved for it, and how long after it
# logs in again the ones it does not claim back are released.
HOLD_SECONDS = 3600.0
RECLAIM_SECONDS = 60.0


class OfflineHolds(Generic[K]):
    def __init__(self, hold: float, reclaim: float, max_total: int = 100_000, max_per_owner: int = 8192) -> None:
        self.hold_seconds = hold
        self.reclaim_seconds = reclaim
        self.max_total = max_total
        self.max_per_owner = max_per_owner
        self._until: dict[K, tuple[str, float]] = {}  # key -> (owner, until), oldest first
        self._by_owner: dict[str, dict[K, None]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def hold(self, key: K, owner: str, now: float) -> None:
        """Reserve ``key`` for ``owner`` (which just went offline)."""
        self.release(key)
        self._prune(now)
        self._until[key] = (owner, now + self.hold_seconds)
        keys = self._by_owner.setdefault(owner, {})
        keys[key] = None
        if len(keys) > self.max_per_owner:
            self.release(next(iter(keys)))
        while len(self._until) > self.max_total:
            biggest = max(self._by_owner, key=lambda o: len(self._by_owner[o]))
            self.release(next(iter(self._by_owner[biggest])))

    def holder(self, key: K, now: float) -> str | None:
        """The owner ``key`` is reserved for, or None (an expired hold is dropped here)."""
        entry = self._until.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            self.release(key)
            return None
        return entry[0]

    def release(self, key: K) -> None:
        entry = self._until.pop(key, None)
        if entry is not None:
            keys = self._by_owner.get(entry[0])
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self._by_owner[entry[0]]

    def owner_returned(self, owner: str, now: float) -> None:
        """``owner`` logged in again: what it does not claim back within ``reclaim`` is released."""
        soon = now + self.reclaim_seconds
        for key in self._by_owner.get(owner, ()):
            held_for, until = self._until[key]
            if until > soon:
                self._until[key] = (held_for, soon)

    def _prune(self, now: float) -> None:
        """Drop a few expired holds, oldest first (amortized O(1) per hold)."""
        for _ in range(4):
            if not self._until:
                return
            key = next(iter(self._until))
            if self._until[key][1] > now:
                return
            self.release(key)
