from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ClientConfig, PortRanges, ServerConfig, load_config, resolve_path
from shared.errors import ConfigError
from tests.e2e.harness import ROOT


def write(tmp: Path, text: str) -> Path:
    p = tmp / "x.toml"
    p.write_text(text)
    return p


def test_examples_load_and_document_every_key() -> None:
    d = load_config(ServerConfig, ROOT / "conf" / "relayd.toml")
    c = load_config(ClientConfig, ROOT / "conf" / "relayc.toml")
    assert d.auth.token == c.auth.token and d.bind_port == c.server_port
    assert c.tunnels[0].remote_port in d.port_ranges
    for model, path in ((ServerConfig, "relayd.toml"), (ClientConfig, "relayc.toml")):
        text = (ROOT / "conf" / path).read_text()
        for key, table in model.table_keys().items():
            assert key in text, f"conf/{path} does not document {key}"
            for subkey in table.table_keys() if table else ():
                assert subkey in text, f"conf/{path} does not document {key}.{subkey}"


@pytest.mark.parametrize(
    "text,key,reason",
    [
        ('bind_prot = 1\n[auth]\ntoken="t"', "bind_prot", "unknown key"),
        ('bind_port = "x"\n[auth]\ntoken="t"', "bind_port", "integer"),
        ('allow_ports = "7000-6000"\n[auth]\ntoken="t"', "allow_ports", "low <= high"),
        ('[auth]\ntoken="t"\n[tls]\ncert_file="a.pem"', "tls.key_file", "together"),
        ("[auth]\ntokn='x'", "auth.tokn", "unknown key"),
        ('[auth]\ntoken="t"\n[acme]\nenable=true', "acme.challenge", "tls-alpn-01 is answered on vhost_https_port"),
        (
            'vhost_https_port=8443\n[auth]\ntoken="t"\n[acme]\nenable=true\nchallenge="http-01"',
            "acme.challenge",
            "http-01 is answered on vhost_http_port, which is 0",
        ),
        ('[auth]\ntoken="t"\n[acme]\nchallenge="dns-01"', "acme.challenge", "must be one of"),
        (
            '[auth]\ntoken="t"\n[[certificates]]\ncert_file="nope.pem"\nkey_file="nope.key"',
            "certificates[0].cert_file",
            "no such file",
        ),
    ],
)
def test_server_errors_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, write(tmp_path, text))
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(tmp_path / "x.toml") in str(info.value)


@pytest.mark.parametrize(
    "text,key",
    [
        (
            '[auth]\ntoken="t"\n[[tunnels]]\nname="a"\nlocal_port=1\n[[tunnels]]\nname="a"\nlocal_port=2',
            "tunnels[1].name",
        ),
        ('[auth]\ntoken="t"\n[[tunnels]]\nname="a"\nlocal_port=1\ntype="quic"', "tunnels[0].type"),
        ('[auth]\ntoken="t"\n[[tunnels]]\nname="a"', "tunnels[0].local_port"),
        ('[auth]\ntoken="t"\n[tls]\nserver_fingerprint="sha256:abc"', "tls.server_fingerprint"),
        ('server_port = 0\n[auth]\ntoken="t"', "server_port"),
        ("name = 'has space'\n[auth]\ntoken='t'", "name"),
        ("", "auth.token"),
    ],
)
def test_client_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ClientConfig, write(tmp_path, text))
    assert info.value.key == key


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, write(tmp_path, "bind_port = = 3"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(ServerConfig, tmp_path / "nope.toml")


def test_fingerprint_forms_are_normalized(tmp_path: Path) -> None:
    fp = "AB:" * 31 + "AB"
    cfg = load_config(ClientConfig, write(tmp_path, f'[auth]\ntoken="t"\n[tls]\nserver_fingerprint="SHA256:{fp}"'))
    assert cfg.tls.server_fingerprint == ["sha256:" + "ab" * 32]  # one pin, or a list (a cluster)
    cfg = load_config(
        ClientConfig,
        write(
            tmp_path,
            f'server_addr = ["a.example", "b.example:7001"]\n[auth]\n'
            f'token="t"\n[tls]\nserver_fingerprint=["SHA256:{fp}"]',
        ),
    )
    assert cfg.server_addr == ["a.example", "b.example:7001"] and cfg.tls.server_fingerprint == ["sha256:" + "ab" * 32]
    with pytest.raises(ConfigError) as info:
        load_config(ClientConfig, write(tmp_path, 'server_addr = ["a.example:99999"]\n[auth]\ntoken="t"'))
    assert info.value.key == "server_addr"


def test_port_ranges() -> None:
    r = PortRanges("6000-7000, 8022")
    assert 6000 in r and 7000 in r and 8022 in r and 5999 not in r and 8021 not in r
    assert r.size() == 1002


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    assert resolve_path(tmp_path / "relayd.toml", "state") == tmp_path / "state"
    assert resolve_path(tmp_path / "relayd.toml", "/abs") == Path("/abs")


def test_the_token_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "relay.token").write_text("a-token-from-a-file-0123456789\nignored second line\n")
    cfg = load_config(ClientConfig, write(tmp_path, '[auth]\ntoken_file = "relay.token"'))
    assert cfg.auth.token == "a-token-from-a-file-0123456789"
    with pytest.raises(ConfigError) as both:
        load_config(ClientConfig, write(tmp_path, '[auth]\ntoken = "x"\ntoken_file = "relay.token"'))
    assert both.value.key == "auth.token_file" and "not both" in both.value.reason
    with pytest.raises(ConfigError) as missing:
        load_config(ServerConfig, write(tmp_path, '[auth]\ntoken_file = "nope.token"'))
    assert missing.value.key == "auth.token_file" and "cannot read" in missing.value.reason
    monkeypatch.setenv("RELAY_TOKEN", "a-token-from-the-environment-0123")
    assert load_config(ServerConfig, write(tmp_path, "[auth]")).auth.token == "a-token-from-the-environment-0123"
    # the example-token check holds whatever the source
    (tmp_path / "example.token").write_text("example-token-change-me\n")
    with pytest.raises(ConfigError) as example:
        load_config(ServerConfig, write(tmp_path, 'bind_addr = "0.0.0.0"\n[auth]\ntoken_file = "example.token"'))
    assert example.value.key == "auth.token"
    monkeypatch.delenv("RELAY_TOKEN")
    with pytest.raises(ConfigError) as none:
        load_config(ClientConfig, write(tmp_path, "[auth]"))
    assert none.value.key == "auth.token" and "RELAY_TOKEN" in none.value.reason
