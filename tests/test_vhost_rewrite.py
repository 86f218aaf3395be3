"""relay_server.vhost._rewrite: the head relayd forwards for an http tunnel, both ways it is made
(as received plus X-Forwarded-* lines, or rebuilt when something must be dropped or changed)."""

from __future__ import annotations

import pytest

from relay_server.frontends.http import _rewrite
from relay_server.http1 import RequestHead, RequestReader


def parse(data: bytes) -> RequestHead:
    (head,) = RequestReader().feed(data)
    assert isinstance(head, RequestHead)
    return head


def forwarded(head: RequestHead, host_rewrite: str = "", drop_auth: bool = False) -> RequestHead:
    """What relayd forwards for ``head``; with ``drop_auth``, the headers handed to ``_rewrite`` are
    a new list without Authorization, as relayd makes them for a tunnel with a password."""
    headers = [(k, v) for k, v in head.headers if k.lower() != "authorization"] if drop_auth else head.headers
    return parse(_rewrite(head, headers, head.get("host") or "", "10.0.0.7", host_rewrite))


def test_plain_request_goes_on_as_received_plus_forwarded_lines() -> None:
    raw = b"GET /lab?x=1 HTTP/1.1\r\nHost:  jupyter.example  \r\nCookie: a=b\r\n\r\n"
    original = parse(raw)
    out = _rewrite(original, original.headers, "jupyter.example", "10.0.0.7", "")
    assert out.startswith(raw[:-2])  # byte for byte, then the added lines
    head = parse(out)
    assert head.target == "/lab?x=1" and head.get("cookie") == "a=b"
    assert head.get_all("x-forwarded-for") == ["10.0.0.7"]
    assert head.get("x-forwarded-proto") == "http" and head.get("x-forwarded-host") == "jupyter.example"


@pytest.mark.parametrize(
    "extra,expected_for",
    [
        (b"X-Forwarded-For: 1.2.3.4\r\n", "1.2.3.4, 10.0.0.7"),  # a chain is extended
        (b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n", "10.0.0.7"),  # forged ones dropped
    ],
)
def test_visitor_forwarded_headers_are_extended_or_replaced(extra: bytes, expected_for: str) -> None:
    head = forwarded(parse(b"GET / HTTP/1.1\r\nHost: a.example\r\n" + extra + b"\r\n"))
    assert head.get_all("x-forwarded-for") == [expected_for]
    assert head.get_all("x-forwarded-proto") == ["http"]
    assert head.get_all("x-forwarded-host") == ["a.example"]


@pytest.mark.parametrize("host_rewrite", ["localhost:8888", ""])
def test_host_rewrite_and_dropped_authorization(host_rewrite: str) -> None:
    """Without a host rewrite nothing else forces the head to be rebuilt: the Authorization line
    must still go, so the head as received (which has it) must not be what is forwarded."""
    original = parse(b"GET / HTTP/1.1\r\nHost: a.example\r\nAuthorization: Basic eDp5\r\n\r\n")
    head = forwarded(original, host_rewrite=host_rewrite, drop_auth=True)
    assert head.get("host") == (host_rewrite or "a.example")
    assert head.get("authorization") is None
    assert head.get("x-forwarded-host") == "a.example"
