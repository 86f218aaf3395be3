"""The README's TOML snippets are what users paste: every [[tunnels]] and [[visitors]] table in
them must pass the same checks as relayc.toml's."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import VisitorConfig, tomllib
from shared.tunnel import TunnelSpec

README = Path(__file__).resolve().parent.parent / "README.md"


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
