"""The pebble harness itself: the ACME directory answers over HTTPS verified with ``ca.pem``, the
management interface gives the issuing root, challtestsrv's DNS resolves any name to 127.0.0.1, and
``stop()`` leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.harness import free_port
from tests.e2e.pebble import Pebble, available
from tests.waiting import wait_until

MISSING = available()
if MISSING is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must install pebble for the ACME tests: {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def skip_name(msg: bytes, at: int) -> int:
    """The offset just past the domain name starting at ``at`` (labels, ending in 0 or a pointer)."""
    while True:
        length = msg[at]
        if length == 0:
            return at + 1
        if length & 0xC0 == 0xC0:  # compression pointer: two bytes, and the name ends there
            return at + 2
        at += 1 + length


def dns_a(port: int, name: str) -> bytes:
    """Ask 127.0.0.1:``port`` over UDP for ``name``'s A record; the first answer record's address.

    Not simply the reply's last 4 bytes: challtestsrv adds an SOA record in the authority section."""
    query_id = 0x5E1F
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    query = header + qname + struct.pack("!HH", 1, 1)  # type A, class IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, ("127.0.0.1", port))
        reply, _ = s.recvfrom(4096)
    got_id, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
    assert got_id == query_id and flags & 0x8000, f"not a response to our query: {reply!r}"
    assert flags & 0x000F == 0 and qdcount == 1 and ancount >= 1, f"no answer (rcode {flags & 0xF}): {reply!r}"
    at = skip_name(reply, 12) + 4  # the question: name, type, class
    at = skip_name(reply, at)  # the first answer's owner name
    rtype, rclass, _ttl, rdlength = struct.unpack("!HHIH", reply[at : at + 10])
    assert (rtype, rclass, rdlength) == (1, 1, 4), f"not an A record: {reply!r}"
    return reply[at + 10 : at + 14]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pebble_serves_its_directory_root_and_dns(tmp_path: Path) -> None:
    pebble = Pebble(tmp_path, http_port=free_port(), tls_port=free_port(), validity_seconds=3600)
    with pebble:
        pids = pebble.pids
        assert len(pids) == 2 and pebble.directory_url == f"https://127.0.0.1:{pebble.port}/dir"

        context = pebble.ssl_context()  # ca.pem only: the system roots would not do
        with urllib.request.urlopen(pebble.directory_url, timeout=10, context=context) as resp:
            assert resp.status == 200
            directory = json.loads(resp.read())
        assert {"newAccount", "newNonce", "newOrder"} <= directory.keys()

        root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
        assert root.issuer == root.subject  # self-signed: the trust anchor of issued certificates
        intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
        assert intermediate.issuer == root.subject

        assert dns_a(pebble.dns_port, "app.relay.test") == bytes([127, 0, 0, 1])
        assert "Using certificate validity period of 3600 seconds" in pebble.log()
        assert "Listening on" in pebble.log()
    for pid in pids:
        wait_until(lambda pid=pid: gone(pid), 10, f"process {pid} to be gone")
    assert pebble.pids == []
