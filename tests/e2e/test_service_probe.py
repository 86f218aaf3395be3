"""Every tunnel's local service is probed, health_check or not: a tunnel whose service does not
answer is "service down" in the API (with the probe's error) as soon as it is registered, and
"active" again once the service is back (a down tunnel is probed every health_check_interval);
UDP tunnels are not probed."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.harness import Proc, TcpServer, echo_handler, free_port, relayc_config, spawn
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import Api, start_relayd
from tests.waiting import wait_until


def test_a_tunnel_without_health_check_shows_service_down_and_recovers(tmp_path: Path, procs: list[Proc]) -> None:
    port, dash = free_port(), free_port()
    up = TcpServer(echo_handler)
    down_port = free_port()  # nothing listens here yet
    back: TcpServer | None = None
    try:
        start_relayd(procs, tmp_path, port, dash)
        tunnels = [
            {"name": "up", "local_port": up.port, "remote_port": free_port()},
            {"name": "down", "local_port": down_port, "remote_port": free_port(), "health_check_interval": 1},
            {"name": "dns", "type": "udp", "local_port": down_port, "remote_port": free_port()},
        ]
        relayc = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
        relayc.wait_for(r"tunnel dns: 127\.0\.0\.1:\d+/udp")
        api = Api(dash)
        wait_until(lambda: tunnel_item(api, "lab", "down").get("status") == "service down", 10,
                   "the tunnel with no service to be shown as service down")  # fmt: skip
        item = tunnel_item(api, "lab", "down")
        assert item["state"] == "service down" and item["health"] == "down"
        assert "refused" in (item["health_error"] or "").lower(), item
        relayc.wait_for(rf"tunnel down: local service 127\.0\.0\.1:{down_port} is down")
        wait_until(lambda: tunnel_item(api, "lab", "up").get("health") == "up", 10, "the served tunnel's probe")
        assert tunnel_item(api, "lab", "up")["status"] == "active"
        assert tunnel_item(api, "lab", "up")["health_error"] is None
        # UDP: never probed (a connect says nothing about a UDP service)
        assert tunnel_item(api, "lab", "dns")["health"] is None
        assert tunnel_item(api, "lab", "dns")["status"] == "active"
        # the service comes up: seen within a few of the down tunnel's probes
        back = TcpServer(echo_handler, port=down_port)
        wait_until(
            lambda: tunnel_item(api, "lab", "down").get("status") == "active",
            15,
            lambda: f"the tunnel to be active again once its service answers; relayc:\n{relayc.output}",
        )
        assert tunnel_item(api, "lab", "down")["health"] == "up"
        relayc.wait_for(rf"tunnel down: local service 127\.0\.0\.1:{down_port} is up")
    finally:
        up.close()
        if back is not None:
            back.close()
