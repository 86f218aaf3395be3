"""The asyncio adapter over real loopback sockets: plain and TLS, on asyncio and on uvloop.

Chain under test (what relayd and relayc do, minus login):
visitor socket -> listener bridge -> MuxConnection (client) ==TCP/TLS== MuxConnection (server)
-> bridge dialing a local echo server.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

import shared.aio as shared_aio
from shared.aio import ControlChannel, MuxConnection, StreamBridge, StreamHandler, release_free_memory
from shared.tls import client_context, ensure_self_signed, server_context
from tests.waiting import holds_for_async, wait_until_async

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop_name: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(coro, 60))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        self.t.write_eof()
        return True


class Chain:
    """Builds the chain and exposes the visitor-facing port."""

    def __init__(self, tls_dir: Path | None) -> None:
        self.tls_dir = tls_dir
        self.servers: list[asyncio.AbstractServer] = []
        self.client_mux: MuxConnection | None = None
        self.server_mux: MuxConnection | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        self.servers.append(echo)

        def server_stream(mux: MuxConnection, sid: int) -> StreamHandler:
            bridge = StreamBridge(mux)
            bridge.stream_id = sid
            self.tasks.add(loop.create_task(loop.create_connection(lambda: bridge, "127.0.0.1", echo_port)))
            return bridge

        def server_factory() -> MuxConnection:
            self.server_mux = MuxConnection(client=False, on_stream_opened=server_stream)
            return self.server_mux

        sctx = cctx = None
        if self.tls_dir is not None:
            cert, key = ensure_self_signed(self.tls_dir)
            sctx = server_context(cert, key)
            cctx = client_context()
        mux_server = await loop.create_server(server_factory, "127.0.0.1", 0, ssl=sctx)
        self.servers.append(mux_server)
        mux_port = mux_server.sockets[0].getsockname()[1]
        self.client_mux = MuxConnection(client=True)
        await loop.create_connection(
            lambda: self.client_mux, "127.0.0.1", mux_port, ssl=cctx, server_hostname="relayd" if cctx else None
        )

        def visitor_factory() -> StreamBridge:
            assert self.client_mux is not None
            return _OpeningBridge(self.client_mux)

        visitors = await loop.create_server(visitor_factory, "127.0.0.1", 0)
        self.servers.append(visitors)
        return int(visitors.sockets[0].getsockname()[1])

    def close(self) -> None:
        for s in self.servers:
            s.close()
        if self.client_mux:
            self.client_mux.close()


def _bridged_sockets(chain: Chain) -> list[socket.socket]:
    """The sockets of the bridges open right now, on both sides of the chain."""
    socks = []
    for mux in (chain.client_mux, chain.server_mux):
        assert mux is not None
        for handler in mux._handlers.values():
            transport = getattr(handler, "transport", None)
            if transport is not None:
                socks.append(transport.get_extra_info("socket"))
    assert len(socks) == 2
    return socks


class _OpeningBridge(StreamBridge):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stream_id = self.mux.open_stream(self)
        super().connection_made(transport)


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 20):
            writer.write(payload[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()  # half-close: we must still read the whole echo

    sender = asyncio.create_task(send())
    got = await reader.read(-1)
    await sender
    writer.close()
    return got


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [False, True])
def test_bulk_and_half_close_over_real_sockets(loop_name: str, tls: bool, tmp_path: Path) -> None:
    async def main() -> None:
        chain = Chain(tmp_path if tls else None)
        port = await chain.start()
        try:
            payload = os.urandom(8 * 1024 * 1024)
            got = await roundtrip(port, payload)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            # several concurrent streams on the one session
            payloads = [os.urandom(300_000 + i) for i in range(16)]
            results = await asyncio.gather(*(roundtrip(port, p) for p in payloads))
            assert results == payloads
            # TCP_NODELAY comes from the event loop itself on every bridged socket
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x")
            await r.readexactly(1)
            for bridge_sock in _bridged_sockets(chain):
                assert bridge_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            w.close()
            # everything finished: no stream is left behind on either side
            client_mux, server_mux = chain.client_mux, chain.server_mux
            assert client_mux is not None and server_mux is not None and server_mux.session is not None
            server_session = server_mux.session
            await wait_until_async(
                lambda: client_mux.stream_count == 0 and server_session.stream_count == 0,
                5,
                lambda: (
                    f"every stream to close (client {client_mux.stream_count}, "
                    f"server {server_session.stream_count} left)"
                ),
            )
        finally:
            chain.close()

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_unreachable_target_resets_visitor(loop_name: str) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as s:  # a port with nothing listening
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]

        def server_stream(mux: MuxConnection, sid: int) -> StreamHandler:
            bridge = StreamBridge(mux)
            bridge.stream_id = sid

            async def dial() -> None:
                try:
                    await loop.create_connection(lambda: bridge, "127.0.0.1", dead_port)
                except OSError:
                    bridge.on_reset(1)
                    mux.reset(sid, 1)

            tasks.add(loop.create_task(dial()))
            return bridge

        srv = await loop.create_server(
            lambda: MuxConnection(client=False, on_stream_opened=server_stream), "127.0.0.1", 0
        )
        client_mux = MuxConnection(client=True)
        await loop.create_connection(lambda: client_mux, "127.0.0.1", srv.sockets[0].getsockname()[1])
        visitors = await loop.create_server(lambda: _OpeningBridge(client_mux), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", visitors.sockets[0].getsockname()[1])
        writer.write(b"hello?")
        try:
            data = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:
            data = b""
        assert data == b""  # closed at once, not left hanging
        writer.close()
        # the session itself is unharmed: the next stream works
        assert client_mux.is_open
        visitors.close()
        srv.close()
        client_mux.close()

    run_on(loop_name, main())


def test_protocol_error_closes_only_that_session() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        muxes: list[MuxConnection] = []

        def factory() -> MuxConnection:
            m = MuxConnection(client=False)
            muxes.append(m)
            return m

        srv = await loop.create_server(factory, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        good = MuxConnection(client=True)
        await loop.create_connection(lambda: good, "127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        await asyncio.wait_for(muxes[1].closed, 5)  # its connection_lost has run
        assert isinstance(muxes[1].error, Exception) and "not a relay peer" in str(muxes[1].error)
        assert good.is_open and muxes[0].is_open
        good.close()
        srv.close()

    run_on("uvloop", main())


def test_tls_client_context_without_pin_still_does_tls(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path)
    assert ensure_self_signed(tmp_path) == (cert, key)  # generated once, then reused
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    ctx = client_context()
    assert ctx.verify_mode == ssl.CERT_NONE  # pinning is done by relayc after the handshake
    assert client_context("relay.example.org").verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_silent_peer_is_detected_and_streams_reset(loop_name: str) -> None:
    """The peer answers the preface, then stops sending anything (no FIN): keepalive catches it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Silent(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.write(b"RELAY\x01\r\n")  # type: ignore[attr-defined]

        srv = await loop.create_server(Silent, "127.0.0.1", 0)
        mux = MuxConnection(client=True, keepalive_timeout=1.0)
        await loop.create_connection(lambda: mux, "127.0.0.1", srv.sockets[0].getsockname()[1])
        resets: list[int] = []

        class Recorder:
            def on_data(self, data: bytes) -> None: ...
            def on_end(self) -> None: ...
            def on_reset(self, code: int) -> None:
                resets.append(code)

            def on_writable(self) -> None: ...
            def pause_input(self) -> None: ...
            def resume_input(self) -> None: ...

        mux.open_stream(Recorder(), b"hello")
        t0 = loop.time()
        await asyncio.wait_for(mux.closed, 5)
        assert 0.9 <= loop.time() - t0 < 3
        assert "silent" in str(mux.error)
        assert resets == [3]  # SESSION_CLOSING: every stream reset
        srv.close()

    run_on(loop_name, main())


def test_heap_is_trimmed_when_streams_came_and_went(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every stream but the control stream is gone, the next keepalive tick hands the freed
    heap back to the OS, once; not while a visitor is connected, not again while nothing happens."""
    trims: list[float] = []
    monkeypatch.setattr(shared_aio, "release_free_memory", lambda: trims.append(0.0) or True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(Echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]

        def server_stream(mux: MuxConnection, sid: int) -> StreamHandler:
            if sid == 1:
                return ControlChannel(mux, lambda m: None, lambda: None)
            bridge = StreamBridge(mux)
            bridge.stream_id = sid
            dials.add(loop.create_task(loop.create_connection(lambda: bridge, "127.0.0.1", echo_port)))
            return bridge

        dials: set[asyncio.Task[Any]] = set()
        server = await loop.create_server(
            lambda: MuxConnection(client=False, keepalive_timeout=0.6, on_stream_opened=server_stream), "127.0.0.1", 0
        )
        client = MuxConnection(client=True, keepalive_timeout=0.6)
        await loop.create_connection(lambda: client, "127.0.0.1", server.sockets[0].getsockname()[1])
        control = ControlChannel(client, lambda m: None, lambda: None)
        control.stream_id = client.open_stream(control)
        # the control stream counts as opened: each side trims once, at its next tick (0.2 s)
        await wait_until_async(lambda: len(trims) >= 2, 5, lambda: f"a trim on each side after login ({trims})")
        after_login = len(trims)
        assert after_login == 2

        visitors = await loop.create_server(lambda: _OpeningBridge(client), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", visitors.sockets[0].getsockname()[1])
        writer.write(b"x" * 100_000)
        await reader.readexactly(100_000)
        # Something that must not happen: watched for 1 s, about five keepalive ticks per side,
        # failing at the first trim rather than looking once at the end.
        await holds_for_async(lambda: len(trims) == after_login, 1.0, "no trim while a visitor is connected")
        writer.close()
        await wait_until_async(
            lambda: len(trims) >= after_login + 2, 5, lambda: f"a trim on each side once the visitor left ({trims})"
        )
        assert len(trims) == after_login + 2  # one trim per side
        await holds_for_async(lambda: len(trims) == after_login + 2, 1.0, "no more trims while nothing happens")
        client.close()
        for s in (echo, server, visitors):
            s.close()

    run_on("uvloop", main())


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


def _libc_has_malloc_trim() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim")
    except OSError:
        return False


@pytest.mark.skipif(
    not _libc_has_malloc_trim() or not Path("/proc/self/status").exists(),
    reason="needs a C library with malloc_trim (glibc) and /proc/self/status to see RSS",
)
def test_release_free_memory_hands_freed_heap_pages_back_to_the_os() -> None:
    """Memory freed in the middle of the heap stays resident (free() can only shrink the heap at
    its top) until malloc_trim releases its pages: RSS drops across the call, by most of it."""
    blocks = [bytes([i & 0xFF]) * 4000 for i in range(8192)]  # 32 MiB of malloc'd, touched blocks
    pins = blocks[::8]  # one block in eight stays: the freed ones are holes, not the heap's top
    del blocks
    freed_mib = 8192 * 7 / 8 * 4000 / 2**20  # 27 MiB
    before = _rss_mib()
    assert release_free_memory() is True  # malloc_trim returns 1: it released memory
    after = _rss_mib()
    assert before - after > freed_mib / 3, f"RSS {before:.1f} -> {after:.1f} MiB after freeing {freed_mib:.0f} MiB"
    assert shared_aio._malloc_trim is not None and shared_aio._malloc_trim.__name__ == "malloc_trim"
    del pins  # held until the measurement is done


@pytest.mark.parametrize("failure", ["no library", "no malloc_trim"])
def test_release_free_memory_is_false_without_malloc_trim(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A C library without malloc_trim (musl, macOS): False, now and on every later call."""

    loads: list[str | None] = []

    def cdll(name: str | None) -> object:
        loads.append(name)
        if failure == "no library":
            raise OSError("cannot load the C library")
        return object()  # a library without the symbol: attribute lookup raises AttributeError

    monkeypatch.setattr(shared_aio, "_malloc_trim", None)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert release_free_memory() is False
    assert release_free_memory() is False
    assert loads == [None]  # the fallback is remembered, not looked up again


class _RecordingMux:
    """What a ControlChannel uses of its MuxConnection: credit returned and failures, recorded."""

    def __init__(self) -> None:
        self.credited = 0
        self.failed: list[BaseException] = []
        self.session = None

    @property
    def is_open(self) -> bool:
        return not self.failed

    def consume(self, stream_id: int, n: int) -> None:
        self.credited += n

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def test_control_channel_handles_a_window_of_messages_a_few_per_loop_turn() -> None:
    """Thousands of small messages in one read are not handled in one callback (6,000 tunnel_add
    held relayd's loop 0.3-0.5 s, every visitor with it): at most MESSAGES_PER_TURN per turn,
    in order; credit comes back only for what was handled (what waits is bounded by the window);
    the end of the stream is seen after the messages sent before it."""
    from shared.messages import TunnelHealth, encode_message

    n = 1000
    per_turn = ControlChannel.MESSAGES_PER_TURN
    messages = [encode_message(TunnelHealth(name=f"t{i}", healthy=True, error="")) for i in range(n)]
    blob = b"".join(messages)
    tail = encode_message(TunnelHealth(name="last", healthy=False, error="down"))

    async def main() -> None:
        mux = _RecordingMux()
        seen: list[str] = []
        ended: list[int] = []
        control = ControlChannel(mux, lambda m: seen.append(m.name), lambda: ended.append(len(seen)))  # type: ignore[arg-type, attr-defined]
        control.on_data(blob)
        assert len(seen) == per_turn
        assert mux.credited == sum(len(m) for m in messages[:per_turn])
        control.on_data(tail[:7])  # more bytes while messages wait: kept after them
        control.on_data(tail[7:])
        control.on_end()
        assert not ended
        turns = 0
        while len(seen) < n + 1 and turns < 1000:
            await asyncio.sleep(0)
            turns += 1
        assert seen == [f"t{i}" for i in range(n)] + ["last"]
        assert turns >= n // per_turn  # spread over many turns, not one
        assert mux.credited == len(blob) + len(tail)
        assert ended == [n + 1]
        assert not mux.failed

    run_on("uvloop", main())


def test_control_channel_stops_at_an_oversized_message_while_others_wait() -> None:
    """A message over the limit behind a backlog of good ones fails the connection once its turn
    comes; nothing after it is handled."""
    from shared.messages import MAX_MESSAGE_SIZE, TunnelHealth, encode_message

    per_turn = ControlChannel.MESSAGES_PER_TURN
    good = b"".join(encode_message(TunnelHealth(name=f"t{i}", healthy=True, error="")) for i in range(per_turn * 2))
    bad = (MAX_MESSAGE_SIZE + 1).to_bytes(4, "big") + b"{}"

    async def main() -> None:
        mux = _RecordingMux()
        seen: list[str] = []
        control = ControlChannel(mux, lambda m: seen.append(m.name), lambda: None)  # type: ignore[arg-type, attr-defined]
        control.on_data(good + bad)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(seen) == per_turn * 2
        assert len(mux.failed) == 1 and "exceeds the maximum" in str(mux.failed[0])

    run_on("uvloop", main())


def test_control_channel_a_failing_handler_ends_that_session_only() -> None:
    """An exception from handling a message (a bug) fails that connection, whether the message
    was handled at once or in a later turn; it does not escape into the event loop."""
    from shared.messages import TunnelHealth, encode_message

    per_turn = ControlChannel.MESSAGES_PER_TURN
    blob = b"".join(encode_message(TunnelHealth(name=f"t{i}", healthy=True, error="")) for i in range(per_turn * 3))

    def handler(message: Any) -> None:
        if message.name == f"t{per_turn + 1}":  # handled in the second turn
            raise ValueError("a bug")
        seen.append(message.name)

    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        escaped: list[Any] = []
        loop.set_exception_handler(lambda _loop, context: escaped.append(context))
        mux = _RecordingMux()
        control = ControlChannel(mux, handler, lambda: None)  # type: ignore[arg-type]
        control.on_data(blob)
        for _ in range(10):
            await asyncio.sleep(0)
        assert seen == [f"t{i}" for i in range(per_turn + 1)]
        assert len(mux.failed) == 1 and isinstance(mux.failed[0], ValueError)
        assert escaped == []

    run_on("uvloop", main())
