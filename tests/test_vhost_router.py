"""DomainClaims: who owns which domain, and which of its tunnels serves which path (no sockets)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from relay_server.claims import DomainClaims as VhostRouter
from relay_server.holds import HOLD_SECONDS as DOMAIN_HOLD
from relay_server.holds import RECLAIM_SECONDS as DOMAIN_RECLAIM
from shared.errors import TunnelRefused
from shared.tunnel import TunnelKind


def tunnel(client: str, name: str, kind: str = "http", subdomain: str = "", domains: tuple[str, ...] = (),
           locations: tuple[str, ...] = ()) -> Any:  # fmt: skip
    spec = SimpleNamespace(type=TunnelKind(kind), subdomain=subdomain, custom_domains=domains, locations=locations,
                           name=name, group="")  # fmt: skip
    return SimpleNamespace(spec=spec, client_name=client, name=name, claim=None, group=None)


def test_a_domain_belongs_to_its_first_client_on_http_and_https() -> None:
    r = VhostRouter("relay.example.org")
    a = tunnel("alice", "jupyter", subdomain="jupyter")
    r.add(a, 0.0)
    attempts = [
        tunnel("mallory", "x", locations=("/api/other/longer",), subdomain="jupyter"),  # another location
        tunnel("mallory", "y", domains=("jupyter.relay.example.org",)),  # the same name spelled as a domain
        tunnel("mallory", "z", kind="https", domains=("jupyter.relay.example.org",)),  # https on it
    ]
    for t in attempts:
        with pytest.raises(TunnelRefused, match="belongs to client 'alice'"):
            r.add(t, 0.0)
    assert r.match_http("jupyter.relay.example.org", "/api/other/longer/x") is a
    assert r.match_https("jupyter.relay.example.org") is None


def test_one_client_splits_its_own_domain_by_locations() -> None:
    r = VhostRouter("relay.example.org")
    root = tunnel("alice", "app", subdomain="lab")
    api = tunnel("alice", "api", domains=("lab.relay.example.org",), locations=("/api", "/v2/"))
    tls = tunnel("alice", "tls", kind="https", subdomain="lab")
    for t in (root, api, tls):
        r.add(t, 0.0)
    assert r.match_http("lab.relay.example.org", "/") is root
    assert r.match_http("lab.relay.example.org", "/api/x") is api
    assert r.match_http("lab.relay.example.org", "/apix") is api  # string prefixes, as frp's locations
    assert r.match_http("lab.relay.example.org", "/v2") is root
    assert r.match_https("lab.relay.example.org") is tls
    with pytest.raises(TunnelRefused, match="location /api is already used by tunnel 'api'"):
        r.add(tunnel("alice", "again", subdomain="lab", locations=("/api",)), 0.0)
    r.remove(api, client_gone=False, now=0.0)
    assert r.match_http("lab.relay.example.org", "/api/x") is root


def test_locations_are_compared_normalized() -> None:
    r = VhostRouter("h")
    admin = tunnel("alice", "admin", subdomain="s", locations=("/admin",))
    r.add(admin, 0.0)
    with pytest.raises(TunnelRefused, match="location"):
        r.add(tunnel("alice", "bad", subdomain="s", locations=("/a%2Fb",)), 0.0)
    r.add(tunnel("alice", "dots", subdomain="s", locations=("/x/../%61pi",)), 0.0)  # is /api
    assert r.match_http("s.h", "/api").name == "dots"  # type: ignore[union-attr]


def test_an_offline_owner_keeps_its_domain_for_a_while_then_releases_what_it_does_not_reclaim() -> None:
    r = VhostRouter("h")
    a = tunnel("alice", "web", subdomain="web")
    r.add(a, 0.0)
    r.remove(a, client_gone=True, now=10.0)  # alice's connection dropped
    assert r.offline_owner("web.h", 15.0) == "alice"
    with pytest.raises(TunnelRefused, match="belongs to client 'alice' \\(offline"):
        r.add(tunnel("mallory", "grab", subdomain="web"), 20.0)
    r.add(tunnel("alice", "web", subdomain="web"), 30.0)  # alice is back
    r.remove(r.match_http("web.h", "/"), client_gone=True, now=40.0)  # type: ignore[arg-type]
    r.owner_returned("alice", 50.0)  # back, but with another config: the domain is released soon
    with pytest.raises(TunnelRefused):
        r.add(tunnel("bob", "web", subdomain="web"), 50.0 + DOMAIN_RECLAIM - 1)
    r.add(tunnel("bob", "web", subdomain="web"), 50.0 + DOMAIN_RECLAIM + 1)
    # never back: free after DOMAIN_HOLD
    c = tunnel("carol", "c", subdomain="c")
    r.add(c, 0.0)
    r.remove(c, client_gone=True, now=0.0)
    r.add(tunnel("dave", "c", subdomain="c"), DOMAIN_HOLD + 1)
    # a tunnel removed on purpose frees its domain at once
    e = tunnel("erin", "e", subdomain="e")
    r.add(e, 0.0)
    r.remove(e, client_gone=False, now=0.0)
    r.add(tunnel("frank", "e", subdomain="e"), 0.0)


def test_claiming_and_releasing_n_tunnels_costs_linear_time() -> None:
    # Before this router, releasing one tunnel scanned every route relayd held: 20,000 tunnels
    # took minutes.  The bound is loose on purpose (a shared machine); O(N^2) misses it by far.
    r = VhostRouter("h")
    tunnels = [tunnel(f"c{i % 50}", f"t{i}", subdomain=f"s{i}", locations=("/", f"/p{i}")) for i in range(20_000)]
    t0 = time.process_time()
    for t in tunnels:
        r.add(t, 0.0)
    for t in tunnels:
        r.remove(t, client_gone=True, now=1.0)
    assert time.process_time() - t0 < 10.0
    many = tunnel("c0", "many", subdomain="big", locations=tuple(f"/l{i}" for i in range(64)))
    r.add(many, 2.0)
    assert r.match_http("big.h", "/l63/x") is many


def test_junk_claims_of_one_client_cannot_evict_another_clients_reservation() -> None:
    r = VhostRouter("h")
    lab = tunnel("lab", "nb", subdomain="jupyter")
    r.add(lab, 0.0)
    r.remove(lab, client_gone=True, now=1.0)  # the lab's network blips
    for cycle in range(40):  # mallory registers and drops thousands of junk domains
        junk = tunnel(f"mallory{cycle % 3}", "j", domains=tuple(f"j{cycle}-{i}.example" for i in range(64)))
        r.add(junk, 2.0)
        r.remove(junk, client_gone=True, now=2.0)
    r.holds.max_total = 1000  # a small table: full, so holds must be evicted
    for i in range(2000):
        junk = tunnel("mallory0", "k", domains=(f"k{i}.example",))
        r.add(junk, 3.0)
        r.remove(junk, client_gone=True, now=3.0)
    assert len(r.holds) <= 1000
    with pytest.raises(TunnelRefused, match="belongs to client 'lab'"):
        r.add(tunnel("mallory0", "grab", subdomain="jupyter"), 5.0)
