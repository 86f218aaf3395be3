"""The registry over a real SQLite store: lasting counters, the change feed, the dashboard's commands.

Sessions here are small stand-ins with the attributes the registry reads (a control session needs
a TLS connection); the frontend is a real ``Frontend`` that hands out port numbers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay_server import registry as registry_module
from relay_server.frontends.base import Frontend
from relay_server.guard import BlockScope, LoginGuard
from relay_server.registry import ClientOnline, Registry, TunnelOpened
from relay_server.stores.sqlite import SqliteStore
from relay_server.tunnels import PublicTunnel
from shared.burst import BurstLog
from shared.config import ServerConfig, parse_config
from shared.errors import Conflict, InvalidField, NotFound, TunnelRefusal, TunnelRefused
from shared.tunnel import TunnelKind, TunnelSpec
from tests.waiting import wait_until_async


class Numbered(Frontend):
    """Claims every tcp tunnel: its remote_port, or the next number."""

    kind = TunnelKind.TCP

    def __init__(self) -> None:
        self.next = 7000
        self.released: list[tuple[str, bool]] = []

    async def claim(self, tunnel: PublicTunnel) -> str:
        if tunnel.spec.remote_port == 1:
            raise TunnelRefused(TunnelRefusal.PORT_TAKEN, "port 1 is taken")
        self.next += 1
        tunnel.port = tunnel.spec.remote_port or self.next
        return f"127.0.0.1:{tunnel.port}"

    def release(self, tunnel: PublicTunnel, client_gone: bool) -> None:
        self.released.append((tunnel.name, client_gone))


class Session:
    def __init__(self, name: str, token: str = "shared-token-0123456789") -> None:
        self.name, self.remote_addr, self.version = name, "127.0.0.1", "test"
        self.ready, self.token_used = True, token
        self.tunnels: dict[str, PublicTunnel] = {}
        self.refusals: dict[str, tuple[TunnelRefusal, str]] = {}
        self.pushed: dict[str, TunnelSpec] = {}
        self.sent: list[tuple[str, str]] = []
        self.ended: list[int] = []
        self.mux, self.bucket, self.visitors_open = None, None, 0

    def backlog(self) -> int:
        return 0

    def push(self, spec: TunnelSpec) -> None:
        self.pushed[spec.name] = spec
        self.sent.append(("push", spec.name))

    def unpush(self, name: str) -> None:
        self.pushed.pop(name, None)
        self.sent.append(("remove", name))

    def end(self, code: int) -> None:
        self.ended.append(code)

    def remember_refusal(self, name: str, reason: TunnelRefusal, text: str) -> None:
        self.refusals[name] = (reason, text)


def config(tmp_path: Path) -> ServerConfig:
    return parse_config(ServerConfig, {"state_dir": str(tmp_path), "auth": {"token": "shared-token-0123456789"}},
                        str(tmp_path / "relayd.toml"))  # fmt: skip


async def make_registry(tmp_path: Path) -> tuple[Registry, SqliteStore, Numbered]:
    store = SqliteStore(tmp_path / "relayd.db")
    await store.open()
    guard = LoginGuard(BlockScope.RELAYC, window=60, block_after=5, block_seconds=60)
    reg = Registry(config(tmp_path), store, guard, BurstLog(registry_module.log))
    frontend = Numbered()
    reg.add_frontend(frontend)
    await reg.load()
    return reg, store, frontend


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[Registry, SqliteStore, Numbered]]:
    reg, store, frontend = await make_registry(tmp_path)
    yield reg, store, frontend
    await reg.close()
    await store.close()


def spec(name: str, **kw: Any) -> TunnelSpec:
    return TunnelSpec.parse({"name": name, "local_port": 22, **kw})


async def test_counters_last_across_incarnations_and_restarts(tmp_path: Path) -> None:
    reg, store, _ = await make_registry(tmp_path)
    events: list[Any] = []
    reg.subscribe(events.append)
    lab = Session("lab")
    reg.register(lab)  # type: ignore[arg-type]
    first = await reg.open_tunnel(lab, spec("ssh"))  # type: ignore[arg-type]
    assert first is not None and lab.tunnels == {"ssh": first} and first.public == f"127.0.0.1:{first.port}"
    first.counters.bytes_in += 1000
    first.counters.conns_total += 1
    reg.close_tunnel(lab.tunnels.pop("ssh"), client_gone=True)  # the client went away
    second = await reg.open_tunnel(lab, spec("ssh"))  # type: ignore[arg-type]
    assert second is not None and second.counters is first.counters  # it goes on counting
    second.counters.bytes_in += 500
    assert [type(e) for e in events[:2]] == [ClientOnline, TunnelOpened]
    await reg.flush_traffic()
    await reg.close()
    await store.close()
    reg, store, _ = await make_registry(tmp_path)  # relayd restarted
    try:
        (item,) = [t for t in reg.client_items() if t["name"] == "lab"] or [None]
        assert item is None  # not a dashboard client and not online: no client item...
        reg.register(Session("lab"))  # type: ignore[arg-type]
        (item,) = reg.client_items()
        assert (item["bytes_in"], item["conns_total"]) == (1500, 1)  # ...but its totals were kept
        third = await reg.open_tunnel(reg.sessions["lab"], spec("ssh"))
        assert third is not None and third.counters.bytes_in == 1500
    finally:
        await reg.close()
        await store.close()


async def test_lasting_counters_are_bounded_per_client(parts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reg, _, _ = parts
    monkeypatch.setattr(registry_module, "TOTALS_PER_CLIENT", 4)
    hostile = Session("hostile")
    reg.register(hostile)
    for i in range(20):  # tunnel names made up one after the other
        tunnel = await reg.open_tunnel(hostile, spec(f"t{i}"))
        assert tunnel is not None
        reg.close_tunnel(hostile.tunnels.pop(tunnel.name), client_gone=False)
    assert set(reg._lasting.by_key) == {("hostile", f"t{i}") for i in (16, 17, 18, 19)}  # the newest kept


async def test_refused_tunnels_leave_no_counter_and_the_total_bound_holds(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, _, _ = parts
    monkeypatch.setattr(registry_module, "TOTALS_KEPT", 10)
    record = await reg.create_client("lab")  # a dashboard client whose tunnel's totals can never go
    lab = Session("lab", token=record.token)
    reg.register(lab)
    await reg.define_tunnel({"client": "lab", "name": "web", "local_port": 80})
    await wait_until_async(lambda: "web" in lab.pushed, 5, "the push")
    tunnel = await reg.open_tunnel(lab, spec("web"))
    reg.close_tunnel(lab.tunnels.pop("web"), client_gone=True)
    assert tunnel is not None and ("lab", "web") in reg._lasting.by_key
    for i in range(30):  # shared-token names, one tunnel each: refused, then one that opens
        s = Session(f"n{i}")
        reg.register(s)
        with pytest.raises(TunnelRefused):
            await reg.open_tunnel(s, spec("x", remote_port=1))
        opened = await reg.open_tunnel(s, spec("y"))
        assert opened is not None
        reg.close_tunnel(s.tunnels.pop("y"), client_gone=True)
    assert len(reg._lasting) == 10 and ("lab", "web") in reg._lasting.by_key
    assert not any(t == "x" for _, t in reg._lasting.by_key)


async def test_deleting_a_live_dashboard_tunnel_drops_its_totals(parts: Any) -> None:
    reg, store, _ = parts
    record = await reg.create_client("lab")
    lab = Session("lab", token=record.token)
    reg.register(lab)
    await reg.define_tunnel({"client": "lab", "name": "web", "local_port": 80})
    await wait_until_async(lambda: "web" in lab.pushed, 5, "the push")
    tunnel = await reg.open_tunnel(lab, spec("web"))
    assert tunnel is not None
    tunnel.counters.bytes_in += 100
    await reg.flush_traffic()
    assert ("lab", "web") in await store.totals()
    lab.unpush = lambda name: reg.close_tunnel(lab.tunnels.pop(name), client_gone=False)  # as a session does
    await reg.delete_tunnel("lab", "web")
    await wait_until_async(lambda: ("lab", "web") not in reg._lasting.by_key, 5, "the totals to go")
    await reg.flush_traffic()
    assert ("lab", "web") not in await store.totals()


class SlowStore(SqliteStore):
    """A store whose record is committed but not yet acknowledged when relayd shuts down."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committed = asyncio.Event()

    async def record_traffic(self, minute: int, deltas: list[Any]) -> None:
        await super().record_traffic(minute, deltas)
        self.committed.set()
        await asyncio.sleep(0.2)


async def test_a_shutdown_during_a_flush_records_nothing_twice(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "relayd.db")
    await store.open()
    guard = LoginGuard(BlockScope.RELAYC, window=60, block_after=5, block_seconds=60)
    reg = Registry(config(tmp_path), store, guard, BurstLog(registry_module.log))
    reg.add_frontend(Numbered())
    await reg.load()
    lab = Session("lab")
    reg.register(lab)
    tunnel = await reg.open_tunnel(lab, spec("ssh"))
    assert tunnel is not None
    tunnel.counters.bytes_in += 1000

    async def periodic() -> None:  # what record_traffic_forever does each minute
        await asyncio.shield(reg.flush_traffic())

    task = asyncio.create_task(periodic())
    await asyncio.wait_for(store.committed.wait(), 10)
    task.cancel()  # shutdown cancels the loop that runs it...
    await reg.flush_traffic()  # ...and flushes once more
    assert (await store.totals())[("lab", "ssh")].bytes_in == 1000
    await reg.close()
    await store.close()


async def test_refusals_are_typed_and_remembered(parts: Any) -> None:
    reg, _, _ = parts
    lab = Session("lab")
    reg.register(lab)
    with pytest.raises(TunnelRefused) as info:
        await reg.open_tunnel(lab, spec("x", remote_port=1))
    assert info.value.reason is TunnelRefusal.PORT_TAKEN
    reg.refused(lab, "x", info.value.reason, str(info.value))
    (item,) = [t for t in reg.tunnel_items() if t["name"] == "x"]
    assert (
        item["state"] == "refused" and item["reason"] == "port_taken" and item["status"] == "refused: port 1 is taken"
    )


async def test_dashboard_commands_check_once_and_act_through_the_change_feed(parts: Any) -> None:
    reg, _, _ = parts
    with pytest.raises(NotFound):
        await reg.define_tunnel({"client": "lab", "name": "web", "local_port": 80})
    record = await reg.create_client("lab")
    lab = Session("lab", token=record.token)
    reg.register(lab)
    with pytest.raises(InvalidField) as bad:
        await reg.define_tunnel({"client": "lab", "name": "web", "local_port": 80, "locl_port": 1})
    assert bad.value.key == "locl_port"
    await reg.define_tunnel({"client": "lab", "name": "ssh", "local_port": 22, "remote_port": 6000,
                             "max_connections": 3})  # fmt: skip
    with pytest.raises(Conflict, match="port 6000 is already used by client 'lab' tunnel 'ssh'"):
        await reg.define_tunnel({"client": "lab", "name": "ssh2", "local_port": 22, "remote_port": 6000})
    await wait_until_async(lambda: ("push", "ssh") in lab.sent, 5, "the defined tunnel to be pushed")
    assert lab.pushed["ssh"].max_connections == 3
    await reg.set_tunnel_enabled("lab", "ssh", False)
    await wait_until_async(lambda: ("remove", "ssh") in lab.sent, 5, "the disabled tunnel to be removed")
    await reg.rotate_token("lab")
    await wait_until_async(lambda: lab.ended, 5, "the session of the old token to end")


async def test_a_cluster_shows_traffic_summed_over_nodes(tmp_path: Path) -> None:
    """Two registries on one store that says it is shared (two nodes): each counts its own
    visitors; after they record, each shows the sum (plus what it has not recorded yet)."""
    node_a, store, _ = await make_registry(tmp_path)
    store.shared = True  # type: ignore[misc]
    node_b = Registry(config(tmp_path), store, LoginGuard(BlockScope.RELAYC), BurstLog(registry_module.log))
    node_b.add_frontend(Numbered())
    await node_b.load()
    try:
        tunnels = []
        for reg in (node_a, node_b):
            lab = Session("lab")
            reg.register(lab)  # type: ignore[arg-type]
            tunnel = await reg.open_tunnel(lab, spec("ssh", remote_port=6000))  # type: ignore[arg-type]
            assert tunnel is not None
            tunnels.append(tunnel)
        tunnels[0].counters.bytes_in += 1000
        tunnels[1].counters.bytes_in += 500
        for reg in (node_a, node_b):
            await reg.flush_traffic()
        tunnels[1].counters.bytes_in += 7  # not recorded yet: node B adds it to what it shows
        for reg, expected in ((node_a, 1500), (node_b, 1507)):
            await reg.refresh_cluster_totals()
            item = next(t for t in reg.tunnel_items() if t["name"] == "ssh")
            assert item["bytes_in"] == expected
    finally:
        await node_b.close()
        await node_a.close()
        await store.close()
