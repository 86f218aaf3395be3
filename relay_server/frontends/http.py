"""The HTTP vhost frontend: http tunnels routed by Host header and path on ``vhost_http_port``.

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
import hmac
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from relay_server.certs import CertStore
from relay_server.claims import DomainClaims
from relay_server.frontends.vhost import VhostFrontend, _VhostVisitor, error_response, host_of
from relay_server.http1 import AnswerStatusReader, Body, HttpError, RequestHead, RequestReader, Tunnel
from relay_server.tunnels import PublicTunnel, Refusal
from shared.aio import StreamBridge
from shared.burst import BurstLog
from shared.tunnel import TunnelKind

T = TypeVar("T")
ACME_CHALLENGE = "/.well-known/acme-challenge/"
HSTS_LINE = b"Strict-Transport-Security: max-age=31536000\r\n"  # one year, the usual value
STATUS_LINE_MAX = 8192
# Where the README tells how to serve Jupyter by name (the usual cause of a 403 behind relayd).
JUPYTER_RECIPE = "the README's recipe 'Jupyter over HTTPS with your own domain in five lines'"
HINT_INTERVAL = 300.0  # seconds between two hints about the same tunnel


class HttpFrontend(VhostFrontend):
    kind = TunnelKind.HTTP
    port_key = "vhost_http_port"

    def __init__(self, domains: DomainClaims, bind_addr: str, port: int, header_timeout: float) -> None:
        super().__init__(domains, bind_addr, port, header_timeout)
        self.certs: CertStore | None = None  # set when relayd terminates TLS for http tunnels
        self.https_port = 0  # where it does (the https vhost frontend's bound port)
        self.acme_tokens: dict[str, str] = {}  # HTTP-01 challenges being validated: token -> answer
        self.acme_enabled = False  # every domain will be served over HTTPS once its certificate is in
        # hints in relayd's log when an answer says what is wrong (a 403 from the app, a 502)
        self.hints = BurstLog(logging.getLogger("relayd"), interval=HINT_INTERVAL, max_keys=256)

    def visitor(self, scheme: str = "http") -> HttpVisitor:
        return HttpVisitor(self, scheme)

    async def claim(self, tunnel: PublicTunnel) -> str:
        """Where visitors reach ``tunnel``: its https:// URLs first where relayd serves HTTPS for
        the domain (a certificate file covers it, or ACME is on), then its http:// ones."""
        public = await super().claim(tunnel)
        if self.certs is None or not self.https_port:
            return public
        port = "" if self.https_port == 443 else f":{self.https_port}"
        https = [f"https://{d}{port}" for d, _ in tunnel.claim or ()
                 if self.acme_enabled or self.certs.from_file(d) is not None]  # fmt: skip
        return ", ".join([*https, public])

    def https_location(self, host: str, target: str) -> str | None:
        """``https://host[:port]/target`` while relayd serves ``host`` over HTTPS with a valid
        certificate, else None (an https_redirect must never lead to a broken page)."""
        if self.certs is None or not self.https_port or self.certs.find(host) is None:
            return None
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{host}{port}{target if target.startswith('/') else '/'}"


class HttpVisitor(_VhostVisitor):
    """One visitor connection on the HTTP vhost port (or, ``scheme="https"``, a connection on the
    HTTPS vhost port whose TLS relayd terminated)."""

    __slots__ = ("_answer", "_first_answer", "_host", "_hsts", "_requests", "_switching", "reader", "scheme")

    def __init__(self, frontend: HttpFrontend, scheme: str = "http") -> None:
        super().__init__(frontend)
        self.frontend: HttpFrontend = frontend
        self.scheme = scheme
        self._hsts: bytes | None = None  # the first answer's bytes until its status line is in
        self.reader = RequestReader()
        self._switching = False  # a request routed elsewhere: finish this tunnel's answer, then close
        self._requests = 0  # requests forwarded on this connection
        self._answer: AnswerStatusReader | None = None  # after an Upgrade: reads the app's answer
        self._first_answer = True  # until the app's first bytes: a 403 there gets a hint logged
        self._host = ""  # the Host of the request routed last

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
        if self._first_answer:
            self._first_answer = False
            if bytes(data[:5]) == b"HTTP/" and bytes(data[8:13]) == b" 403 ":
                self._hint_forbidden()
        if self._hsts is None:
            self._from_app(data)
            return
        # the first answer on an HTTPS connection of an hsts tunnel: Strict-Transport-Security
        # goes in after its status line (browsers keep the policy from one answer)
        held = self._hsts + data
        cut = held.find(b"\r\n")
        if cut < 0 and len(held) < STATUS_LINE_MAX:
            self._hsts = held  # credit for it is returned once it is passed on
            return
        self._hsts = None
        if cut < 0 or held[9:10] == b"1":  # no status line after all, or 1xx: leave it alone
            self._from_app(held)
            return
        self._from_app(held[: cut + 2])
        if self.transport is not None and not self._done:
            self.transport.write(HSTS_LINE)
        self._from_app(held[cut + 2 :])

    def _from_app(self, data: bytes | memoryview) -> None:
        if not data:
            return
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

    def _hint_forbidden(self) -> None:
        """The app answered the first request of this connection with 403: log (now and then) the
        usual cause behind relayd, for the one who runs the tunnel.  Names are peer-chosen: %r."""
        tunnel = self.tunnel
        if tunnel is None:
            return
        client, spec = tunnel.client.name, tunnel.spec
        key = f"403:{client}:{spec.name}"
        if self._answer is not None and not spec.host_header_rewrite:
            self.frontend.hints.warning(
                key, "client %r tunnel %r: the app refused a WebSocket for %r with 403; Jupyter does that when "
                "the page's Origin is not its Host (a page on another site), or when it does not know the name "
                "(--ServerApp.local_hostnames=%s; see %s)", client, spec.name, self._host, self._host,
                JUPYTER_RECIPE)  # fmt: skip
        elif self._answer is not None:
            self.frontend.hints.warning(
                key, "client %r tunnel %r: the app refused a WebSocket with 403: host_header_rewrite makes the "
                "browser's Origin differ from the Host the app sees, and Jupyter refuses that; remove "
                "host_header_rewrite and give the app its public name instead (Jupyter: "
                "--ServerApp.local_hostnames=%s; see %s)", client, spec.name, self._host, JUPYTER_RECIPE)  # fmt: skip
        else:
            self.frontend.hints.warning(
                key, "client %r tunnel %r: the app answered 403 Forbidden to a request for %r; if it is Jupyter, "
                "it refuses a Host it does not know: start it with --ServerApp.local_hostnames=%s (see %s); "
                "other apps have a similar allowed-hosts setting", client, spec.name, self._host, self._host,
                JUPYTER_RECIPE)  # fmt: skip

    def on_reset(self, code: int) -> None:
        transport = self.transport
        if not self._replied and transport is not None and not transport.is_closing():
            # relayc could not reach the app (or refused the target) before any answer: say so
            self._done = True
            self._replied = True
            tunnel = self.tunnel
            name = tunnel.name if tunnel else "?"
            transport.write(error_response(502, f"Tunnel {name}: the service behind it is not reachable right now: "
                                           "relayc on the lab machine could not connect to it. If this is your "
                                           "tunnel: is the service running on the lab machine, on the local_port "
                                           "of this tunnel? The dashboard and `relayc status` show it as "
                                           "\"service down\" until it answers."))  # fmt: skip
            if tunnel is not None:
                spec = tunnel.spec
                self.frontend.hints.warning(
                    f"502:{tunnel.client.name}:{spec.name}", "client %r tunnel %r: 502 for %r: relayc could not "
                    "reach %s:%d on the lab machine; is the service running there? (relayc's log says why)",
                    tunnel.client.name, spec.name, self._host, spec.local_ip, spec.local_port)  # fmt: skip
            transport.close()
            return
        super().on_reset(code)

    def _route(self, head: RequestHead) -> bool:
        tokens = self.frontend.acme_tokens
        if tokens and head.target.startswith(ACME_CHALLENGE):  # before routing, auth and redirects
            answer = tokens.get(head.target[len(ACME_CHALLENGE) :])
            if answer is not None and self.transport is not None:
                self._done = self._replied = True
                body = answer.encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                     b"Connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
                self.transport.close()
                return False
        router = self.frontend.domains
        host_header = head.get("host")
        if head.target.startswith(("http://", "https://")):  # absolute form: its authority wins
            host_header = head.target.split("://", 1)[1].split("/", 1)[0]
        if not host_header:
            self._refuse(400, "the request has no Host header")
            return False
        host = host_of(host_header)
        self._host = host
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
        if spec.https_redirect and self.scheme == "http":
            location = self.frontend.https_location(host, head.target)
            if location is not None:
                self._refuse(308, f"This site is served over HTTPS: {location}", (f"Location: {location}",))
                return False
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
            if spec.hsts and self.scheme == "https":
                self._hsts = b""
            refusal = self._attach(tunnel)
            if refusal is not None:
                if refusal is Refusal.OFFLINE:
                    message = f"The tunnel for {host} is offline: its client {tunnel.client.name} is not connected."
                elif refusal is Refusal.NO_MEMBER:
                    message = f"No member of the group serving {host} can take it right now."
                else:
                    message = f"Tunnel {tunnel.name}: {tunnel.refusal_text(refusal, self.visitor_ip)}."
                self._refuse(refusal.http_status, message)
                return False
        elif tunnel is not self.tunnel and (tunnel.group is None or tunnel.group is not self.tunnel.group):
            return self._switch()  # another tunnel (the same group's next request stays with its member)
        self._requests += 1
        if head.is_upgrade:
            self._answer = AnswerStatusReader()
        forwarded = _rewrite(head, headers, host_header, self.visitor_ip, spec.host_header_rewrite, self.scheme)
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


def _rewrite(head: RequestHead, headers: list[tuple[str, str]], host: str, visitor_ip: str, host_rewrite: str,
             scheme: str = "http") -> bytes:  # fmt: skip
    index = head.index
    if headers is head.headers and not host_rewrite and head.raw and index.keys().isdisjoint(_FORWARDED):
        # The usual request: nothing to drop or change, so the head goes on as received (the
        # parser checked every line) with relayd's X-Forwarded-* lines added.
        added = f"X-Forwarded-For: {visitor_ip}\r\nX-Forwarded-Proto: {scheme}\r\nX-Forwarded-Host: {host}\r\n\r\n"
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
    out.append(("X-Forwarded-Proto", scheme))
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
