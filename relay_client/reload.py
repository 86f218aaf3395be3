"""Reading relayc.toml again without a restart: on SIGHUP, and when the file changes.

The file is polled (its inode, modification time and size) every ``POLL_INTERVAL`` seconds, with
no dependency on inotify; a change is taken once the file has stayed the same for one poll, so an
editor caught halfway through writing it is not read.  A config that is invalid when read again is
logged the way ``relayc -c FILE`` would report it at start (the file and the key path) and the
running one stays.  What changes then is ``Relayc.apply_config``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from shared.config import ClientConfig, load_config
from shared.errors import ConfigError

if TYPE_CHECKING:
    from relay_client.client import Relayc

log = logging.getLogger("relayc")
POLL_INTERVAL = 1.0

FileStamp = tuple[int, int, int] | None


def stamp(path: os.PathLike[str] | str) -> FileStamp:
    """What tells a change of the file: inode (an editor's rename), mtime and size; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class ConfigReloader:
    """Reloads ``relayc.config_path`` into ``relayc`` (one reload at a time)."""

    def __init__(self, relayc: Relayc) -> None:
        self.relayc = relayc
        self.path = relayc.config_path
        self.loaded = stamp(self.path)  # the file as last read
        self._lock = asyncio.Lock()

    async def reload(self, why: str) -> bool:
        """Read the file again and apply it; False (logged) when it is invalid."""
        async with self._lock:
            self.loaded = stamp(self.path)
            try:
                config = load_config(ClientConfig, self.path)
            except ConfigError as exc:
                # the same words as the exit-2 message of `relayc -c FILE`
                log.error("configuration error: %s (reload after %s: relayc keeps running with the configuration it "
                          "had)", exc, why)  # fmt: skip
                return False
            try:
                await self.relayc.apply_config(config, why)
            except Exception:  # a bug: say so, keep the watcher (and relayc) alive
                log.exception("reloading %s failed", self.path)
                return False
            return True

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        """Poll the file forever; reload once a change has settled for one poll."""
        previous = self.loaded
        while True:
            await asyncio.sleep(interval)
            now = stamp(self.path)
            if now is not None and now != self.loaded and now == previous:
                await self.reload(f"{self.path.name} changed")
            previous = now
