"""Secret tunnels end to end: no public port; a laptop's relayc reaches the lab's service through
a ``[[visitors]]`` port or ``relayc connect`` (stdin/stdout), allowed by name or by secret_key;
everyone else is refused clearly.  Then ssh and scp through ``relayc connect`` as ProxyCommand,
to a real sshd, bytes hash-checked."""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ssh_reverse import SshReverse, available
from tests.e2e.harness import (
    Proc,
    TcpServer,
    closed_by_peer,
    free_port,
    relayc_config,
    round_trip,
    spawn,
)
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import Api, start_relayd

SECRET_KEY = "a-visitor-key-0123456789"
PAYLOAD = os.urandom(1 << 20)


def connect(config: Path, target: str, data: bytes, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``relayc connect -c config target`` with ``data`` on stdin."""
    return subprocess.run([sys.executable, "-m", "relay_client.cli", "connect", "-c", str(config), target],
                          input=data, capture_output=True, timeout=timeout, cwd=config.parent)  # fmt: skip


def own_token(dash: int, name: str) -> str:
    """A client made in the dashboard, with a token of its own: only such a name counts for
    allow_visitors (relayd's shared token lets anyone log in under any name)."""
    status, body, _ = Api(dash).call("POST", "/api/v1/clients", {"name": name})
    assert status == 201, body
    return str(body["token"])


def start_lab(procs: list[Proc], tmp: Path, port: int, target: int) -> Proc:
    tunnels = [
        {"name": "echo", "type": "secret", "local_port": target, "allow_visitors": ["laptop", "impostor"]},
        {"name": "keyed", "type": "secret", "local_port": target, "secret_key": SECRET_KEY},
    ]
    lab = spawn(procs, "relay_client.cli", relayc_config(tmp, port, tunnels, filename="lab.toml"))
    lab.wait_for(r"tunnel echo: secret \(visitors laptop, impostor\)")
    lab.wait_for(r"tunnel keyed: secret \(secret_key\)")
    return lab


def test_visitors_reach_a_secret_tunnel_and_others_are_refused(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, dash = free_port(), free_port()
    by_name, by_key, wrong_key, missing = free_port(), free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, dash)
    start_lab(procs, tmp_path, port, echo.port)
    visitors = [
        {"client": "lab", "tunnel": "echo", "bind_port": by_name},
        {"client": "lab", "tunnel": "keyed", "secret_key": SECRET_KEY, "bind_port": by_key},
        {"client": "lab", "tunnel": "keyed", "secret_key": "not-the-key", "bind_port": wrong_key},
        {"client": "lab", "tunnel": "nope", "bind_port": missing},
    ]
    token = own_token(dash, "laptop")
    laptop = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [], filename="laptop.toml", name="laptop",
                                                            visitors=visitors, auth={"token": token}))  # fmt: skip
    laptop.wait_for(r"logged in to relayd")
    laptop.wait_for(rf"visitor lab/nope: listening on 127\.0\.0\.1:{missing}")
    # by name and by key: the lab's service, both ways, every byte
    assert round_trip(by_name, PAYLOAD, timeout=30) == PAYLOAD
    assert round_trip(by_key, b"with the key") == b"with the key"
    # a wrong key and a tunnel that does not exist: the local connection is closed, the log says why
    for bad, why in ((wrong_key, r"not allowed to visit lab/keyed: wrong secret_key"),
                     (missing, r"no secret tunnel lab/nope is open now")):  # fmt: skip
        mark = laptop.mark()
        with socket.create_connection(("127.0.0.1", bad), timeout=10) as s:
            s.sendall(b"let me in")
            assert closed_by_peer(s, 10)
        laptop.wait_for(rf"visitor lab/\w+: refused by relayd: {why}", start=mark)
    # relayd opened no port for either, and counts the visits as the tunnel's connections
    item = tunnel_item(Api(dash), "lab", "echo")
    assert item["type"] == "secret" and item["public"].startswith("secret") and item["remote_port"] == 0
    assert item["conns_total"] == 1 and item["bytes_in"] == len(PAYLOAD) and item["bytes_out"] == len(PAYLOAD)
    assert "secret_key" not in tunnel_item(Api(dash), "lab", "keyed")  # write-only, like http_password
    assert "listening on" not in "".join(line for line in d.lines if "tunnel echo" in line)


def test_relayc_connect_joins_stdin_and_stdout_to_the_tunnel(
    tmp_path: Path, echo: TcpServer, procs: list[Proc]
) -> None:
    port, dash = free_port(), free_port()
    start_relayd(procs, tmp_path, port, dash)
    start_lab(procs, tmp_path, port, echo.port)
    keyed = {"client": "lab", "tunnel": "keyed", "secret_key": SECRET_KEY, "bind_port": free_port()}
    laptop_cfg = relayc_config(
        tmp_path,
        port,
        [],
        filename="laptop.toml",
        name="laptop",
        auth={"token": own_token(dash, "laptop")},
        visitors=[keyed],
    )
    laptop = spawn(procs, "relay_client.cli", laptop_cfg)  # the laptop's own session runs meanwhile
    laptop.wait_for(r"logged in to relayd")
    done = connect(laptop_cfg, "lab/echo", PAYLOAD)
    assert done.returncode == 0, done.stderr.decode()
    first_diff = next((i for i, (x, y) in enumerate(zip(done.stdout, PAYLOAD, strict=False)) if x != y), None)
    assert done.stdout == PAYLOAD, (len(done.stdout), first_diff)  # only the tunnel's bytes on stdout
    done = connect(laptop_cfg, "lab/keyed", b"by key, from [[visitors]]")
    assert (done.returncode, done.stdout) == (0, b"by key, from [[visitors]]"), done.stderr.decode()
    # refusals: exit 1, the reason on stderr, nothing on stdout
    stranger_cfg = relayc_config(tmp_path, port, [], filename="stranger.toml", name="stranger")
    # a client named in allow_visitors but logged in with the shared token proves nothing: refused
    impostor_cfg = relayc_config(tmp_path, port, [], filename="impostor.toml", name="impostor")
    for cfg, target, why in ((stranger_cfg, "lab/echo", b"client 'stranger' is not in its allow_visitors"),
                             (impostor_cfg, "lab/echo", b"client 'impostor' logged in with relayd's shared token"),
                             (laptop_cfg, "lab/nope", b"no secret tunnel lab/nope is open now"),
                             (laptop_cfg, "nobody/echo", b"no secret tunnel nobody/echo")):  # fmt: skip
        done = connect(cfg, target, b"hello?")
        assert done.returncode == 1 and done.stdout == b"" and why in done.stderr, done.stderr.decode()
    # the visitor-only sessions never took the laptop's name from its running relayc
    assert "another relayc logged in" not in laptop.output and "session with relayd ended" not in laptop.output


SSH_SKIP = available()
if SSH_SKIP and os.environ.get("CI"):
    raise RuntimeError(f"CI must install openssh for the ProxyCommand test: {SSH_SKIP}")


@pytest.mark.skipif(SSH_SKIP is not None, reason=SSH_SKIP or "")
def test_ssh_and_scp_through_relayc_connect_as_proxycommand(tmp_path: Path, procs: list[Proc]) -> None:
    sshd_port, port, dash = free_port(), free_port(), free_port()
    sshd = SshReverse(tmp_path / "ssh", sshd_port)
    sshd.start_sshd()
    try:
        start_relayd(procs, tmp_path, port, dash)
        tunnel = {"name": "ssh", "type": "secret", "local_port": sshd_port, "allow_visitors": ["laptop"]}
        lab = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel], filename="lab.toml"))
        lab.wait_for(r"tunnel ssh: secret")
        laptop_cfg = relayc_config(
            tmp_path, port, [], filename="laptop.toml", name="laptop", auth={"token": own_token(dash, "laptop")}
        )
        proxy = f"{shlex.quote(sys.executable)} -m relay_client.cli connect -c {shlex.quote(str(laptop_cfg))} lab/%h"
        ssh_opts = ["-o", f"ProxyCommand={proxy}", "-i", str(tmp_path / "ssh" / "user_key"),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                    "-o", "LogLevel=ERROR"]  # fmt: skip
        user = getpass.getuser()
        # ssh: 1 MiB through the session, hashed by the lab's shell
        run = subprocess.run(["ssh", *ssh_opts, f"{user}@ssh", "sha256sum"], input=PAYLOAD, capture_output=True,
                             timeout=60, cwd=tmp_path)  # fmt: skip
        assert run.returncode == 0, run.stderr.decode()
        assert run.stdout.split()[0].decode() == hashlib.sha256(PAYLOAD).hexdigest()
        # scp there and back
        src, back = tmp_path / "data.bin", tmp_path / "back.bin"
        src.write_bytes(os.urandom(3 << 20))
        remote = tmp_path / "on-the-lab.bin"
        for a, b in ((str(src), f"{user}@ssh:{remote}"), (f"{user}@ssh:{remote}", str(back))):
            run = subprocess.run(["scp", "-q", *ssh_opts, a, b], capture_output=True, timeout=60, cwd=tmp_path)
            assert run.returncode == 0, run.stderr.decode()
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
        assert tunnel_item(Api(dash), "lab", "ssh")["conns_total"] == 3
    finally:
        sshd.stop()
