"""relayc reads its config again without a restart, on SIGHUP and when the file changes: tunnels
added are registered, removed ones closed on relayd (``tunnel_remove``), unchanged ones keep their
visitors' connections; visitor ports follow; an invalid config keeps the running one and the log
names the file and the key; what needs a restart is said so."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from shared.messages import TunnelAdd, TunnelRemove, TunnelStatus, encode_message
from shared.tunnel import TunnelSpec
from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    closed_by_peer,
    free_port,
    port_refuses,
    relayc_config,
    round_trip,
    spawn,
    start_relayd,
    wait_port_serves,
)
from tests.e2e.rawclient import RawClient
from tests.waiting import wait_until


def echoes(conn: socket.socket, data: bytes) -> bool:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == data


def test_sighup_adds_and_removes_tunnels_and_unchanged_ones_keep_their_connections(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, p1, p2 = free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    a = {"name": "a", "local_port": echo.port, "remote_port": p1}
    b = {"name": "b", "local_port": echo.port, "remote_port": p2}
    cfg = relayc_config(tmp_path, port, [a])
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(rf"tunnel a: relayd port {p1}")
    with socket.create_connection(("127.0.0.1", p1), timeout=10) as visitor:
        assert echoes(visitor, b"before the reload")
        mark = c.mark()
        relayc_config(tmp_path, port, [a, b])
        c.popen.send_signal(signal.SIGHUP)
        c.wait_for(r"reloaded .*relayc\.toml \(SIGHUP\): added b", start=mark)
        c.wait_for(rf"tunnel b: relayd port {p2}", start=mark)
        wait_port_serves(p2)
        assert echoes(visitor, b"after the reload: a was not touched")  # the same connection
        assert d.output.count("client lab tunnel a (tcp)") == 1  # a was not registered again
        assert c.popen.poll() is None
        # a goes: its port closes on relayd, its visitor is let go; b goes on
        mark = c.mark()
        relayc_config(tmp_path, port, [b])
        c.popen.send_signal(signal.SIGHUP)
        c.wait_for(r"reloaded .*\(SIGHUP\): removed a", start=mark)
        d.wait_for(r"client lab tunnel a: removed by the client")
        wait_until(lambda: port_refuses(p1), 10, f"port {p1} of the removed tunnel to refuse")
        assert closed_by_peer(visitor, timeout=10)
    assert round_trip(p2, b"b still serves") == b"b still serves"
    assert "closed by relayd" not in c.output
    assert "logged in to relayd" in c.output and c.output.count("logged in to relayd") == 1  # no reconnect


def test_a_changed_config_file_is_reloaded_without_a_signal(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, p1, p2 = free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    cfg = relayc_config(tmp_path, port, [{"name": "a", "local_port": echo.port, "remote_port": p1}])
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(rf"tunnel a: relayd port {p1}")
    mark = c.mark()
    # a changed tunnel (another public port) is replaced
    relayc_config(tmp_path, port, [{"name": "a", "local_port": echo.port, "remote_port": p2}])
    c.wait_for(r"reloaded .*relayc\.toml \(relayc\.toml changed\): replaced a", start=mark)
    c.wait_for(rf"tunnel a: relayd port {p2}", start=mark)
    wait_port_serves(p2)
    wait_until(lambda: port_refuses(p1), 10, f"the old port {p1} of the replaced tunnel to refuse")


def test_an_invalid_config_on_reload_keeps_the_old_one_and_names_file_and_key(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, p1, p2 = free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    a = {"name": "a", "local_port": echo.port, "remote_port": p1}
    cfg = relayc_config(tmp_path, port, [a])
    c = spawn(procs, "relay_client.cli", cfg)
    c.wait_for(rf"tunnel a: relayd port {p1}")
    mark = c.mark()
    relayc_config(tmp_path, port, [a, {"name": "b", "local_port": 0, "remote_port": p2}])
    c.popen.send_signal(signal.SIGHUP)
    line = c.wait_for(r"ERROR .*configuration error: .*", start=mark).group(0)
    assert f"{cfg}: tunnels[1].local_port" in line
    assert "keeps running with the configuration it had" in line
    wait_port_serves(p1)
    assert port_refuses(p2)
    assert c.popen.poll() is None
    # fixed, and with a change only a restart can apply: said so, the rest applied
    mark = c.mark()
    relayc_config(tmp_path, port, [a, {"name": "b", "local_port": echo.port, "remote_port": p2}],
                  keepalive_timeout=12)  # fmt: skip
    c.popen.send_signal(signal.SIGHUP)
    c.wait_for(r"reloaded .*: added b", start=mark)
    c.wait_for(r"keepalive_timeout changed: that needs a restart of relayc", start=mark)
    wait_port_serves(p2)
    wait_port_serves(p1)


def test_visitor_ports_follow_a_reload(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, visit_port = free_port(), free_port()
    start_relayd(procs, tmp_path, port)
    key = "a-visitor-key-0123456789"
    keyed = {"name": "keyed", "type": "secret", "local_port": echo.port, "secret_key": key}
    lab = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [keyed], filename="lab.toml"))
    lab.wait_for(r"tunnel keyed: secret")
    laptop_cfg = relayc_config(tmp_path, port, [], filename="laptop.toml", name="laptop")
    laptop = spawn(procs, "relay_client.cli", laptop_cfg)
    laptop.wait_for(r"logged in to relayd")
    visitor = {"client": "lab", "tunnel": "keyed", "secret_key": key, "bind_port": visit_port}
    relayc_config(tmp_path, port, [], filename="laptop.toml", name="laptop", visitors=[visitor])
    laptop.popen.send_signal(signal.SIGHUP)
    laptop.wait_for(rf"visitor lab/keyed: listening on 127\.0\.0\.1:{visit_port}")
    assert round_trip(visit_port, b"through the new visitor port") == b"through the new visitor port"
    relayc_config(tmp_path, port, [], filename="laptop.toml", name="laptop")
    laptop.popen.send_signal(signal.SIGHUP)
    laptop.wait_for(r"reloaded .*visitors stopped lab/keyed")
    wait_until(lambda: port_refuses(visit_port), 10, "the removed visitor port to refuse")


def test_relayd_takes_a_tunnel_remove_in_order_and_strictly(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    raw = RawClient(port)
    try:
        assert raw.login(TOKEN)
        add = encode_message(TunnelAdd(tunnel=TunnelSpec.parse({"name": "t", "local_port": echo.port,
                                                                 "remote_port": public})))  # fmt: skip
        # an add, its remove, a remove of a name never added (no error), the add again: in order
        raw.session.send_data(1, add + encode_message(TunnelRemove(name="t")) +
                              encode_message(TunnelRemove(name="never-added")) + add)  # fmt: skip
        raw.flush()
        answers = [raw.control_message(), raw.control_message()]
        assert all(isinstance(a, TunnelStatus) and a.ok and a.remote_port == public for a in answers), answers
        d.wait_for(r"client raw tunnel t: removed by the client")
        assert not port_refuses(public)  # listening again (this raw client joins no visitor, though)
        raw.session.send_data(1, encode_message(TunnelRemove(name="t")))
        raw.flush()
        wait_until(lambda: port_refuses(public), 10, f"port {public} to close after tunnel_remove")
        # a name no tunnel could have is a protocol error: the session ends
        raw.session.send_data(1, encode_message(TunnelRemove(name="not a/name")))
        raw.flush()
        assert raw.closed_by_server()
        d.wait_for(r"bad tunnel_remove message: field name")
    finally:
        raw.close()
