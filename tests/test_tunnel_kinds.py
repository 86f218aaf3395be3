"""The sans-IO pieces of the newer tunnel kinds, with plain values: datagram framing (udp), the
visit messages and proof (secret), groups (round robin, health, the rules of joining) and the
port claims of a group."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from relay_server.claims import PortClaims, Transport
from relay_server.groups import TunnelGroup, same_group
from shared import auth
from shared.config import PortRanges
from shared.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram
from shared.errors import RemoteProtocolError, TunnelRefusal, TunnelRefused
from shared.messages import Hello, TunnelHealth, VisitOpen, VisitResult, decode_message, encode_message
from shared.schema import SchemaError
from shared.tunnel import TunnelSpec

# --- udp: datagrams on a stream -----------------------------------------------------------------


def test_datagrams_survive_any_split_of_the_stream() -> None:
    datagrams = [b"", b"x", b"query" * 100, bytes(MAX_DATAGRAM)]
    wire = b"".join(encode_datagram(d) for d in datagrams)
    for step in (1, 2, 3, 1000, len(wire)):
        decoder = DatagramDecoder()
        got: list[bytes] = []
        for i in range(0, len(wire), step):
            got += decoder.feed(wire[i : i + step])
            assert decoder.buffered <= MAX_DATAGRAM + 2  # never more than one partial datagram
        assert got == datagrams and decoder.buffered == 0


def test_a_datagram_over_the_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds 65535"):
        encode_datagram(bytes(MAX_DATAGRAM + 1))


# --- secret: visit messages and the proof of a secret_key ---------------------------------------


def test_visit_messages_round_trip_and_hello_role_is_optional() -> None:
    for message in (VisitOpen(client="lab", tunnel="ssh", proof="ab" * 32), VisitResult(ok=False, code="not_allowed",
                    error="no"), TunnelHealth(name="web", healthy=False, error="refused")):  # fmt: skip
        assert decode_message(encode_message(message)[4:]) == message
    plain = encode_message(Hello(name="lab", client_nonce="n" * 32))
    assert b"role" not in plain  # an older relayd never sees the key
    visitor = Hello(name="lab", client_nonce="n" * 32, role="visitor")
    assert decode_message(encode_message(visitor)[4:]) == visitor
    with pytest.raises(RemoteProtocolError, match="field role: 'admin' is not one of"):
        decode_message(b'{"type":"hello","name":"lab","client_nonce":"' + b"n" * 32 + b'","role":"admin"}')


def test_a_visit_proof_is_bound_to_the_visitor_the_tunnel_and_relayd() -> None:
    proof = auth.visit_proof("key", "laptop", "lab", "ssh", "sha256:aa")
    assert len(proof) == 64 and proof == auth.visit_proof("key", "laptop", "lab", "ssh", "sha256:aa")
    others = {auth.visit_proof("key2", "laptop", "lab", "ssh", "sha256:aa"),
              auth.visit_proof("key", "tablet", "lab", "ssh", "sha256:aa"),
              auth.visit_proof("key", "laptop", "lab", "jupyter", "sha256:aa"),
              auth.visit_proof("key", "laptop", "lab", "ssh", "sha256:bb")}  # fmt: skip
    assert proof not in others and len(others) == 4


def test_kind_rules_of_the_new_fields() -> None:
    def problem(**fields: Any) -> str:
        with pytest.raises(SchemaError) as info:
            TunnelSpec.parse({"name": "t", "local_port": 22, **fields})
        where, why = info.value.problems[0]
        return f"{where[0]}: {why}"

    assert problem(type="secret", remote_port=6000).startswith("remote_port: only for tcp and udp")
    assert problem(type="tcp", allow_visitors=["laptop"]).startswith("allow_visitors: only for secret")
    assert problem(type="udp", health_check="tcp").startswith("health_check: only for")
    assert problem(type="tcp", udp_idle_timeout=5).startswith("udp_idle_timeout: only for udp")
    assert problem(type="tcp", remote_port=6000, group="web").startswith("group_key: a group needs group_key")
    assert problem(type="tcp", group="web", group_key="k" * 16).startswith("remote_port: a group needs a fixed")
    assert problem(type="secret", allow_visitors=["not a name"]).startswith("allow_visitors")
    assert problem(health_check="http", health_check_path="no-slash").startswith("health_check_path")
    assert problem(type="secret", secret_key="short").startswith("secret_key: is too short to be a secret")


# --- groups -------------------------------------------------------------------------------------


def member(client: str, **fields: Any) -> Any:
    spec = TunnelSpec.parse({"name": "web", "local_port": 80, "remote_port": 6000, "group": "web",
                             "group_key": "k" * 16, **fields})  # fmt: skip
    mux = SimpleNamespace(is_open=True)
    return SimpleNamespace(spec=spec, client_name=client, name="web", healthy=None, group=None,
                           client=SimpleNamespace(mux=mux), bind_host="127.0.0.1")  # fmt: skip


def test_a_group_takes_turns_and_skips_members_that_cannot_serve() -> None:
    a, b, c = (member(name, health_check="tcp") for name in "abc")
    group = TunnelGroup(a)
    group.join(b)
    group.join(c)
    assert [group.pick() for _ in range(6)] == [a, b, c, a, b, c]
    b.healthy = False  # its health check fails
    c.client.mux.is_open = False  # its client is gone
    assert [group.pick() for _ in range(3)] == [a, a, a]
    a.healthy = False
    assert group.pick() is None  # nobody can serve: the visitor is refused, not sent to a dead member
    b.healthy = True
    assert group.pick() is b
    assert group.leave(a) is b and group.leave(b) is c and group.leave(c) is None


def test_only_a_configured_health_check_takes_a_member_out() -> None:
    """Without health_check, relayc's gentle probe shows "service down" but the member stays in
    (a single failed connect must not empty a group)."""
    a, b = member("a"), member("b", health_check="tcp")
    group = TunnelGroup(a)
    group.join(b)
    a.healthy = b.healthy = False
    assert [group.pick() for _ in range(3)] == [a, a, a]


def test_joining_a_group_needs_its_name_key_and_place() -> None:
    group = TunnelGroup(member("a"))
    assert group.problem(member("b").spec) is None
    assert "another group_key" in (group.problem(member("b", group_key="a-wrong-guess-of-the-key").spec) or "")
    assert "same type and remote_port" in (group.problem(member("b", remote_port=6001).spec) or "")
    assert same_group(member("a").spec, member("b").spec)
    assert not same_group(member("a").spec, member("b", group_key="another-group-key-entirely").spec)


async def test_group_members_share_a_port_and_hand_it_over() -> None:
    ports = PortClaims(PortRanges("6000-6010"), max_per_client=0)

    async def listen(p: int) -> int:
        return p

    first, second = member("lab-a"), member("lab-b")
    assert await ports.claim(first, Transport.TCP, 6000, listen, lambda: None) == 6000
    TunnelGroup(first)
    group = ports.join(second, Transport.TCP, 6000)
    assert group is first.group
    group.join(second)
    with pytest.raises(TunnelRefused, match="group 'web' has another group_key") as info:
        ports.join(member("mallory", group_key="a-wrong-guess-of-the-key"), Transport.TCP, 6000)
    assert info.value.reason is TunnelRefusal.PORT_TAKEN
    assert ports.join(member("other", group="other"), Transport.TCP, 6000) is None  # not this group: usual rules
    # the holder leaves: the port goes to the other member, not to anyone else
    heir = group.leave(first)
    ports.release(first, Transport.TCP, 6000, client_gone=True, heir=heir)
    assert ports.holder(Transport.TCP, 6000) is second
    assert ports.count_for("lab-a") == 0 and ports.count_for("lab-b") == 1
    ports.release(second, Transport.TCP, 6000, client_gone=True, heir=group.leave(second))
    assert ports.holder(Transport.TCP, 6000) is None and ports.count_for("lab-b") == 0


def test_a_udp_flow_drops_datagrams_instead_of_buffering_them() -> None:
    """relayd's side of a flow: past FLOW_BACKLOG bytes waiting for relayc's credit, or past the
    bandwidth limit, a visitor's datagram is dropped (counted), never queued."""
    from relay_server.frontends.udp import FLOW_BACKLOG, UdpFlow
    from shared.limits import TokenBucket

    class Loop:
        now = 100.0

        def time(self) -> float:
            return self.now

    waiting = {7: 0}
    sent: list[bytes] = []
    session = SimpleNamespace(send_buffered=lambda sid: waiting[sid])
    mux = SimpleNamespace(session=session, send=lambda sid, data: sent.append(data), consume=lambda sid, n: None)
    tunnel = SimpleNamespace(dropped=0)
    endpoint = SimpleNamespace(loop=Loop(), tunnel=tunnel)
    flow = UdpFlow(endpoint, ("127.0.0.1", 5000))  # type: ignore[arg-type]
    flow.bind(mux, 7)  # type: ignore[arg-type]
    flow.from_visitor(b"q" * 100)
    assert sent == [encode_datagram(b"q" * 100)] and tunnel.dropped == 0
    waiting[7] = FLOW_BACKLOG + 1  # relayc is not taking them in
    for _ in range(1000):
        flow.from_visitor(b"q" * 100)
    assert len(sent) == 1 and tunnel.dropped == 1000
    waiting[7] = 0
    flow.buckets = (TokenBucket(300, endpoint.loop.now),)  # 300 bytes/s: two datagrams (100 + 28 each) fit now
    for _ in range(3):
        flow.from_visitor(b"q" * 100)
    assert len(sent) == 3 and tunnel.dropped == 1001


async def test_a_udp_flow_handles_a_flood_of_tiny_datagrams_a_bounded_number_at_a_time() -> None:
    """relayc sends 256 KiB of empty datagrams: relayd's flow handles PER_CALLBACK of them per loop
    callback (credit held for the rest), drops the empty ones, and every byte is credited in the end."""
    import asyncio

    from relay_server.frontends.udp import UdpFlow
    from shared.datagrams import PER_CALLBACK

    loop = asyncio.get_running_loop()
    credited: list[int] = []
    mux = SimpleNamespace(session=None, consume=lambda sid, n: credited.append(n))
    tunnel = SimpleNamespace(dropped=0)
    sent: list[bytes] = []
    endpoint = SimpleNamespace(loop=loop, tunnel=tunnel, to_visitor=lambda addr, d: sent.append(d) or True)
    flow = UdpFlow(endpoint, ("127.0.0.1", 5000))  # type: ignore[arg-type]
    flow.bind(mux, 7)  # type: ignore[arg-type]
    flood = encode_datagram(b"") * (128 * 1024) + encode_datagram(b"real")
    flow.on_data(flood)
    assert sum(credited) == PER_CALLBACK * 2 and tunnel.dropped == PER_CALLBACK  # one callback's share
    for _ in range(2000):  # bounded: the rest is handled in later loop iterations
        if sum(credited) == len(flood):
            break
        await asyncio.sleep(0)
    assert sum(credited) == len(flood) and sent == [b"real"] and tunnel.dropped == 128 * 1024


def test_a_group_member_never_takes_over_the_owners_domain() -> None:
    """alice serves / alone and /api with bob (a group); when alice goes, bob keeps serving /api
    for the group, but the domain stays alice's: bob cannot put / on it, and it is reserved for
    alice, not bob, once the last member leaves."""
    from relay_server.claims import DomainClaims

    def http(client: str, name: str, location: str, **fields: Any) -> Any:
        spec = TunnelSpec.parse({"name": name, "type": "http", "local_port": 80, "custom_domains": ["app.test"],
                                 "locations": [location], **fields})  # fmt: skip
        return SimpleNamespace(spec=spec, client_name=client, name=name, group=None, claim=None)

    group = {"group": "g", "group_key": "k" * 16}
    domains = DomainClaims("")
    alice_root, alice_api, bob_api = http("alice", "root", "/"), http("alice", "api", "/api", **group), \
        http("bob", "api", "/api", **group)  # fmt: skip
    domains.add(alice_root, 0.0)
    domains.add(alice_api, 0.0)
    domains.add(bob_api, 0.0)
    assert alice_api.group is bob_api.group
    domains.remove(alice_root, client_gone=True, now=1.0)
    domains.remove(alice_api, client_gone=True, now=1.0)
    assert domains.match_http("app.test", "/api/x") is bob_api  # the group goes on serving
    assert domains.domains["app.test"].owner == "alice"
    with pytest.raises(TunnelRefused, match="belongs to client 'alice'"):
        domains.add(http("bob", "root", "/"), 2.0)
    domains.remove(bob_api, client_gone=True, now=3.0)
    assert domains.offline_owner("app.test", 4.0) == "alice"
