"""The floor for a relay written in Python: a bare uvloop TCP forwarder, nothing else.

    python -m bench.forwarder LISTEN_PORT TARGET_PORT [--tls-in CERT KEY | --tls-out]

Two of these chained, with TLS between them (one TLS connection per visitor connection: no
multiplexer, no authentication, no flow control, no limits, no counters), do the least work that
any two-process Python relay with TLS must do per byte and per request: the benchmark's "floor"
column.  relay doing about as well shows where the remaining cost is (syscalls, TLS, the
interpreter) and that it is not in relay's own layers.  A benchmark aid, not a product: it does
not verify the certificate it is shown, and a half-close cannot cross its TLS hop (asyncio's TLS
transports cannot half-close), so an EOF from the visitor closes the whole chain.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Callable


class Side(asyncio.Protocol):
    """One socket of a forwarded pair; what it reads is written to the other."""

    def __init__(self, dial: Callable[[Side], None] | None = None) -> None:
        self.dial = dial  # the visitor side opens the target side once it is connected itself
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the other side connected
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.peer is not None and self.peer.lost:
            transport.close()  # the visitor left while this side was still connecting
            return
        if self.early:
            self.transport.writelines(self.early)  # type: ignore[union-attr]
            self.early = []
        if self.dial is not None:
            # only now: a TLS visitor whose handshake fails never gets here, and must not leave
            # a connection to the target open behind it
            self.dial(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            return
        if peer.transport is None:
            peer.early.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        other = self.peer.transport if self.peer is not None else None
        if other is None or other.is_closing():
            return False
        if other.can_write_eof():
            other.write_eof()  # half-close passes through (keep reading the other way)
            return self.transport is not None and self.transport.can_write_eof()
        other.close()  # a TLS transport cannot half-close: send what is buffered, then close
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(listen_port: int, target_port: int, tls_in: tuple[str, str] | None, tls_out: bool) -> None:
    loop = asyncio.get_running_loop()
    server_ctx = client_ctx = None
    if tls_in:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(*tls_in)
    if tls_out:
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE  # benchmark only: both ends are ours, on loopback
    tasks: set[asyncio.Task[object]] = set()

    def dial(visitor: Side) -> None:
        target = Side()
        visitor.peer, target.peer = target, visitor
        task = loop.create_task(loop.create_connection(lambda: target, "127.0.0.1", target_port, ssl=client_ctx))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await loop.create_server(lambda: Side(dial), "127.0.0.1", listen_port, ssl=server_ctx, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    tls_in_files = (args[3], args[4]) if len(args) >= 5 and args[2] == "--tls-in" else None
    try:
        import uvloop

        uvloop.run(main(int(args[0]), int(args[1]), tls_in_files, "--tls-out" in args))
    except ImportError:
        asyncio.run(main(int(args[0]), int(args[1]), tls_in_files, "--tls-out" in args))
