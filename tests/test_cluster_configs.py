"""conf/cluster: the docker compose example's relayd configs pass ``relayd --check`` once their
placeholders are replaced as the file says (there is no Docker daemon here), and are refused
while the token is still the placeholder."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from relay_server.passwords import hash_password

CLUSTER = Path(__file__).resolve().parent.parent / "conf" / "cluster"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay_server.cli", "-c", str(path), "--check"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("name", ["relayd-a.toml", "relayd-b.toml"])
def test_the_compose_example_configs_check(name: str, tmp_path: Path) -> None:
    text = (CLUSTER / name).read_text()
    unchanged = tmp_path / f"unchanged-{name}"
    unchanged.write_text(text)
    refused = check(unchanged)
    assert refused.returncode == 2 and "auth.token" in refused.stderr, refused.stderr
    dashboard_hash = hash_password("a-long-dashboard-password")
    filled = (text.replace("PASTE-TOKEN", secrets.token_urlsafe(32))
              .replace("PASTE-DB-PASSWORD", secrets.token_urlsafe(16))
              .replace("scrypt$PASTE-HASH-FROM-relayd-hash-password", dashboard_hash))  # fmt: skip
    config = tmp_path / name
    config.write_text(filled)
    done = check(config)
    assert done.returncode == 0, done.stderr
    assert "[store]" in text and re.search(r'^url = "postgresql://', text, re.M)
    compose = (CLUSTER / "docker-compose.yml").read_text()
    assert f"./{name}:/etc/relay/relayd.toml:ro" in compose
