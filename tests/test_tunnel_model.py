"""The one tunnel model (shared/tunnel.py): each field declared once, the same rules at every edge."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import pytest

from shared.config import ClientConfig, parse_config
from shared.errors import ConfigError, RemoteProtocolError
from shared.messages import MessageDecoder, TunnelAdd, encode_message
from shared.schema import SchemaError, ShapeProblem
from shared.tunnel import InvalidTunnel, TunnelKind, TunnelSpec, field_list


def raw(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def test_relayc_toml_tunnels_are_the_model_and_the_form_lists_every_field() -> None:
    cfg = parse_config(ClientConfig, {"auth": {"token": "t" * 20}, "tunnels": [{"name": "a", "local_port": 22}]}, "x")
    assert type(cfg.tunnels[0]) is TunnelSpec
    names = [f.name for f in dataclasses.fields(TunnelSpec)]
    listed = field_list()
    assert [f["name"] for f in listed] == names
    by_name = {f["name"]: f for f in listed}
    assert by_name["remote_port"]["kinds"] == ["tcp", "udp"] and by_name["locations"]["kinds"] == ["http"]
    assert by_name["http_password"]["secret"] and by_name["name"]["required"]
    assert by_name["type"]["choices"] == ["tcp", "http", "https", "udp", "secret"]


def test_values_are_normalized_and_kinds_are_an_enum() -> None:
    spec = TunnelSpec.parse({"name": "j", "type": "http", "local_port": 8888, "subdomain": "Jupyter",
                             "custom_domains": ["Lab.Example.ORG."], "bandwidth_limit": "10MB"})  # fmt: skip
    assert spec.type is TunnelKind.HTTP and spec.subdomain == "jupyter"
    assert spec.custom_domains == ["lab.example.org"] and spec.bandwidth_limit == 10_000_000


@pytest.mark.parametrize(
    ("fields", "key", "words"),
    [
        ({"subdomain": "x"}, "subdomain", 'this one is type "tcp"'),
        ({"type": "https", "subdomain": "x", "locations": ["/a"]}, "locations", "passed through untouched"),
        ({"type": "http"}, "subdomain", "needs subdomain or custom_domains"),
        ({"type": "http", "subdomain": "x", "remote_port": 80}, "remote_port", "only for tcp and udp tunnels"),
        ({"type": "http", "subdomain": "x", "http_user": "u"}, "http_password", "given together"),
        ({"type": "quic"}, "type", "must be one of 'tcp', 'http', 'https', 'udp', 'secret'"),
        ({"locations": ["x"]}, "locations", "must start with '/'"),
    ],
)
def test_rules_name_the_key(fields: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        TunnelSpec.parse({"name": "t", "local_port": 1, **fields}, ("tunnels", 2))
    (where, why), *_ = info.value.problems
    assert where == ("tunnels", 2, key) and words in why
    with pytest.raises(ConfigError, match=rf"relayc.toml: tunnels\[0\]\.{key}: "):
        parse_config(ClientConfig, {"auth": {"token": "t" * 20},
                                    "tunnels": [{"name": "t", "local_port": 1, **fields}]}, "relayc.toml")  # fmt: skip


def test_dict_forms_round_trip_and_secrets_stay_out_of_views() -> None:
    spec = TunnelSpec.parse({"name": "w", "type": "http", "local_port": 80, "subdomain": "w", "http_user": "u",
                             "http_password": "p", "locations": ["/api"], "allow_sources": ["10.0.0.0/8"]})  # fmt: skip
    wire = spec.to_dict(omit_defaults=True)
    assert "local_ip" not in wire and "remote_port" not in wire  # defaults are not sent
    assert TunnelSpec.parse(wire) == spec == TunnelSpec.parse(spec.to_dict())
    view = spec.to_dict(secrets=False)
    assert "http_password" not in view and view["http_user"] == "u"


def test_the_wire_refuses_a_broken_rule_by_name_and_a_broken_shape_as_a_protocol_error() -> None:
    (msg,) = MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": {"name": "ok", "local_port": 1,
                                                                        "subdomain": "x"}}))  # fmt: skip
    assert msg.tunnel == InvalidTunnel(
        "ok", "tunnel 'ok': subdomain: only for http/https tunnels (this one is type \"tcp\")"
    )
    (msg,) = MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": {"name": "bad name", "local_port": 1}}))
    assert isinstance(msg.tunnel, InvalidTunnel) and msg.tunnel.name == "bad name"
    (msg,) = MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": {"name": "n", "local_port": 1, "x": 1}}))
    assert isinstance(msg.tunnel, InvalidTunnel) and "unknown key" in msg.tunnel.problem
    too_many = {"name": "n", "local_port": 1, "type": "http", "custom_domains": [f"d{i}.org" for i in range(65)]}
    with pytest.raises(RemoteProtocolError, match=r"field tunnel\.custom_domains: must hold at most 64 items"):
        MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": too_many}))
    with pytest.raises(RemoteProtocolError, match=r"field tunnel\.local_port: expected an integer"):
        MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": {"name": "n", "local_port": "22"}}))
    spec = TunnelSpec.parse({"name": "s", "local_port": 22, "remote_port": 6000})
    (back,) = MessageDecoder().feed(encode_message(TunnelAdd(tunnel=spec)))
    assert back.tunnel == spec


def test_shape_problems_are_marked() -> None:
    with pytest.raises(SchemaError) as info:
        TunnelSpec.parse({"name": "n", "local_port": 70000, "subdomain": "-bad-"})
    kinds = {p[0][-1]: isinstance(p, ShapeProblem) for p in info.value.problems}
    assert kinds == {"local_port": True, "subdomain": False}


@pytest.mark.parametrize("rate", ["1" + " " * 60_000 + "!", [1], None, 1.5, "9" * 400])
def test_a_peers_rate_is_checked_in_bounded_time_and_never_raises_past_the_decoder(rate: Any) -> None:
    """bandwidth_limit accepts "10MB" and is read from peers: the text is capped before any regex
    (the old pattern backtracked cubically on digits, spaces and a stray character)."""
    spec = {"name": "t", "local_port": 1, "bandwidth_limit": rate}
    (msg,) = MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": spec}))
    assert isinstance(msg.tunnel, InvalidTunnel) and "bandwidth_limit" in msg.tunnel.problem
    assert len(msg.tunnel.problem) <= 512
