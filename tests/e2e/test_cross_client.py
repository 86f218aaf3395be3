"""Rules between clients, against real relayd and relayc processes: who owns a domain, who keeps a
name, and whose failed logins block whom."""

from __future__ import annotations

import json
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from shared.messages import LoginFailed, LoginOk
from tests.e2e.harness import (
    TOKEN,
    Proc,
    TcpServer,
    free_port,
    relayc_config,
    spawn,
    start_relayd,
    start_tunnel,
    wait_port_serves,
)
from tests.e2e.rawclient import RawClient
from tests.e2e.test_vhost import get, start_app


def login_answer(port: int, name: str, token: str, source_ip: str = "127.0.0.1") -> Any:
    """Log in by hand and return relayd's answer (LoginOk or LoginFailed, None if it closed)."""
    client = RawClient(port, source_ip=source_ip)
    try:
        return client.login_answer(token, name)
    finally:
        client.close()


def test_a_domain_belongs_to_the_client_that_registered_it_first(tmp_path: Path, procs: list[Proc]) -> None:
    port, http_port, https_port = free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port, vhost_http_port=http_port, vhost_https_port=https_port,
                 subdomain_host="relay.test")  # fmt: skip
    app, other = start_app("alice-app"), start_app("mallory-app")
    try:
        alice = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
            {"name": "nb", "type": "http", "local_port": app.server_port, "subdomain": "nb"},
            # alice may split her own domain by locations
            {"name": "api", "type": "http", "local_port": other.server_port, "subdomain": "nb",
             "locations": ["/api"]},
        ], name="alice"))  # fmt: skip
        alice.wait_for(r"tunnel api: http")
        attempts = [
            {"name": "loc", "type": "http", "local_port": other.server_port, "subdomain": "nb",
             "locations": ["/evil/longer/path"]},  # another location on her domain
            {"name": "spelled", "type": "http", "local_port": other.server_port,
             "custom_domains": ["NB.Relay.Test."]},  # her subdomain, as a custom domain, case and dot folded
            {"name": "tls", "type": "https", "local_port": other.server_port, "custom_domains": ["nb.relay.test"]},
        ]  # fmt: skip
        mallory = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, attempts, filename="m.toml",
                                                                  name="mallory"))  # fmt: skip
        for t in attempts:
            mallory.wait_for(rf"tunnel {t['name']} refused by relayd: domain nb\.relay\.test belongs to client "
                             r"'alice'")  # fmt: skip
        for path, app_name in (("/", "alice-app"), ("/evil/longer/path", "alice-app"), ("/api/x", "mallory-app")):
            status, _, body = get(http_port, "nb.relay.test", path)
            assert status == 200 and json.loads(body)["app"] == app_name
        # nothing for mallory on the https port either: the name is not routed, the connection closes
        ctx = ssl.create_default_context()
        with (
            socket.create_connection(("127.0.0.1", https_port), timeout=5) as raw,
            pytest.raises((ssl.SSLError, ConnectionResetError, OSError)),
        ):
            ctx.wrap_socket(raw, server_hostname="nb.relay.test").recv(10)
        # alice drops off the network: her domain stays hers while she is away
        alice.stop(signal.SIGKILL)
        grab = [{"name": "grab", "type": "http", "local_port": other.server_port, "subdomain": "nb"}]
        thief = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, grab, filename="t.toml", name="thief"))
        thief.wait_for(r"tunnel grab refused by relayd: domain nb\.relay\.test belongs to client 'alice' \(offline")
        assert get(http_port, "nb.relay.test")[0] == 502
    finally:
        app.shutdown()
        other.shutdown()


def test_a_second_relayc_with_a_live_name_is_refused_and_a_dead_one_is_replaced(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, p1, p2, p3 = free_port(), free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    first = start_tunnel(procs, tmp_path, port, "one", echo.port, p1)
    mark = d.mark()
    second = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "two", "local_port": echo.port, "remote_port": p2}], filename="second.toml"))  # fmt: skip
    second.wait_for(r"login to relayd at 127\.0\.0\.1:\d+ failed: client name 'lab' is in use by a live session "
                    r"from 127\.0\.0\.1, logged in at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # fmt: skip
    second.wait_for(r"relayd refused the login \(name_in_use\): reconnecting in (4[89]|[5-6]\d|7[0-2]) s")
    d.wait_for(r"login refused: client 'lab' from 127\.0\.0\.1: the name is in use by a live session", start=mark)
    wait_port_serves(p1)  # the first one never flapped
    assert "client lab (127.0.0.1) disconnected" not in d.output
    # the lab machine freezes (as if it lost power: no FIN, no answers): a newcomer takes over at once
    first.popen.send_signal(signal.SIGSTOP)
    try:
        third = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
            {"name": "three", "local_port": echo.port, "remote_port": p3}], filename="third.toml"))  # fmt: skip
        third.wait_for(r"tunnel three: relayd port", timeout=15)
        d.wait_for(r"client lab: a new session from 127\.0\.0\.1 replaces the one from 127\.0\.0\.1", start=mark)
        wait_port_serves(p3)
    finally:
        first.popen.send_signal(signal.SIGCONT)


def test_a_wrong_token_behind_a_shared_address_does_not_lock_out_the_others(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, auth={"token": TOKEN, "block_after_failures": 3, "failure_window": 60,
                                                   "block_seconds": 60})  # fmt: skip
    # a misconfigured relayc on the campus NAT (127.0.0.1 here) says why, and backs off
    bad = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [], filename="bad.toml", name="broken",
                                                          auth={"token": "not-the-token-at-all"}))  # fmt: skip
    bad.wait_for(r"failed: wrong token \(check auth\.token against relayd\.toml\)")
    bad.wait_for(r"relayd refused the login \(wrong_token\): reconnecting in ([89]|1[0-2]) s")
    # another one (by hand, to control the pace): plainly refused, then blocked with the time it ends
    answers = [login_answer(port, "typo", "still-wrong") for _ in range(3)]
    assert all(isinstance(a, LoginFailed) for a in answers)
    assert [a.reason for a in answers[:2]] == ["wrong token"] * 2
    assert answers[2].reason.startswith("wrong token, blocked until ") and answers[2].code == "blocked"
    blocked = login_answer(port, "typo", TOKEN)  # blocked: not even the right token is checked
    assert isinstance(blocked, LoginFailed) and blocked.code == "blocked" and 0 < blocked.retry_after <= 60
    d.wait_for(r"login: client 'typo' from 127\.0\.0\.1 blocked for 60 s after 3 failed logins")
    # the good ones behind the same address keep logging in and reconnecting
    good_config = relayc_config(tmp_path, port, [{"name": "e", "local_port": echo.port, "remote_port": public}],
                                filename="good.toml", name="good")  # fmt: skip
    for _ in range(2):  # logs in, and logs in again after a crash
        good = spawn(procs, "relay_client.cli", good_config)
        good.wait_for(r"tunnel e: relayd port")
        wait_port_serves(public)
        good.stop(signal.SIGKILL)
    assert isinstance(login_answer(port, "another", TOKEN), LoginOk)


def test_a_scanner_naming_several_clients_is_dropped_before_tls(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, auth={"token": TOKEN, "block_after_failures": 4, "failure_window": 60,
                                                   "block_seconds": 60})  # fmt: skip
    for name in ("root", "admin", "lab", "gpu"):
        assert isinstance(login_answer(port, name, "guess", source_ip="127.0.0.3"), LoginFailed)
    d.wait_for(r"login: address 127\.0\.0\.3 blocked for 60 s: its failed logins name several clients")
    with pytest.raises((ConnectionResetError, ssl.SSLError, OSError)):
        RawClient(port, source_ip="127.0.0.3")  # closed before the TLS handshake
    start_tunnel(procs, tmp_path, port, "e", echo.port, public)  # other addresses are unaffected
    wait_port_serves(public)
