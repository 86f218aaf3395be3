"""UDP tunnels end to end: a real relayd and relayc in front of a real UDP service (a small DNS
server answering A queries), several visitors at once, a tcp and a udp tunnel on one port
number, flows that time out when idle, and the flow cap."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, round_trip, spawn
from tests.e2e.test_core import tunnel_item
from tests.e2e.test_dashboard import Api, start_relayd
from tests.waiting import wait_until


class DnsServer:
    """A UDP DNS server on 127.0.0.1: answers every A query for NAME with ADDRESS (same id,
    question echoed), and remembers which source ports it heard from."""

    NAME = "lab.example"
    ADDRESS = "10.1.2.3"

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sources: set[int] = set()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.sources.add(addr[1])
            if len(data) < 12:
                continue
            qid, _flags, qd = struct.unpack("!HHH", data[:6])
            question = data[12:]
            answer = (
                struct.pack("!HHHHHH", qid, 0x8180, qd, 1, 0, 0)
                + question
                + struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4)
                + socket.inet_aton(self.ADDRESS)
            )
            self.sock.sendto(answer, addr)

    def close(self) -> None:
        self.sock.close()


def dns_query(qid: int, name: str) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def resolve(sock: socket.socket, port: int, qid: int, timeout: float = 5.0) -> str:
    """Send an A query through ``port`` and return the address in the answer (checked against
    the query's id and name)."""
    query = dns_query(qid, DnsServer.NAME)
    sock.settimeout(timeout)
    sock.sendto(query, ("127.0.0.1", port))
    data, _ = sock.recvfrom(65535)
    assert struct.unpack("!H", data[:2])[0] == qid, "the answer is for another query"
    assert data[12 : 12 + len(query) - 12] == query[12:], "the question is not echoed"
    return socket.inet_ntoa(data[-4:])


def visitor() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def test_dns_queries_through_a_udp_tunnel(tmp_path: Path, dns: DnsServer, echo: TcpServer,
                                          procs: list[Proc]) -> None:  # fmt: skip
    """Several visitors at once each get their own answers, and a tcp tunnel shares the port number."""
    port, dash, public = free_port(), free_port(), free_port()
    start_relayd(procs, tmp_path, port, dash)
    tunnels = [
        {"name": "dns", "type": "udp", "local_port": dns.port, "remote_port": public},
        {"name": "echo", "type": "tcp", "local_port": echo.port, "remote_port": public},
    ]
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
    c.wait_for(r"tunnel dns: 127\.0\.0\.1:\d+/udp")
    c.wait_for(r"tunnel echo: relayd port")
    socks = [visitor() for _ in range(5)]
    try:
        for round_no in range(3):
            for i, s in enumerate(socks):
                assert resolve(s, public, 1000 + round_no * 10 + i) == DnsServer.ADDRESS
        assert round_trip(public, b"tcp on the same port number") == b"tcp on the same port number"
        api = Api(dash)
        item = tunnel_item(api, "lab", "dns")
        assert item["type"] == "udp" and item["public"].endswith(f":{public}/udp")
        assert item["conns_open"] == 5 and item["conns_total"] == 5  # one flow per visitor address
        assert item["bytes_in"] == 15 * len(dns_query(0, DnsServer.NAME))
        assert len(dns.sources) == 5  # relayc gave each flow its own socket
    finally:
        for s in socks:
            s.close()


def test_idle_flows_time_out_and_the_flow_cap_holds(tmp_path: Path, dns: DnsServer, procs: list[Proc]) -> None:
    port, dash, public = free_port(), free_port(), free_port()
    d = start_relayd(procs, tmp_path, port, dash, limits={"max_udp_flows_per_tunnel": 2})
    tunnel = {"name": "dns", "type": "udp", "local_port": dns.port, "remote_port": public, "udp_idle_timeout": 1}
    c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, [tunnel]))
    c.wait_for(r"tunnel dns: 127\.0\.0\.1:\d+/udp")
    api = Api(dash)
    a, b, third = visitor(), visitor(), visitor()
    try:
        assert resolve(a, public, 1) == DnsServer.ADDRESS
        assert resolve(b, public, 2) == DnsServer.ADDRESS
        mark = d.mark()
        third.sendto(dns_query(3, DnsServer.NAME), ("127.0.0.1", public))
        d.wait_for(r"udp visitor 127\.0\.0\.1:\d+ refused: max_udp_flows_per_tunnel=2 flows open", start=mark)
        # idle for udp_idle_timeout: both flows end on both sides, and the cap has room again
        wait_until(lambda: tunnel_item(api, "lab", "dns").get("conns_open") == 0, 10, "idle flows to be closed")
        assert tunnel_item(api, "lab", "dns")["conns_total"] == 2
        assert resolve(third, public, 4) == DnsServer.ADDRESS
        sources_before = set(dns.sources)
        assert resolve(a, public, 5) == DnsServer.ADDRESS  # a new flow: relayc opened a new socket
        assert len(dns.sources - sources_before) == 1
        assert tunnel_item(api, "lab", "dns")["datagrams_dropped"] == 1  # the refused visitor's query
        metrics = api.call("GET", "/metrics")[1]
        assert 'relay_udp_datagrams_dropped_total{client="lab",tunnel="dns"} 1' in metrics
        assert 'relay_tunnel_info{client="lab",tunnel="dns",type="udp",group=""} 1' in metrics
    finally:
        for s in (a, b, third):
            s.close()
