from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import RemoteProtocolError
from shared.messages import (
    MAX_MESSAGE_SIZE,
    Challenge,
    Hello,
    MessageDecoder,
    StreamOpen,
    TunnelAdd,
    TunnelSpec,
    TunnelStatus,
    encode_message,
    encode_stream_open,
)

SAMPLES = [
    Hello(name="lab-gpu-01", version="0.1.0", client_nonce="ab" * 32),
    Challenge(server_nonce="cd" * 32),
    TunnelAdd(tunnel=TunnelSpec(name="ssh", local_port=22, remote_port=6000)),
    TunnelStatus(name="ssh", ok=False, error="port 80 is not in allow_ports"),
    StreamOpen(tunnel="ssh", visitor="198.51.100.7:51234"),
]


def raw(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def test_whole_and_byte_at_a_time() -> None:
    wire = b"".join(encode_message(m) for m in SAMPLES)
    assert MessageDecoder().feed(wire) == SAMPLES
    dec = MessageDecoder()
    out = []
    for i in range(len(wire)):
        out += dec.feed(wire[i : i + 1])
    assert out == SAMPLES
    assert dec.buffered == 0


def test_rest_after_preamble_is_kept() -> None:
    dec = MessageDecoder()
    assert dec.feed(encode_message(SAMPLES[-1]) + b"SSH-2.0-", limit=1) == [SAMPLES[-1]]
    assert dec.take_rest() == b"SSH-2.0-"


def test_unknown_type_is_named() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown control message type 'teleport'"):
        MessageDecoder().feed(raw({"type": "teleport"}))


def test_bad_field_is_named() -> None:
    with pytest.raises(RemoteProtocolError, match=r"tunnel_add message: field tunnel.local_port"):
        MessageDecoder().feed(raw({"type": "tunnel_add", "tunnel": {"name": "x", "local_port": 70000}}))
    with pytest.raises(RemoteProtocolError, match="field name"):
        MessageDecoder().feed(raw({"type": "hello", "client_nonce": "a" * 64}))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    (msg,) = MessageDecoder().feed(raw({"type": "stream_open", "tunnel": "ssh", "future": 1}))
    assert msg == StreamOpen(tunnel="ssh")


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"\xff\xfe", b'"str"'])
def test_garbage_bodies(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        MessageDecoder().feed(struct.pack("!I", len(body)) + body)


def test_oversized_length_rejected_before_buffering() -> None:
    dec = MessageDecoder()
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        dec.feed(struct.pack("!I", MAX_MESSAGE_SIZE + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    dec = MessageDecoder(max_size=200)
    try:
        dec.feed(data)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize(
    ("tunnel", "visitor"),
    [("ssh", "198.51.100.7:51234"), ("web-1", "[2001:db8::1]:443"), ('odd"\\name', "caf\u00e9:1"), ("x", "")],
)
def test_stream_open_fast_encoding_is_the_generic_one(tunnel: str, visitor: str) -> None:
    assert encode_stream_open(tunnel, visitor) == encode_message(StreamOpen(tunnel=tunnel, visitor=visitor))
    assert MessageDecoder().feed(encode_stream_open(tunnel, visitor)) == [StreamOpen(tunnel=tunnel, visitor=visitor)]


def test_whitespace_around_a_message_is_accepted_and_trailing_bytes_are_not() -> None:
    (msg,) = MessageDecoder().feed(raw_body(b' \n{"type": "stream_open", "tunnel": "ssh"}\r\n '))
    assert msg == StreamOpen(tunnel="ssh")
    with pytest.raises(RemoteProtocolError, match="not valid JSON"):
        MessageDecoder().feed(raw_body(b'{"type":"stream_open","tunnel":"ssh"}x'))
    with pytest.raises(RemoteProtocolError, match="not valid JSON"):
        MessageDecoder().feed(raw_body(b'{"type":"stream_open","tunnel":}'))


def raw_body(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def test_deeply_nested_json_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        MessageDecoder().feed(raw_body(b"[" * 60_000))
