"""Run many relayc clients in one process (200 real relayc processes would need ~8 GB of RAM).

    python -m tests.e2e.many_clients DIR SERVER_PORT FINGERPRINT COUNT TUNNELS TARGET_PORT

Each client is a real ``Relayc`` (real TLS connection, login, tunnel registration) with its own
name; client 0's first tunnel is pinned to the port in DIR/first_port.  Prints "ALL LOGGED IN"
once every client has logged in and got its tunnels, then runs until killed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from relay_client.client import Relayc
from shared.aio import run
from shared.cli import raise_fd_limit
from shared.config import ClientConfig, parse_config


async def main(workdir: Path, port: int, fingerprint: str, count: int, tunnels: int, target: int) -> None:
    first_port = int((workdir / "first_port").read_text())
    clients = []
    for i in range(count):
        data = {
            "server_port": port, "name": f"c{i}", "auth": {"token": sys.argv[7]},
            "tls": {"server_fingerprint": fingerprint},
            "tunnels": [{"name": f"t{j}", "local_port": target, "remote_port": first_port if (i, j) == (0, 0) else 0}
                        for j in range(tunnels)],
        }  # fmt: skip
        clients.append(Relayc(parse_config(ClientConfig, data, f"client {i}"), workdir / "relayc.toml"))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.gather(*(c.connected.wait() for c in clients))
    print("ALL LOGGED IN", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING)
    a = sys.argv
    run(main(Path(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]), int(a[6])))
