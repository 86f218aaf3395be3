"""``relayc install-service`` and ``relayd install-service``: the systemd unit runs this Python with
the config's absolute path, restarts, and is written where systemd looks (a user unit here: the
system one would go to /etc); a bad config exits 2 first; systemctl is never run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(
    prog: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    module = "relay_client.cli" if prog == "relayc" else "relay_server.cli"
    return subprocess.run([sys.executable, "-m", module, "install-service", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("prog", ["relayc", "relayd"])
def test_a_unit_is_printed_or_written_for_the_config(prog: str, tmp_path: Path) -> None:
    cfg = tmp_path / f"{prog}.toml"
    cfg.write_text('[auth]\ntoken = "a-long-token-0123456789"\n')
    printed = run(prog, "-c", str(cfg), "--print")
    assert printed.returncode == 0, printed.stderr
    unit = printed.stdout
    module = "relay_client.cli" if prog == "relayc" else "relay_server.cli"
    assert f"ExecStart={Path(sys.executable).absolute()} -m {module} -c {cfg.resolve()}\n" in unit
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit
    written = run(prog, "-c", cfg.name, "--user", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    target = tmp_path / "xdg" / "systemd" / "user" / f"{prog}.service"
    assert f"-c {cfg.resolve()}" in target.read_text() and "WantedBy=default.target" in target.read_text()
    assert f"systemctl --user enable --now {prog}" in written.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("bind_prot = 1\n")
    refused = run(prog, "-c", str(bad), "--print")
    assert refused.returncode == 2 and "bind_prot" in refused.stderr
