"""``relayc status``: the running relayc answers, over a 0600 unix socket in its state_dir, what each
tunnel is doing (state, public address, connections, bytes), as a table or JSON; exit 1 when no
relayc runs for the config (no socket, or a stale one), 2 for a bad config."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from relay_client import status as status_module
from tests.e2e.harness import (
    Proc,
    TcpServer,
    free_port,
    relayc_config,
    spawn,
    start_relayd,
)
from tests.waiting import wait_until


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay_client.cli", "status", "-c", str(config), *extra],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def status_json(config: Path) -> dict[str, Any]:
    done = status(config, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert isinstance(answer, dict)
    return answer


def tunnel(answer: dict[str, Any], name: str) -> dict[str, Any]:
    found = [t for t in answer["tunnels"] if t["name"] == name]
    assert found, answer
    return found[0]


def test_status_shows_each_tunnel_with_a_visitors_connections_and_bytes(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public, dead_port = free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    tunnels = [
        {"name": "echo", "local_port": echo.port, "remote_port": public},
        {"name": "low", "local_port": echo.port, "remote_port": 1000},  # outside relayd's allow_ports
        {"name": "gone", "local_port": dead_port, "health_check": "tcp", "health_check_interval": 1,
         "health_check_max_failures": 1},
    ]  # fmt: skip
    cfg = relayc_config(tmp_path, port, tunnels)
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(rf"tunnel echo: relayd port {public}")
    with socket.create_connection(("127.0.0.1", public), timeout=10) as visitor:
        visitor.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += visitor.recv(4096)
        answers: list[dict[str, Any]] = []

        def counted() -> bool:
            answers.append(status_json(cfg))
            t = tunnel(answers[-1], "echo")
            return t["conns_open"] == 1 and t["bytes_in"] == 1000 and t["bytes_out"] == 1000

        wait_until(counted, 15, lambda: f"the visitor's connection and bytes in {answers[-1:]}", interval=0.2)
        answer = answers[-1]
        assert answer["client"] == "lab"
        assert [(n["addr"], n["connected"]) for n in answer["nodes"]] == [(f"127.0.0.1:{port}", True)]
        assert isinstance(answer["nodes"][0]["since"], float)
        echo_t = tunnel(answer, "echo")
        assert echo_t["type"] == "tcp"
        assert echo_t["state"] == "active"
        assert echo_t["public"] == f"127.0.0.1:{public}"
        assert echo_t["conns_total"] == 1
        assert echo_t["error"] == ""
        assert set(echo_t) >= {"name", "type", "state", "public", "conns_open", "conns_total", "bytes_in",
                               "bytes_out", "error"}  # fmt: skip
        low = tunnel(answer, "low")
        assert low["state"] == "refused"
        assert "1000" in low["error"]

        # the table: one line per tunnel, by name
        wait_until(lambda: tunnel(status_json(cfg), "gone")["state"] == "service down", 15, "gone's health check")
        table = status(cfg)
        assert table.returncode == 0, table.stderr
        lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.split()}
        assert lines["TUNNEL"].split() == ["TUNNEL", "TYPE", "PUBLIC", "OPEN", "TOTAL", "BYTES_IN", "BYTES_OUT",
                                           "STATE"]  # fmt: skip
        assert lines["echo"].split() == ["echo", "tcp", f"127.0.0.1:{public}", "1", "1", "1000", "1000", "active"]
        assert "refused: " in lines["low"]
        assert "service down" in lines["gone"]
        assert f"relayd 127.0.0.1:{port}: connected since" in table.stdout
    # the visitor left: no connection open, one in all
    wait_until(lambda: tunnel(status_json(cfg), "echo")["conns_open"] == 0, 15, "the visitor's connection to close")
    assert tunnel(status_json(cfg), "echo")["conns_total"] == 1


def test_status_exits_1_when_no_relayc_runs_and_2_for_a_bad_config(tmp_path: Path) -> None:
    cfg = relayc_config(tmp_path, free_port(), [{"name": "e", "local_port": 22}])
    done = status(cfg)
    assert done.returncode == 1
    sock = tmp_path / "relayc.sock"
    assert f"no relayc is running for {cfg} (no socket at {sock})" in done.stderr
    assert done.stdout == ""
    # a socket left by a relayc that crashed: nobody accepts on it
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))
    done = status(cfg, "--json")
    assert done.returncode == 1
    assert f"no relayc is running for {cfg}" in done.stderr
    assert "connection refused" in done.stderr
    bad = relayc_config(tmp_path, free_port(), [{"name": "e", "local_port": 0}], filename="bad.toml")
    done = status(bad)
    assert done.returncode == 2
    assert "configuration error" in done.stderr
    assert "tunnels[0].local_port" in done.stderr


def test_status_socket_is_the_owners_only_replaces_a_stale_one_and_goes_at_exit(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    state = tmp_path / "state-of-relayc"
    state.mkdir()
    sock = state / "relayc.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # from a relayc that crashed
        stale.bind(str(sock))
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = relayc_config(conf, port, [{"name": "e", "local_port": echo.port, "remote_port": public}],
                        state_dir=str(state))  # fmt: skip
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(r"tunnel e: relayd port")
    c.wait_for(r"status: answering")
    mode = sock.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert not (conf / "relayc.sock").exists()
    assert tunnel(status_json(cfg), "e")["state"] == "active"
    # another config in the same folder has a socket of its own
    other = relayc_config(conf, port, [], filename="other.toml", name="other", state_dir=str(state))
    assert "no socket at" in status(other).stderr
    assert c.stop(signal.SIGTERM) == 0
    assert not sock.exists()
    done = status(cfg)
    assert done.returncode == 1
    assert "no relayc is running" in done.stderr


async def test_the_status_server_reads_one_bounded_request_within_a_time(tmp_path: Path, monkeypatch: Any) -> None:
    """A request over REQUEST_MAX bytes, or none within REQUEST_TIMEOUT, is closed unanswered; one
    that is not a status request gets an error; a status request the snapshot."""
    monkeypatch.setattr(status_module, "REQUEST_TIMEOUT", 0.5)
    path = tmp_path / "relayc.sock"
    server = status_module.StatusServer(path, lambda: {"client": "unit"})
    assert await server.start()

    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    try:
        assert await exchange(b"x" * (status_module.REQUEST_MAX + 10) + b"\n") == b""
        assert await exchange(b"") == b""  # nothing sent: closed after the timeout
        assert json.loads(await exchange(b'{"request": "secrets"}\n'))["error"].startswith("unknown request")
        assert json.loads(await exchange(b'{"request": "status"}\n')) == {"client": "unit"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        server.close()
    assert not path.exists()


def test_status_counts_udp_flows_and_datagrams(tmp_path: Path, procs: list[Proc]) -> None:
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.bind(("127.0.0.1", 0))

    def echo_datagrams() -> None:
        while True:
            try:
                data, addr = service.recvfrom(65536)
            except OSError:
                return
            service.sendto(data + b"!", addr)

    threading.Thread(target=echo_datagrams, daemon=True).start()
    port, public = free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    cfg = relayc_config(tmp_path, port, [{"name": "u", "type": "udp", "local_port": service.getsockname()[1],
                                          "remote_port": public}])  # fmt: skip
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(r"tunnel u: 127\.0\.0\.1:\d+/udp")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as visitor:
            visitor.settimeout(5)
            for _ in range(3):
                visitor.sendto(b"datagram", ("127.0.0.1", public))
                assert visitor.recvfrom(100)[0] == b"datagram!"
            u = tunnel(status_json(cfg), "u")
            assert (u["type"], u["state"], u["public"]) == ("udp", "active", f"127.0.0.1:{public}/udp")
            assert (u["conns_open"], u["conns_total"], u["bytes_in"], u["bytes_out"]) == (1, 1, 24, 27)
    finally:
        service.close()
