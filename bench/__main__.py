"""relay against the direct path and against OpenSSH's reverse tunnel, in one run on one machine.

    python -m bench [--duration 5] [--rounds 3] [--conns 5000] [--wrk-conns 10] [--json results.json]
                    [--quick] [--no-bare] [--no-haproxy] [--cluster-only]

Starts everything itself on 127.0.0.1: iperf3 and a tiny HTTP server as targets, relayd and relayc
(TLS on, the real commands), and for the baseline a private sshd with throwaway keys plus
``ssh -N -R``.  Prints one table; every relay figure is also given as a ratio to ssh -R and to the
direct path measured in the same run.  Rows 1-4 and 6-8 are measured in interleaved rounds and the
table gives medians (see ``interleaved``).  A missing tool is reported with its Debian package and
its row skipped, never faked.

The "bare" column is two bare uvloop forwarders with TLS between them (bench/forwarder.py): no
multiplexer, no authentication, one TLS connection per visitor.  It is the least a two-process
Python relay with TLS does per request, so relay/bare near 1 in rows 3 and 6 says the cost left is
the interpreter, the syscalls and TLS, not relay's layers.  Rows 3, 4, 6 and 7 also give the CPU
the tunnel's own processes spent per request (from /proc), steadier than requests/s on a busy machine.

The "haproxy" column is the same two-hop shape in C: two haproxy processes (one thread each, tcp
mode) with verified TLS between them, one TLS connection per visitor.  It is what an event-driven
C proxy with OpenSSL does on the same machine in the same run, so haproxy/ssh shows which ratios
to ssh -R are within reach of any user-space TLS relay here.  Like bare, it pays a TLS handshake
per new connection (row 4) and holds a TLS connection per visitor (row 5 leaves both out).

Row 7 is keep-alive requests over HTTPS by name (``web.bench.test``, a throwaway CA and wildcard
certificate made in the temporary directory): relayd terminates TLS on its vhost_https_port and
sends plain HTTP over its multiplexed connection to relayc, which dials the HTTP target; in the
haproxy column one more haproxy (one thread, mode http, ``http-reuse always``, adding the same
X-Forwarded-* lines) terminates TLS in front of the same target; direct is plain HTTP to the
target, as in row 3; ssh -R and bare have no row 7.  Its CPU per request is relayd's + relayc's,
and that haproxy's: the relay/haproxy column compares them.  bench/https_vhost.py tells how wrk
is made to send the name (SNI and Host) while connecting to 127.0.0.1.

Row 8 is row 3's keep-alive run (same target, same ``-c``) against a tcp tunnel's public port
served by relayd nodes of a cluster on this machine, one throwaway PostgreSQL server for both
(bench/cluster.py, bench/postgres.py; Debian's postgresql package): "one node" is one relayd on
the PostgreSQL store, "two nodes" two relayd on another database of the same server, sharing the
tunnel's port with SO_REUSEPORT, with one relayc holding a session to each.  The one-node side
runs the same code as the two-node side (PostgreSQL store, heartbeats, SO_REUSEPORT), so the node
count is the only difference; the bench's own relayd (SQLite) is not used.  It has a table of its
own: req/s, p99 and CPU per request (relayd nodes + relayc, also split) for each side, two/one,
and how the kernel split wrk's connections and requests between the two nodes (each node's
``/api/v1/tunnels`` counters).  ``--cluster-only`` runs only row 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cluster
from bench.https_vhost import WRK_LOOPBACK_LUA, Certificate, haproxy_terminator_config, make_certificate
from bench.ssh_reverse import SshReverse, wait_port
from bench.ssh_reverse import available as ssh_available

TOKEN = "bench-token-0123456789abcdef"
HTTPS_NAME = "web.bench.test"  # row 7: the http tunnel "web" by name over HTTPS (bench/https_vhost.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by ``pids`` (from /proc; 0 for a pid that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def wrk_with_cpu(
    path: Path_,
    port: int,
    seconds: float,
    close: bool,
    host: str = "",
    conns: int = 10,
    url: str = "",
    script: Path | None = None,
) -> dict[str, float]:
    """``wrk`` through ``path``, plus the CPU its tunnel processes spent per request (microseconds).

    On a shared machine requests/s swing with the neighbours; CPU per request is much steadier, so
    it is the figure to compare across commits."""
    before = cpu_seconds(path.pids)
    r = wrk(port, seconds, close, host, conns, url, script)
    spent = cpu_seconds(path.pids) - before
    r["cpu_us"] = spent / (r["rps"] * max(1, int(seconds))) * 1e6 if path.pids and r["rps"] else float("nan")
    return r


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Path_:
    """One way to reach the targets: its public ports by target name."""

    name: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)


# --- measurements -------------------------------------------------------------------------------


def iperf(port: int, seconds: float, reverse: bool, parallel: int = 1) -> float:
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-P", str(parallel)]
    if reverse:
        cmd.append("-R")
    for _attempt in range(10):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        data = json.loads(out.stdout)
        # iperf3 serves one test at a time: the previous path's test may not have ended on the
        # server yet (its control connection is closed through that path's tunnel).  Wait for it.
        if "busy" not in data.get("error", ""):
            break
        time.sleep(1.0)
    if "error" in data:
        raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def python_bulk(port: int, seconds: float, reverse: bool, parallel: int = 1) -> float:
    """Fallback without iperf3: the echo target; send for ``seconds`` while reading the echo back."""
    total = [0]
    lock = threading.Lock()
    block = os.urandom(1 << 18)

    def one() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            deadline = time.monotonic() + seconds

            def reader() -> None:
                while True:
                    d = s.recv(1 << 20)
                    if not d:
                        return
                    with lock:
                        total[0] += len(d)

            t = threading.Thread(target=reader)
            t.start()
            while time.monotonic() < deadline:
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            t.join()

    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0] * 8 / (time.monotonic() - t0) / 1e9


def wrk(
    port: int, seconds: float, close: bool, host: str = "", conns: int = 10, url: str = "", script: Path | None = None
) -> dict[str, float]:
    """``url`` replaces ``http://127.0.0.1:port/`` (row 7: an https:// URL with a name, which
    ``script`` makes wrk connect to 127.0.0.1; see bench/https_vhost.py)."""
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--latency", url or f"http://127.0.0.1:{port}/"]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: (.*)", out)
    lat: dict[str, float] = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            lat[pct] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return {"rps": rps, "p50_ms": lat.get("50", float("nan")), "p99_ms": lat.get("99", float("nan")),
            "socket_errors": 1.0 if errors else 0.0}  # fmt: skip


async def _hold(port: int, n: int, ready: asyncio.Event, release: asyncio.Event, failures: list[int]) -> None:
    sem = asyncio.Semaphore(200)
    writers = []

    async def one() -> None:
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                w.write(b"x")
                if await asyncio.wait_for(r.readexactly(1), 30) != b"x":
                    raise OSError("bad echo")
                writers.append(w)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                failures.append(1)

    await asyncio.gather(*(one() for _ in range(n)))
    ready.set()
    await release.wait()
    for w in writers:
        w.close()


def hold_connections(port: int, n: int, pids: list[int]) -> tuple[int, float]:
    """Open ``n`` echo connections through ``port``, all answered; return (failures, KiB per conn)."""
    before = sum(rss_kib(p) for p in pids)
    failures: list[int] = []
    result: dict[str, float] = {}

    async def main() -> None:
        ready, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(_hold(port, n, ready, release, failures))
        await ready.wait()
        await asyncio.sleep(1.0)
        result["after"] = sum(rss_kib(p) for p in pids)
        release.set()
        await task

    asyncio.run(main())
    return len(failures), (result["after"] - before) / n


# --- the paths ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ssh: SshReverse | None = None
        self.missing: dict[str, str] = {}
        self.targets: dict[str, int] = {}
        self.paths: list[Path_] = []
        self.relay = Path_("relay")
        self.vhost_port = 0
        self.vhost_https_port = 0
        self.haproxy_https: Path_ | None = None  # row 7: one haproxy terminating TLS (mode http)
        self._certificate: Certificate | None = None
        self.rss_after_bulk: dict[str, float] = {}
        self.cluster_runs: dict[str, list[dict[str, float]]] = {}  # row 8: every run, with the split

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        f = open(self.tmp / log, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)
        self.procs.append(p)
        return p

    def start_targets(self) -> None:
        if shutil.which("iperf3"):
            self.targets["iperf"] = free_port()
            self.spawn(["iperf3", "-s", "-p", str(self.targets["iperf"])], "iperf3.log")
        else:
            self.missing["iperf3"] = "iperf3 not installed (apt-get install iperf3): bulk rows use a Python echo"
        self.targets["http"] = free_port()
        self.spawn([sys.executable, "-m", "bench.httpd", str(self.targets["http"])], "httpd.log")
        self.targets["echo"] = free_port()
        self.spawn([sys.executable, "-m", "bench.echod", str(self.targets["echo"])], "echod.log")
        for port in self.targets.values():
            wait_port(port)
        self.paths.append(Path_("direct", dict(self.targets)))

    def start_ssh(self) -> None:
        why = ssh_available()
        if why:
            self.missing["ssh -R"] = why
            return
        self.ssh = SshReverse(self.tmp / "ssh", free_port())
        self.ssh.start_sshd()
        path = Path_("ssh -R")
        for name, port in self.targets.items():
            path.ports[name] = free_port()
            self.ssh.forward(path.ports[name], port)
        path.pids = self.ssh.pids()
        self.paths.append(path)

    def start_bare(self) -> None:
        """Two bare forwarders per target with TLS between them (bench/forwarder.py)."""
        from shared.tls import ensure_self_signed

        cert, key = ensure_self_signed(self.tmp / "bare")
        path = Path_("bare")
        fwd = [sys.executable, "-m", "bench.forwarder"]
        for name, port in self.targets.items():
            inner, outer = free_port(), free_port()
            a = self.spawn([*fwd, str(inner), str(port), "--tls-in", str(cert), str(key)], f"bare-{name}-in.log")
            wait_port(inner)
            b = self.spawn([*fwd, str(outer), str(inner), "--tls-out"], f"bare-{name}-out.log")
            wait_port(outer)
            path.ports[name] = outer
            path.pids += [a.pid, b.pid]
        self.paths.append(path)

    def certificate(self) -> Certificate:
        """Row 7's throwaway CA and ``*.bench.test`` certificate, made on first use in the bench's
        temporary directory (relayd's ``[[certificates]]`` and haproxy's ``ssl crt``)."""
        if self._certificate is None:
            self._certificate = make_certificate(self.tmp / "https", ["*.bench.test"])
            (self.tmp / "https" / "wrk-loopback.lua").write_text(WRK_LOOPBACK_LUA)
        return self._certificate

    def start_haproxy(self) -> None:
        """Two haproxy processes per target with verified TLS between them: the C counterpart of bare."""
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            self.missing["haproxy"] = "haproxy not installed (apt-get install haproxy): its column is left out"
            return
        from shared.tls import ensure_self_signed

        cert, key = ensure_self_signed(self.tmp / "haproxy")  # CN and SAN "relayd", also 127.0.0.1
        pem = self.tmp / "haproxy" / "server.pem"
        pem.write_text(Path(cert).read_text() + Path(key).read_text())
        common = (
            "global\n nbthread 1\ndefaults\n mode tcp\n timeout connect 5s\n timeout client 60s\n timeout server 60s\n"
        )
        path = Path_("haproxy")
        for name, port in self.targets.items():
            inner, outer = free_port(), free_port()
            configs = {
                "in": f"listen in\n bind 127.0.0.1:{inner} ssl crt {pem}\n server target 127.0.0.1:{port}\n",
                "out": f"listen out\n bind 127.0.0.1:{outer}\n"
                f" server inner 127.0.0.1:{inner} ssl verify required ca-file {cert} verifyhost relayd\n",
            }
            for side, text in configs.items():
                cfg = self.tmp / "haproxy" / f"{name}-{side}.cfg"
                cfg.write_text(common + text)
                proc = self.spawn([haproxy, "-db", "-f", str(cfg)], f"haproxy-{name}-{side}.log")
                path.pids.append(proc.pid)
                wait_port(inner if side == "in" else outer)
            path.ports[name] = outer
        self.paths.append(path)
        # row 7: one more haproxy, terminating TLS in http mode in front of the HTTP target
        if "http" not in self.targets:
            return  # no HTTP target started (a caller that wants the TCP hops only)
        https = free_port()
        cfg = self.tmp / "haproxy" / "https.cfg"
        cfg.write_text(haproxy_terminator_config(https, self.certificate().combined, self.targets["http"]))
        proc = self.spawn([haproxy, "-db", "-f", str(cfg)], "haproxy-https.log")
        wait_port(https)
        self.haproxy_https = Path_("haproxy", {"https": https}, [proc.pid])

    def start_relay(self) -> None:
        control = free_port()
        self.vhost_port, self.vhost_https_port = free_port(), free_port()
        cert = self.certificate()
        (self.tmp / "relayd.toml").write_text(
            f'bind_addr = "127.0.0.1"\nbind_port = {control}\nstate_dir = "state"\n'
            f"vhost_http_port = {self.vhost_port}\nvhost_https_port = {self.vhost_https_port}\n"
            f'subdomain_host = "bench.test"\n[auth]\ntoken = "{TOKEN}"\n'
            # the dashboard on, as a user would run it: idle RSS is measured with it
            f'[dashboard]\naddr = "127.0.0.1"\nport = {free_port()}\npassword = "{secrets.token_urlsafe(16)}"\n'
            # row 7: relayd terminates TLS for the http tunnel "web" on vhost_https_port
            f'[[certificates]]\ncert_file = "{cert.cert_file}"\nkey_file = "{cert.key_file}"\n'
        )
        tunnels = ""
        for name, port in self.targets.items():
            self.relay.ports[name] = free_port()
            tunnels += f'[[tunnels]]\nname = "{name}"\nlocal_port = {port}\nremote_port = {self.relay.ports[name]}\n'
        tunnels += f'[[tunnels]]\nname = "web"\ntype = "http"\nlocal_port = {self.targets["http"]}\nsubdomain = "web"\n'
        (self.tmp / "relayc.toml").write_text(
            f'server_port = {control}\nname = "bench"\n[auth]\ntoken = "{TOKEN}"\n{tunnels}'
        )
        d_cmd = cluster.relay_command("relayd", "relay_server.cli")
        c_cmd = cluster.relay_command("relayc", "relay_client.cli")
        d = self.spawn([*d_cmd, "-c", "relayd.toml", "--log-level", "warning"], "relayd.log")
        wait_port(control)
        c = self.spawn([*c_cmd, "-c", "relayc.toml", "--log-level", "warning"], "relayc.log")
        for port in self.relay.ports.values():
            wait_port(port)
        self.relay.pids = [d.pid, c.pid]
        self.paths.append(self.relay)

    def stop(self) -> None:
        if self.ssh:
            self.ssh.stop()
        stop_processes(self.procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process still running, then wait for all (killing one that takes over 10 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "us":
        return f"{v:.1f}"
    if unit == "KiB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description="relay vs direct vs ssh -R on loopback")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput/request measurement")
    ap.add_argument("--conns", type=int, default=5000, help="connections held open for the memory row")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run): 1 s, 200 connections")
    ap.add_argument("--no-bare", action="store_true", help="leave out the 'bare' column")
    ap.add_argument("--no-haproxy", action="store_true", help="leave out the 'haproxy' column")
    ap.add_argument("--wrk-conns", type=int, default=10,
                    help="connections wrk keeps in flight in rows 3, 4 and 6-8 (default 10)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds per row; the table gives medians (default 3)")  # fmt: skip
    ap.add_argument("--cluster-only", action="store_true", help="run only row 8 (relayd nodes on PostgreSQL)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.conns, args.rounds = 1.0, 200, 1
    args.rounds = max(1, args.rounds)
    raise_fd_limit()
    b = Bench(args)
    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    try:
        b.start_targets()
        if args.cluster_only:
            rows += cluster_rows(b)
            return report(b, rows, idle)
        b.start_ssh()
        if not args.no_haproxy:
            b.start_haproxy()
        if not args.no_bare:
            b.start_bare()
        b.start_relay()
        time.sleep(1.0)
        idle = {"relayd": rss_kib(b.relay.pids[0]) / 1024, "relayc": rss_kib(b.relay.pids[1]) / 1024}
        rows += measure(b)
    finally:
        b.stop()
    return report(b, rows, idle)


def report(b: Bench, rows: list[dict[str, Any]], idle: dict[str, float]) -> int:
    """Print the tables (and write the JSON file if asked)."""
    args = b.args
    machine = describe_machine()
    print(f"\nrelay benchmark, {time.strftime('%Y-%m-%d')}, {machine}")
    print(
        f"medians of {args.rounds} interleaved round(s) of {args.duration:g} s per path and row; wrk -c{args.wrk_conns}"
    )
    for what, why in b.missing.items():
        print(f"  skipped/substituted: {what}: {why}")
    if any(not r["row"].startswith("8.") for r in rows):
        print_table([r for r in rows if not r["row"].startswith("8.")])
    print_cluster_table([r for r in rows if r["row"].startswith("8.")], b.cluster_runs)
    if idle:
        print(f"\nidle RSS: relayd {idle['relayd']:.1f} MiB (dashboard on), relayc {idle['relayc']:.1f} MiB")
    after = b.rss_after_bulk
    if after:
        print(f"RSS 12 s after the bulk rows: relayd {after['relayd']:.1f} MiB, relayc {after['relayc']:.1f} MiB")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "date": time.strftime("%Y-%m-%d"),
                    "rounds": args.rounds,
                    "wrk_conns": args.wrk_conns,
                    "duration": args.duration,
                    "rows": rows,
                    "idle_rss_mib": idle,
                    "rss_after_bulk_mib": b.rss_after_bulk,
                    "cluster_runs": b.cluster_runs,
                },
                indent=2,
            )
        )
    return 0


def interleaved(
    paths: list[Path_], rounds: int, one: Callable[[Path_], dict[str, float]], pause: float = 0.5
) -> dict[str, list[dict[str, float]]]:
    """Measure every path ``rounds`` times, the paths interleaved (each round starts one path
    later); return each path's measurements.

    On a shared machine the neighbours come and go within seconds: measuring one path after the
    other lets a busy spell land on one of them only; interleaved rounds spread it over all."""
    samples: dict[str, list[dict[str, float]]] = {p.name: [] for p in paths}
    for r in range(rounds):
        k = r % len(paths)
        for path in paths[k:] + paths[:k]:
            samples[path.name].append(one(path))
            time.sleep(pause)
    return samples


def figure_row(
    label: str, unit: str, higher: bool, samples: dict[str, list[dict[str, float]]], key: str
) -> dict[str, Any]:
    """One table row: the median of ``key`` per path; every sample is kept for the JSON file."""
    row: dict[str, Any] = {"row": label, "unit": unit, "higher_is_better": higher, "samples": {}}
    for name, runs in samples.items():
        values = [run[key] for run in runs if run[key] == run[key]]  # NaN: no tunnel processes (direct)
        if values:
            row[name] = statistics.median(values)
            row["samples"][name] = values
    return row


def measure(b: Bench) -> list[dict[str, Any]]:
    d = b.args.duration
    rounds = b.args.rounds
    wc = b.args.wrk_conns
    rows: list[dict[str, Any]] = []
    have_iperf = "iperf" in b.targets
    bulk = iperf if have_iperf else python_bulk
    bulk_target = "iperf" if have_iperf else "echo"
    for label, reverse, parallel in (
        ("1. bulk, 1 conn, visitor->service", False, 1),
        ("1. bulk, 1 conn, service->visitor", True, 1),
        ("2. bulk, 8 conns, visitor->service", False, 8),
        ("2. bulk, 8 conns, service->visitor", True, 8),
    ):
        if not have_iperf and reverse:
            continue  # the echo fallback measures both directions at once
        # the echo fallback half-closes, which bare's TLS hop cannot carry (nor, to be safe, haproxy's)
        paths = [p for p in b.paths if have_iperf or p.name not in ("bare", "haproxy")]
        got = interleaved(
            paths, rounds, lambda p, r=reverse, n=parallel: {"gbps": bulk(p.ports[bulk_target], d, r, n)}, pause=0.3
        )
        rows.append(figure_row(label, "Gbit/s", True, got, "gbps"))
    # relayd and relayc hand freed buffers back to the OS on the first keepalive tick (every 10 s)
    # after the last visitor stream closed: measure what they hold once that has happened.
    time.sleep(12)
    b.rss_after_bulk = {"relayd": rss_kib(b.relay.pids[0]) / 1024, "relayc": rss_kib(b.relay.pids[1]) / 1024}
    if shutil.which("wrk"):
        for label, close in ((f"3. keep-alive requests, {wc} conns", False), ("4. new connections", True)):
            got = interleaved(b.paths, rounds, lambda p, c=close: wrk_with_cpu(p, p.ports["http"], d, c, conns=wc))
            rows += _request_rows(label, got, p50=not close, p99=not close)
    else:
        b.missing["wrk"] = "wrk not installed (apt-get install wrk): rows 3, 4, 6, 7 and 8 skipped"
    n = b.args.conns
    mem: dict[str, Any] = {"row": f"5. memory per held conn ({n} conns)", "unit": "KiB", "higher_is_better": False}
    fails: dict[str, Any] = {"row": f"5. failed of {n} held conns", "unit": "count", "higher_is_better": False}
    for path in b.paths:
        if path.name in ("direct", "bare", "haproxy"):  # a TLS connection per visitor: not comparable
            continue
        fails[path.name], mem[path.name] = hold_connections(path.ports["echo"], n, path.pids)
        time.sleep(0.5)
    rows += [mem, fails]
    if shutil.which("wrk"):

        def through_vhost(path: Path_) -> dict[str, float]:
            if path.name == "relay":
                return wrk_with_cpu(path, b.vhost_port, d, False, host="web.bench.test", conns=wc)
            return wrk_with_cpu(path, path.ports["http"], d, False, conns=wc)  # no vhost there: as row 3

        got = interleaved(b.paths, rounds, through_vhost)
        rows += _request_rows("6. keep-alive requests, http vhost", got, p50=False, p99=True)
        rows += https_rows(b)
        rows += cluster_rows(b)
    return rows


def cluster_rows(b: Bench) -> list[dict[str, Any]]:
    """Row 8: row 3's keep-alive run through one relayd node and through two sharing the tunnel's
    port (bench/cluster.py), interleaved; CPU per request of the nodes and relayc, and how much
    each node carried (its tunnel counters, read before and after each run)."""
    why = cluster.available() or (None if shutil.which("wrk") else "wrk not installed (apt-get install wrk)")
    if why:
        b.missing["row 8"] = f"{why}: row 8 skipped"
        return []
    d, wc = b.args.duration, b.args.wrk_conns
    with cluster.Cluster(b.tmp, b.spawn, TOKEN, b.targets["http"]) as c:
        paths = [Path_(s.name, {"http": s.public}, s.pids) for s in c.setups]

        def one(path: Path_) -> dict[str, float]:
            setup = c.setup(path.name)
            counts = setup.counters()
            pg_pids = c.pg.processes()
            cpu = [cpu_seconds([pid]) for pid in path.pids]
            pg_cpu = cpu_seconds(pg_pids)
            r = wrk(path.ports["http"], d, False, conns=wc)
            spent = [cpu_seconds([pid]) - before for pid, before in zip(path.pids, cpu, strict=True)]
            pg_spent = cpu_seconds(pg_pids) - pg_cpu
            after = setup.counters()
            requests = r["rps"] * max(1, int(d))
            per_req = 1e6 / requests if requests else float("nan")
            r["cpu_us"] = sum(spent) * per_req
            r["relayd_cpu_us"] = sum(spent[:-1]) * per_req
            r["relayc_cpu_us"] = spent[-1] * per_req
            r["postgres_cpu_us"] = pg_spent * per_req
            carried = [a[0] - x[0] for a, x in zip(after, counts, strict=True)]  # bytes from wrk per node
            for node, a, x, s, bytes_in in zip(setup.nodes, after, counts, spent, carried, strict=False):
                r[f"{node.name}_share"] = 100.0 * bytes_in / sum(carried) if sum(carried) else float("nan")
                r[f"{node.name}_conns"] = float(a[2] - x[2])  # wrk's connections that landed on it
                r[f"{node.name}_cpu_s"] = s
            r["relayc_cpu_s"] = spent[-1]
            return r

        got = interleaved(paths, b.args.rounds, one)
    b.cluster_runs = got
    label = f"8. keep-alive requests, {wc} conns"
    rows = [figure_row(label + " (req/s)", "req/s", True, got, "rps"),
            figure_row("8. ... p99", "ms", False, got, "p99_ms"),
            figure_row("8. ... CPU/req, relayd nodes + relayc", "us", False, got, "cpu_us"),
            figure_row("8. ... CPU/req, relayd nodes", "us", False, got, "relayd_cpu_us"),
            figure_row("8. ... CPU/req, relayc", "us", False, got, "relayc_cpu_us"),
            figure_row("8. ... CPU/req, PostgreSQL (not counted above)", "us", False, got, "postgres_cpu_us"),
            figure_row("8. ... node A's share of the bytes", "%", False, got, "A_share")]  # fmt: skip
    return rows


def print_cluster_table(rows: list[dict[str, Any]], runs: dict[str, list[dict[str, float]]]) -> None:
    """Row 8's own table: one node, two nodes, two/one; then how the two nodes split each run."""
    if not rows:
        return
    cols = ["one node", "two nodes"]
    head = f"\n{'row 8: relayd nodes on one PostgreSQL':<48}{'unit':>7}" + "".join(f"{c:>11}" for c in cols)
    print(head + f"{'two/one':>10}")
    print("-" * (len(head) + 9))
    for r in rows:
        one, two = r.get("one node"), r.get("two nodes")
        comparable = r["unit"] != "%"
        ratio = f"{two / one:.2f}x" if comparable and one and two is not None and one == one and two == two else "-"
        unit = r["unit"]
        shown = [f"{v:.0f}" if unit == "%" and v is not None else fmt(v, unit) for v in (one, two)]
        print(f"{r['row']:<48}{unit:>7}" + "".join(f"{v:>11}" for v in shown) + f"{ratio:>10}")
    # wrk opens one more connection than -c, to try the address, before its run
    for i, run in enumerate(runs.get("two nodes", []), 1):
        print(f"  two nodes, run {i}: wrk's connections A/B {run['A_conns']:.0f}/{run['B_conns']:.0f}, "
              f"bytes A/B {run['A_share']:.0f}%/{run['B_share']:.0f}%, CPU s relayd A {run['A_cpu_s']:.2f}, "
              f"relayd B {run['B_cpu_s']:.2f}, relayc {run['relayc_cpu_s']:.2f}; {run['rps']:,.0f} req/s")  # fmt: skip


def https_rows(b: Bench) -> list[dict[str, Any]]:
    """Row 7: keep-alive requests to the HTTP target over HTTPS by name, TLS terminated by relayd
    (vhost_https_port, then the multiplexed connection to relayc) or by one haproxy (mode http,
    one thread); direct is plain HTTP to the target, as in row 3."""
    d, wc = b.args.duration, b.args.wrk_conns
    cert = b.certificate()
    script = b.tmp / "https" / "wrk-loopback.lua"
    direct = next(p for p in b.paths if p.name == "direct")
    paths = [direct, Path_("relay", {"https": b.vhost_https_port}, b.relay.pids)]
    if b.haproxy_https is not None:
        paths.insert(1, b.haproxy_https)
    for path in paths[1:]:
        check_https(path.ports["https"], HTTPS_NAME, cert.ca_file)

    def one(path: Path_) -> dict[str, float]:
        if path.name == "direct":
            return wrk_with_cpu(path, path.ports["http"], d, False, conns=wc)
        port = path.ports["https"]
        return wrk_with_cpu(path, port, d, False, conns=wc, url=f"https://{HTTPS_NAME}:{port}/", script=script)

    got = interleaved(paths, b.args.rounds, one)
    return _request_rows("7. keep-alive requests, https vhost", got, p50=False, p99=True)


def check_https(port: int, name: str, ca_file: Path) -> None:
    """One request over HTTPS to ``name`` on 127.0.0.1:``port``, the certificate verified: the
    target's answer must come back, so wrk never measures an error page or a refused handshake."""
    context = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(sock, server_hostname=name) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):  # the target's whole answer (10 s timeout)
            chunk = tls.recv(4096)
            if not chunk:
                raise RuntimeError(f"https://{name}:{port}/ answered {answer!r}, not the target's 'ok'")
            answer += chunk


def _request_rows(label: str, got: dict[str, list[dict[str, float]]], p50: bool, p99: bool) -> list[dict[str, Any]]:
    """The table rows of one wrk measurement: req/s, then the latencies asked for, then CPU."""
    rows = [figure_row(label + " (req/s)", "req/s", True, got, "rps")]
    if p50:
        rows.append(figure_row(label + " p50", "ms", False, got, "p50_ms"))
    if p99:
        rows.append(figure_row(label + " p99", "ms", False, got, "p99_ms"))
    rows.append(figure_row(label + " CPU/req", "us", False, got, "cpu_us"))
    return rows


def describe_machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {model}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")  # fmt: skip


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["direct", "ssh -R", "haproxy", "bare", "relay"]
    head = f"{'row':<44}{'unit':>7}" + "".join(f"{c:>10}" for c in cols)
    head += f"{'relay/ssh':>11}{'haproxy/ssh':>13}{'relay/bare':>12}{'relay/direct':>14}{'relay/haproxy':>15}"
    print(head)
    print("-" * len(head))

    def ratio(a: float | None, b: float | None) -> str:
        if a is None or b is None or b == 0 or a != a or b != b:
            return "-"
        return f"{a / b:.2f}x"

    for r in rows:
        unit = r["unit"]
        line = f"{r['row']:<44}{unit:>7}" + "".join(f"{fmt(r.get(c), unit):>10}" for c in cols)
        relay, ssh = r.get("relay"), r.get("ssh -R")
        line += f"{ratio(relay, ssh):>11}{ratio(r.get('haproxy'), ssh):>13}"
        line += f"{ratio(relay, r.get('bare')):>12}{ratio(relay, r.get('direct')):>14}"
        line += f"{ratio(relay, r.get('haproxy')):>15}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
