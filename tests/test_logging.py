"""Log lines carry names peers chose: control characters must come out escaped."""

from __future__ import annotations

import io
import logging

from shared.cli import EscapingFormatter, escape_controls


def test_control_characters_are_escaped_in_messages_not_in_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test-escaping")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("client %s said %r", "evil\r\nERROR forged", "\x1b[2J\x00\x7f\x85")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("name %s", "a\nb")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue().splitlines()
    assert out[0] == "WARNING client evil\\r\\nERROR forged said '\\x1b[2J\\x00\\x7f\\x85'"
    assert out[1] == "ERROR name a\\nb"
    assert out[2] == "Traceback (most recent call last):"  # the traceback keeps its lines
    assert out[-1] == "ValueError: boom"


def test_escape_controls_keeps_printable_text() -> None:
    text = "plain ASCII, UTF-8 é 中文, quotes ' \" and backslash \\"
    assert escape_controls(text) == text
    assert escape_controls("\t\x01\u2028\u2029") == "\\t\\x01\\u2028\\u2029"  # str.splitlines() splits on these
