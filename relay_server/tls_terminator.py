"""TLS termination on a connection whose first bytes were already read (the ClientHello).

Theory of operation
===================

The HTTPS vhost port reads a visitor's ClientHello itself (``sni.ClientHelloReader``) to route by
server name.  When the name belongs to an http tunnel that relayd holds a certificate for, the
connection is terminated here instead of passed through: ``TlsTerminator`` becomes the raw
transport's protocol, is fed the bytes read so far, and runs an ``ssl.SSLObject`` over two memory
BIOs (the sans-IO form of the ``ssl`` module): ciphertext in from the socket, plaintext out to the
inner protocol (an ``HttpVisitor``), and the reverse.  To that inner protocol it *is* the
transport: ``write``, ``pause_reading``, ``close`` and the rest act on the TLS layer and then on
the socket, and the socket's flow control (``pause_writing``) is passed up unchanged.

Bounds: plaintext is only decrypted while the inner protocol reads (a paused reader leaves the
ciphertext in the socket or, at most one read of it, in the incoming BIO); the handshake must
finish within the vhost header timeout the inner protocol already enforces from
``connection_made`` on (armed here at once for the handshake too).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

log = logging.getLogger("relay_server.vhost")
READ_CHUNK = 64 * 1024


class TlsTerminator(asyncio.Protocol, asyncio.Transport):  # type: ignore[misc]
    """The raw socket's protocol, and the inner protocol's transport."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, inner: asyncio.Protocol,
                 handshake_timeout: float) -> None:  # fmt: skip
        asyncio.Transport.__init__(self)
        self.raw = raw
        self.inner = inner
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaken = False
        self._paused = False  # the inner protocol paused reading
        self._eof = False  # the peer closed TLS (close_notify) or the socket
        self._closed = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            handshake_timeout, self._handshake_expired
        )

    def start(self, first: bytes) -> None:
        """Take over the raw transport with the bytes already read from it."""
        self.raw.set_protocol(self)
        self.data_received(first)

    # --- the socket side (asyncio.Protocol) -----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._incoming.write(data)
        if not self._handshaken:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as exc:
                log.debug("https vhost: TLS handshake failed: %s", exc)
                self._flush()
                self.abort()
                return
            self._handshaken = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush()
            self.inner.connection_made(self)
        self._deliver()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if self._handshaken:
            self._deliver()
            if not self._eof:
                self._eof = True
                keep = self.inner.eof_received()
                return bool(keep)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._handshaken:
            self.inner.connection_lost(exc)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        if self._handshaken:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._handshaken:
            self.inner.resume_writing()

    # --- the inner protocol's transport ---------------------------------------------------------

    def write(self, data: Any) -> None:
        if self._closed or not data:
            return
        try:
            self.sslobj.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("https vhost: TLS write failed: %s", exc)
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        """TLS has no half-close: send close_notify (the end of what we send), keep reading."""
        if self._closed:
            return
        try:
            self.sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, OSError):
            pass  # close_notify is queued; the peer's may come later
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closed:
            return
        if self._handshaken:
            self.write_eof()
        self._closed = True
        self.raw.close()

    def abort(self) -> None:
        self._closed = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closed or self.raw.is_closing()

    def pause_reading(self) -> None:
        self._paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._deliver()
        if not self._paused and not self._closed:
            self.raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() + self._outgoing.pending

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        return self.raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner

    # --- internals ------------------------------------------------------------------------------

    def _deliver(self) -> None:
        """Decrypt what is buffered and hand it to the inner protocol while it reads."""
        while not self._paused and not self._closed and not self._eof:
            try:
                chunk = self.sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the visitor finished sending
                self._eof = True
                if not self.inner.eof_received():
                    self.close()
                break
            except (ssl.SSLError, OSError) as exc:
                log.debug("https vhost: TLS error from the visitor: %s", exc)
                self.abort()
                break
            if not chunk:
                break
            self.inner.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        pending = self._outgoing.pending
        if pending and not self.raw.is_closing():
            self.raw.write(self._outgoing.read())

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self._handshaken:
            self.abort()
