"""The README's Quickstart, offline: a fresh checkout, ``python3 -m venv .venv``, relay installed
into it with pip (a regular install, as ``pip install .``), and then ``.venv/bin/relayd`` and
``.venv/bin/relayc`` run, without activating the venv, on the example configs: ``--check``, ``--help``,
``install-service --print`` (the unit runs the venv's python), and relayd started for real on the
example config (with free ports) serving its dashboard from the installed package's files.

Without the network, two things differ from the README's command, and only in how pip gets what it
needs: relay's dependencies (and setuptools, to build it) come from the environment running this
test, through a .pth file in the new venv that appends its site-packages after the venv's own
(``--no-deps --no-build-isolation --no-index``), and the venv is made ``--without-pip`` so pip and
setuptools are that environment's too (a venv's bundled setuptools may be too old to build a wheel
alone). The venv's own site-packages come first, so relay runs from what pip installed there. The
online path, exactly as written (with Debian's own Python too), is in the closing note of issue 18."""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, free_port
from tests.waiting import wait_until


def can_build_offline() -> bool:
    """setuptools 70.1+ builds a wheel by itself; older ones need the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


NO_BUILD = "setuptools>=70.1 (in the test extra) is needed to build relay offline: pip install -e '.[test]'"
if not can_build_offline() and os.environ.get("CI"):
    raise RuntimeError(f"CI: {NO_BUILD}")
pytestmark = pytest.mark.skipif(not can_build_offline(), reason=NO_BUILD)


def fresh_checkout(dest: Path) -> Path:
    """What ``git clone`` gives: the files the install and the Quickstart use."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "relayd-state", "relayc_known_servers", "docker", "cluster")
    for name in ("shared", "relay_server", "relay_client", "conf"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def run(argv: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_NO_INPUT"] = "1"
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return done


def test_the_quickstart_installs_relayd_and_relayc_into_a_venv(tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "relay")
    venv = checkout / ".venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], checkout)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], checkout)
    venv_site = Path(purelib.stdout.strip())
    assert venv_site.is_relative_to(venv), purelib
    outer = [p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]) if Path(p).is_dir()]
    (venv_site / "_outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))

    installed = run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                     "--disable-pip-version-check", "."], checkout)  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    where = run([python, "-c", "import relay_server, relay_client, shared; print(relay_server.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv_site), where  # what pip installed, not the checkout
    assert (venv_site / "relay_server" / "dashboard" / "static" / "index.html").is_file()  # package data

    relayd, relayc = venv / "bin" / "relayd", venv / "bin" / "relayc"
    for prog, config in ((relayd, "conf/relayd.toml"), (relayc, "conf/relayc.toml")):
        head = "".join(prog.read_text().splitlines(True)[:3])  # #!python, or pip's /bin/sh trampoline for long paths
        assert str(python) in head, head  # the venv's python
        checked = run([prog, "--check", "-c", config], checkout, timeout=60)
        assert checked.returncode == 0 and "configuration is valid" in checked.stderr + checked.stdout, checked
    helped = run([relayc, "--help"], checkout, timeout=60)
    assert helped.returncode == 0 and "relayc" in helped.stdout, helped
    unit = run([relayc, "install-service", "-c", "conf/relayc.toml", "--print"], checkout, timeout=60)
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={python} -m relay_client.cli -c {checkout / 'conf' / 'relayc.toml'}" in unit.stdout

    # relayd from the venv on the example config as shipped, but for its ports (tests run in parallel)
    config = checkout / "conf" / "relayd.toml"
    text = config.read_text()
    ports = {"bind_port": 7000, "vhost_http_port": 8080, "vhost_https_port": 8443, "port": 7500}
    for key, shipped in ports.items():
        ports[key] = free_port()
        text, n = re.subn(rf"^{key} = {shipped}$", f"{key} = {ports[key]}", text, flags=re.M)
        assert n == 1, key
    config.write_text(text)
    log = tmp_path / "relayd.log"
    with log.open("wb") as out:  # the script itself, as the README runs it (the harness runs python -m)
        relayd_proc = subprocess.Popen([relayd, "-c", config], cwd=checkout, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)  # fmt: skip
    try:

        def logged(pattern: str) -> bool:
            assert relayd_proc.poll() is None, log.read_text()
            return re.search(pattern, log.read_text()) is not None

        def get(path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", ports["port"], timeout=5)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        def dashboard_page() -> bool:
            """The sign-in page and a static file, from the installed package's files."""
            try:
                (status, page), (static, _) = get("/login"), get("/static/app.js")
            except OSError:
                return False
            return status == 200 and b"<html" in page.lower() and static == 200

        listening = rf"listening for relayc on 127\.0\.0\.1:{ports['bind_port']}"
        wait_until(lambda: logged(listening), 60, lambda: f"relayd from the venv to listen:\n{log.read_text()}")
        wait_until(dashboard_page, 30, lambda: f"the dashboard's page from the installed package:\n{log.read_text()}")
        assert (checkout / "conf" / "relayd-state" / "relayd.db").is_file()
    finally:
        relayd_proc.terminate()
        try:
            relayd_proc.wait(15)
        except subprocess.TimeoutExpired:
            relayd_proc.kill()
            relayd_proc.wait(5)
    assert relayd_proc.returncode == 0, log.read_text()
