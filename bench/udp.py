"""UDP through a relay tunnel against the direct path: iperf3 -u rate, loss and jitter, in one run.

    python -m bench.udp [--duration 5] [--rate 100M[,500M]] [--rounds 3] [--json FILE]

Starts on 127.0.0.1 an iperf3 server, relayd and relayc (TLS on, the real commands, log level
info) with two tunnels on one public port number: a tcp tunnel for iperf3's control connection and
a udp tunnel for its datagrams (iperf3 uses the same port number for both).  Then, for each
offered rate, runs ``iperf3 -c 127.0.0.1 -p PORT -u -b RATE -l 1400 -t DURATION -J`` straight to
the server (direct) and through relayd's public port (relay), in interleaved rounds, and prints
the medians: the receiver's throughput, iperf3's lost percent and jitter, and relay/direct for the
throughput.  "tunnel CPU" is the CPU relayd and relayc spent during the relay test, in percent of
one core.  Without iperf3 it says so and exits 0 without a row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Path_, cpu_seconds, describe_machine, free_port, interleaved, stop_processes
from bench.ssh_reverse import wait_port

TOKEN = "bench-token-0123456789abcdef"
DATAGRAM = 1400  # -l: bytes of UDP payload per datagram, under loopback's and most paths' MTU


def free_tcp_udp_port() -> int:
    """A port free a moment ago for TCP and for UDP both (iperf3 and the tunnels use both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP after 50 tries")


def parse_rate(text: str) -> float:
    """iperf3's -b notation (100M, 1G, 500k) in bits per second."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 100M")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]


class UdpBench:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-udp-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.iperf_port = 0
        self.paths: list[Path_] = []

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        f = open(self.tmp / log, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)
        self.procs.append(p)
        return p

    def wait_log(self, log: str, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        """Wait until ``log`` has a line matching ``pattern`` (at most ``timeout`` s)."""
        rx, text = re.compile(pattern), ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = (self.tmp / log).read_text(errors="replace")
            if rx.search(text):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{log}: the process exited ({proc.returncode}):\n{text[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{log}: no line matching {pattern!r} after {timeout} s:\n{text[-2000:]}")

    def start(self) -> None:
        self.iperf_port = free_tcp_udp_port()
        self.spawn(["iperf3", "-s", "-p", str(self.iperf_port)], "iperf3.log")
        wait_port(self.iperf_port)
        self.paths.append(Path_("direct", {"iperf": self.iperf_port}))

        control, public = free_port(), free_tcp_udp_port()
        (self.tmp / "relayd.toml").write_text(
            f'bind_addr = "127.0.0.1"\nbind_port = {control}\nstate_dir = "state"\nallow_ports = "1024-65535"\n'
            f'[auth]\ntoken = "{TOKEN}"\n'
        )
        tunnels = "".join(
            f'[[tunnels]]\nname = "iperf-{kind}"\ntype = "{kind}"\nlocal_port = {self.iperf_port}\n'
            f"remote_port = {public}\n"
            for kind in ("tcp", "udp")
        )
        (self.tmp / "relayc.toml").write_text(
            f'server_addr = "127.0.0.1"\nserver_port = {control}\nname = "bench"\n[auth]\ntoken = "{TOKEN}"\n{tunnels}'
        )
        d = self.spawn([sys.executable, "-m", "relay_server.cli", "-c", "relayd.toml", "--log-level", "info"],
                       "relayd.log")  # fmt: skip
        self.wait_log("relayd.log", r"listening for relayc", d)
        c = self.spawn([sys.executable, "-m", "relay_client.cli", "-c", "relayc.toml", "--log-level", "info"],
                       "relayc.log")  # fmt: skip
        self.wait_log("relayc.log", rf"tunnel iperf-udp: \S*:{public}/udp ->", c)
        self.wait_log("relayc.log", rf"tunnel iperf-tcp: relayd port {public} ", c)
        self.paths.append(Path_("relay", {"iperf": public}, [d.pid, c.pid]))

    def stop(self) -> None:
        stop_processes(self.procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


def iperf_udp(path: Path_, rate: str, seconds: float) -> dict[str, float]:
    """One ``iperf3 -u`` test through ``path``: receiver Mbit/s, lost %, jitter, tunnel CPU %.

    A test that fails (iperf3 error or timeout) gives NaN figures and ``failed`` 1."""
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(path.ports["iperf"]), "-u", "-b", rate,
           "-l", str(DATAGRAM), "-t", f"{seconds:g}", "-J"]  # fmt: skip
    nan = float("nan")
    failed = {"mbps": nan, "lost_percent": nan, "jitter_ms": nan, "cpu_percent": nan, "failed": 1.0}
    data: dict[str, Any] = {}
    before, t0 = 0.0, 0.0
    for _attempt in range(10):
        before, t0 = cpu_seconds(path.pids), time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            print(f"  {path.name} {rate}: iperf3 timed out", file=sys.stderr)
            return failed
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            data = {"error": (out.stdout + out.stderr).strip()[-300:] or f"exit {out.returncode}"}
        # iperf3 serves one test at a time: the previous test's control connection may still be
        # closing (through the tunnel).  Wait for it.
        if "busy" not in data.get("error", ""):
            break
        time.sleep(1.0)
    spent, elapsed = cpu_seconds(path.pids) - before, time.monotonic() - t0
    if "error" in data:
        print(f"  {path.name} {rate}: iperf3: {data['error']}", file=sys.stderr)
        return failed
    end = data["end"]
    received = end.get("sum_received", end["sum"])
    return {
        "mbps": float(received["bits_per_second"]) / 1e6,
        "lost_percent": float(end["sum"]["lost_percent"]),
        "jitter_ms": float(end["sum"]["jitter_ms"]),
        "lost_packets": float(end["sum"]["lost_packets"]),
        "packets": float(end["sum"]["packets"]),
        "cpu_percent": spent / elapsed * 100 if path.pids else nan,
        "failed": 0.0,
    }


def median(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return statistics.median(ok) if ok else float("nan")


def summarize(rate: str, samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"rate": rate, "paths": {}}
    for name, runs in samples.items():
        row["paths"][name] = {
            key: median([r.get(key, float("nan")) for r in runs])
            for key in ("mbps", "lost_percent", "jitter_ms", "cpu_percent")
        }
        row["paths"][name]["failed"] = int(sum(r["failed"] for r in runs))
        row["paths"][name]["samples"] = runs
    direct, relay = row["paths"].get("direct", {}), row["paths"].get("relay", {})
    d, r = direct.get("mbps", float("nan")), relay.get("mbps", float("nan"))
    row["relay_over_direct"] = r / d if d and not math.isnan(d) and not math.isnan(r) else float("nan")
    return row


def no_nan(v: Any) -> Any:
    """``v`` with every NaN as None (null in JSON)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [no_nan(x) for x in v]
    return v


def print_table(rows: list[dict[str, Any]], rounds: int) -> None:
    head = (f"{'offered':>8} {'path':<7}{'Mbit/s':>9}{'lost %':>9}{'jitter ms':>11}{'tunnel CPU':>12}"
            f"{'failed':>8}{'relay/direct':>14}")  # fmt: skip
    print(head)
    print("-" * len(head))

    def f(v: float, spec: str) -> str:
        return "-" if math.isnan(v) else format(v, spec)

    for row in rows:
        for name, p in row["paths"].items():
            ratio = f"{f(row['relay_over_direct'], '.2f')}x" if name == "relay" else ""
            cpu = f(p["cpu_percent"], ".0f") + ("%" if not math.isnan(p["cpu_percent"]) else "")
            print(f"{row['rate']:>8} {name:<7}{f(p['mbps'], '.1f'):>9}{f(p['lost_percent'], '.2f'):>9}"
                  f"{f(p['jitter_ms'], '.3f'):>11}{cpu:>12}{p['failed']:>5}/{rounds:<2}{ratio:>14}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description="iperf3 -u through a relay udp tunnel vs direct, on loopback")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 test (default 5)")
    ap.add_argument("--rate", default="100M,500M",
                    help="offered rate(s) for iperf3 -b, comma-separated (default 100M,500M)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per rate; medians (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args()
    rates = [r.strip() for r in args.rate.split(",") if r.strip()]
    for r in rates:
        parse_rate(r)
    args.rounds = max(1, args.rounds)
    nproc = len(os.sched_getaffinity(0))
    machine = f"{describe_machine()}, nproc {nproc}"
    print(f"relay UDP benchmark, {time.strftime('%Y-%m-%d')}, {machine}")
    if shutil.which("iperf3") is None:
        print("iperf3 is not installed: this row needs it (apt-get install iperf3); no row measured.")
        return 0
    print(f"iperf3 -u -l {DATAGRAM}, {args.duration:g} s per test, medians of {args.rounds} interleaved round(s)")
    b = UdpBench()
    rows: list[dict[str, Any]] = []
    try:
        b.start()
        time.sleep(1.0)
        for rate in rates:

            def one(path: Path_, rate: str = rate) -> dict[str, float]:
                return iperf_udp(path, rate, args.duration)

            got = interleaved(b.paths, args.rounds, one)
            rows.append(summarize(rate, got))
    finally:
        b.stop()
    print()
    print_table(rows, args.rounds)
    print("Mbit/s: the receiver's; lost % and jitter: iperf3's end.sum; tunnel CPU: relayd + relayc, % of one core")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "date": time.strftime("%Y-%m-%d"),
                    "rounds": args.rounds,
                    "duration": args.duration,
                    "datagram_bytes": DATAGRAM,
                    "iperf3": (
                        subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
                    ),
                    "rows": no_nan(rows),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
