"""Fixtures shared by the end-to-end and browser tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

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
