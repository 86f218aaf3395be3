"""The dashboard: a FastAPI app served by uvicorn inside relayd's own event loop.

An adapter over the registry's command/query API (``relay_server.registry``) and nothing else: it
never touches sessions, claim tables or the store itself, and the data plane never imports this
module (``relay_server.cli`` wires it in when ``[dashboard]`` is present).

Authentication, on every route but the login form and static files:
  * browsers: a session cookie from the login form (HttpOnly, SameSite=Strict, Secure over TLS);
    state-changing requests must also carry the session's CSRF token in ``X-CSRF-Token`` (the
    Sign out form carries it as a hidden field);
  * scripts: HTTP Basic with the dashboard user and password, or ``Authorization: Bearer <token>``
    with the API token relayd keeps in ``state_dir/dashboard_api_token``.  A state-changing request
    with Basic is refused (403) when a browser marks it as coming from another site (``Origin`` or
    ``Sec-Fetch-Site``): a browser's cached Basic credentials cannot be used cross-site.

Every attempt with a credential (the login form, Basic, Bearer) goes through one gate, per peer
address: a blocked address is refused without its credential being checked; otherwise attempts
from one address are checked one at a time, each after the delay the address owes for its earlier
failures (so parallel guesses get no more tries than serial ones), and failures are counted by a
``LoginGuard`` in the dashboard scope.  Password hashes are verified in worker threads, never on
the event loop that carries the tunnels.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hmac
import logging
import math
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator

from relay_server.guard import BlockKind, BlockScope, LoginGuard
from relay_server.passwords import verify_password
from relay_server.registry import Event, Registry, TunnelRefusedEvent, TunnelState
from shared.checks import check_name, is_loopback
from shared.config import resolve_path
from shared.errors import Conflict, InvalidField, NotFound, StoreUnavailable
from shared.tunnel import field_list

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from shared.aio import LoopLagMonitor
    from shared.config import DashboardConfig

log = logging.getLogger("relayd.dashboard")
STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "relay_session"
SESSION_TTL = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Everything a peer sends is bounded.
BODY_LIMIT = 64 * 1024  # any request body (the JSON API's are well under 1 KiB)
FORM_LIMIT = 8 * 1024  # the sign-in and sign-out forms
AUTH_HEADER_LIMIT = 4096  # an Authorization header
NAME_MAX = 128  # client and tunnel names (64 in configs, 128 on the wire)
VALUE_MAX = 256  # a block's value: an address or a client name
MAX_SINCE = 2**40  # /api/v1/traffic?since=: Unix seconds, far beyond any real date

# The sign-in gate.
HASH_THREADS = 1  # password hashes verified at once (each ~0.1 s of CPU in a worker thread)
GATE_IN_FLIGHT = 1024  # credential attempts held or waiting, all addresses together
GATE_PER_ADDRESS = 64  # of which from one address
OWED_ENTRIES = 10_000  # addresses whose next attempt must wait: the oldest are forgotten first


class ClientIn(BaseModel):
    name: str = Field(description="unique client name, as relayc.toml's name")

    _name = field_validator("name")(lambda cls, v: check_name(v))


class ClientPatch(BaseModel):
    enabled: bool


Name = Annotated[str, PathParam(min_length=1, max_length=NAME_MAX)]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: relayd owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _BodyLimit:
    """ASGI middleware: reads a request's body (at most ``limit`` bytes, else 413) before the app
    runs.  FastAPI parses JSON bodies before the auth dependency runs, so without this anyone could
    make relayd buffer and parse a body of any size."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = b'{"detail":"request body too large (at most %d bytes)"}' % self.limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class _Slot:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class AddressLocks:
    """One ``asyncio.Lock`` per peer address, so that one address's attempts are checked one after
    the other.  Keyed by something the peer chooses, so bounded: at most ``max_in_flight`` attempts
    held or waiting in all, ``max_per_address`` from one address (over either: 503, nothing is
    checked), and a lock leaves the table as soon as nobody holds or waits on it."""

    def __init__(self, max_in_flight: int = GATE_IN_FLIGHT, max_per_address: int = GATE_PER_ADDRESS) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_address = max_per_address
        self._slots: dict[str, _Slot] = {}
        self._in_flight = 0

    @contextlib.asynccontextmanager
    async def hold(self, addr: str) -> AsyncIterator[None]:
        slot = self._slots.get(addr)
        if self._in_flight >= self.max_in_flight or (slot is not None and slot.users >= self.max_per_address):
            raise HTTPException(503, "too many sign-ins in progress; try again shortly", headers={"Retry-After": "1"})
        if slot is None:
            slot = self._slots[addr] = _Slot()
        slot.users += 1
        self._in_flight += 1
        try:
            async with slot.lock:
                yield
        finally:
            slot.users -= 1
            self._in_flight -= 1
            if slot.users == 0 and self._slots.get(addr) is slot:
                del self._slots[addr]

    def busy(self, addr: str) -> bool:
        """An attempt from ``addr`` is being checked (or waits)."""
        slot = self._slots.get(addr)
        return slot is not None and slot.users > 0

    def __len__(self) -> int:
        return len(self._slots)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What the dashboard says about this relayd besides the registry: where relayc connects."""

    bind_addr: str
    port: int
    fingerprint: str  # "" when TLS is off
    # the certificates served on vhost_https_port, one item per name (pending ACME names too)
    certificates: Callable[[], list[dict[str, Any]]] = lambda: []
    public_address: str = ""  # this node's address for relayc (public_addr, or bind address and port)


class Dashboard:
    def __init__(self, registry: Registry, node: NodeInfo, loop_lag: LoopLagMonitor, config: DashboardConfig,
                 state_dir: Path, config_path: Path) -> None:  # fmt: skip
        self.registry = registry
        self.node = node
        self.loop_lag = loop_lag
        self.config = config
        self.config_path = config_path
        self.refusals_by_reason: dict[str, int] = {}
        registry.subscribe(self._on_event)
        self.guard = LoginGuard(BlockScope.DASHBOARD, window=600, block_after=30, block_seconds=300,
                                names_to_block_address=1)  # fmt: skip
        self.locks = AddressLocks()
        self._owed: dict[str, float] = {}  # address -> monotonic time before which its next attempt waits
        self._hash_slots = asyncio.Semaphore(HASH_THREADS)
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="dashboard-scrypt")
        self.sessions: dict[str, tuple[float, str]] = {}  # cookie -> (expiry, csrf token)
        token_file = state_dir / "dashboard_api_token"
        if not token_file.exists():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        self.api_token = token_file.read_text().strip()
        self.token_file = token_file
        self.app = self._build_app()
        self.server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cert = str(resolve_path(self.config_path, cfg.tls_cert_file)) if cfg.tls_cert_file else None
        key = str(resolve_path(self.config_path, cfg.tls_key_file)) if cfg.tls_key_file else None
        uv_config = uvicorn.Config(
            _BodyLimit(self.app, BODY_LIMIT), host=cfg.addr, port=cfg.port, log_level="warning", access_log=False,
            lifespan="off", ssl_certfile=cert, ssl_keyfile=key, server_header=False, proxy_headers=False,
            log_config=None,  # uvicorn's loggers propagate to relayd's root handler (and its formatter)
        )  # fmt: skip
        self.server = _EmbeddedServer(uv_config)
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the startup error (port in use...)
                raise OSError(f"dashboard could not start on {cfg.addr}:{cfg.port}")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if cert else "http"
        log.info("dashboard on %s://%s:%d (user %s; API token in %s)", scheme, cfg.addr, self.port, cfg.user,
                 self.token_file)  # fmt: skip
        if not is_loopback(cfg.addr) and not cert:
            log.warning("the dashboard listens on %s without TLS: passwords cross the network in clear", cfg.addr)

    async def stop(self) -> None:
        if self.server is not None and self._task is not None:
            self.server.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TunnelRefusedEvent):
            reason = event.reason.value
            self.refusals_by_reason[reason] = self.refusals_by_reason.get(reason, 0) + 1

    # --- auth -----------------------------------------------------------------------------------

    @staticmethod
    def _peer(request: Request) -> str:
        return request.client.host if request.client else "?"

    async def _password_ok(self, user: str, password: str) -> bool:
        cfg = self.config
        user_ok = hmac.compare_digest(user.encode(), cfg.user.encode())
        if cfg.password_hash:
            pw_ok = await self._verify_hash(password, cfg.password_hash)
        else:  # constant time and cheap: stays on the loop
            pw_ok = hmac.compare_digest(password.encode(), cfg.password.encode())
        return user_ok and pw_ok

    async def _verify_hash(self, password: str, encoded: str) -> bool:
        """scrypt in a worker thread, at most HASH_THREADS at once.  A slot is given back when the
        thread is done, not when the caller stops waiting: a cancelled request cannot pile up work."""
        loop = asyncio.get_running_loop()
        await self._hash_slots.acquire()

        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._hash_slots.release)

        try:
            job = self._hash_pool.submit(verify_password, password, encoded)
        except BaseException:
            self._hash_slots.release()
            raise
        job.add_done_callback(release)
        return await asyncio.wrap_future(job, loop=loop)

    async def _token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.api_token.encode())

    def _refuse_if_blocked(self, addr: str) -> None:
        now = time.monotonic()
        until = self.guard.address_blocked_until(addr, now)
        if until is None:
            return
        wall = datetime.datetime.fromtimestamp(time.time() + until - now, datetime.timezone.utc)
        raise HTTPException(429, f"too many failed sign-ins from {addr}; blocked until "
                                 f"{wall.isoformat(timespec='seconds')}",
                            headers={"Retry-After": str(max(1, math.ceil(until - now)))})  # fmt: skip

    def _owe(self, addr: str, until: float) -> None:
        owed = self._owed
        owed.pop(addr, None)
        now = time.monotonic()
        for _ in range(4):  # forget a few entries whose wait is over, oldest first
            first = next(iter(owed), None)
            if first is None or owed[first] > now:
                break
            del owed[first]
        if len(owed) >= OWED_ENTRIES:
            del owed[next(iter(owed))]
        owed[addr] = until

    async def _attempt(self, request: Request, way: str, check: Callable[[], Awaitable[bool]]) -> bool:
        """The one gate for every credential (form, Basic, Bearer): True when ``check`` accepted it.

        A blocked address gets 429 without its credential being checked.  Otherwise the address's
        attempts are checked one at a time: each holds the address's lock while it waits out the
        delay owed for earlier failures and while its credential is checked, so N parallel guesses
        are checked one after the other, each after its delay.  A failure is counted, and answered
        after its own delay (the next attempt in line waits for the same moment)."""
        addr = self._peer(request)
        self._refuse_if_blocked(addr)
        if addr in self._owed and self.locks.busy(addr):
            # an address that failed recently gets one attempt at a time, not a queue of them
            raise HTTPException(429, f"a sign-in from {addr} is being checked; after failed attempts one at a "
                                     "time", headers={"Retry-After": "1"})  # fmt: skip
        async with self.locks.hold(addr):
            wait = self._owed.get(addr, 0.0) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._refuse_if_blocked(addr)  # the guesses ahead in line may have got it blocked
            if await check():
                self.guard.record_success(addr, "")
                self._owed.pop(addr, None)
                return True
            now = time.monotonic()
            failure = self.guard.record_failure(addr, "", now)
            self._owe(addr, now + failure.delay)
        if failure.address_blocked:
            log.warning("dashboard: sign-ins from %r blocked for %.0f s after %d failed attempts", addr,
                        self.guard.block_seconds, failure.failures)  # fmt: skip
        elif failure.failures == 1:
            log.info("dashboard: failed sign-in (%s) from %r", way, addr)
        else:
            log.debug("dashboard: failed sign-in (%s) from %r (%d in the window)", way, addr, failure.failures)
        await asyncio.sleep(failure.delay)
        return False

    def _own_origin(self, request: Request) -> str:
        scheme = "https" if self.config.tls_cert_file else "http"
        return f"{scheme}://{request.headers.get('host', '')}".lower()

    def _refuse_cross_site(self, request: Request) -> None:
        """403 when a browser says this request comes from another site.  Without Sec-Fetch-Site
        and Origin (curl, scripts) the request is accepted."""
        site = request.headers.get("sec-fetch-site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            raise HTTPException(403, f"refused: the Sec-Fetch-Site header says {site}; a browser's saved "
                                     "credentials are not accepted from other sites")  # fmt: skip
        origin = request.headers.get("origin")
        if origin is not None and origin.strip().lower() != self._own_origin(request):
            raise HTTPException(403, f"refused: the Origin header {origin[:200]!r} is not this dashboard's origin; "
                                     "a browser's saved credentials are not accepted from other sites")  # fmt: skip

    async def require_auth(self, request: Request) -> str:
        """Dependency: returns how the caller authenticated ("cookie", "basic", "bearer")."""
        header = request.headers.get("authorization")
        if header is not None:
            if len(header) > AUTH_HEADER_LIMIT:
                raise HTTPException(400, f"Authorization header too long (at most {AUTH_HEADER_LIMIT} bytes)")
            scheme, _, value = header.strip().partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer":
                token = value.strip()
                if await self._attempt(request, "bearer", lambda: self._token_ok(token)):
                    return "bearer"
                raise HTTPException(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
            if scheme == "basic":
                if request.method not in SAFE_METHODS:
                    self._refuse_cross_site(request)
                try:
                    user, colon, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
                except ValueError:  # bad base64 (binascii.Error), non-ASCII, or not UTF-8 underneath
                    user, colon, password = "", "", ""
                if not colon:
                    raise HTTPException(400, "malformed Basic credentials: expected base64 of user:password")
                if await self._attempt(request, "basic", lambda: self._password_ok(user, password)):
                    return "basic"
                raise HTTPException(401, "wrong user or password", headers={"WWW-Authenticate": 'Basic realm="relayd"'})
        cookie = request.cookies.get(SESSION_COOKIE, "")
        entry = self.sessions.get(cookie)
        if entry is not None and entry[0] > time.time():
            if request.method not in SAFE_METHODS:
                sent = request.headers.get("x-csrf-token", "")
                if not hmac.compare_digest(sent.encode(), entry[1].encode()):
                    raise HTTPException(403, "missing or wrong X-CSRF-Token")
            return "cookie"
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="relayd"'})

    @staticmethod
    async def _form(request: Request) -> dict[str, list[str]]:
        """A urlencoded form of a few fields, parsed here rather than with python-multipart."""
        body = (await request.body())[:FORM_LIMIT]
        return urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=16)

    # --- the app --------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="relayd dashboard", docs_url=None, redoc_url=None, openapi_url=None)
        auth = Depends(self.require_auth)
        registry = self.registry

        @app.exception_handler(Conflict)
        async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
            reason = exc.reason.value if exc.reason is not None else None
            return JSONResponse({"detail": str(exc), "reason": reason}, status_code=409)

        @app.exception_handler(NotFound)
        async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=404)

        @app.exception_handler(StoreUnavailable)
        async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
            detail = f"{exc}: changes are refused until it is back (running tunnels are not affected)"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

        @app.exception_handler(InvalidField)
        async def _invalid(request: Request, exc: InvalidField) -> JSONResponse:
            loc = ["body", *exc.key.replace("[", ".").replace("]", "").split(".")]
            return JSONResponse({"detail": [{"loc": loc, "msg": exc.reason, "type": "value_error"}]}, status_code=422)

        @app.exception_handler(HTTPException)
        async def _http(request: Request, exc: HTTPException) -> Response:
            if exc.status_code == 401 and request.url.path in ("/", "/clients", "/tunnels"):
                return RedirectResponse("/login", status_code=303)
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/login", include_in_schema=False)
        async def login_page() -> HTMLResponse:
            return HTMLResponse((STATIC / "login.html").read_text())

        @app.post("/login", include_in_schema=False)
        async def login(request: Request) -> Response:
            site = request.headers.get("sec-fetch-site", "").strip().lower()
            if site in ("cross-site", "same-site"):  # another site's page cannot guess from the operator's address
                raise HTTPException(403, f"refused: the Sec-Fetch-Site header says {site}")
            form = await self._form(request)
            user, password = form.get("user", [""])[0], form.get("password", [""])[0]
            try:
                ok = await self._attempt(request, "form", lambda: self._password_ok(user, password))
            except HTTPException as exc:  # blocked or one at a time (429), too busy (503): not checked
                if exc.status_code not in (429, 503):
                    raise
                return RedirectResponse("/login?wait=1", status_code=303)
            if not ok:
                return RedirectResponse("/login?failed=1", status_code=303)
            now = time.time()
            for stale in [c for c, (expiry, _) in self.sessions.items() if expiry <= now]:
                del self.sessions[stale]  # expired sessions go when a new one is made
            cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            self.sessions[cookie] = (now + SESSION_TTL, csrf)
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="strict",
                            secure=bool(self.config.tls_cert_file), max_age=SESSION_TTL)  # fmt: skip
            return resp

        @app.post("/logout", include_in_schema=False)
        async def logout(request: Request) -> Response:
            """Ends the cookie session on the server.  CSRF-protected like every state change: the
            Sign out form sends the session's token as the ``csrf`` field (or ``X-CSRF-Token``)."""
            cookie = request.cookies.get(SESSION_COOKIE, "")
            entry = self.sessions.get(cookie)
            if entry is not None:
                sent = request.headers.get("x-csrf-token")
                if sent is None:
                    sent = (await self._form(request)).get("csrf", [""])[0]
                if not hmac.compare_digest(sent.encode(), entry[1].encode()):
                    raise HTTPException(403, "missing or wrong CSRF token")
                del self.sessions[cookie]
            resp = RedirectResponse("/login", status_code=303)
            resp.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=bool(self.config.tls_cert_file))
            return resp

        @app.get("/", include_in_schema=False)
        @app.get("/clients", include_in_schema=False)
        @app.get("/tunnels", include_in_schema=False)
        async def index(request: Request, _: str = auth) -> HTMLResponse:
            entry = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
            csrf = entry[1] if entry else ""
            html = (STATIC / "index.html").read_text().replace("{{CSRF}}", csrf)
            return HTMLResponse(html, headers={"Cache-Control": "no-store"})

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(_: str = auth) -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs(_: str = auth) -> HTMLResponse:
            return HTMLResponse((STATIC / "docs.html").read_text())

        # --- JSON API ---------------------------------------------------------------------------

        @app.get("/api/v1/overview")
        async def overview(_: str = auth) -> dict[str, Any]:
            return {**registry.overview(), "fingerprint": self.node.fingerprint}

        @app.get("/api/v1/clients")
        async def clients(_: str = auth) -> list[dict[str, Any]]:
            return registry.client_items()

        @app.post("/api/v1/clients", status_code=201)
        async def create_client(body: ClientIn, request: Request, _: str = auth) -> dict[str, Any]:
            record = await registry.create_client(body.name)
            return {"name": record.name, "token": record.token, "created": record.created,
                    "relayc_toml": self.relayc_toml(record.name, record.token, request)}  # fmt: skip

        @app.patch("/api/v1/clients/{name}")
        async def patch_client(name: Name, body: ClientPatch, _: str = auth) -> dict[str, Any]:
            await registry.set_client_enabled(name, body.enabled)
            return self._client_or_404(name)

        @app.post("/api/v1/clients/{name}/rotate")
        async def rotate(name: Name, request: Request, _: str = auth) -> dict[str, Any]:
            token = await registry.rotate_token(name)
            return {"name": name, "token": token, "relayc_toml": self.relayc_toml(name, token, request)}

        @app.post("/api/v1/clients/{name}/kick")
        async def kick(name: Name, _: str = auth) -> dict[str, Any]:
            if not registry.kick(name):
                raise HTTPException(404, f"client {name!r} is not connected")
            return {"name": name, "kicked": True}

        @app.delete("/api/v1/clients/{name}", status_code=204)
        async def delete_client(name: Name, _: str = auth) -> Response:
            await registry.delete_client(name)
            return Response(status_code=204)

        @app.get("/api/v1/tunnels")
        async def tunnels(_: str = auth) -> list[dict[str, Any]]:
            return registry.tunnel_items()

        @app.get("/api/v1/nodes")
        async def nodes(_: str = auth) -> list[dict[str, Any]]:
            """The relayd nodes: this one alone, or every live node of a cluster sharing the
            database: ``{addr, fingerprint, heartbeat_age, clients, this}``."""
            return registry.node_items(self.node.public_address, self.node.fingerprint)

        @app.get("/api/v1/certificates")
        async def certificates(_: str = auth) -> list[dict[str, Any]]:
            """One item per name served over HTTPS by relayd, pending ACME names included:
            ``{domain, not_after, issuer, source: "acme" | "file", last_error}``."""
            return self.node.certificates()

        @app.get("/api/v1/tunnel-fields")
        async def tunnel_fields(_: str = auth) -> list[dict[str, Any]]:
            """The keys ``POST /api/v1/tunnels`` takes besides ``client``: relayc.toml's
            ``[[tunnels]]`` keys, with type, default, the kinds each is for and a label."""
            return field_list()

        @app.post("/api/v1/tunnels", status_code=201)
        async def create_tunnel(body: Annotated[dict[str, Any], Body()], _: str = auth) -> dict[str, Any]:
            """Define a tunnel: exactly relayc.toml's ``[[tunnels]]`` keys (same names, types and
            defaults; see ``/api/v1/tunnel-fields``) plus ``client``.  ``http_password`` is
            write-only: no answer ever includes it."""
            record = await registry.define_tunnel(body)
            return self._tunnel_item(record.client, record.spec.name)

        @app.patch("/api/v1/tunnels/{client}/{name}")
        async def patch_tunnel(client: Name, name: Name, body: Annotated[dict[str, Any], Body()],
                               _: str = auth) -> dict[str, Any]:  # fmt: skip
            """Edit a dashboard tunnel live: any key ``POST /api/v1/tunnels`` takes but ``client``,
            ``name`` and ``type`` (422 "cannot be changed"), and/or ``enabled``.  The tunnel with
            these keys is checked like a new one (422 naming the key); keys left out keep their
            value (``http_password`` too: write-only, never in an answer).  The client's relayc
            gets the new definition at once; a change of port, domains, locations or group reopens
            the tunnel, any other change applies where it stands (its visitors stay connected).
            A tunnel from a relayc.toml is read-only: 409 (``enabled`` alone: 404, as before)."""
            await registry.edit_tunnel(client, name, body)
            return self._tunnel_item(client, name)

        @app.get("/api/v1/tunnels/{client}/{name}/connections")
        async def tunnel_connections(client: Name, name: Name, _: str = auth) -> list[dict[str, Any]]:
            """The tunnel's last 100 visitor connections, newest first: ``{addr, opened, closed,
            bytes_in, bytes_out}``; ``addr`` is ``ip:port`` (``[ip]:port`` for IPv6; a visit to a
            secret tunnel: ``client@ip``), times are Unix seconds (``closed`` null while open),
            ``bytes_in`` came from the visitor, ``bytes_out`` went to it.  One item per TCP
            connection (http/https: per visitor connection, whatever its requests), per UDP flow,
            per visit.  404 for a tunnel relayd does not know."""
            return registry.connections(client, name)

        @app.get("/api/v1/tunnels/{client}/{name}/refusals")
        async def tunnel_refusals(client: Name, name: Name, _: str = auth) -> list[dict[str, Any]]:
            """Visitors the tunnel turned away lately (the last 100, newest first): ``{at, addr,
            reason, text}``, ``at`` in Unix seconds, ``reason`` one of ``source`` (not in
            allow_sources), ``tunnel_full``, ``client_full``, ``client_busy``.  404 for a tunnel
            relayd does not know."""
            return registry.visitor_refusals(client, name)

        @app.delete("/api/v1/tunnels/{client}/{name}", status_code=204)
        async def delete_tunnel(client: Name, name: Name, _: str = auth) -> Response:
            await registry.delete_tunnel(client, name)
            return Response(status_code=204)

        @app.get("/api/v1/traffic")
        async def traffic(
            client: Annotated[str, Query(max_length=NAME_MAX)] = "",
            tunnel: Annotated[str, Query(max_length=NAME_MAX)] = "",
            since: Annotated[float, Query(ge=0, le=MAX_SINCE, allow_inf_nan=False, description="Unix seconds")] = 0,
            _: str = auth,
        ) -> dict[str, Any]:
            return await registry.traffic(client, tunnel, since)

        @app.get("/api/v1/blocks")
        async def blocks(_: str = auth) -> list[dict[str, Any]]:
            """Addresses and client names refused for failed logins: relayc's (scope "relayc") and
            the dashboard's own sign-ins (scope "dashboard"); ``until`` is Unix seconds."""
            now, wall = time.monotonic(), time.time()
            return [b.as_dict() for b in (*registry.blocks(now, wall), *self.guard.blocks(now, wall))]

        @app.delete("/api/v1/blocks/{kind}/{value:path}", status_code=204)  # a name the peer sent may hold "/"
        async def unblock(kind: BlockKind, value: Annotated[str, PathParam(min_length=1, max_length=VALUE_MAX)],
                          _: str = auth) -> Response:  # fmt: skip
            """Lift a block: an address in both scopes, a client name in relayc's."""
            found = registry.unblock(kind, value)
            if kind is BlockKind.ADDRESS:
                found = self.guard.unblock(kind, value) or found
                self._owed.pop(value, None)
            if not found:
                raise HTTPException(404, f"no {kind.value} {value!r} is blocked")
            log.info("dashboard: %s %r unblocked by the operator", kind.value, value)
            return Response(status_code=204)

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics(request: Request) -> PlainTextResponse:
            if not self.config.metrics_public:
                await self.require_auth(request)
            return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4")

        return app

    # --- views of the data plane ---------------------------------------------------------------

    def _client_or_404(self, name: str) -> dict[str, Any]:
        for c in self.registry.client_items():
            if c["name"] == name:
                return c
        raise HTTPException(404, f"client {name!r} does not exist")

    def _tunnel_item(self, client: str, name: str) -> dict[str, Any]:
        for t in self.registry.tunnel_items():
            if t["client"] == client and t["name"] == name:
                return t
        raise HTTPException(404, "tunnel vanished")

    def relayc_toml(self, name: str, token: str, request: Request) -> str:
        server = self.node.bind_addr
        if server in ("0.0.0.0", "::"):
            host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
            server = host if host and not is_loopback(host) else "YOUR-VM-ADDRESS"
        lines = [
            "# relayc.toml made by the relayd dashboard",
            f'server_addr = "{server}"',
            f"server_port = {self.node.port}",
            f'name = "{name}"',
            "",
            "[auth]",
            f'token = "{token}"',
            "",
            "[tls]",
            "enable = true" if self.node.fingerprint else "enable = false",
        ]
        if self.node.fingerprint:
            lines.append(f'server_fingerprint = "{self.node.fingerprint}"')
        lines += ["", "# Tunnels can be added here, or in the dashboard without touching this machine again."]
        return "\n".join(lines) + "\n"

    def metrics_text(self) -> str:
        tunnels = self.registry.tunnel_items()
        active, down = TunnelState.ACTIVE.value, TunnelState.SERVICE_DOWN.value
        live = [t for t in tunnels if t["state"] in (active, down)]

        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        out = [
            "# HELP relay_clients_online Clients with a live session.",
            "# TYPE relay_clients_online gauge",
            f"relay_clients_online {self.registry.clients_online()}",
            "# HELP relay_tunnels Tunnels known, by status.",
            "# TYPE relay_tunnels gauge",
            f'relay_tunnels{{status="active"}} {sum(1 for t in tunnels if t["state"] == active)}',
            f'relay_tunnels{{status="service_down"}} {sum(1 for t in tunnels if t["state"] == down)}',
            f'relay_tunnels{{status="inactive"}} {sum(1 for t in tunnels if t["state"] not in (active, down))}',
            "# HELP relay_connections_open Open visitor connections.",
            "# TYPE relay_connections_open gauge",
            f"relay_connections_open {sum(t['conns_open'] for t in tunnels)}",
            "# HELP relay_event_loop_lag_seconds Worst event-loop lag since the previous scrape.",
            "# TYPE relay_event_loop_lag_seconds gauge",
            f"relay_event_loop_lag_seconds {self.loop_lag.take_worst():.6f}",
            "# HELP relay_tunnel_refusals_total Tunnel registrations refused since start, by reason.",
            "# TYPE relay_tunnel_refusals_total counter",
            *(f'relay_tunnel_refusals_total{{reason="{r}"}} {n}' for r, n in sorted(self.refusals_by_reason.items())),
        ]
        for metric, field_name, help_text in (
            ("relay_tunnel_bytes_in_total", "bytes_in", "Bytes from visitors to the lab side."),
            ("relay_tunnel_bytes_out_total", "bytes_out", "Bytes from the lab side to visitors."),
            ("relay_tunnel_connections_total", "conns_total", "Visitor connections accepted."),
            ("relay_tunnel_connections_open", "conns_open", "Visitor connections open."),
        ):
            kind = "gauge" if field_name == "conns_open" else "counter"
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            for t in live:
                out.append(f'{metric}{{client="{esc(t["client"])}",tunnel="{esc(t["name"])}"}} {t[field_name]}')
        out += ["# HELP relay_tunnel_info Open tunnels: kind, group, and whether relayc's health check passes "
                "(1 up or unchecked, 0 service down).", "# TYPE relay_tunnel_info gauge"]  # fmt: skip
        for t in live:
            out.append(f'relay_tunnel_info{{client="{esc(t["client"])}",tunnel="{esc(t["name"])}",type="{t["type"]}",'
                       f'group="{esc(t.get("group") or "")}"}} {0 if t["state"] == down else 1}')  # fmt: skip
        out += ["# HELP relay_udp_datagrams_dropped_total Datagrams of udp tunnels dropped (slow path, limits, "
                "refused visitors).", "# TYPE relay_udp_datagrams_dropped_total counter"]  # fmt: skip
        for t in live:
            if "datagrams_dropped" in t:
                labels = f'client="{esc(t["client"])}",tunnel="{esc(t["name"])}"'
                out.append(f"relay_udp_datagrams_dropped_total{{{labels}}} {t['datagrams_dropped']}")
        return "\n".join(out) + "\n"
