"""The Docker recipes (the README's ``docker run`` lines and the compose files in conf/docker and
conf/cluster) cannot run here (no Docker daemon), so what they rely on is checked instead: every
file they mount exists, every relayd.toml and relayc.toml they mount passes ``--check`` once its
PASTE- placeholders are filled in as a user would (and relayd refuses the placeholder token), the
compose files parse, relayc runs with the host's network and keeps its state in a volume, and the
dashboard is published on the host's loopback only."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay_server.passwords import hash_password
from shared.config import ClientConfig, ServerConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = sorted([*ROOT.glob("conf/docker/*.yml"), ROOT / "conf" / "cluster" / "docker-compose.yml"])
MODULES = {"relayd": "relay_server.cli", "relayc": "relay_client.cli"}


def fill(text: str) -> str:
    """The PASTE- placeholders replaced the way the files' comments tell a user to."""
    filled = (
        text.replace("PASTE-TOKEN", secrets.token_urlsafe(32))
        .replace("PASTE-DB-PASSWORD", secrets.token_urlsafe(16))
        .replace("PASTE-VM-ADDRESS", "203.0.113.7")
        .replace("PASTE-YOUR-DOMAIN", "relay.example.org")
        .replace("scrypt$PASTE-HASH-FROM-relayd-hash-password", hash_password("a-long-dashboard-password"))
    )
    assert not re.findall(r"PASTE-[A-Z][\w-]*", filled)
    return filled


def check(prog: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", MODULES[prog], "-c", str(config), "--check"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def program_for(target: str) -> str:
    """relayd or relayc, from where a config is mounted (/etc/relay/relayd.toml)."""
    prog = Path(target).stem
    assert prog in MODULES, f"a config mounted as {target}: neither relayd.toml nor relayc.toml"
    return prog


def checked(prog: str, source: Path, tmp: Path) -> ServerConfig | ClientConfig:
    """``source`` passes ``prog --check`` with its placeholders filled; relayd refuses it unfilled
    when it has the placeholder token. Returns the filled config as loaded."""
    text = source.read_text()
    if prog == "relayd" and "PASTE-TOKEN" in text:
        unfilled = tmp / f"unfilled-{source.name}"
        unfilled.write_text(text)
        refused = check(prog, unfilled)
        assert refused.returncode == 2 and "auth.token" in refused.stderr, refused.stderr
    config = tmp / source.name
    config.write_text(fill(text))
    done = check(prog, config)
    assert done.returncode == 0, f"{source}: {done.stderr}"
    model: type[ServerConfig] | type[ClientConfig] = ServerConfig if prog == "relayd" else ClientConfig
    return load_config(model, config)


def mounts(volumes: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(bind mounts target -> source, named volumes target -> name) of a service's volumes."""
    binds, named = {}, {}
    for entry in volumes:
        source, target, *mode = entry.split(":")
        if source.startswith((".", "/", "$")):
            binds[target] = source
            if target.startswith("/etc/relay/"):
                assert mode == ["ro"], f"{entry}: configs are mounted read-only"
        else:
            named[target] = source
    return binds, named


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_files_mount_configs_that_exist_and_check(compose_file: Path, tmp_path: Path) -> None:
    compose: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    declared_volumes = set(compose.get("volumes") or {})
    relay_services = 0
    for name, service in compose["services"].items():
        binds, named = mounts(service.get("volumes", []))
        assert set(named.values()) <= declared_volumes, f"{name}: a named volume not declared at the top level"
        for source in binds.values():
            assert (compose_file.parent / source).exists(), f"{compose_file.name}: {name} mounts {source}: no such file"
        if service.get("image") != "relay":
            continue
        relay_services += 1
        command = service["command"]
        prog, flag, config_target = command
        assert flag == "-c" and config_target in binds, f"{name}: runs {command} but does not mount its config"
        assert program_for(config_target) == prog
        cfg = checked(prog, compose_file.parent / binds[config_target], tmp_path)
        assert str(cfg.state_dir) in named, f"{name}: state_dir {cfg.state_dir} is not a named volume"
        if prog == "relayc":
            # its 127.0.0.1 must be the lab machine's, and it needs no published port
            assert service.get("network_mode") == "host" and "ports" not in service
        elif "ports" in service:
            assert isinstance(cfg, ServerConfig)
            check_published_ports(cfg, service["ports"])
    assert relay_services, f"{compose_file}: no service runs the relay image"


def check_published_ports(cfg: ServerConfig, ports: list[str]) -> None:
    """What relayd listens on (inside its container, on 0.0.0.0) is published on the same port
    numbers, and the dashboard on the host's loopback only."""
    published: dict[str, str] = {}  # container port[/proto] -> host side
    for entry in ports:
        host_side, _, container = entry.rpartition(":")
        published[container] = host_side
    assert cfg.bind_addr == "0.0.0.0"
    for port in (cfg.bind_port, cfg.vhost_http_port, cfg.vhost_https_port):
        assert published.get(str(port)) == str(port), f"port {port} not published as itself: {ports}"
    assert published.get(cfg.allow_ports) == cfg.allow_ports and published.get(f"{cfg.allow_ports}/udp")
    assert cfg.dashboard is not None and cfg.dashboard.addr == "0.0.0.0"
    assert published[str(cfg.dashboard.port)] == f"127.0.0.1:{cfg.dashboard.port}"


def readme_docker_runs() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Docker\n") : text.index("\n## ", text.index("## Docker\n") + 1)]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("docker run"):
                commands.append(shlex.split(command.replace("$PWD/", "./")))
    return commands


def test_the_readmes_docker_runs_mount_configs_that_check(tmp_path: Path) -> None:
    runs = readme_docker_runs()
    progs = set()
    for argv in runs:
        volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        published = [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
        binds, named = mounts(volumes)
        image = next(i for i, a in enumerate(argv) if a == "relay")
        command = argv[image + 1 :] or ["relayd", "-c", "/etc/relay/relayd.toml"]  # the image's CMD
        prog, _, config_target = command
        progs.add(prog)
        assert program_for(config_target) == prog and config_target in binds, argv
        source = ROOT / binds[config_target]
        assert source.is_file(), f"the README mounts {binds[config_target]}: no such file"
        cfg = checked(prog, source, tmp_path)
        assert str(cfg.state_dir) in named, f"{prog}: state_dir {cfg.state_dir} is not a volume in {argv}"
        if prog == "relayc":
            assert "--network" in argv and argv[argv.index("--network") + 1] == "host" and not published
        else:
            assert isinstance(cfg, ServerConfig)
            check_published_ports(cfg, published)
    assert progs == {"relayd", "relayc"}
