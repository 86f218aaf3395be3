from __future__ import annotations

import functools
import re
import ssl
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_server import sni
from relay_server.sni import (
    MAX_CLIENT_HELLO,
    MAX_HELLO_RECORDS,
    MAX_RAW_HELLO,
    MAX_RECORD,
    NEED_MORE,
    ClientHelloReader,
    SniError,
    read_sni,
)


def client_hello(server_name: str | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@functools.cache
def real_hello(server_name: str = "real.example.org") -> bytes:
    return client_hello(server_name)


def handshake_of(stream: bytes) -> bytes:
    """The handshake bytes carried by a stream of TLS records."""
    out, pos = bytearray(), 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def records(handshake: bytes, sizes: Iterable[int], version: bytes = b"\x03\x01") -> bytes:
    """``handshake`` re-split into records whose payload sizes cycle through ``sizes``."""
    sizes = list(sizes)
    out, pos, i = bytearray(), 0, 0
    while pos < len(handshake):
        part = handshake[pos : pos + sizes[i % len(sizes)]]
        out += b"\x16" + version + len(part).to_bytes(2, "big") + part
        pos += len(part)
        i += 1
    return bytes(out)


def padded(handshake: bytes, total: int) -> bytes:
    """A ClientHello handshake message grown to ``total`` bytes by a padding extension (RFC 7685).

    The padding goes first among the extensions so that the server_name one is still read.
    """
    body = handshake[4:]
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    pad = total - len(handshake) - 4
    assert pad >= 0
    exts = b"\x00\x15" + pad.to_bytes(2, "big") + bytes(pad) + body[pos + 2 :]
    new_body = body[:pos] + (ext_len + 4 + pad).to_bytes(2, "big") + exts[: ext_len + 4 + pad]
    out = b"\x01" + len(new_body).to_bytes(3, "big") + new_body
    assert len(out) == total
    return out


def synthetic_hello(raw_name: bytes) -> bytes:
    """A minimal ClientHello record carrying ``raw_name`` as its host_name, unchecked."""
    entry = b"\x00" + len(raw_name).to_bytes(2, "big") + raw_name
    ext = len(entry).to_bytes(2, "big") + entry
    exts = b"\x00\x00" + len(ext).to_bytes(2, "big") + ext
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(hs, [len(hs)])


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def feed_all(chunks: Iterable[bytes]) -> tuple[str | None, ClientHelloReader]:
    """Feed until the reader answers; every answer but the last must be None."""
    reader, name = ClientHelloReader(), None
    for chunk in chunks:
        assert name is None, "fed past the answer"
        name = reader.feed(chunk)
    return name, reader


VALID_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


# ---- read_sni, the one-shot form ----


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


# ---- ClientHelloReader: however the hello is split ----


@pytest.mark.parametrize("name", ["demo.example.org", "Jupyter.Relay.Example.Org"])
@pytest.mark.parametrize("one_byte_records", [False, True])
@pytest.mark.parametrize("piece", [None, 1, 7, 1000])
def test_reader_gives_the_name_however_split(name: str, one_byte_records: bool, piece: int | None) -> None:
    stream = client_hello(name)
    if one_byte_records:
        stream = records(handshake_of(stream), [1])
        assert len(stream) > 5 * len(handshake_of(stream))
    chunks = [stream] if piece is None else pieces(stream, piece)
    got, reader = feed_all(chunks)
    assert got == name.lower()
    assert reader.received() == stream


def test_bytes_after_the_hello_are_kept_not_parsed() -> None:
    hello = real_hello()
    # TLS 1.3 middlebox-compat ChangeCipherSpec and some early data, in the same read
    after = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x04abcd"
    reader = ClientHelloReader()
    assert reader.feed(hello + after) == "real.example.org"
    assert reader.received() == hello + after
    # a second handshake message after the ClientHello in its last record: ignored
    hs = handshake_of(hello) + b"\x0b\x00\x00\x00"
    assert ClientHelloReader().feed(records(hs, [len(hs)])) == "real.example.org"


def test_reader_takes_any_bytes_like() -> None:
    hello = real_hello()
    reader = ClientHelloReader()
    buf = bytearray(hello[:100])
    assert reader.feed(buf) is None
    buf[:] = b"\xff" * 100  # a reused read buffer: what was fed must not change
    assert reader.feed(memoryview(hello)[100:]) == "real.example.org"
    assert reader.received() == hello


def test_feeding_a_finished_reader_is_a_bug() -> None:
    reader = ClientHelloReader()
    assert reader.feed(real_hello()) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"")
    reader = ClientHelloReader()
    with pytest.raises(SniError):
        reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"\r\n")
    assert reader.received() == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (b"\x17\x03\x03\x00\x10", "not a TLS handshake"),
        (b"\x16\x02\x00\x00\x10", "not a TLS handshake"),
        (b"\x16\x03\x01\x00\x00", "bad TLS record length 0"),
        (b"\x16\x03\x01" + (MAX_RECORD + 1).to_bytes(2, "big"), "bad TLS record length"),
    ],
)
def test_bad_second_record_is_an_error(header: bytes, error: str) -> None:
    hs = handshake_of(real_hello())
    reader = ClientHelloReader()
    assert reader.feed(records(hs[:10], [10])) is None
    with pytest.raises(SniError, match=error):
        reader.feed(header)


# ---- the server name must be a DNS host name ----


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"Demo.Example.ORG", "demo.example.org"),
        (b"demo.example.org.", "demo.example.org"),  # the absolute form
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"a" * 63 + b".b", "a" * 63 + ".b"),
        (b".".join([b"a" * 63] * 3 + [b"b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),  # 253
        (b"localhost", "localhost"),
        (b"1.2.3.4", "1.2.3.4"),  # as shared/config.check_domain: it matches no route
    ],
)
def test_valid_host_names(raw: bytes, name: str) -> None:
    assert ClientHelloReader().feed(synthetic_hello(raw)) == name


@pytest.mark.parametrize(
    "raw",
    [
        b"evil.example.org\r\nX-Injected: 1",
        b"evil\n.example.org",
        b"a\x00b.example.org",
        b"\x1b[31mred.example.org",
        b"a b.example.org",
        b"under_score.example.org",
        b"caf\xc3\xa9.example.org",
        b"\xff",
        b"a" * 64 + b".example.org",
        b".".join([b"a" * 63] * 4),  # 255
        b".".join([b"a" * 63] * 3 + [b"b" * 62]),  # 254
        b"",
        b".",
        b"a..example.org",
        b".example.org",
        b"example.org..",
        b"-a.example.org",
        b"a-.example.org",
        b"[::1]",
        b"::1",
        b"a" * 300,
    ],
)
def test_hostile_names_are_errors(raw: bytes) -> None:
    for stream in (synthetic_hello(raw), records(handshake_of(synthetic_hello(raw)), [1])):
        with pytest.raises(SniError) as info:
            feed_all(pieces(stream, 3))
        message = str(info.value)
        assert message.isprintable() and message.isascii()  # no raw control bytes in logs
        assert "\n" not in message and "\r" not in message


# ---- bounds ----


def test_declared_length_over_the_limit_is_refused_at_once() -> None:
    hs_header = b"\x01" + (MAX_CLIENT_HELLO - 4 + 1).to_bytes(3, "big")
    with pytest.raises(SniError, match="too large"):
        ClientHelloReader().feed(b"\x16\x03\x01\x40\x00" + hs_header)


def test_largest_client_hello_in_full_records() -> None:
    hs = padded(handshake_of(real_hello()), MAX_CLIENT_HELLO)
    stream = records(hs, [16384])
    got, reader = feed_all(pieces(stream, 4096))
    assert got == "real.example.org"
    assert reader.received() == stream
    with pytest.raises(SniError, match="too large"):
        read_sni(records(padded(handshake_of(real_hello()), MAX_CLIENT_HELLO + 1), [16384]))


def test_a_hello_in_as_many_one_byte_records_as_allowed_is_accepted() -> None:
    stream = records(padded(handshake_of(real_hello()), MAX_HELLO_RECORDS), [1])
    assert len(stream) == 6 * MAX_HELLO_RECORDS < MAX_RAW_HELLO
    got, reader = feed_all(pieces(stream, 7))
    assert got == "real.example.org"
    assert reader.received() == stream


def test_a_hello_split_into_more_records_is_refused_whole_or_in_pieces() -> None:
    stream = records(padded(handshake_of(real_hello()), 30000), [1])
    reader = ClientHelloReader()
    fed = 0
    with pytest.raises(SniError, match=f"more than {MAX_HELLO_RECORDS} records"):
        for chunk in pieces(stream, 6):
            assert reader.feed(chunk) is None
            fed += 1
    assert fed == MAX_HELLO_RECORDS  # refused at the first record over the count, not later
    with pytest.raises(SniError, match="records"):
        read_sni(stream)


# ---- arbitrary input: None, a valid name, or SniError; whole and split agree ----


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "real", "synthetic"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "real":
        hs = handshake_of(real_hello())
    else:
        raw = draw(st.binary(max_size=80) | st.from_regex(rb"[A-Za-z0-9.-]{0,80}", fullmatch=True))
        hs = handshake_of(synthetic_hello(raw))
    stream = bytearray(records(hs, draw(st.lists(st.integers(1, 400), min_size=1, max_size=5))))
    for _ in range(draw(st.integers(0, 3))):  # record headers included
        stream[draw(st.integers(0, len(stream) - 1))] = draw(st.integers(0, 255))
    return bytes(stream[: draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream)


def outcome(chunks: list[bytes]) -> tuple[str, str | None]:
    reader, fed = ClientHelloReader(), bytearray()
    for chunk in chunks:
        fed += chunk
        try:
            name = reader.feed(chunk)
        except SniError as exc:
            assert reader.received() == fed
            return "error", str(exc)
        if name is not None:
            assert VALID_NAME.fullmatch(name), name
            assert reader.received() == fed
            return "name", name
    assert reader.received() == fed
    return "more", None


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_bytes_whole_or_split_agree(data: st.DataObject) -> None:
    stream = data.draw(streams())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    split = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert outcome([stream]) == outcome(split)


# ---- cost: linear in the bytes fed, however the hello is split ----


def lines_run_in_sni(fn: Callable[[], Any]) -> int:
    """How many lines of relay_server/sni.py run during ``fn()``: a deterministic work count."""
    count = 0
    target = sni.__file__

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        count += event == "line"
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == target else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_one_byte_records_fed_one_at_a_time_cost_linear_work() -> None:
    stream = records(padded(handshake_of(real_hello()), MAX_HELLO_RECORDS), [1])
    recs = pieces(stream, 6)
    assert len(recs) == MAX_HELLO_RECORDS
    result: list[str | None] = []
    lines = lines_run_in_sni(lambda: result.append(feed_all(recs)[0]))
    assert result == ["real.example.org"]
    # About 40 lines per record (39 on CPython 3.11) plus the final parse.  Walking the buffer again
    # on each read (the old read_sni per read) runs about 10 lines per buffered record per read:
    # 5e6 for 1,000 records, 2e7 for 2,000.
    assert lines < 100 * len(recs), lines
