"""PortClaims: ports are claimed per transport, owned by the first client, reserved while it is offline."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from relay_server.claims import PortClaims, Transport
from shared.config import PortRanges
from shared.errors import TunnelRefusal, TunnelRefused


def tunnel(client: str, name: str) -> Any:
    return SimpleNamespace(client_name=client, name=name, bind_host="127.0.0.1", group=None)


async def claim(ports: PortClaims, t: Any, transport: Transport, port: int) -> int:
    async def listen(p: int) -> int:
        return p

    return await ports.claim(t, transport, port, listen, lambda: None)


async def test_a_udp_and_a_tcp_claim_of_one_port_number_do_not_collide() -> None:
    ports = PortClaims(PortRanges("6000-6010"), max_per_client=0)
    tcp, udp = tunnel("lab", "ssh"), tunnel("lab", "dns")
    assert await claim(ports, tcp, Transport.TCP, 6000) == 6000
    assert await claim(ports, udp, Transport.UDP, 6000) == 6000
    assert ports.holder(Transport.TCP, 6000) is tcp and ports.holder(Transport.UDP, 6000) is udp
    with pytest.raises(TunnelRefused, match="port 6000 is already used by client 'lab' tunnel 'ssh'") as info:
        await claim(ports, tunnel("mallory", "x"), Transport.TCP, 6000)
    assert info.value.reason is TunnelRefusal.PORT_TAKEN
    with pytest.raises(TunnelRefused) as outside:
        await claim(ports, tunnel("lab", "y"), Transport.TCP, 7000)
    assert outside.value.reason is TunnelRefusal.PORT_NOT_ALLOWED
    assert ports.count_for("lab") == 2


async def test_an_offline_owners_port_is_reserved_per_transport() -> None:
    ports = PortClaims(PortRanges("6000-6010"), max_per_client=1)
    tcp = tunnel("lab", "ssh")
    await claim(ports, tcp, Transport.TCP, 6001)
    ports.release(tcp, Transport.TCP, 6001, client_gone=True)
    with pytest.raises(TunnelRefused) as info:
        await claim(ports, tunnel("mallory", "x"), Transport.TCP, 6001)
    assert info.value.reason is TunnelRefusal.PORT_RESERVED
    assert await claim(ports, tunnel("mallory", "x"), Transport.UDP, 6001) == 6001  # udp was never the lab's
    with pytest.raises(TunnelRefused) as capped:
        await claim(ports, tunnel("mallory", "z"), Transport.TCP, 6005)
    assert capped.value.reason is TunnelRefusal.TOO_MANY_PORTS
    assert await claim(ports, tunnel("lab", "ssh"), Transport.TCP, 6001) == 6001  # the owner takes it back
