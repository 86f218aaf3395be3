"""Rate-limited logging: one line per burst of the same recurring event, with a count."""

from __future__ import annotations

import logging
import time
from typing import Any


class BurstLog:
    """Logs a recurring failure once per ``interval`` with a count of the ones not logged.

    Keys often hold names a peer chose (a client, a tunnel, an address), so at most ``max_keys``
    are remembered: the least recently reported goes first (its next event is simply logged), and
    ``forget`` drops a key whose owner left.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}  # key -> when last logged, least recently logged first
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: Any) -> None:
        self.log(logging.INFO, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} more like this since the last report)" if n else ""
        self.logger.log(level, msg + suffix, *args)
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > self.max_keys:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._suppressed.pop(oldest, None)

    def forget(self, key: str) -> None:
        self._last.pop(key, None)
        self._suppressed.pop(key, None)

    def __len__(self) -> int:
        return len(self._last)
