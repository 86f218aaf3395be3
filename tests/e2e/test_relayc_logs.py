"""What relayc and relayd log says who ended a session and why: relayc's own SIGTERM is not "closed
by relayd", a refused login is not preceded by "relayd is going away", and a silent peer is "no
answer ... for N s" (the configured keepalive_timeout) on either side."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, spawn, start_relayd


def test_relaycs_own_sigterm_is_not_closed_by_relayd(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "e", "local_port": echo.port, "remote_port": public}]))  # fmt: skip
    c.wait_for(r"tunnel e: relayd port")
    assert c.stop(signal.SIGTERM) == 0
    assert "stopping (SIGTERM)" in c.output
    assert "closed by relayd" not in c.output
    assert "relayc stopped" in c.output
    d.wait_for(r"client lab: relayc is stopping")
    d.wait_for(r"client lab \(127\.0\.0\.1\) disconnected")


def test_a_refused_login_is_not_preceded_by_going_away(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    start_relayd(procs, tmp_path, port)
    bad = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [], auth={"token": "not-the-token-0123456"}))
    bad.wait_for(r"refused the login \(wrong_token\): reconnecting in")
    failure = [i for i, line in enumerate(bad.lines) if re.search(r"login to relayd at .* failed: wrong token", line)]
    assert len(failure) == 1, bad.output  # the reason, once
    before = "\n".join(bad.lines[: failure[0]])
    assert "going away" not in before
    assert "going away" not in bad.output
    assert "closed by relayd" not in bad.output


def test_a_silent_relayd_is_no_answer_for_the_keepalive_timeout(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "e", "local_port": echo.port, "remote_port": public}], keepalive_timeout=2))  # fmt: skip
    c.wait_for(r"tunnel e: relayd port")
    mark = c.mark()
    d.popen.send_signal(signal.SIGSTOP)  # relayd stops answering, its connections stay open
    try:
        c.wait_for(r"session with relayd at 127\.0\.0\.1:\d+ ended: no answer from relayd for 2 s", start=mark)
    finally:
        d.popen.send_signal(signal.SIGCONT)
    assert "closed by relayd" not in c.output
    c.wait_for(r"tunnel e: relayd port", start=mark)  # and it comes back


def test_a_silent_relayc_is_no_answer_in_relayds_log(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, keepalive_timeout=2)
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "e", "local_port": echo.port, "remote_port": public}]))  # fmt: skip
    c.wait_for(r"tunnel e: relayd port")
    c.popen.send_signal(signal.SIGSTOP)
    try:
        d.wait_for(r"client lab \(127\.0\.0\.1\) disconnected: no answer from it for 2 s")
    finally:
        c.popen.send_signal(signal.SIGCONT)
    assert "going away" not in d.output


def test_relayds_own_sigterm_is_said_so_on_both_sides(tmp_path: Path, echo: TcpServer, procs: list[Proc]) -> None:
    port, public = free_port(), free_port()
    d = start_relayd(procs, tmp_path, port)
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [
        {"name": "e", "local_port": echo.port, "remote_port": public}]))  # fmt: skip
    c.wait_for(r"tunnel e: relayd port")
    assert d.stop(signal.SIGTERM) == 0
    assert "client lab (127.0.0.1) disconnected (relayd closed the session)" in d.output
    c.wait_for(r"session with relayd at 127\.0\.0\.1:\d+ ended: connection closed by relayd \(GO_AWAY NORMAL\)")


def test_a_relayd_that_never_answers_is_no_answer_too(tmp_path: Path, procs: list[Proc]) -> None:
    """A fake relayd that accepts and then says nothing at all (no preface, no challenge)."""

    def silent(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass

    fake = TcpServer(silent)
    try:
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, fake.port, [], keepalive_timeout=2,
                                                           tls={"enable": False}))  # fmt: skip
        line = c.wait_for(rf"cannot connect to relayd at 127\.0\.0\.1:{fake.port}: .*").group(0)
        assert "no answer from relayd for 2 s" in line
        assert "closed by relayd" not in c.output
    finally:
        fake.close()
