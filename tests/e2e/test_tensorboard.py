"""A real TensorBoard through relay, as the README's recipes publish it: by name through an http
tunnel (relayd's vhost routes on the Host header; basic auth in front, since TensorBoard has no
login of its own) and through a tcp tunnel's public port. Each path serves TensorBoard's page, its
``/data/logdir`` and ``/data/runs`` JSON and the scalars of a run written beforehand with
TensorBoard's own event-file writer (no TensorFlow or PyTorch needed).

TensorBoard runs as the README says: ``--host 127.0.0.1`` (only relayc, on the same machine, reaches
it). It needs no option for the proxy: it does not check the Host header, and its page loads
everything by relative URLs. (Served under a path instead of a name, with ``locations``, it would
need ``--path_prefix``.)"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import Proc, free_fixed_port, free_port, relayc_config, relayd_config, spawn
from tests.waiting import wait_until

if importlib.util.find_spec("tensorboard") is None and os.environ.get("CI"):
    raise RuntimeError("CI must install the test extras (pip install -e '.[test]'); missing: tensorboard")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="not installed: tensorboard (pip install -e '.[test]')"
)

NAME = "tb.relay.test"
USER, PASSWORD = "me", "a-long-password"  # the README's recipe puts basic auth in front
LOSSES = [1.0, 0.5, 0.25]


def write_run(logdir: Path, run: str) -> None:
    """One run with a scalar ``loss`` per step, as a training script's SummaryWriter writes it
    (this is the writer PyTorch's torch.utils.tensorboard uses)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir / run))
    for step, loss in enumerate(LOSSES):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", simple_value=loss)])
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    writer.close()


class TensorBoard:
    """``tensorboard --logdir LOGDIR --host 127.0.0.1 --port PORT``, its output in ``tmp/tensorboard.log``."""

    def __init__(self, tmp: Path, logdir: Path, port: int) -> None:
        self.port = port
        self.log = tmp / "tensorboard.log"
        argv = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                "--port", str(port), "--reload_interval", "1"]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(tmp)}  # its .tensorboard-info stays in the test's folder
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(argv, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def has_run(self, run: str) -> bool:
        """True once TensorBoard, asked on its own port, lists ``run``."""
        if self.popen.poll() is not None:
            raise AssertionError(f"tensorboard exited with {self.popen.returncode}:\n{self.output()}")
        try:
            status, body = get(self.port, f"127.0.0.1:{self.port}", "/data/runs")
        except OSError:
            return False
        return status == 200 and run in json.loads(body)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def get(port: int, host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` with ``Host: host``, as a browser that resolved ``host``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check_tensorboard(port: int, host: str, headers: dict[str, str]) -> None:
    """TensorBoard's page and data, as its page fetches them, through relay at ``host``."""
    status, body = get(port, host, "/", headers)
    assert status == 200 and b"<title>TensorBoard</title>" in body and b"<tb-webapp>" in body, (status, body[:300])
    status, body = get(port, host, "/data/logdir", headers)
    assert status == 200 and "logdir" in json.loads(body), (status, body)
    status, body = get(port, host, "/data/runs", headers)
    assert status == 200 and json.loads(body) == ["train"], (status, body)
    status, body = get(port, host, "/data/plugin/scalars/scalars?run=train&tag=loss", headers)
    assert status == 200, (status, body)
    assert [(step, value) for _, step, value in json.loads(body)] == list(enumerate(LOSSES))


def test_tensorboard_through_an_http_tunnel_by_name_and_a_tcp_tunnel(tmp_path: Path, procs: list[Proc]) -> None:
    logdir = tmp_path / "runs"
    write_run(logdir, "train")
    board = TensorBoard(tmp_path, logdir, free_fixed_port())
    try:
        port, http_port = free_port(), free_port()
        d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port, vhost_http_port=http_port,
                                                           subdomain_host="relay.test"))  # fmt: skip
        d.wait_for("listening for relayc")
        tunnels = [
            {"name": "tensorboard", "type": "http", "local_port": board.port, "subdomain": "tb",
             "http_user": USER, "http_password": PASSWORD},
            {"name": "tensorboard-tcp", "local_port": board.port, "remote_port": 0},
        ]  # fmt: skip
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
        c.wait_for(rf"tunnel tensorboard: http://{NAME}:{http_port}\b")
        public = int(c.wait_for(r"tunnel tensorboard-tcp: relayd port (\d+)").group(1))
        wait_until(lambda: board.has_run("train"), 90, lambda: f"TensorBoard to list the run:\n{board.output()}")

        host = f"{NAME}:{http_port}"
        auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        status, _ = get(http_port, host, "/data/runs")
        assert status == 401  # relayd asks for the password before anything reaches the lab machine
        check_tensorboard(http_port, host, auth)
        check_tensorboard(public, f"127.0.0.1:{public}", {})
    finally:
        board.stop()
