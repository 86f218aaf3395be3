"""Health checks: relayc probes the local service of each of its tunnels.

``health_check = "tcp"`` connects; ``"http"`` sends ``GET health_check_path`` and wants a status
line below 500.  A probe runs every ``health_check_interval`` seconds, at most one at a time per
tunnel, and fails when it takes over ``health_check_timeout``.  The service is *down* after
``health_check_max_failures`` failures in a row and *up* after one success; relayc tells relayd
(``tunnel_health``) only when that verdict changes (every session is told the verdicts known when it logs in), and
relayd takes a down member out of its group and shows the tunnel as "service down".

A tunnel with no ``health_check`` is probed too, gently: a TCP connect when it is registered and
then every ``IMPLICIT_INTERVAL`` seconds while it answers, every ``health_check_interval`` while
it does not (a connection refused is decisive, so one failure is enough), so the dashboard can
say "service down" for any tunnel.  UDP tunnels are not probed
(nothing answers a connect).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from shared.messages import TunnelHealth
from shared.tunnel import PROBED_KINDS, TunnelSpec

if TYPE_CHECKING:
    from relay_client.client import Relayc, _ClientSession

log = logging.getLogger("relayc")
TICK = 0.5  # how often due probes are looked for
IMPLICIT_INTERVAL = 30  # seconds between the probes of a tunnel with no health_check
STATUS_LINE_MAX = 1024


async def probe(spec: TunnelSpec) -> str:
    """ "" if the local service of ``spec`` answers its health check, else why not."""
    try:
        return await asyncio.wait_for(_probe(spec), spec.health_check_timeout)
    except asyncio.TimeoutError:
        return f"no answer within {spec.health_check_timeout} s"
    except OSError as exc:
        return exc.strerror or str(exc) or exc.__class__.__name__


async def _probe(spec: TunnelSpec) -> str:
    reader, writer = await asyncio.open_connection(spec.local_ip, spec.local_port)
    try:
        if spec.health_check != "http":
            return ""
        host = spec.host_header_rewrite or f"{spec.local_ip}:{spec.local_port}"
        writer.write(f"GET {spec.health_check_path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: relayc-health\r\n"
                     "Connection: close\r\n\r\n".encode())  # fmt: skip
        line = await reader.readline()  # a StreamReader line is bounded by its 64 KiB limit
        parts = line[:STATUS_LINE_MAX].split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return "not an HTTP answer"
        status = int(parts[1])
        return "" if status < 500 else f"HTTP {status} for {spec.health_check_path}"
    except ValueError:  # a line over the reader's limit
        return "not an HTTP answer"
    finally:
        writer.close()


class _State:
    __slots__ = ("due", "error", "failures", "reported", "running", "spec")

    def __init__(self, due: float, spec: TunnelSpec) -> None:
        self.spec = spec  # what is probed: a tunnel replaced (reload, dashboard edit) starts over
        self.due = due
        self.failures = 0
        self.reported: bool | None = None  # the verdict relayd was told
        self.error = ""
        self.running = False


class HealthChecks:
    """The probes of one relayc, for its tunnels; verdicts go to every relayd session (a cluster
    has one per node), and a session that starts is told the verdicts known so far."""

    def __init__(self, relayc: Relayc) -> None:
        self.relayc = relayc
        self.states: dict[str, _State] = {}
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[Any]] = set()

    def report_to(self, session: _ClientSession) -> None:
        """A session logged in: tell it the verdicts known, and make sure probes run."""
        for name, state in self.states.items():
            if state.reported is not None and session.control is not None:
                session.control.send(TunnelHealth(name=name, healthy=state.reported, error=state.error[:1024]))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def tunnel_registered(self, session: _ClientSession, name: str) -> None:
        """relayd registered tunnel ``name`` on ``session``: tell it the verdict known so far (one
        sent before the registration was done is not kept by relayd)."""
        state = self.states.get(name)
        if state is not None and state.reported is not None and session.control is not None:
            session.control.send(TunnelHealth(name=name, healthy=state.reported, error=state.error[:1024]))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._probes):
            task.cancel()
        self.states.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            relayc = self.relayc
            # not a pushed target allow_targets no longer allows (a reload narrowed it)
            specs = {name: spec for name, spec in relayc.tunnels.items()
                     if spec.type in PROBED_KINDS and relayc.tunnel_spec(name) is spec}  # fmt: skip
            for name in [n for n in self.states if n not in specs]:
                del self.states[name]
            for name, spec in specs.items():
                state = self.states.get(name)
                if state is None or state.spec != spec:  # new, or changed: probe it now
                    state = self.states[name] = _State(now, spec)
                if state.running or now < state.due:
                    continue
                state.running = True
                state.due = now + spec.health_check_interval  # (set again by _check for implicit probes)
                task = loop.create_task(self._check(name, spec, state))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            await asyncio.sleep(TICK)

    async def _check(self, name: str, spec: TunnelSpec, state: _State) -> None:
        try:
            error = await probe(spec)
        finally:
            state.running = False
        if self.states.get(name) is not state:
            return  # the tunnel went away meanwhile
        state.failures = state.failures + 1 if error else 0
        if not spec.health_check:  # gently while up, as often as a checked tunnel while down
            gap = spec.health_check_interval if error else IMPLICIT_INTERVAL
            state.due = asyncio.get_running_loop().time() + gap
        if error and spec.health_check and state.failures < spec.health_check_max_failures:
            return
        healthy = not error
        if state.reported is healthy:
            return
        state.reported, state.error = healthy, error
        if healthy:
            log.info("tunnel %s: local service %s:%d is up", name, spec.local_ip, spec.local_port)
        else:
            log.warning("tunnel %s: local service %s:%d is down: %s", name, spec.local_ip, spec.local_port, error)
        for session in self.relayc.logged_in_sessions():
            if session.control is not None:
                session.control.send(TunnelHealth(name=name, healthy=healthy, error=error[:1024]))
