"""relayc's side of a visitor stream (relay_client.dialer) over a real loopback mux connection.

relayd's role is played by a bare ``MuxConnection`` that opens streams by hand, so the preamble
can be cut anywhere: whole in the first frame (decoded in place), or split over several frames
(decoded by a ``MessageDecoder``).  Either way the visitor's bytes must reach the local service and
its answer come back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from relay_client.dialer import IncomingStream
from shared.aio import MuxConnection, run
from shared.burst import BurstLog
from shared.frames import HEADER_LEN, ResetCode, preface
from shared.messages import TunnelSpec, encode_stream_open
from tests.waiting import wait_until_async


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(data.upper())


class CountingMux(MuxConnection):
    """A ``MuxConnection`` that counts the bytes it has read off its socket."""

    def __init__(self, client: bool, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.bytes_read = 0

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        super().data_received(data)


class Visitor:
    """relayd's end of one stream: records what comes back."""

    def __init__(self, mux: MuxConnection, expect: bytes) -> None:
        self.mux = mux
        self.expect = expect
        self.stream_id = 0
        self.received = b""
        self.reset_code: int | None = None
        self.done = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes | memoryview) -> None:
        self.received += bytes(data)
        self.mux.consume(self.stream_id, len(data))
        if len(self.received) >= len(self.expect) and not self.done.done():
            self.done.set_result(None)

    def on_end(self) -> None:
        """Not used: the echo never half-closes."""

    def on_reset(self, code: int) -> None:
        self.reset_code = code
        if not self.done.done():
            self.done.set_result(None)

    def on_writable(self) -> None:
        """Never paused: tiny payloads."""

    def pause_input(self) -> None:
        """No socket."""

    def resume_input(self) -> None:
        """No socket."""


async def _exchange(pieces: list[bytes], expect: bytes, tunnel_known: bool = True) -> Visitor:
    """Open one stream from 'relayd' whose bytes are ``pieces`` (each in its own loop turn); wait
    for ``expect`` bytes back, or a reset."""
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, "127.0.0.1", 0)
    spec = TunnelSpec(name="ssh", local_port=echo.sockets[0].getsockname()[1])

    def stream_opened(mux: MuxConnection, sid: int) -> IncomingStream:
        return IncomingStream(mux, sid, lambda name: spec if tunnel_known and name == "ssh" else None, BurstLog(log))

    log = logging.getLogger("test_dialer")
    relayc_side: list[CountingMux] = []

    def relayc_factory() -> CountingMux:
        relayc_side.append(CountingMux(client=True, on_stream_opened=stream_opened))
        return relayc_side[-1]

    relayc_listener = await loop.create_server(relayc_factory, "127.0.0.1", 0)
    relayd = CountingMux(client=False)
    await loop.create_connection(lambda: relayd, "127.0.0.1", relayc_listener.sockets[0].getsockname()[1])
    # relayd speaks only once relayc's preface is in (its own preface goes first), and relayc has
    # relayd's before the stream's first frame is sent
    await wait_until_async(
        lambda: relayd.bytes_read >= len(preface()) and relayc_side and relayc_side[0].bytes_read >= len(preface()),
        5,
        "the prefaces to cross",
    )
    relayc = relayc_side[0]
    visitor = Visitor(relayd, expect)
    for i, piece in enumerate(pieces):
        # each piece in its own frame, read by relayc before the next is sent: its own TCP segment
        read_before = relayc.bytes_read
        if i == 0:
            visitor.stream_id = relayd.open_stream(visitor, piece)
        else:
            relayd.send(visitor.stream_id, piece)
        await wait_until_async(
            lambda: relayc.bytes_read >= read_before + HEADER_LEN + len(piece),  # noqa: B023 - awaited here
            5,
            f"relayc to read piece {i} of the stream",
        )
    await asyncio.wait_for(visitor.done, 10)
    relayd.close()
    relayc_listener.close()
    echo.close()
    return visitor


PREAMBLE = encode_stream_open("ssh", "198.51.100.7:51234")


@pytest.mark.parametrize(
    "cuts",
    [
        [len(PREAMBLE) + 6],  # preamble and payload in one frame
        [len(PREAMBLE)],  # preamble alone, payload after
        [2],  # not even the length prefix
        [3, 9, len(PREAMBLE) + 1],  # preamble in three pieces, payload split too
    ],
)
def test_preamble_whole_or_in_pieces_reaches_the_service(cuts: list[int]) -> None:
    wire = PREAMBLE + b"hello\nworld\n"
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]

    async def main() -> None:
        visitor = await _exchange(pieces, b"HELLO\nWORLD\n")
        result["received"] = visitor.received

    result: dict[str, Any] = {}
    run(asyncio.wait_for(main(), 30))
    assert result == {"received": b"HELLO\nWORLD\n"}


@pytest.mark.parametrize("split", [False, True])
def test_unknown_tunnel_is_reset_whole_or_split(split: bool) -> None:
    wire = PREAMBLE + b"hi\n"
    pieces = [wire[:5], wire[5:]] if split else [wire]
    result: dict[str, Any] = {}

    async def main() -> None:
        visitor = await _exchange(pieces, b"HI\n", tunnel_known=False)
        result["code"] = visitor.reset_code
        result["received"] = visitor.received

    run(main())
    assert result == {"code": ResetCode.UNKNOWN_TUNNEL, "received": b""}
