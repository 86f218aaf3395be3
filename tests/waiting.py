"""Waiting on a condition with a deadline, instead of sleeping and then asserting.

``wait_until`` returns as soon as the condition holds and fails, naming what it waited for, when
the deadline passes first.  ``holds_for`` is for what must *not* happen within a time: it watches
the condition through the whole window and fails the moment it stops holding.  Each has an
``_async`` twin for code running on an event loop (polling with ``asyncio.sleep`` lets the loop
run what is being waited for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

Description = str | Callable[[], str]  # a callable is asked at failure time, for current values


def _describe(what: Description) -> str:
    return what if isinstance(what, str) else what()


def wait_until(predicate: Callable[[], object], timeout: float, what: Description, interval: float = 0.05) -> None:
    """Return once ``predicate()`` is true; raise AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {_describe(what)}")
        time.sleep(interval)


def holds_for(predicate: Callable[[], object], duration: float, what: Description, interval: float = 0.05) -> None:
    """Check ``predicate()`` throughout ``duration`` s; raise AssertionError naming ``what`` as soon as
    it is false."""
    deadline = time.monotonic() + duration
    while True:
        if not predicate():
            raise AssertionError(f"no longer true: {_describe(what)}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], object], timeout: float, what: Description, interval: float = 0.01
) -> None:
    """``wait_until`` on the running event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {_describe(what)}")
        await asyncio.sleep(interval)


async def holds_for_async(
    predicate: Callable[[], object], duration: float, what: Description, interval: float = 0.01
) -> None:
    """``holds_for`` on the running event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    while True:
        if not predicate():
            raise AssertionError(f"no longer true: {_describe(what)}")
        if loop.time() >= deadline:
            return
        await asyncio.sleep(interval)
