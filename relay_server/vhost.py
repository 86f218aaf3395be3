"""HTTP virtual hosts (routed by Host and path) and HTTPS passthrough (routed by SNI).

Keep-alive rule: every request is routed by its own Host header and path.  A connection is bound
to the tunnel of its first request; when a later request on it routes to another tunnel, relayd
sends the first tunnel a FIN, lets its answer finish, then closes the connection, so the browser
sends that request again on a new connection.  A request is therefore never delivered to the wrong
tunnel.  Requests are parsed (``http1.RequestReader``); responses pass through untouched, so
WebSockets, server-sent events and chunked streams flow as they are produced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import html
import logging
from typing import TYPE_CHECKING, cast

from relay_server.http1 import Body, HttpError, RequestHead, RequestReader
from relay_server.sni import NEED_MORE, SniError, read_sni
from relay_server.tunnels import PublicTunnel, TunnelRefused
from shared.aio import MuxConnection, StreamBridge

if TYPE_CHECKING:
    from relay_server.server import Relayd

log = logging.getLogger(__name__)

_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def error_response(status: int, message: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    """A small HTML page; ``message`` is escaped.  The connection closes after it."""
    title = f"{status} {_STATUS_TEXT.get(status, '')}"
    body = (
        f"<!doctype html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>{html.escape(message)}</p><hr><p>relay</p></body></html>\n"
    ).encode()
    head = [f"HTTP/1.1 {title}", "Content-Type: text/html; charset=utf-8", f"Content-Length: {len(body)}",
            "Connection: close", "Cache-Control: no-store", *extra_headers]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def host_of(value: str) -> str:
    """``Example.org:8080`` -> ``example.org``; ``[::1]:80`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if ":" in value else value.rstrip(".")


class VhostRouter:
    """Which tunnel serves which domain (and path prefix, for http)."""

    def __init__(self, subdomain_host: str) -> None:
        self.subdomain_host = subdomain_host
        self.http: dict[str, list[tuple[str, PublicTunnel]]] = {}
        self.https: dict[str, PublicTunnel] = {}
        self.offline: dict[str, str] = {}  # domain -> client name, for routes whose client went away

    def domains_of(self, tunnel: PublicTunnel) -> list[str]:
        spec = tunnel.spec
        domains: list[str] = []
        if spec.subdomain:
            if not self.subdomain_host:
                raise TunnelRefused("relayd has no subdomain_host configured; use custom_domains")
            domains.append(f"{spec.subdomain}.{self.subdomain_host}")
        domains += [d.lower() for d in spec.custom_domains]
        return domains

    def add(self, tunnel: PublicTunnel) -> list[str]:
        """Claim the tunnel's routes; raise TunnelRefused naming the holder of any conflict."""
        domains = self.domains_of(tunnel)
        if tunnel.spec.kind == "https":
            for d in domains:
                holder = self.https.get(d)
                if holder is not None and holder is not tunnel:
                    raise TunnelRefused(f"domain {d} is already used by client {holder.client.name!r} "
                                        f"tunnel {holder.name!r}")  # fmt: skip
            for d in domains:
                self.https[d] = tunnel
                self.offline.pop(d, None)
            return domains
        locations = list(tunnel.spec.locations) or ["/"]
        for d in domains:
            for loc, holder in self.http.get(d, []):
                if loc in locations and holder is not tunnel:
                    raise TunnelRefused(f"domain {d} location {loc} is already used by client "
                                        f"{holder.client.name!r} tunnel {holder.name!r}")  # fmt: skip
        for d in domains:
            routes = self.http.setdefault(d, [])
            routes.extend((loc, tunnel) for loc in locations)
            routes.sort(key=lambda r: len(r[0]), reverse=True)  # longest prefix first
            self.offline.pop(d, None)
        return domains

    def remove(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        for d, routes in list(self.http.items()):
            kept = [r for r in routes if r[1] is not tunnel]
            if len(kept) != len(routes):
                if kept:
                    self.http[d] = kept
                else:
                    del self.http[d]
                    if client_gone:
                        self.offline[d] = tunnel.client.name
        for d, holder in list(self.https.items()):
            if holder is tunnel:
                del self.https[d]
                if client_gone:
                    self.offline[d] = tunnel.client.name
        if len(self.offline) > 10_000:
            del self.offline[next(iter(self.offline))]

    def match_http(self, host: str, path: str) -> PublicTunnel | None:
        for loc, tunnel in self.http.get(host, ()):
            if path.startswith(loc):
                return tunnel
        return None


class _VhostVisitor(StreamBridge):
    """A visitor whose tunnel is only known after its first bytes were read."""

    __slots__ = ("_replied", "_timer", "server", "tunnel", "visitor")

    def __init__(self, server: Relayd) -> None:
        super().__init__(cast(MuxConnection, None))
        self.server = server
        self.tunnel: PublicTunnel | None = None
        self.visitor = ""
        self._timer: asyncio.TimerHandle | None = None
        self._replied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.visitor = f"{peer[0]}:{peer[1]}" if peer else ""
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.server.config.vhost_header_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(408, "the request was not received in time")

    def _refuse(self, status: int, message: str, extra_headers: tuple[str, ...] = ()) -> None:
        """Answer with an error page and close (or just close, before any HTTP)."""
        self._cancel_timer()
        transport = self.transport
        if self.tunnel is not None and not self._done:
            self._done = True
            self.mux.reset(self.stream_id)
        self._done = True
        if transport is None or transport.is_closing():
            return
        if status and not self._replied:
            self._replied = True
            transport.write(error_response(status, message, extra_headers))
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self.tunnel is not None:
            self.tunnel.visitors.discard(self)
            super().connection_lost(exc)
        else:
            self._done = True

    def eof_received(self) -> bool:
        if self.tunnel is None:
            self._cancel_timer()
            return False  # nothing routed yet: close
        return super().eof_received()

    def on_data(self, data: bytes | memoryview) -> None:
        self._replied = True  # the app has started answering
        super().on_data(data)

    def on_reset(self, code: int) -> None:
        transport = self.transport
        if isinstance(self, HttpVisitor) and not self._replied and transport is not None and not transport.is_closing():
            # relayc could not reach the app (or refused the target) before any answer: say so
            self._done = True
            self._replied = True
            name = self.tunnel.name if self.tunnel else "?"
            transport.write(error_response(502, f"Tunnel {name}: the service behind it is not reachable right now."))
            transport.close()
            return
        super().on_reset(code)


class HttpVisitor(_VhostVisitor):
    """One visitor connection on the HTTP vhost port."""

    __slots__ = ("_switching", "reader")

    def __init__(self, server: Relayd) -> None:
        super().__init__(server)
        self.reader = RequestReader()
        self._switching = False  # a request routed elsewhere: finish this tunnel's answer, then close

    def data_received(self, data: bytes) -> None:
        if self._done or self._switching:
            return
        try:
            events = self.reader.feed(data)
        except HttpError as exc:
            self._refuse(exc.status, exc.reason)
            return
        for ev in events:
            if type(ev) is Body:
                super().data_received(ev.data)
            elif type(ev) is RequestHead:
                if not self._route(ev):
                    return
            if self._done:
                return
        if self.reader.head_in_progress:
            self._arm_timer()
        else:
            self._cancel_timer()

    def _route(self, head: RequestHead) -> bool:
        router = self.server.vhosts
        host_header = head.get("host")
        if host_header is None and head.target.startswith(("http://", "https://")):
            host_header = head.target.split("://", 1)[1].split("/", 1)[0]
        if not host_header:
            self._refuse(400, "the request has no Host header")
            return False
        host = host_of(host_header)
        tunnel = router.match_http(host, head.path)
        if tunnel is None:
            client = router.offline.get(host)
            if client is not None:
                self._refuse(502, f"The tunnel for {host} is offline: its client {client} is not connected.")
            else:
                self._refuse(404, f"No tunnel serves {host}{head.path}.")
            return False
        spec = tunnel.spec
        headers = head.headers
        if spec.http_user:
            if not _basic_auth_ok(head.get("authorization"), spec.http_user, spec.http_password):
                self._refuse(401, "This tunnel needs a user name and password.",
                             (f'WWW-Authenticate: Basic realm="{spec.name}", charset="UTF-8"',))  # fmt: skip
                return False
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]  # not for the app
        if self.tunnel is None:
            refusal = tunnel.refusal(self.visitor.rsplit(":", 1)[0])
            if refusal is not None:
                status = 403 if refusal.startswith("source") else 503
                self._refuse(status, f"Tunnel {tunnel.name}: {refusal}.")
                return False
            if not tunnel.attach(self, self.visitor):
                self._refuse(
                    502, f"The tunnel for {host} is offline: its client {tunnel.client.name} is not connected."
                )
                return False
            self.tunnel = tunnel
        elif tunnel is not self.tunnel:
            # another tunnel: let this one's answer finish, then close; the browser retries elsewhere
            self._switching = True
            self._cancel_timer()
            if self.transport is not None:
                self.transport.pause_reading()
            self.eof_received()
            return False
        super().data_received(_rewrite(head, headers, host_header, self.visitor, spec.host_header_rewrite))
        return True


_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def _rewrite(head: RequestHead, headers: list[tuple[str, str]], host: str, visitor: str, host_rewrite: str) -> bytes:
    visitor_ip = visitor.rsplit(":", 1)[0]
    index = head.index
    if headers is head.headers and not host_rewrite and head.raw and index.keys().isdisjoint(_FORWARDED):
        # The usual request: nothing to drop or change, so the head goes on as received (the
        # parser checked every line) with relayd's X-Forwarded-* lines added.
        added = f"X-Forwarded-For: {visitor_ip}\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: {host}\r\n\r\n"
        return head.raw + added.encode("latin-1")
    out: list[tuple[str, str]] = []
    forwarded_for = ""
    for k, v in headers:
        lk = k.lower()
        if lk == "x-forwarded-for":
            forwarded_for = f"{forwarded_for}, {v}" if forwarded_for else v
        elif lk in ("x-forwarded-proto", "x-forwarded-host"):
            continue  # set by relayd, never trusted from the visitor
        elif lk == "host" and host_rewrite:
            out.append((k, host_rewrite))
        else:
            out.append((k, v))
    out.append(("X-Forwarded-For", f"{forwarded_for}, {visitor_ip}" if forwarded_for else visitor_ip))
    out.append(("X-Forwarded-Proto", "http"))
    out.append(("X-Forwarded-Host", host))
    return head.encode(out)


def _basic_auth_ok(value: str | None, user: str, password: str) -> bool:
    if not value or value[:6].lower() != "basic ":
        return False
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    got_user, sep, got_password = decoded.partition(b":")
    ok_user = hmac.compare_digest(got_user, user.encode())
    ok_password = hmac.compare_digest(got_password, password.encode())
    return bool(sep) and ok_user and ok_password


class SniVisitor(_VhostVisitor):
    """One visitor connection on the HTTPS vhost port: routed by the ClientHello's server name."""

    __slots__ = ("_hello",)

    def __init__(self, server: Relayd) -> None:
        super().__init__(server)
        self._hello = b""

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self.tunnel is not None:
            super().data_received(data)
            return
        self._hello += data
        try:
            name = read_sni(self._hello)
        except SniError as exc:
            log.debug("https vhost: %s from %s: %s", "closing", self.visitor, exc)
            self._refuse(0, "")
            return
        if name is NEED_MORE:
            return
        assert isinstance(name, str)
        tunnel = self.server.vhosts.https.get(name)
        if tunnel is None:
            log.debug("https vhost: no tunnel for %s (from %s)", name, self.visitor)
            self._refuse(0, "")
            return
        self._cancel_timer()
        first, self._hello = self._hello, b""
        if tunnel.refusal(self.visitor.rsplit(":", 1)[0]) is not None or not tunnel.attach(self, self.visitor, first):
            self._refuse(0, "")
            return
        self.tunnel = tunnel
