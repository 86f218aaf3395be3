"""Joining a stream that relayd opened to the local service of its tunnel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from relay_client.udp import LocalUdpFlow
from shared.aio import MuxConnection, StreamBridge, TrafficCounters
from shared.burst import BurstLog
from shared.errors import RemoteProtocolError
from shared.frames import ResetCode
from shared.messages import MessageDecoder, StreamOpen, decode_first
from shared.proxy_protocol import proxy_header
from shared.tunnel import TunnelKind, TunnelSpec

log = logging.getLogger("relayc")
_dials: set[asyncio.Task[Any]] = set()
DIAL_TIMEOUT = 10.0
PREAMBLE_MAX = 4096  # bytes of a stream_open message; relayd's are about 80


class HeaderFirstBridge(StreamBridge):
    """A bridge that writes ``header`` (a PROXY protocol header) to the local service as soon as
    it is connected, before any stream bytes (which are not counted or credited for it)."""

    __slots__ = ("header",)

    def __init__(self, mux: MuxConnection, header: bytes) -> None:
        super().__init__(mux)
        self.header = header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._done:
            cast(asyncio.Transport, transport).write(self.header)
        super().connection_made(transport)


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
        counters: Callable[[str], TrafficCounters] | None = None,
    ) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self._lookup = lookup
        self._burst_log = burst_log
        self._counters = counters  # a tunnel's counters by name (``relayc status``)
        self._decoder: MessageDecoder | None = None  # only when the preamble comes in pieces
        self._bridge: StreamBridge | None = None
        self._ended = False
        self._timed_out = False

    def on_data(self, data: bytes | memoryview) -> None:
        try:
            found = self._read_preamble(data)
        except RemoteProtocolError as exc:
            self.mux.consume(self.stream_id, len(data))
            self.mux.fail(exc)
            return
        if found is None:
            self.mux.consume(self.stream_id, len(data))
            return
        first, rest = found
        self.mux.consume(self.stream_id, len(data) - len(rest))
        self._start(first, rest)

    def _read_preamble(self, data: bytes | memoryview) -> tuple[Any, bytes | memoryview] | None:
        """The preamble message and the bytes after it, or None until it is all there."""
        if self._decoder is None:
            found = decode_first(data, PREAMBLE_MAX)  # the usual case: whole, decoded in place
            if found is not None:
                return found[0], data[found[1] :]
            self._decoder = MessageDecoder(max_size=PREAMBLE_MAX)  # it comes in pieces
        messages = self._decoder.feed(data, limit=1)
        return (messages[0], self._decoder.take_rest()) if messages else None

    def _start(self, first: object, rest: bytes | memoryview) -> None:
        """The preamble is in: find the tunnel, hand the stream to a bridge, dial."""
        if not isinstance(first, StreamOpen):
            self.mux.fail(RemoteProtocolError(f"stream {self.stream_id}: expected one stream_open message first"))
            return
        spec = self._lookup(first.tunnel)
        if spec is None:
            self._burst_log.warning(f"unknown:{first.tunnel}", "stream for unknown tunnel %r refused", first.tunnel)
            self.mux.reset(self.stream_id, ResetCode.UNKNOWN_TUNNEL)
            return
        if spec.type is TunnelKind.UDP:  # a flow of datagrams, to a UDP socket of its own
            flow = LocalUdpFlow(self.mux, self.stream_id, spec, self._burst_log)
            if self._counters is not None:
                counters = flow.counters = self._counters(spec.name)
                counters.conns_open += 1
                counters.conns_total += 1
            self.mux.set_handler(self.stream_id, flow)
            if rest:
                flow.on_data(rest)
            if self._ended:
                flow.on_end()
            else:
                flow.start()
            return
        if spec.proxy_protocol:  # the visitor's address goes first, before any of its bytes
            bridge: StreamBridge = HeaderFirstBridge(self.mux, proxy_header(spec.proxy_protocol, first.visitor,
                                                                            first.public))  # fmt: skip
        else:
            bridge = StreamBridge(self.mux)
        bridge.stream_id = self.stream_id
        if self._counters is not None:  # a connection counts once dialing starts (undone if the dial fails)
            counters = bridge.counters = self._counters(spec.name)
            counters.conns_open += 1
            counters.conns_total += 1
        self._bridge = bridge
        self.mux.set_handler(self.stream_id, bridge)
        if rest:
            bridge.on_data(rest)
        if self._ended:
            bridge.on_end()
        self._dial(bridge, spec, first.visitor)

    def _dial(self, bridge: StreamBridge, spec: TunnelSpec, visitor: str) -> None:
        # One task and one timer per dial (not a coroutine of ours plus wait_for's own task): a new
        # visitor connection costs relayc less CPU this way (bench row 4).
        loop = self.mux.loop
        task = loop.create_task(loop.create_connection(lambda: bridge, spec.local_ip, spec.local_port))
        timer = loop.call_later(DIAL_TIMEOUT, self._give_up, task)
        _dials.add(task)  # a task only weakly referenced by the loop could be collected mid-dial
        task.add_done_callback(lambda done: self._dialed(done, timer, bridge, spec, visitor))

    def _give_up(self, task: asyncio.Task[Any]) -> None:
        self._timed_out = True
        task.cancel()

    def _dialed(
        self,
        task: asyncio.Task[Any],
        timer: asyncio.TimerHandle,
        bridge: StreamBridge,
        spec: TunnelSpec,
        visitor: str,
    ) -> None:
        _dials.discard(task)
        timer.cancel()
        if (task.cancelled() or task.exception() is not None) and bridge.counters is not None:
            bridge.counters.conns_open -= 1  # never joined: connection_lost will not count it out
            bridge.counters.conns_total -= 1
            bridge.counters = None
        if task.cancelled():
            if not self._timed_out:
                return  # relayc is shutting down: not the target's fault
            reason = f"no answer within {DIAL_TIMEOUT:g} s"
        else:
            exc = task.exception()
            if exc is None:
                return
            reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
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
