"""Visiting another client's secret tunnel: ``[[visitors]]`` local ports and ``relayc connect``.

A visit is a stream this relayc opens to relayd, starting with ``visit_open {client, tunnel,
proof}``; relayd answers ``visit_result`` first, then the stream carries the tunnel's bytes (see
``relay_server/frontends/secret.py``).  ``VisitBridge`` is a ``StreamBridge`` that sends the
preamble, takes the answer off the front of what comes back, and then joins the stream to a local
socket (a ``[[visitors]]`` port) or to stdin/stdout (``relayc connect``, through ``PipePair``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any, cast

from shared import auth
from shared.aio import MuxConnection, StreamBridge
from shared.config import VisitorConfig
from shared.errors import RemoteProtocolError
from shared.messages import MessageDecoder, VisitOpen, VisitResult, decode_first, encode_message

log = logging.getLogger("relayc")
RESULT_MAX = 4096  # bytes of a visit_result message


def visit_preamble(visitor_name: str, client: str, tunnel: str, secret_key: str, fingerprint: str) -> bytes:
    """The ``visit_open`` that starts a visit stream (the key only as a proof)."""
    proof = auth.visit_proof(secret_key, visitor_name, client, tunnel, fingerprint) if secret_key else ""
    return encode_message(VisitOpen(client=client, tunnel=tunnel, proof=proof))


class VisitBridge(StreamBridge):
    """A visit stream joined to a local transport once relayd's ``visit_result`` says ok.

    ``on_result(ok, error)`` is called once with relayd's answer (or its absence: the stream was
    reset or ended before any answer)."""

    __slots__ = ("_decoder", "_result_seen", "on_result")

    def __init__(self, mux: MuxConnection, on_result: Callable[[bool, str], None]) -> None:
        super().__init__(mux)
        self.on_result = on_result
        self._decoder: MessageDecoder | None = None
        self._result_seen = False

    def open(self, preamble: bytes) -> None:
        self.stream_id = self.mux.open_stream(self, preamble)

    def on_data(self, data: bytes | memoryview) -> None:
        if self._result_seen:
            super().on_data(data)
            return
        try:
            if self._decoder is None:
                found = decode_first(data, RESULT_MAX)
                if found is not None:
                    message, rest = found[0], data[found[1] :]
                else:
                    self._decoder = MessageDecoder(max_size=RESULT_MAX)
            if self._decoder is not None:
                messages = self._decoder.feed(data, limit=1)
                if not messages:
                    self.mux.consume(self.stream_id, len(data))
                    return
                message, rest = messages[0], self._decoder.take_rest()
        except RemoteProtocolError as exc:
            self.mux.consume(self.stream_id, len(data))
            self._answer(False, f"relayd sent a bad answer: {exc}")
            self.abort()
            return
        self.mux.consume(self.stream_id, len(data) - len(rest))
        if not isinstance(message, VisitResult):
            self._answer(False, f"relayd answered a visit with {message.type}")
            self.abort()
            return
        self._answer(message.ok, message.error or message.code)
        if not message.ok:
            self.abort()
            return
        if rest:
            super().on_data(rest)

    def _answer(self, ok: bool, error: str) -> None:
        if not self._result_seen:
            self._result_seen = True
            self.on_result(ok, error)

    def on_end(self) -> None:
        if not self._result_seen:
            self._answer(False, "relayd ended the visit without an answer")
        super().on_end()

    def on_reset(self, code: int) -> None:
        if not self._result_seen:
            self._answer(False, "relayd refused the visit stream (reset)")
        super().on_reset(code)


class VisitorPorts:
    """The local ports of relayc.toml's ``[[visitors]]``: each connection accepted becomes a visit
    on the current session (refused at once while relayc is not logged in)."""

    def __init__(self, visitors: list[VisitorConfig], current: Callable[[], tuple[MuxConnection, str] | None],
                 name: str) -> None:  # fmt: skip
        self.visitors = visitors
        self.current = current  # the logged-in session's mux and relayd's fingerprint, or None
        self.name = name
        self.servers: list[tuple[VisitorConfig, asyncio.Server]] = []

    async def start(self) -> None:
        for v in self.visitors:
            await self._listen(v)

    async def _listen(self, v: VisitorConfig) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda v=v: self._accept(v), v.bind_addr, v.bind_port)  # type: ignore[misc]
        self.servers.append((v, server))
        port = server.sockets[0].getsockname()[1]
        log.info("visitor %s/%s: listening on %s:%d", v.client, v.tunnel, v.bind_addr, port)

    async def update(self, visitors: list[VisitorConfig]) -> str:
        """A reloaded config: ports of visitors no longer listed (or changed) stop listening, new
        ones start; unchanged ones keep listening.  Connections already accepted go on.  Returns
        what changed, for the log ("" when nothing did)."""
        kept: list[tuple[VisitorConfig, asyncio.Server]] = []
        stopped = []
        for v, server in self.servers:
            if v in visitors and v not in [k for k, _ in kept]:
                kept.append((v, server))
            else:
                server.close()
                stopped.append(f"{v.client}/{v.tunnel}")
        self.servers = kept
        self.visitors = visitors
        started = []
        for v in visitors:
            if v in [k for k, _ in kept]:
                continue
            try:
                await self._listen(v)
                started.append(f"{v.client}/{v.tunnel}")
            except OSError as exc:
                log.error("visitor %s/%s: cannot listen on %s:%d: %s", v.client, v.tunnel, v.bind_addr, v.bind_port,
                          exc.strerror or exc)  # fmt: skip
        parts = [f"visitors {what} {', '.join(names)}" for what, names in (("stopped", stopped), ("started", started))
                 if names]  # fmt: skip
        return "; ".join(parts)

    def listening(self) -> list[dict[str, str]]:
        """Each visitor port: its target and where it listens (``relayc status``)."""
        out = []
        for v, server in self.servers:
            sockets = server.sockets
            host, port = sockets[0].getsockname()[:2] if sockets else (v.bind_addr, v.bind_port)
            out.append({"client": v.client, "tunnel": v.tunnel, "listen": f"{host}:{port}"})
        return out

    def _accept(self, v: VisitorConfig) -> asyncio.Protocol:
        target = f"{v.client}/{v.tunnel}"
        current = self.current()
        if current is None:
            return _Refused(f"visitor {target}: not connected to relayd; connection closed")

        def result(ok: bool, error: str) -> None:
            if not ok:
                log.warning("visitor %s: refused by relayd: %s", target, error)

        mux, fingerprint = current
        bridge = VisitBridge(mux, result)
        bridge.open(visit_preamble(self.name, v.client, v.tunnel, v.secret_key, fingerprint))
        return bridge

    def close(self) -> None:
        for _, server in self.servers:
            server.close()


class _Refused(asyncio.Protocol):
    def __init__(self, why: str) -> None:
        self.why = why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.warning("%s", self.why)
        cast(asyncio.Transport, transport).abort()


class PipePair(asyncio.Transport):
    """stdin and stdout as one transport for a ``StreamBridge``: reads come from stdin, writes go
    to stdout (what ``relayc connect`` joins to the tunnel for ssh's ProxyCommand)."""

    def __init__(self) -> None:
        super().__init__()
        self.reader: asyncio.ReadTransport | None = None
        self.writer: asyncio.WriteTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()  # both directions done, or aborted
        self._in_done = self._out_done = False

    async def open(self, bridge: StreamBridge) -> None:
        loop = asyncio.get_running_loop()
        pair = self

        class Out(asyncio.Protocol):
            def pause_writing(self) -> None:
                bridge.pause_writing()

            def resume_writing(self) -> None:
                bridge.resume_writing()

            def connection_lost(self, exc: BaseException | None) -> None:
                pair._out_done = True
                pair._maybe_done()

        class In(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                bridge.data_received(data)

            def eof_received(self) -> bool:
                bridge.eof_received()
                pair._in_done = True
                pair._maybe_done()
                return True

        self.writer, _ = await loop.connect_write_pipe(Out, sys.stdout.buffer)
        self.reader, _ = await loop.connect_read_pipe(In, sys.stdin.buffer)
        bridge.connection_made(self)

    def _finish(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    # --- what StreamBridge uses -----------------------------------------------------------------

    def write(self, data: Any) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def write_eof(self) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.close()  # a pipe's end of file is its close (after what is buffered)

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        if self.reader is not None and not self.reader.is_closing():
            self.reader.pause_reading()

    def resume_reading(self) -> None:
        if self.reader is not None and not self.reader.is_closing():
            self.reader.resume_reading()

    def is_closing(self) -> bool:
        return self.closed.done()

    def close(self) -> None:
        """Stop reading stdin; close stdout once what is buffered for it is written."""
        if self.reader is not None:
            self.reader.close()
        self._in_done = True
        if self.writer is not None:
            self.writer.close()
        else:
            self._out_done = True
        self._maybe_done()

    def abort(self) -> None:
        for t in (self.reader, self.writer):
            if t is not None:
                cast(asyncio.BaseTransport, t).close()
        self._finish()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def _maybe_done(self) -> None:
        if self._in_done and self._out_done:  # stdout's buffer flushed and closed, stdin at its end
            self._finish()
