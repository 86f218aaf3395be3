"""Two builds of relay, CPU per request in bench rows 3, 4 and 6, measured in alternation.

    python3 -m bench.ab_builds --a OLD_CHECKOUT --b NEW_CHECKOUT [--rounds 8] [--duration 4] [--json F]

``python3 -m bench`` compares relay with ssh -R and other forwarders; telling two builds of relay
apart needs less noise than one run of it gives on a shared machine.  Here each round starts a
fresh relayd and relayc of each build (imported from its checkout through PYTHONPATH; the same
configuration as the main bench, dashboard on), measures with wrk:

  row 3: keep-alive requests through a tcp tunnel    row 4: a new connection per request
  row 6: keep-alive requests through the http vhost

and stops them; builds alternate A B, B A, A B... so that a drift of the machine falls on both.
CPU per request is the user + system time of relayd and relayc (from /proc) divided by the
requests wrk made.  Prints each round, the medians per build, and two ratios B/A: of the medians,
and the median of each round's own B/A (the steadier one: both builds of a round ran a minute apart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import TOKEN, Path_, describe_machine, free_port, stop_processes, wrk_with_cpu
from bench.ssh_reverse import wait_port

ROWS = (("3. keep-alive, tcp tunnel", "tcp", False), ("4. new connections", "tcp", True),
        ("6. keep-alive, http vhost", "vhost", False))  # fmt: skip


class Build:
    """relayd and relayc of one checkout, with a tcp and an http tunnel to the HTTP target."""

    def __init__(self, code_dir: Path, target: int, work: Path) -> None:
        self.code_dir, self.target, self.work = code_dir, target, work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Path_:
        work = self.work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        control, vhost, public = free_port(), free_port(), free_port()
        (work / "relayd.toml").write_text(
            f'bind_addr = "127.0.0.1"\nbind_port = {control}\nstate_dir = "state"\nvhost_http_port = {vhost}\n'
            f'subdomain_host = "bench.test"\n[auth]\ntoken = "{TOKEN}"\n'
            f'[dashboard]\naddr = "127.0.0.1"\nport = {free_port()}\npassword = "ab-builds-password-0123"\n'
        )
        (work / "relayc.toml").write_text(
            f'server_port = {control}\nname = "bench"\n[auth]\ntoken = "{TOKEN}"\n'
            f'[[tunnels]]\nname = "http"\nlocal_port = {self.target}\nremote_port = {public}\n'
            f'[[tunnels]]\nname = "web"\ntype = "http"\nlocal_port = {self.target}\nsubdomain = "web"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(self.code_dir)}
        for module, conf in (("relay_server.cli", "relayd.toml"), ("relay_client.cli", "relayc.toml")):
            log = open(work / f"{conf}.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
            cmd = [sys.executable, "-m", module, "-c", conf, "--log-level", "warning"]
            self.procs.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT))
            if module == "relay_server.cli":
                wait_port(control)
        wait_port(public)
        deadline = time.monotonic() + 15
        while "tunnel web" not in (work / "relayd.toml.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the vhost route has no port of its own to wait for
        time.sleep(0.5)
        return Path_("relay", {"tcp": public, "vhost": vhost}, [p.pid for p in self.procs])

    def stop(self) -> None:
        stop_processes(self.procs)
        self.procs.clear()


def measure(path: Path_, duration: float) -> dict[str, dict[str, float]]:
    out = {}
    for label, port_name, close in ROWS:
        host = "web.bench.test" if port_name == "vhost" else ""
        out[label] = wrk_with_cpu(path, path.ports[port_name], duration, close, host=host)
        time.sleep(0.5)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="checkout of build A (the baseline)")
    ap.add_argument("--b", required=True, type=Path, help="checkout of build B")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per wrk measurement")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="relay-ab-"))
    target = free_port()
    httpd = subprocess.Popen([sys.executable, "-m", "bench.httpd", str(target)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_port(target)
    builds = {"A": Build(args.a.resolve(), target, tmp / "a"), "B": Build(args.b.resolve(), target, tmp / "b")}
    results: list[dict[str, Any]] = []
    print(describe_machine())
    print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds, {args.duration:g} s per measurement")
    try:
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                build = builds[name]
                try:
                    got = measure(build.start(), args.duration)
                finally:
                    build.stop()
                results.append({"round": r + 1, "build": name, "load": os.getloadavg()[0], "rows": got})
                cells = "  ".join(f"{v['cpu_us']:6.1f} us {v['rps']:8,.0f}/s" for v in got.values())
                print(f"round {r + 1} {name}: {cells}", flush=True)
    finally:
        httpd.terminate()
        httpd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(results)
    for label, s in summary.items():
        print(
            f"{label}: CPU/req median A {s['a_cpu']:.1f} us, B {s['b_cpu']:.1f} us, B/A {s['ratio_of_medians']:.3f}"
            f" (median of per-round B/A {s['median_of_ratios']:.3f}); req/s B/A {s['rps_ratio']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "a": str(args.a), "b": str(args.b),
                                               "runs": results, "summary": summary}, indent=1))  # fmt: skip
    return 0


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for label, _, _ in ROWS:
        cpu = {n: [x["rows"][label]["cpu_us"] for x in results if x["build"] == n] for n in ("A", "B")}
        rps = {n: [x["rows"][label]["rps"] for x in results if x["build"] == n] for n in ("A", "B")}
        per_round = [b / a for a, b in zip(cpu["A"], cpu["B"], strict=False) if a]
        out[label] = {
            "a_cpu": statistics.median(cpu["A"]), "b_cpu": statistics.median(cpu["B"]),
            "ratio_of_medians": statistics.median(cpu["B"]) / statistics.median(cpu["A"]),
            "median_of_ratios": statistics.median(per_round),
            "rps_ratio": statistics.median(rps["B"]) / statistics.median(rps["A"]),
        }  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
