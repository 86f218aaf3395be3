"""Rate-limited logging: one line per burst of the same recurring event, with a count."""

from __future__ import annotations

import logging
import time
from typing import Any


class BurstLog:
    """Logs a recurring failure once per ``interval`` with a count of the ones not logged."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            n = self._suppressed.pop(key, 0)
            suffix = f" ({n} more like this since the last report)" if n else ""
            self.logger.warning(msg + suffix, *args)
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
