"""Every tunnel's local service is probed, health_check or not: a tunnel whose service does not
answer is "service down" in the API (with the probe's error) as soon as it is registered, and
"active" again once the service is back (a down tunnel is probed every health_check_interval);
UDP tunnels are not probed."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.e2e.harness import Proc, TcpServer, echo_handler, free_port, relayc_config, spawn
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import Api, relayc_from, start_relayd
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


def test_a_changed_tunnel_is_probed_again_at_once(tmp_path: Path, procs: list[Proc]) -> None:
    """A dashboard tunnel shown as service down, pointed at a live service by an edit, is seen up
    at the next probe round, not only after its health_check_interval (10 s here); a reload too."""
    port, dash = free_port(), free_port()
    up = TcpServer(echo_handler)
    try:
        start_relayd(procs, tmp_path, port, dash)
        api = Api(dash)
        status, created, _ = api.call("POST", "/api/v1/clients", {"name": "lab"})
        assert status == 201
        own_port = free_port()
        own = f'\n[[tunnels]]\nname = "own"\nlocal_port = {own_port}\nremote_port = 0\n'
        relayc = relayc_from(procs, tmp_path, created["relayc_toml"] + own, "lab.toml")
        status, _, _ = api.call("POST", "/api/v1/tunnels", {"client": "lab", "name": "app", "local_port": free_port()})
        assert status == 201
        for name in ("app", "own"):
            wait_until(lambda n=name: tunnel_item(api, "lab", n).get("status") == "service down", 10, f"{name} down")
        status, _, _ = api.call("PATCH", "/api/v1/tunnels/lab/app", {"local_port": up.port})
        assert status == 200
        wait_until(lambda: tunnel_item(api, "lab", "app").get("health") == "up", 5,
                   lambda: f"the edited tunnel to be seen up within 5 s; relayc:\n{relayc.output}")  # fmt: skip
        path = tmp_path / "lab.toml"
        path.write_text(
            path.read_text().replace(own, own.replace(f"local_port = {own_port}", f"local_port = {up.port}"))
        )
        relayc.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: tunnel_item(api, "lab", "own").get("health") == "up", 5,
                   lambda: f"the reloaded tunnel to be seen up within 5 s; relayc:\n{relayc.output}")  # fmt: skip
    finally:
        up.close()
