from __future__ import annotations

import ssl

import pytest

from relay_server.sni import NEED_MORE, SniError, read_sni


def client_hello(server_name: str | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["demo.example.org", "Jupyter.Relay.Example.Org"])
def test_sni_from_a_real_client_hello(name: str) -> None:
    hello = client_hello(name)
    assert read_sni(hello) == name.lower()
    for i in range(len(hello)):  # any prefix asks for more
        assert read_sni(hello[:i]) is NEED_MORE


def test_client_hello_split_over_two_records() -> None:
    hello = client_hello("split.example.org")
    body = hello[5:]
    half = len(body) // 2
    two = b"\x16\x03\x01" + half.to_bytes(2, "big") + body[:half]
    two += b"\x16\x03\x01" + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert read_sni(two) == "split.example.org"


def test_no_sni_and_garbage_are_errors() -> None:
    with pytest.raises(SniError, match="no server name"):
        read_sni(client_hello(None))
    with pytest.raises(SniError, match="not a TLS handshake"):
        read_sni(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(SniError):
        read_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a ServerHello, not a ClientHello
