"""The README's TOML snippets are what users paste: every [[tunnels]] and [[visitors]] table in
them must pass the same checks as relayc.toml's. Its Quickstart commands are what a new user types
on a fresh machine, and CI (``.ci/run``) runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import ClientConfig, ServerConfig, VisitorConfig, load_config, tomllib
from shared.tunnel import TunnelSpec

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_every_tunnel_and_visitor_table_in_the_readme_is_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    kinds: set[str] = set()
    for block in blocks:
        data = tomllib.loads(block)
        for i, table in enumerate(data.get("tunnels", [])):
            kinds.add(TunnelSpec.parse(table, ("tunnels", i)).type.value)
        for table in data.get("visitors", []):
            VisitorConfig.from_table(table)
    assert {"tcp", "http", "udp", "secret"} <= kinds  # the recipes show each kind


def quickstart() -> str:
    text = README.read_text()
    return text[text.index("## Quickstart\n") : text.index("\n## ", text.index("## Quickstart\n") + 1)]


def quickstart_commands() -> list[str]:
    return [line for block in re.findall(r"```sh\n(.*?)```", quickstart(), re.S) for line in block.splitlines()]


def test_the_quickstart_makes_a_venv_and_ci_runs_its_test_command() -> None:
    """Two commands, each from a fresh checkout: a venv (Debian's own Python refuses pip outside
    one), relay installed in it, then relayd started / the tests run, all from .venv/bin without
    activating it; the Debian package that gives python3 its venv module is named."""
    commands = quickstart_commands()
    run, test = commands[0], commands[1]
    assert run == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/relayd -c conf/relayd.toml"
    assert test == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert "apt install python3-venv" in quickstart()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run exactly the README's test command"
    assert "python3-venv" in re.search(r"^apt-get install .*$", ci, re.M).group(0)  # type: ignore[union-attr]
    # nothing in CI (or the README's Development section) still installs into the bare python3
    assert "python3 -m pip install" not in ci and "python3 -m pip install -e" not in README.read_text()
    for line in ci.splitlines():
        assert not re.match(r"python3 -m (bench|pytest)", line), f".ci/run: {line!r} is not the venv's Python"


def test_the_single_machine_demo_matches_the_example_configs() -> None:
    """The demo's commands use the example configs as shipped: the always-there web server on the
    port the example's web tunnel dials, curl on that tunnel's public port, and ssh on the ssh
    tunnel's (which the README says needs an sshd)."""
    commands = quickstart_commands()
    assert ".venv/bin/relayc -c conf/relayc.toml" in commands
    d = load_config(ServerConfig, ROOT / "conf" / "relayd.toml")
    c = load_config(ClientConfig, ROOT / "conf" / "relayc.toml")
    assert d.auth.token == c.auth.token and d.bind_port == c.server_port and d.bind_addr in c.server_addr
    tunnels = {t.name: t for t in c.tunnels}
    web, ssh = tunnels["web"], tunnels["ssh"]
    server = next(line for line in commands if "http.server" in line)
    assert server == f"python3 -m http.server {web.local_port} --bind 127.0.0.1"
    text = quickstart()
    assert f"curl http://127.0.0.1:{web.remote_port}/" in text
    assert ssh.local_port == 22 and f"ssh -p {ssh.remote_port} $USER@127.0.0.1" in text
    assert "when an sshd runs here" in text
    for t in (web, ssh):
        assert t.remote_port in d.port_ranges
