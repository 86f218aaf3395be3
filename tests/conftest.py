"""Fixtures shared by the end-to-end and browser tests."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e.harness import Proc, TcpServer, echo_handler


@pytest.fixture
def echo() -> Iterator[TcpServer]:
    """A threaded TCP echo server on 127.0.0.1."""
    server = TcpServer(echo_handler)
    yield server
    server.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts are appended here and killed (by pid) when it ends."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)


@pytest.fixture
def host_app() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP app on 127.0.0.1 recording the Host header of each request it gets."""
    hosts: list[str] = []

    class App(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            """Quiet: the test reads the recorded Host headers instead."""

        def do_GET(self) -> None:
            hosts.append(self.headers.get("Host", ""))
            body = b"hello from the lab"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), hosts
    server.shutdown()
    server.server_close()
