"""HTTP virtual hosts (routed by Host header and path) and HTTPS passthrough (routed by SNI).

Domains.  A domain (a tunnel's ``subdomain`` under ``subdomain_host``, or one of its
``custom_domains``; the two spellings of one name are one domain) belongs to the client that
claimed it first: no other client can register anything on it, no location on http and nothing on
https.  The owner may split its domain between its own http tunnels by ``locations`` (the longest
matching prefix wins; locations and request paths are compared normalized).  When the owner goes
offline its domains stay reserved for it (``holds.HOLD_SECONDS``), and when it comes back they are
released ``holds.RECLAIM_SECONDS`` after its login unless it claimed them again: a hostile client
cannot grab a lab's domain during a network blip.  Every claim and release costs time in the
number of the tunnel's own routes, never in the number of routes relayd holds.

Keep-alive rule: every request is routed by its own Host header and path.  A connection is bound
to the tunnel of its first request; when a later request on it routes to another tunnel, relayd
sends the first tunnel a FIN, lets its answer finish, then closes the connection, so the browser
sends that request again on a new connection.  A request is therefore never delivered to the wrong
tunnel.  Requests are parsed (``http1.RequestReader``); answers pass through untouched, so
WebSockets, server-sent events and chunked streams flow as they are produced.  The one exception:
after an Upgrade (or CONNECT) request, the status line of the app's answer is read
(``http1.AnswerStatusReader``): 101 (2xx for CONNECT) makes the connection opaque, anything else
and relayd goes on parsing requests, each routed, authenticated and given X-Forwarded-* like a
first request.  So that the answer read is the answer to that request, an Upgrade is only honoured
as the first request of a connection; a later one is treated like a request for another tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hmac
import html
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from relay_server.holds import HOLD_SECONDS, RECLAIM_SECONDS, OfflineHolds
from relay_server.http1 import (
    AnswerStatusReader,
    Body,
    HttpError,
    RequestHead,
    RequestReader,
    Tunnel,
    normalize_path,
)
from relay_server.sni import ClientHelloReader, SniError
from relay_server.tunnels import PublicTunnel, Refusal, TunnelRefused
from shared.aio import MuxConnection, StreamBridge

if TYPE_CHECKING:
    from relay_server.server import Relayd

log = logging.getLogger(__name__)
T = TypeVar("T")


_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
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


class DomainClaim:
    """One domain with at least one tunnel on it: its owner, its http routes (location ->
    tunnel), its https tunnel."""

    __slots__ = ("http", "https", "length_count", "lengths", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.http: dict[str, PublicTunnel] = {}
        self.lengths: list[int] = []  # distinct location lengths negated, so longest first (<= 1024)
        self.length_count: dict[int, int] = {}  # location length -> how many locations have it
        self.https: PublicTunnel | None = None

    @property
    def empty(self) -> bool:
        return not self.http and self.https is None

    def match(self, path: str) -> PublicTunnel | None:
        """The tunnel whose location is the longest prefix of ``path`` (a normalized path)."""
        http = self.http
        for negated in self.lengths:
            n = -negated
            tunnel = http.get(path[:n]) if len(path) >= n else None
            if tunnel is not None:
                return tunnel
        return None

    def add_location(self, location: str, tunnel: PublicTunnel) -> None:
        if location not in self.http:
            n = len(location)
            count = self.length_count.get(n, 0)
            self.length_count[n] = count + 1
            if not count:
                bisect.insort(self.lengths, -n)  # stored negated: longest first
        self.http[location] = tunnel

    def remove_location(self, location: str) -> None:
        del self.http[location]
        n = len(location)
        count = self.length_count[n] - 1
        if count:
            self.length_count[n] = count
        else:
            del self.length_count[n]
            self.lengths.remove(-n)


class VhostRouter:
    """Which client owns which domain, and which of its tunnels serves which path."""

    def __init__(self, subdomain_host: str) -> None:
        self.subdomain_host = subdomain_host
        self.domains: dict[str, DomainClaim] = {}
        self.holds: OfflineHolds[str] = OfflineHolds(HOLD_SECONDS, RECLAIM_SECONDS)

    def domains_of(self, tunnel: PublicTunnel) -> list[str]:
        spec = tunnel.spec
        domains: list[str] = []
        if spec.subdomain:
            if not self.subdomain_host:
                raise TunnelRefused("relayd has no subdomain_host configured; use custom_domains")
            domains.append(f"{spec.subdomain}.{self.subdomain_host}".lower())
        domains += [d.lower().rstrip(".") for d in spec.custom_domains]
        return list(dict.fromkeys(domains))  # a custom domain may spell the subdomain again

    def add(self, tunnel: PublicTunnel, now: float) -> list[str]:
        """Claim the tunnel's routes; raise TunnelRefused naming the holder of any conflict."""
        domains = self.domains_of(tunnel)
        https = tunnel.spec.kind == "https"
        locations = [] if https else list(dict.fromkeys(normalize_location(loc) for loc in tunnel.spec.locations))
        locations = locations or ["/"]
        owner = tunnel.client.name
        for d in domains:
            claim = self.domains.get(d)
            if claim is None:
                held_for = self.holds.holder(d, now)
                if held_for is not None and held_for != owner:
                    raise TunnelRefused(f"domain {d} belongs to client {held_for!r} (offline; reserved for it)")
                continue
            if claim.owner != owner:
                raise TunnelRefused(f"domain {d} belongs to client {claim.owner!r}")
            if https:
                if claim.https is not None and claim.https is not tunnel:
                    raise TunnelRefused(f"domain {d} is already used by tunnel {claim.https.name!r}")
            else:
                for loc in locations:
                    holder = claim.http.get(loc)
                    if holder is not None and holder is not tunnel:
                        raise TunnelRefused(f"domain {d} location {loc} is already used by tunnel {holder.name!r}")
        for d in domains:
            claim = self.domains.get(d)
            if claim is None:
                claim = self.domains[d] = DomainClaim(owner)
                self.holds.release(d)
            if https:
                claim.https = tunnel
            else:
                for loc in locations:
                    claim.add_location(loc, tunnel)
        tunnel.routes = [(d, tuple(locations)) for d in domains]
        return domains

    def remove(self, tunnel: PublicTunnel, client_gone: bool, now: float) -> None:
        """Release the tunnel's routes.  A domain left empty stays reserved for its owner when the
        client went away; one released on purpose (tunnel removed or replaced) is free at once."""
        https = tunnel.spec.kind == "https"
        for d, locations in tunnel.routes:
            claim = self.domains.get(d)
            if claim is None:
                continue
            if https:
                if claim.https is tunnel:
                    claim.https = None
            else:
                for loc in locations:
                    if claim.http.get(loc) is tunnel:
                        claim.remove_location(loc)
            if claim.empty:
                del self.domains[d]
                if client_gone:
                    self.holds.hold(d, claim.owner, now)
        tunnel.routes = []

    def owner_returned(self, owner: str, now: float) -> None:
        """``owner`` logged in again: what it does not claim back soon is released."""
        self.holds.owner_returned(owner, now)

    def match_http(self, host: str, path: str) -> PublicTunnel | None:
        claim = self.domains.get(host)
        return claim.match(path) if claim is not None else None

    def match_https(self, host: str) -> PublicTunnel | None:
        claim = self.domains.get(host)
        return claim.https if claim is not None else None

    def offline_owner(self, host: str, now: float) -> str | None:
        """The client whose domain ``host`` is while it is offline (for the 502 page)."""
        return self.holds.holder(host, now) if host not in self.domains else None


def normalize_location(location: str) -> str:
    """A location as request paths are compared: normalized the same way (a location that does
    not normalize, say with ``%2F``, can never match and is refused at registration)."""
    try:
        return normalize_path(location)
    except HttpError as exc:
        raise TunnelRefused(f"location {location!r}: {exc.reason}") from None


class _VhostVisitor(StreamBridge):
    """A visitor whose tunnel is only known after its first bytes were read."""

    __slots__ = ("_replied", "_timer", "server", "tunnel", "visitor", "visitor_ip")

    def __init__(self, server: Relayd) -> None:
        super().__init__(cast(MuxConnection, None))  # bound to a session once routed
        self.server = server
        self.tunnel: PublicTunnel | None = None
        self.visitor = ""
        self.visitor_ip = ""
        self._timer: asyncio.TimerHandle | None = None
        self._replied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.visitor = f"{peer[0]}:{peer[1]}" if peer else ""
        self.visitor_ip = str(peer[0]) if peer else ""
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

    def _attach(self, tunnel: PublicTunnel, first: bytes = b"") -> Refusal | None:
        """Join this visitor to ``tunnel`` (a stream to its client), or say why not."""
        refusal = tunnel.refusal(self.visitor_ip)
        if refusal is not None:
            return refusal
        if not tunnel.attach(self, self.visitor, first):
            return Refusal.OFFLINE
        self.tunnel = tunnel
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self.tunnel is not None:
            self.tunnel.detach(self)
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


class HttpVisitor(_VhostVisitor):
    """One visitor connection on the HTTP vhost port."""

    __slots__ = ("_answer", "_requests", "_switching", "reader")

    def __init__(self, server: Relayd) -> None:
        super().__init__(server)
        self.reader = RequestReader()
        self._switching = False  # a request routed elsewhere: finish this tunnel's answer, then close
        self._requests = 0  # requests forwarded on this connection
        self._answer: AnswerStatusReader | None = None  # after an Upgrade: reads the app's answer

    def data_received(self, data: bytes) -> None:
        if self._done or self._switching:
            return
        self._read(self.reader.feed, data)

    def _read(self, step: Callable[[T], list[RequestHead | Body | Tunnel]], arg: T) -> None:
        """Run one step of the request reader (feed, answer) and act on its events; a malformed
        request is answered with its status."""
        try:
            events = step(arg)
        except HttpError as exc:
            self._refuse(exc.status, exc.reason)
            return
        self._handle(events)

    def _handle(self, events: list[RequestHead | Body | Tunnel]) -> None:
        for ev in events:
            if type(ev) is Body:
                StreamBridge.data_received(self, ev.data)
            elif type(ev) is RequestHead:
                if not self._route(ev):
                    return
            if self._done:
                return
        if self.tunnel is None or self.reader.head_in_progress:
            self._arm_timer()  # until a first request is routed, or while a head trickles in
        else:
            self._cancel_timer()
        if self.reader.more and not self._paused_local:
            # the reader stopped after its share of work: go on in a later loop iteration, and
            # read nothing more from the visitor meanwhile
            self._paused_local = True
            self._update_reading()
            asyncio.get_running_loop().call_soon(self._parse_more)

    def _parse_more(self) -> None:
        self._paused_local = False
        if self._done or self._switching:
            return
        self._read(self.reader.feed, b"")
        if not self._paused_local:
            self._update_reading()

    def on_data(self, data: bytes | memoryview) -> None:
        answer = self._answer
        if answer is None:
            super().on_data(data)
            return
        try:
            status = answer.feed(data)
        except HttpError as exc:
            self._refuse(exc.status, exc.reason)
            return
        super().on_data(data)  # the app's bytes go on untouched either way
        if status is not None:
            self._answer = None
            self._read(self.reader.answer, status)

    def on_reset(self, code: int) -> None:
        transport = self.transport
        if not self._replied and transport is not None and not transport.is_closing():
            # relayc could not reach the app (or refused the target) before any answer: say so
            self._done = True
            self._replied = True
            name = self.tunnel.name if self.tunnel else "?"
            transport.write(error_response(502, f"Tunnel {name}: the service behind it is not reachable right now."))
            transport.close()
            return
        super().on_reset(code)

    def _route(self, head: RequestHead) -> bool:
        router = self.server.vhosts
        host_header = head.get("host")
        if head.target.startswith(("http://", "https://")):  # absolute form: its authority wins
            host_header = head.target.split("://", 1)[1].split("/", 1)[0]
        if not host_header:
            self._refuse(400, "the request has no Host header")
            return False
        host = host_of(host_header)
        tunnel = router.match_http(host, head.route_path)
        if tunnel is None:
            client = router.offline_owner(host, time.monotonic())
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
        if head.is_upgrade and self._requests:
            # Only the first request's answer is known to be the next bytes from the app: an
            # Upgrade later on goes to a new connection, like a request for another tunnel.
            return self._switch()
        if self.tunnel is None:
            refusal = self._attach(tunnel)
            if refusal is not None:
                if refusal is Refusal.OFFLINE:
                    message = f"The tunnel for {host} is offline: its client {tunnel.client.name} is not connected."
                else:
                    message = f"Tunnel {tunnel.name}: {tunnel.refusal_text(refusal, self.visitor_ip)}."
                self._refuse(refusal.http_status, message)
                return False
        elif tunnel is not self.tunnel:
            return self._switch()
        self._requests += 1
        if head.is_upgrade:
            self._answer = AnswerStatusReader()
        forwarded = _rewrite(head, headers, host_header, self.visitor_ip, spec.host_header_rewrite)
        StreamBridge.data_received(self, forwarded)
        return True

    def _switch(self) -> bool:
        """A request this connection cannot carry: let the current answer finish, then close; the
        browser sends the request again on a new connection."""
        self._switching = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.pause_reading()
        self.eof_received()
        return False


_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def _rewrite(head: RequestHead, headers: list[tuple[str, str]], host: str, visitor_ip: str, host_rewrite: str) -> bytes:
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

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(0, "")  # a TLS client: no HTTP page, just close

    __slots__ = ("_hello",)

    def __init__(self, server: Relayd) -> None:
        super().__init__(server)
        self._hello: ClientHelloReader | None = ClientHelloReader()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        hello = self._hello
        if hello is None:  # routed: the rest is the visitor's TLS, passed on untouched
            StreamBridge.data_received(self, data)
            return
        try:
            name = hello.feed(data)
        except SniError as exc:
            log.debug("https vhost: closing the connection from %s: %s", self.visitor, exc)
            self._refuse(0, "")
            return
        if name is None:
            return
        self._cancel_timer()
        self._hello = None
        tunnel = self.server.vhosts.match_https(name)
        if tunnel is None:
            log.debug("https vhost: no tunnel for %s (from %s)", name, self.visitor)
            self._refuse(0, "")
            return
        if self._attach(tunnel, hello.received()) is not None:
            self._refuse(0, "")
