"""ruff and mypy, configured in pyproject.toml, are part of the test suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.harness import ROOT


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]])
def test_tool_is_clean(tool: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
