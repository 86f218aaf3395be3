"""relayc's end of a UDP flow: one stream from relayd, one connected UDP socket to the service.

Datagrams from the stream (``shared.datagrams`` framing) are sent to the local service; its
answers go back on the stream.  Nothing is buffered beyond one partial datagram: credit is
returned at once, and an answer is dropped while ``FLOW_BACKLOG`` bytes of the flow wait for
relayd's credit.  No datagram either way for the tunnel's ``udp_idle_timeout`` ends the flow
(relayd times it out the same way; whichever comes first resets the stream).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.aio import MuxConnection, TrafficCounters
from shared.burst import BurstLog
from shared.datagrams import PER_CALLBACK, DatagramDecoder, encode_datagram
from shared.frames import ResetCode
from shared.tunnel import TunnelSpec

log = logging.getLogger("relayc")
FLOW_BACKLOG = 64 * 1024
_dials: set[asyncio.Task[Any]] = set()


class LocalUdpFlow(asyncio.DatagramProtocol):
    """The stream handler of one UDP flow and the protocol of its socket to the local service."""

    def __init__(self, mux: MuxConnection, stream_id: int, spec: TunnelSpec, burst_log: BurstLog) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.spec = spec
        self.burst_log = burst_log
        self.decoder = DatagramDecoder()
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[bytes] = []  # datagrams that came before the socket was ready (bounded)
        self.closed = False
        self.loop = mux.loop
        self.last_active = self.loop.time()
        self.dropped = 0
        self._draining = False
        self._timer: asyncio.TimerHandle | None = None
        # the tunnel's counters (``relayc status``), from the socket's side like a StreamBridge's:
        # bytes_in from the local service, bytes_out to it; a flow counts as a connection
        self.counters: TrafficCounters | None = None

    def start(self) -> None:
        task = self.loop.create_task(self.loop.create_datagram_endpoint(
            lambda: self, remote_addr=(self.spec.local_ip, self.spec.local_port)))  # fmt: skip
        _dials.add(task)
        task.add_done_callback(self._opened)
        self._arm()

    def _opened(self, task: asyncio.Task[Any]) -> None:
        _dials.discard(task)
        if task.cancelled():
            self.abort()
            return
        exc = task.exception()
        if exc is not None:
            self.burst_log.warning(f"dial:{self.spec.name}", "tunnel %s: cannot open a UDP socket to %s:%d (%s)",
                                   self.spec.name, self.spec.local_ip, self.spec.local_port, exc)  # fmt: skip
            self.abort()

    # --- the socket -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.close()
            return
        waiting, self.waiting = self.waiting, []
        for datagram in waiting:
            self.transport.sendto(datagram)  # type: ignore[union-attr]
            if self.counters is not None:
                self.counters.bytes_out += len(datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.mux.session
        if self.closed or session is None or session.send_buffered(self.stream_id) > FLOW_BACKLOG:
            self.dropped += 1
            return
        self.last_active = self.loop.time()
        if self.counters is not None:
            self.counters.bytes_in += len(data)
        self.mux.send(self.stream_id, encode_datagram(data))

    def error_received(self, exc: Exception) -> None:
        """The service's port is closed (ICMP): the datagram is lost, as it would be without relay."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.abort()

    # --- the stream -----------------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        if self.closed:
            self.mux.consume(self.stream_id, len(data))
            return
        self._deliver(data)

    def _deliver(self, data: bytes | memoryview = b"") -> None:
        """Datagrams from relayd to the service, ``PER_CALLBACK`` at a time (credit for the rest is
        held until they are handled in later loop iterations)."""
        self._draining = False
        if self.closed:
            return
        decoder = self.decoder
        datagrams = decoder.feed(data, PER_CALLBACK)
        if decoder.consumed:
            self.mux.consume(self.stream_id, decoder.consumed)
        if datagrams:
            self.last_active = self.loop.time()
        transport = self.transport
        for datagram in datagrams:
            if not datagram:
                self.dropped += 1  # an empty datagram: nothing to send (asyncio would not either)
            elif transport is not None:
                if transport.get_write_buffer_size() > FLOW_BACKLOG:  # type: ignore[attr-defined]
                    self.dropped += 1
                    continue
                transport.sendto(datagram)
                if self.counters is not None:
                    self.counters.bytes_out += len(datagram)
            elif len(self.waiting) < 64:
                self.waiting.append(datagram)
            else:
                self.dropped += 1
        if decoder.more and not self._draining:
            self._draining = True
            self.loop.call_soon(self._deliver)

    def on_end(self) -> None:
        self.abort()

    def on_reset(self, code: int) -> None:
        self._close()

    def on_writable(self) -> None:
        """Datagrams are dropped, never paused for credit."""

    def pause_input(self) -> None:
        """See on_writable."""

    def resume_input(self) -> None:
        """See on_writable."""

    # --- ending ---------------------------------------------------------------------------------

    def _arm(self) -> None:
        left = self.last_active + self.spec.udp_idle_timeout - self.loop.time()
        if left <= 0:
            self.abort()
            return
        self._timer = self.loop.call_later(min(left, 5.0) + 0.05, self._arm)

    def abort(self) -> None:
        if not self.closed:
            self.mux.reset(self.stream_id, ResetCode.ABORTED)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.counters is not None:
            self.counters.conns_open -= 1
            self.counters = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.close()
