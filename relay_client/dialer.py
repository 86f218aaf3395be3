"""Joining a stream that relayd opened to the local service of its tunnel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shared.aio import MuxConnection, StreamBridge
from shared.burst import BurstLog
from shared.errors import RemoteProtocolError
from shared.frames import ResetCode
from shared.messages import MessageDecoder, StreamOpen, TunnelSpec

log = logging.getLogger("relayc")
_dials: set[asyncio.Task[None]] = set()


class IncomingStream:
    """Handler of a stream relayd opened: reads its ``stream_open`` preamble, then dials.

    Until the dial completes, bytes that follow the preamble wait in the bridge, uncredited.
    """

    def __init__(
        self,
        mux: MuxConnection,
        stream_id: int,
        lookup: Callable[[str], TunnelSpec | None],
        burst_log: BurstLog,
    ) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self._lookup = lookup
        self._burst_log = burst_log
        self._decoder = MessageDecoder(max_size=4096)
        self._bridge: StreamBridge | None = None
        self._ended = False

    def on_data(self, data: bytes | memoryview) -> None:
        try:
            messages = self._decoder.feed(data, limit=1)
        except RemoteProtocolError as exc:
            self.mux.consume(self.stream_id, len(data))
            self.mux.fail(exc)
            return
        if not messages:
            self.mux.consume(self.stream_id, len(data))
            return
        rest = self._decoder.take_rest()
        self.mux.consume(self.stream_id, len(data) - len(rest))
        first = messages[0]
        if not isinstance(first, StreamOpen):
            self.mux.fail(RemoteProtocolError(f"stream {self.stream_id}: expected one stream_open message first"))
            return
        spec = self._lookup(first.tunnel)
        if spec is None:
            self._burst_log.warning(f"unknown:{first.tunnel}", "stream for unknown tunnel %r refused", first.tunnel)
            self.mux.reset(self.stream_id, ResetCode.UNKNOWN_TUNNEL)
            return
        bridge = StreamBridge(self.mux)
        bridge.stream_id = self.stream_id
        self._bridge = bridge
        self.mux.set_handler(self.stream_id, bridge)
        if rest:
            bridge.on_data(rest)
        if self._ended:
            bridge.on_end()
        task = asyncio.get_running_loop().create_task(self._dial(bridge, spec, first.visitor))
        _dials.add(task)  # a task only weakly referenced by the loop could be collected mid-dial
        task.add_done_callback(_dials.discard)

    async def _dial(self, bridge: StreamBridge, spec: TunnelSpec, visitor: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: bridge, spec.local_ip, spec.local_port), 10.0)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or exc.__class__.__name__
            self._burst_log.warning(
                f"dial:{spec.name}",
                "tunnel %s: cannot reach %s:%d (%s); visitor %s refused",
                spec.name,
                spec.local_ip,
                spec.local_port,
                reason,
                visitor,
            )
            bridge.on_reset(ResetCode.REFUSED)
            self.mux.reset(self.stream_id, ResetCode.REFUSED)

    def on_end(self) -> None:
        self._ended = True

    def on_reset(self, code: int) -> None:
        self._ended = True

    def on_writable(self) -> None:
        """The preamble reader sends nothing."""

    def pause_input(self) -> None:
        """No socket yet."""

    def resume_input(self) -> None:
        """No socket yet."""
