"""The UDP frontend: one public UDP socket per udp tunnel, each visitor address one flow.

Theory of operation
===================

A flow is the datagrams between one visitor address (ip, port) and the tunnel's local service.
The first datagram from a new address is checked like a TCP visitor (``PublicTunnel.refusal``:
sources, connection caps) plus the flow cap (``[limits] max_udp_flows_per_tunnel`` and the
tunnel's ``max_connections``), then opens a stream to relayc (``stream_open`` first, as for any
visitor); every datagram then travels on that stream framed by ``shared.datagrams``.  Datagrams
relayc sends back on the stream go to that visitor address from the tunnel's socket.

UDP may lose datagrams, so nothing here waits or buffers without bound: a datagram is dropped
when its flow has ``FLOW_BACKLOG`` bytes waiting for relayc's credit, when the bandwidth limit
has no room for it now, or when the socket's send buffer toward visitors holds ``SEND_BACKLOG``;
credit for what relayc sends is returned at once (a dropped datagram costs nothing later).  A
flow with no datagram either way for ``udp_idle_timeout`` seconds is reset (a sweep every few
seconds, at most ``max_udp_flows_per_tunnel`` flows per sweep); relayc times its end out the same.
"""

from __future__ import annotations

import asyncio
from typing import cast

from relay_server.claims import PortClaims, Transport
from relay_server.frontends.base import Frontend
from relay_server.tunnels import PublicTunnel
from shared.aio import ConnectionRecord, MuxConnection, TrafficCounters
from shared.burst import BurstLog
from shared.datagrams import DATAGRAM_OVERHEAD, MAX_DATAGRAM, PER_CALLBACK, DatagramDecoder, encode_datagram
from shared.frames import ResetCode
from shared.limits import TokenBucket
from shared.tunnel import TunnelKind, TunnelSpec

PROTOCOL = Transport.UDP
FLOW_BACKLOG = 64 * 1024  # bytes of one flow waiting for relayc's credit: past it, drop
SEND_BACKLOG = 256 * 1024  # bytes in the socket's buffer toward visitors: past it, drop


class UdpFrontend(Frontend):
    kind = TunnelKind.UDP

    def __init__(self, ports: PortClaims, burst_log: BurstLog, max_flows: int) -> None:
        self.ports = ports
        self.burst_log = burst_log
        self.max_flows = max_flows

    async def claim(self, tunnel: PublicTunnel) -> str:
        loop = asyncio.get_running_loop()

        async def listen(port: int) -> int:
            endpoint = UdpEndpoint(tunnel, self.burst_log, self.max_flows)
            transport, _ = await loop.create_datagram_endpoint(lambda: endpoint, local_addr=(tunnel.bind_host, port))
            tunnel.claim = endpoint
            return int(transport.get_extra_info("sockname")[1])

        tunnel.port = await self.ports.claim(tunnel, PROTOCOL, tunnel.spec.remote_port, listen,
                                             lambda: self.stop_accepting(tunnel))  # fmt: skip
        return f"{tunnel.bind_host}:{tunnel.port}/udp"

    def update(self, tunnel: PublicTunnel) -> str:
        endpoint = tunnel.claim
        if endpoint is not None:
            cast(UdpEndpoint, endpoint).configure(tunnel.spec)
        return tunnel.public

    def stop_accepting(self, tunnel: PublicTunnel) -> None:
        endpoint = tunnel.claim
        if endpoint is not None:
            cast(UdpEndpoint, endpoint).close()
            tunnel.claim = None

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        self.ports.release(tunnel, PROTOCOL, tunnel.port, client_gone)
        self.stop_accepting(tunnel)
        tunnel.reset_visitors()


class UdpEndpoint(asyncio.DatagramProtocol):
    """A udp tunnel's public socket and its flows, by visitor address."""

    def __init__(self, tunnel: PublicTunnel, burst_log: BurstLog, max_flows: int) -> None:
        self.tunnel = tunnel
        self.burst_log = burst_log
        self.limit = max_flows  # [limits] max_udp_flows_per_tunnel
        self.max_flows = self.max_per_source = 0
        self.idle_timeout = 0.0
        self.configure(tunnel.spec)
        self.flows: dict[tuple[str, int], UdpFlow] = {}
        self.per_source: dict[str, int] = {}  # flows open per visitor IP
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def configure(self, spec: TunnelSpec) -> None:
        """The flow cap and idle timeout of ``spec`` (again when the tunnel is edited)."""
        self.max_flows = min(self.limit, spec.max_connections) if spec.max_connections else self.limit
        # one host cannot take every flow: at most an eighth of them (or 16, whichever is more)
        self.max_per_source = max(min(self.max_flows, 16), self.max_flows // 8)
        self.idle_timeout = float(spec.udp_idle_timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._arm_sweep()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        flow = self.flows.get(addr[:2])
        if flow is None:
            flow = self._new_flow(addr)
            if flow is None:
                self.tunnel.dropped += 1
                return
        flow.from_visitor(data)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error for a datagram sent to a visitor: nothing to do (UDP)."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.close()

    def _new_flow(self, addr: tuple[str, int]) -> UdpFlow | None:
        tunnel = self.tunnel
        ip, port = str(addr[0]), int(addr[1])
        visitor = f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}"
        refusal = tunnel.refusal(ip)
        if refusal is not None:
            why = tunnel.refusal_text(refusal, ip)
        elif len(self.flows) >= self.max_flows:
            why = f"max_udp_flows_per_tunnel={self.max_flows} flows open"
        elif self.per_source.get(ip, 0) >= self.max_per_source:
            why = f"{self.max_per_source} flows from {ip} already (the most one source may hold)"
        else:
            flow = UdpFlow(self, (ip, port))
            if not tunnel.attach(flow, visitor):
                return None
            self.flows[(ip, port)] = flow
            self.per_source[ip] = self.per_source.get(ip, 0) + 1
            return flow
        self.burst_log.warning(f"refuse:{tunnel.client_name}:{tunnel.name}",
                               "client %s tunnel %s: udp visitor %s refused: %s", tunnel.client_name, tunnel.name,
                               visitor, why)  # fmt: skip
        return None

    def to_visitor(self, addr: tuple[str, int], datagram: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.get_write_buffer_size() > SEND_BACKLOG:  # type: ignore[attr-defined]
            self.tunnel.dropped += 1
            return False
        transport.sendto(datagram, addr)
        return True

    def flow_closed(self, flow: UdpFlow) -> None:
        if self.flows.get(flow.addr) is flow:
            del self.flows[flow.addr]
            left = self.per_source.get(flow.addr[0], 0) - 1
            if left > 0:
                self.per_source[flow.addr[0]] = left
            else:
                self.per_source.pop(flow.addr[0], None)
        self.tunnel.detach(flow)

    def _arm_sweep(self) -> None:
        interval = max(0.5, min(self.idle_timeout / 4, 5.0))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        deadline = self.loop.time() - self.idle_timeout
        for flow in [f for f in self.flows.values() if f.last_active < deadline]:
            flow.abort()
        self._arm_sweep()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for flow in list(self.flows.values()):
            flow.abort()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class UdpFlow:
    """One visitor address's datagrams: the visitor end of one stream (``tunnels.Visitor``)."""

    __slots__ = ("_draining", "addr", "buckets", "closed", "counters", "decoder", "endpoint", "last_active", "mux",
                 "record", "stream_id")  # fmt: skip

    def __init__(self, endpoint: UdpEndpoint, addr: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.mux: MuxConnection | None = None
        self.stream_id = 0
        self.counters: TrafficCounters | None = None
        self.record: ConnectionRecord | None = None
        self.buckets: tuple[TokenBucket, ...] = ()
        self.decoder = DatagramDecoder()
        self.last_active = endpoint.loop.time()  # the visitor's last datagram (the idle timeout's clock)
        self.closed = False
        self._draining = False

    def bind(self, mux: MuxConnection, stream_id: int) -> None:
        self.mux = mux
        self.stream_id = stream_id

    def from_visitor(self, datagram: bytes) -> None:
        mux = self.mux
        if mux is None or self.closed:
            return
        now = self.endpoint.loop.time()
        self.last_active = now
        session = mux.session
        backlog = session.send_buffered(self.stream_id) if session is not None else FLOW_BACKLOG + 1
        if backlog > FLOW_BACKLOG or not self._fits(len(datagram) + DATAGRAM_OVERHEAD, now):
            self.endpoint.tunnel.dropped += 1
            return
        if self.counters is not None:
            self.counters.bytes_in += len(datagram)
            if self.record is not None:
                self.record.bytes_in += len(datagram)
        mux.send(self.stream_id, encode_datagram(datagram[:MAX_DATAGRAM]))

    def _fits(self, n: int, now: float) -> bool:
        return all(bucket.try_take(n, now) for bucket in self.buckets)

    # --- the stream side (StreamHandler) --------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        if self.mux is None:
            return
        if self.closed:
            self.mux.consume(self.stream_id, len(data))
            return
        self._deliver(data)

    def _deliver(self, data: bytes | memoryview = b"") -> None:
        """Send relayc's datagrams to the visitor, ``PER_CALLBACK`` at a time (the rest in later
        loop iterations, their credit held meanwhile): a stream of tiny datagrams cannot hold the
        loop.  A datagram that cannot be sent now is dropped, not queued."""
        self._draining = False
        mux = self.mux
        if mux is None or self.closed:
            return
        decoder = self.decoder
        datagrams = decoder.feed(data, PER_CALLBACK)
        if decoder.consumed:
            mux.consume(self.stream_id, decoder.consumed)
        now = self.endpoint.loop.time()
        for datagram in datagrams:
            if datagram and self._fits(len(datagram) + DATAGRAM_OVERHEAD, now) and \
                    self.endpoint.to_visitor(self.addr, datagram):  # fmt: skip
                if self.counters is not None:
                    self.counters.bytes_out += len(datagram)
                    if self.record is not None:
                        self.record.bytes_out += len(datagram)
            else:
                self.endpoint.tunnel.dropped += 1
        if decoder.more and not self._draining:
            self._draining = True
            self.endpoint.loop.call_soon(self._deliver)

    def on_end(self) -> None:
        self.abort()

    def on_reset(self, code: int) -> None:
        self.closed_by_peer()

    def on_writable(self) -> None:
        """Datagrams are dropped, never paused for credit."""

    def pause_input(self) -> None:
        """A UDP socket is shared by all flows: the backlog checks drop instead."""

    def resume_input(self) -> None:
        """See pause_input."""

    def closed_by_peer(self) -> None:
        if not self.closed:
            self._finish()

    def abort(self) -> None:
        """End the flow: reset its stream, forget the visitor address."""
        if self.closed:
            return
        if self.mux is not None:
            self.mux.reset(self.stream_id, ResetCode.ABORTED)
        self._finish()

    def _finish(self) -> None:
        self.closed = True
        if self.counters is not None:
            self.counters.conns_open -= 1
            self.counters = None
        self.endpoint.flow_closed(self)
