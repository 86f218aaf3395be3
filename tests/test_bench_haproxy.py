"""The benchmark's "haproxy" path (bench/__main__.py ``Bench.start_haproxy``): two haproxy
processes with TLS between them carry bytes both ways, and the outer one really verifies the
inner one's certificate (a ceiling measured with unverified TLS would flatter the C column)."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator

import pytest

from bench.__main__ import Bench
from bench.ssh_reverse import wait_port
from shared.tls import ensure_self_signed
from tests.e2e.harness import TcpServer, round_trip

NO_HAPROXY = "haproxy not installed (apt-get install haproxy)"
if shutil.which("haproxy") is None and os.environ.get("CI"):
    raise RuntimeError(f"CI must install haproxy for this test: {NO_HAPROXY}")
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason=NO_HAPROXY)


@pytest.fixture
def bench(echo: TcpServer) -> Iterator[Bench]:
    b = Bench(argparse.Namespace())
    b.targets["echo"] = echo.port
    try:
        yield b
    finally:
        b.stop()


def test_bytes_cross_the_two_haproxy_hops(bench: Bench) -> None:
    bench.start_haproxy()
    (path,) = bench.paths
    assert path.name == "haproxy" and len(path.pids) == 2
    payload = bytes(range(256)) * 4096  # 1 MiB there and back
    assert round_trip(path.ports["echo"], payload) == payload


def test_the_outer_haproxy_refuses_a_certificate_it_cannot_verify(bench: Bench) -> None:
    """Swap the certificate the outer hop trusts for another one: nothing passes any more."""
    bench.start_haproxy()
    (path,) = bench.paths
    other_cert, _ = ensure_self_signed(bench.tmp / "other")
    out_cfg = bench.tmp / "haproxy" / "echo-out.cfg"
    text = out_cfg.read_text()
    assert "verify required" in text
    out_cfg.write_text(text.replace(str(bench.tmp / "haproxy" / "server.crt"), str(other_cert)))
    outer = bench.procs[-1]
    outer.terminate()
    outer.wait(10)
    port = path.ports["echo"]
    bench.spawn(["haproxy", "-db", "-f", str(out_cfg)], "haproxy-echo-out-2.log")  # stopped by bench.stop
    wait_port(port)
    assert round_trip(port, b"ping") == b""  # the connection is closed without a byte passing
