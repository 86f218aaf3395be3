"""Hostile clients and visitors against a real relayd: what each attack costs it.

    python3 -m bench.attacks [--only A,B,...] [--code-dir DIR] [--quick] [--json FILE] [--rss-cap-mib N]

Each attack starts its own relayd (``python3 -m relay_server.cli -c FILE`` with ``PYTHONPATH`` set to
``--code-dir``, so another checkout, say the one before a fix, is measured by the same harness), an
*echo probe*, and then the attack.  The echo probe is a relayc with one tcp tunnel to an echo server,
and a prober that sends 16 bytes through the tunnel's public port every 20 ms on one kept-open
connection and records each round trip; echo server and prober run in a child process of their own,
so the attackers' threads in this process do not delay them.  Every attack reports, as numbers:

  * ``rss_growth_mib``: relayd's peak VmRSS during the attack (/proc, sampled every 50 ms) minus its
    VmRSS just before;
  * ``cpu_s``: relayd's CPU seconds (utime + stime) during the attack;
  * ``probe_max_rtt_ms``, ``probe_p99_rtt_ms``: the echo probe's round trips during the attack, the
    event-loop stall as seen from outside (a round trip still unanswered when the attack ends counts
    with the time it has waited so far);

plus figures of its own:

  A  pre-login non-reader: N TLS connections (from 127.0.0.2-9) send the preface, then flood PING
     frames (each makes relayd queue a 12-byte PING ACK) or stream openings (DATA|SYN on 3, 5, 7...,
     each refused with a 16-byte RST), never reading; up to 8 MiB each or until a send blocks 2 s.
  B  post-login non-reader: the same floods after a successful login, up to 256 MiB per connection;
     whether relayd closed the connection, and when.
  C  control-stream credit withheld: after login, never a WINDOW_UPDATE for stream 1, and up to
     100,000 tunnel_add messages (each refused: remote_port outside allow_ports, each answered by a
     tunnel_status); the client reads relayd's frames (but never grants stream 1 credit) while it
     sends the first 90%, to learn how much it may send, then stops reading and sends the rest as
     far as its credit allows; then it waits (sending keepalive frames) for relayd to disconnect it.
  D  visitor upload through a client that grants relayd a huge window and stops reading: per visitor
     kind (tcp, http vhost, https SNI), bytes relayd accepted from the visitor before it blocked.
  E  registering N http + M tcp tunnels and removing them (closing the connection), at N and N/4:
     the growth ratio of the costs (linear ~4x, quadratic ~16x).
  F  SNI dribble: concurrent visitors to the https vhost port send a ClientHello cut into TLS records
     of 1 byte each (6 bytes per byte), in ~600-byte writes, again and again.
  G  dashboard password guessing with HTTP Basic: 40 threads against 1, and whether the right
     password is still accepted right after the parallel guessing.
  H  secret-tunnel visitor withholding credit: a relayc has a secret tunnel (with a secret_key "evil" knows)
     to a service that pours up to 1 GiB into every connection as fast as it can; a raw client logs
     in as "evil", opens 20 visits (visit_open) and never returns credit for them, reading its
     connection (H-credit) or not reading at all (H-noread); how much the service got out before it
     stalled (``poured_mib``: what relayc, relayd and the kernel's buffers took in between).

Safety: a relayd growing by more than ``--rss-cap-mib`` (default 1024) ends the attack early; the
figure is then a lower bound and ``rss_capped`` is 1.  Everything listens on 127.0.0.1 with ports
chosen by the OS; every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import platform
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from shared import auth
from shared.frames import MAX_WINDOW, Flag, FrameType, frame_header, preface
from shared.mux import DataReceived, Event, Session, StreamOpened
from shared.tls import fingerprint_of_der
from tests.e2e.harness import TOKEN, free_port, write_toml

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
DASH_PASSWORD = "correct-horse-battery-staple-42"
VISIT_KEY = "attack-h-visit-key-0123456789"  # attack H's secret tunnel key, which the visitor holds
_HEADER = struct.Struct("!BBHII")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc ---------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0  # the process is gone
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def settle(pid: int, limit_s: float, stop: threading.Event | None = None, quiet_s: float = 1.0) -> float:
    """Wait until ``pid`` used under 5% of a core for ``quiet_s`` s (it has processed what it was
    sent), at most ``limit_s`` s or until ``stop`` is set; returns the seconds waited."""
    t0 = time.monotonic()
    last_cpu, last_t = cpu_seconds(pid), t0
    while time.monotonic() - t0 < limit_s and not (stop is not None and stop.is_set()):
        time.sleep(0.1)
        now = time.monotonic()
        if now - last_t >= quiet_s:
            cpu = cpu_seconds(pid)
            if cpu - last_cpu < 0.05 * (now - last_t) or cpu == 0.0:
                break
            last_cpu, last_t = cpu, now
    return time.monotonic() - t0


def describe_machine() -> dict[str, Any]:
    model = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return {
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_gib": round(mem_gib, 1),
        "loadavg": os.getloadavg(),
    }


# --- processes -----------------------------------------------------------------------------------


def code_env(code_dir: Path) -> dict[str, str]:
    """The environment that makes ``python3 -m relay_server...`` import the code in ``code_dir``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(code_dir)}


class Proc:
    """relayd or relayc (``python -m MODULE -c CONFIG``) running the code in ``code_dir``; its output
    is collected line by line with the monotonic time each line arrived."""

    def __init__(self, module: str, config: Path, code_dir: Path, log_level: str = "info") -> None:
        self.module = module
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, "-c", str(config), "--log-level", log_level],
            cwd=str(config.parent),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=code_env(code_dir),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def find(self, pattern: str, start: int = 0) -> tuple[float, re.Match[str]] | None:
        rx = re.compile(pattern)
        with self._cond:
            for t, line in self.lines[start:]:
                m = rx.search(line)
                if m:
                    return t, m
        return None

    def matches(self, pattern: str, start: int = 0) -> list[tuple[float, re.Match[str]]]:
        """Arrival times and matches of the lines from index ``start`` that match ``pattern``."""
        rx = re.compile(pattern)
        with self._cond:
            return [(t, m) for t, line in self.lines[start:] if (m := rx.search(line))]

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> tuple[float, re.Match[str]] | None:
        """The first line from index ``start`` matching ``pattern`` (its arrival time and match), waiting
        up to ``timeout`` s; None if none came (or the process ended)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        pos = start
        with self._cond:
            while True:
                while pos < len(self.lines):
                    t, line = self.lines[pos]
                    pos += 1
                    m = rx.search(line)
                    if m:
                        return t, m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(left, 0.2))

    def need(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        got = self.wait_for(pattern, timeout, start)
        if got is None:
            raise RuntimeError(
                f"{self.module}: no line matching {pattern!r} within {timeout} s; last lines:\n{self.tail()}"
            )
        return got[1]

    def stop(self) -> None:
        """SIGKILL this process (by its pid) and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        self._reader.join(2)


_KEY_SUPPORT: dict[tuple[str, str], bool] = {}


def accepts_key(code_dir: Path, toml_line: str, table: str = "") -> bool:
    """Whether relayd in ``code_dir`` accepts a config line (``relayd --check`` exits 0 rather than 2
    with "unknown key"); asked once per code dir and key."""
    cache_key = (str(code_dir), f"[{table}]{toml_line}")
    if cache_key in _KEY_SUPPORT:
        return _KEY_SUPPORT[cache_key]
    tmp = Path(tempfile.mkdtemp(prefix="relay-attack-check-"))
    try:
        text = f"bind_port = 0\nstate_dir = 'state'\n{'' if table else toml_line}\n[auth]\ntoken = '{TOKEN}'\n"
        if table:
            text += f"[{table}]\n{toml_line}\n"
        (tmp / "relayd.toml").write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "relay_server.cli", "-c", "relayd.toml", "--check"],
            cwd=tmp,
            env=code_env(code_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        ok = r.returncode == 0
        if not ok and "unknown key" not in r.stdout + r.stderr:
            raise RuntimeError(f"relayd --check with {toml_line!r}: {r.stdout}{r.stderr}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _KEY_SUPPORT[cache_key] = ok
    return ok


def relay_server_file(code_dir: Path) -> str:
    r = subprocess.run(
        [sys.executable, "-c", "import relay_server; print(relay_server.__file__)"],
        env=code_env(code_dir),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    return r.stdout.strip() or r.stderr.strip()


# --- the echo probe ------------------------------------------------------------------------------

# Runs in a child process (stdlib only): an echo server, and once told the public port, a prober.
# Lines out: "ECHO port", then "S t" before each round trip, "R t rtt" after it, "E t t_err why" when the
# round trip failed (the connection is then made again), "C t why" when connecting failed.
PROBE_CHILD = r"""
import socket, sys, threading, time

def echo(conn):
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
    except OSError:
        return  # the probe went away: nothing to echo
    finally:
        conn.close()

def serve(srv):
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

out = sys.stdout
lock = threading.Lock()

def say(line):
    with lock:
        out.write(line + "\n")
        out.flush()

def probe(port, interval):
    payload = b"0123456789abcdef"
    sock = None
    next_at = time.monotonic()
    while True:
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                say(f"C {time.monotonic():.6f} connect: {exc}")
                time.sleep(0.2)
                continue
        t0 = time.monotonic()
        say(f"S {t0:.6f}")
        try:
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                data = sock.recv(len(payload) - got)
                if not data:
                    raise OSError("connection closed")
                got += len(data)
        except OSError as exc:
            say(f"E {t0:.6f} {time.monotonic():.6f} {exc}")
            sock.close()
            sock = None
            continue
        t1 = time.monotonic()
        say(f"R {t0:.6f} {t1 - t0:.6f}")
        next_at = max(next_at + interval, t1)
        time.sleep(max(0.0, next_at - time.monotonic()))

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
threading.Thread(target=serve, args=(srv,), daemon=True).start()
say(f"ECHO {srv.getsockname()[1]}")
words = sys.stdin.readline().split()
if len(words) == 3 and words[0] == "GO":
    threading.Thread(target=probe, args=(int(words[1]), float(words[2])), daemon=True).start()
    sys.stdin.read()
"""


class Probe:
    """The echo probe: a relayc with one tcp tunnel to the child's echo server, and the child's
    prober sending 16 bytes through the public port every ``interval`` s."""

    def __init__(self, lab: Lab, relayd_port: int, interval: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []  # (send time, round trip)
        self.errors: list[tuple[float, str]] = []  # (time, what)
        self.pending: float | None = None
        self._lock = threading.Lock()
        self.child = subprocess.Popen(
            [sys.executable, "-c", PROBE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        assert self.child.stdout is not None and self.child.stdin is not None
        first = self.child.stdout.readline().split()
        if len(first) != 2 or first[0] != "ECHO":
            raise RuntimeError(f"echo probe did not start: {first}")
        cfg = write_toml(
            lab.tmp / "probe-relayc.toml",
            {
                "server_addr": "127.0.0.1",
                "server_port": relayd_port,
                "name": "probe",
                "auth": {"token": TOKEN},
                "tunnels": [{"name": "echo", "local_port": int(first[1]), "remote_port": free_port()}],
            },
        )
        self.relayc = lab.spawn("relay_client.cli", cfg)
        self.public_port = int(self.relayc.need(r"tunnel echo: relayd port (\d+)", 30).group(1))
        self.child.stdin.write(f"GO {self.public_port} {interval}\n")
        self.child.stdin.flush()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 15
        while len(self.samples) < 5:
            if time.monotonic() > deadline:
                raise RuntimeError("the echo probe got no answers through relayd within 15 s")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            words = line.split()
            if not words:
                continue
            with self._lock:
                if words[0] == "S":
                    self.pending = float(words[1])
                elif words[0] == "R":
                    self.samples.append((float(words[1]), float(words[2])))
                    self.pending = None
                elif words[0] == "E":  # a failed round trip: it lasted at least until it failed
                    t_send, t_err = float(words[1]), float(words[2])
                    self.samples.append((t_send, t_err - t_send))
                    self.errors.append((t_err, " ".join(words[3:])))
                    self.pending = None
                elif words[0] == "C":
                    self.errors.append((float(words[1]), " ".join(words[2:])))

    def stats(self, t0: float, t1: float) -> dict[str, Any]:
        """Round trips that overlapped [t0, t1]; an unanswered one counts with its wait so far."""
        with self._lock:
            rtts = [rtt for ts, rtt in self.samples if ts <= t1 and ts + rtt >= t0]
            if self.pending is not None and self.pending <= t1:
                rtts.append(t1 - self.pending)
            errors = [what for t, what in self.errors if t0 <= t <= t1]
        rtts.sort()
        n = len(rtts)
        return {
            "probe_max_rtt_ms": round(rtts[-1] * 1000, 1) if n else -1.0,
            "probe_p99_rtt_ms": round(rtts[min(n - 1, math.ceil(0.99 * n) - 1)] * 1000, 1) if n else -1.0,
            "probe_samples": n,
            "probe_errors": len(errors),
            **({"probe_error_kinds": "; ".join(sorted(set(errors))[:3])} if errors else {}),
        }

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            with suppress(subprocess.TimeoutExpired):
                self.child.wait(5)
        self._reader.join(5)  # it ends at the end of the child's output
        for f in (self.child.stdin, self.child.stdout):
            if f is not None:
                with suppress(OSError):
                    f.close()


class Lab:
    """One attack's world: a temporary directory, relayd, the echo probe; all stopped by pid at the end."""

    def __init__(self, code_dir: Path, label: str) -> None:
        self.code_dir = code_dir
        self.tmp = Path(tempfile.mkdtemp(prefix=f"relay-attack-{label}-"))
        self.procs: list[Proc] = []
        self.probes: list[Probe] = []

    def spawn(self, module: str, config: Path) -> Proc:
        p = Proc(module, config, self.code_dir)
        self.procs.append(p)
        return p

    def relayd(self, **overrides: Any) -> tuple[Proc, int]:
        """relayd on a port chosen by the OS; returns it and its control port."""
        data: dict[str, Any] = {
            "bind_addr": "127.0.0.1",
            "bind_port": 0,
            "state_dir": "state",
            "auth": {"token": TOKEN},
        }
        data.update(overrides)
        cfg = write_toml(self.tmp / "relayd.toml", data)
        d = self.spawn("relay_server.cli", cfg)
        port = int(d.need(r"listening for relayc on \S+:(\d+)", 30).group(1))
        return d, port

    def probe(self, relayd_port: int) -> Probe:
        p = Probe(self, relayd_port)
        self.probes.append(p)
        return p

    def close(self) -> None:
        for probe in self.probes:
            probe.close()
        for p in reversed(self.procs):
            p.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def lab(code_dir: Path, label: str) -> Iterator[Lab]:
    world = Lab(code_dir, label)
    try:
        yield world
    finally:
        world.close()


class Meter:
    """relayd's RSS growth (peak VmRSS every 50 ms minus VmRSS at start), CPU seconds and the echo
    probe's round trips between ``start()`` and ``stop()``.  ``capped`` is set once the growth
    exceeds ``rss_cap_mib`` (0: no cap), for attacks to stop early."""

    def __init__(self, pid: int, probe: Probe | None = None, rss_cap_mib: float = 0.0) -> None:
        self.pid = pid
        self.probe = probe
        self.cap_kib = int(rss_cap_mib * 1024)
        self.capped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.rss0 = self.peak = 0
        self.cpu0 = 0.0
        self.t0 = 0.0

    def start(self) -> Meter:
        self.rss0 = self.peak = rss_kib(self.pid)
        self.cpu0 = cpu_seconds(self.pid)
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            r = rss_kib(self.pid)
            if r > self.peak:
                self.peak = r
            if self.cap_kib and r - self.rss0 > self.cap_kib:
                self.capped.set()

    def stop(self, prefix: str = "") -> dict[str, Any]:
        t1 = time.monotonic()
        cpu = cpu_seconds(self.pid)
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, rss_kib(self.pid))
        figs: dict[str, Any] = {
            "seconds": round(t1 - self.t0, 2),
            "rss_before_mib": round(self.rss0 / 1024, 1),
            "rss_growth_mib": round((self.peak - self.rss0) / 1024, 1),
            "rss_capped": int(self.capped.is_set()),
            "cpu_s": round(max(0.0, cpu - self.cpu0), 2),
        }
        if self.probe is not None:
            figs.update(self.probe.stats(self.t0, t1))
        return {prefix + k: v for k, v in figs.items()}


# --- a raw client --------------------------------------------------------------------------------


def control_message(obj: dict[str, Any]) -> bytes:
    """One control message as on the wire: 4-byte length, compact JSON."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(body)) + body


def tunnel_add(**spec: Any) -> bytes:
    return control_message({"type": "tunnel_add", "tunnel": spec})


class JsonStream:
    """Splits stream-1 bytes into control messages (as dicts: robust to types and fields the
    measured relayd may add)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[dict[str, Any]]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                break
            out.append(json.loads(bytes(self.buf[4 : 4 + n])))
            del self.buf[: 4 + n]
        return out


def tls_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawSession:
    """A hand-driven relay client: the sans-IO ``Session`` over a blocking TLS socket, read only when
    told to.  With ``grant_control`` False it never returns credit for what relayd sends on the
    control stream (it never calls ``consume``)."""

    HEAD_BYTES = 4096

    def __init__(self, port: int, source_ip: str = "127.0.0.1", grant_control: bool = True) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source_ip, 0))
        self.sock = tls_client_context().wrap_socket(raw)
        self.fingerprint = fingerprint_of_der(self.sock.getpeercert(binary_form=True) or b"")
        self.session = Session(True, 0.0)
        self.grant_control = grant_control
        self.stream = JsonStream()
        self.messages: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.received: dict[int, int] = {}  # bytes delivered on the streams opened with ``open``
        self.heads: dict[int, bytearray] = {}  # their first ``HEAD_BYTES`` bytes
        self.write_lock = threading.Lock()
        self.closed = False
        self.flush()

    def flush(self, timeout: float = 15.0) -> None:
        data = self.session.data_to_send()
        if data:
            self.send_raw(data, timeout)

    def send_control(self, data: bytes) -> None:
        """Control-message bytes on stream 1, as the session's credit allows (the rest is sent by
        later flushes, as relayd returns credit)."""
        self.session.send_data(1, data)
        self.flush()

    def send_raw(self, data: bytes, timeout: float = 15.0) -> None:
        with self.write_lock:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)

    def pump(self, timeout: float) -> bool:
        """Read once (waiting up to ``timeout`` s); False once relayd closed the connection."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 18)
        except TimeoutError:
            return True
        except (OSError, ssl.SSLError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        try:
            events = self.session.receive_data(data, 0.0)
        except Exception:  # a protocol error from relayd's side: treat as closed
            self.closed = True
            return False
        for ev in events:
            if isinstance(ev, DataReceived) and ev.stream_id == 1:
                self.messages += self.stream.feed(ev.data)
                if self.grant_control:
                    self.session.consume(1, len(ev.data))
            elif isinstance(ev, DataReceived):
                head = self.heads.get(ev.stream_id)
                if head is not None:  # a stream opened with ``open``: counted, never consumed
                    self.received[ev.stream_id] += len(ev.data)
                    if len(head) < self.HEAD_BYTES:
                        head += ev.data[: self.HEAD_BYTES - len(head)]
            else:
                self.events.append(ev)
        self.flush()
        return True

    def open(self, data: bytes) -> int:
        """Open a stream (odd id) starting with ``data``; what relayd sends on it is counted in
        ``received`` and its start kept in ``heads``, and no credit is ever returned for it."""
        sid = self.session.open_stream(data)
        self.received[sid] = 0
        self.heads[sid] = bytearray()
        self.flush()
        return sid

    def next_message(self, timeout: float = 15.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while not self.messages:
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 1.0)):
                return None
        return self.messages.pop(0)

    def login(self, name: str, token: str = TOKEN) -> None:
        nonce = auth.new_nonce()
        hello = {"type": "hello", "name": name, "client_nonce": nonce, "version": "attacks"}
        self.session.open_stream(control_message(hello))
        self.flush()
        challenge = self.next_message()
        if not challenge or challenge.get("type") != "challenge":
            raise RuntimeError(f"login {name}: expected a challenge, got {challenge}")
        proof = auth.client_proof(token, name, nonce, challenge["server_nonce"], self.fingerprint)
        self.session.send_data(1, control_message({"type": "login", "proof": proof}))
        self.flush()
        answer = self.next_message()
        if not answer or answer.get("type") != "login_ok":
            raise RuntimeError(f"login {name}: expected login_ok, got {answer}")

    def wait_opened(self, timeout: float) -> int | None:
        """The id of the next stream relayd opens (even id), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if isinstance(ev, StreamOpened) and ev.stream_id % 2 == 0:
                    del self.events[i]
                    return ev.stream_id
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 1.0)):
                return None

    def close(self) -> None:
        self.closed = True
        with suppress(OSError):
            self.sock.close()


class Keepalive:
    """Sends a harmless frame (WINDOW_UPDATE +0 on stream 0) every ``interval`` s, so that relayd's
    keepalive timeout is not what ends a client that has stopped reading."""

    def __init__(self, client: RawSession, interval: float = 2.0) -> None:
        self.client = client
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        frame = frame_header(FrameType.WINDOW_UPDATE, 0, 0, 0)
        while not self._stop.wait(self.interval):
            try:
                self.client.send_raw(frame, timeout=self.interval)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)


# --- floods (A, B) -------------------------------------------------------------------------------

FLOOD_CHUNK = 16380  # 1365 frames of 12 bytes: one TLS record per send
PING_CHUNK = b"".join(frame_header(FrameType.PING, Flag.SYN, 0, i) for i in range(FLOOD_CHUNK // 12))


def chunk_maker(kind: str) -> Callable[[], bytes]:
    """Successive 16 KiB pieces of a flood: PINGs, or DATA|SYN frames opening odd streams 3, 5, 7..."""
    if kind == "ping":
        return lambda: PING_CHUNK
    if kind != "streams":
        raise ValueError(f"unknown flood {kind!r}")
    next_id = [3]
    pack = _HEADER.pack

    def streams() -> bytes:
        first = next_id[0]
        next_id[0] = first + 2 * (FLOOD_CHUNK // 12)
        return b"".join([pack(1, FrameType.DATA, Flag.SYN, sid, 0) for sid in range(first, next_id[0], 2)])

    return streams


class FloodResult:
    __slots__ = ("closed_at", "error", "outcome", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.outcome = "not started"
        self.closed_at = -1.0
        self.error = ""


def flood(
    sock: ssl.SSLSocket,
    kind: str,
    max_bytes: int,
    block_s: float,
    deadline: float,
    stop: threading.Event,
    t0: float,
    result: FloodResult,
) -> None:
    """Send the flood until ``max_bytes``, a send blocked ``block_s`` s, relayd closed, or stop."""
    make = chunk_maker(kind)
    sock.settimeout(block_s)
    while result.sent < max_bytes:
        if stop.is_set() or time.monotonic() > deadline:
            result.outcome = "stopped"
            return
        chunk = make()
        try:
            sock.sendall(chunk)
        except TimeoutError:
            result.outcome = "blocked"
            return
        except (OSError, ssl.SSLError) as exc:
            result.outcome = "closed"
            result.closed_at = time.monotonic() - t0
            result.error = type(exc).__name__
            return
        result.sent += len(chunk)
    result.outcome = "done"


def summarize_floods(results: list[FloodResult]) -> dict[str, Any]:
    figs: dict[str, Any] = {"sent_mib": round(sum(r.sent for r in results) / MIB, 1)}
    figs["sent_mib_per_conn_max"] = round(max((r.sent for r in results), default=0) / MIB, 2)
    for outcome in ("done", "blocked", "closed", "stopped", "connect failed"):
        figs[f"conns_{outcome.replace(' ', '_')}"] = sum(1 for r in results if r.outcome == outcome)
    closed = [r.closed_at for r in results if r.closed_at >= 0]
    figs["closed_after_s_max"] = round(max(closed), 2) if closed else -1.0
    return figs


def attack_a(
    code_dir: Path = ROOT,
    *,
    kind: str = "ping",
    conns: int = 100,
    max_bytes: int = 8 * MIB,
    block_s: float = 2.0,
    limit_s: float = 60.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """A: ``conns`` TLS connections that never log in nor read flood PINGs (``kind="ping"``) or
    stream openings (``"streams"``) after the preface."""
    with lab(code_dir, "A") as world:
        d, port = world.relayd()
        probe = world.probe(port)
        results = [FloodResult() for _ in range(conns)]
        stop = threading.Event()
        go = threading.Event()  # every connection is made (TLS, preface) before any floods
        release = threading.Event()  # the connections stay open (unread) until relayd has settled
        lock = threading.Lock()
        ready = [0]
        flooding = [conns]
        when = {"t0": 0.0, "deadline": 0.0}

        def one(i: int) -> None:
            src = f"127.0.0.{2 + i % 8}"
            sock = None
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))
                sock = tls_client_context().wrap_socket(raw)
                sock.sendall(preface())
            except (OSError, ssl.SSLError) as exc:
                results[i].outcome = "connect failed"
                results[i].error = f"{type(exc).__name__}: {exc}"
            with lock:
                ready[0] += 1
            go.wait(60)
            try:
                if sock is not None:
                    flood(sock, kind, max_bytes, block_s, when["deadline"], stop, when["t0"], results[i])
            finally:
                with lock:
                    flooding[0] -= 1
                release.wait(limit_s + 60)
                if sock is not None:
                    sock.close()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(conns)]
        for t in threads:
            t.start()
        connect_until = time.monotonic() + 30
        while ready[0] < conns and time.monotonic() < connect_until:
            time.sleep(0.02)
        meter = Meter(d.pid, probe, rss_cap_mib).start()
        t0 = when["t0"] = meter.t0
        deadline = when["deadline"] = t0 + limit_s
        go.set()
        while flooding[0] and time.monotonic() < deadline + block_s + 15:
            if meter.capped.is_set():
                stop.set()
            time.sleep(0.05)
        stop.set()
        sending_s = time.monotonic() - t0
        # relayd may still be working through what the kernel buffered: measure until it is idle
        settle(d.pid, max(1.0, deadline + 15 - time.monotonic()), meter.capped)
        figs = meter.stop()
        release.set()
        for t in threads:
            t.join(5)
        figs["sending_s"] = round(sending_s, 2)
        figs.update(summarize_floods(results))
        errors = sorted({r.error for r in results if r.outcome == "connect failed"})
        if errors:
            figs["connect_errors"] = "; ".join(errors[:3])
        figs["conns"] = conns
        figs["rss_growth_per_conn_kib"] = round(figs["rss_growth_mib"] * 1024 / max(1, conns), 1)
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


def attack_b(
    code_dir: Path = ROOT,
    *,
    kind: str = "ping",
    conns: int = 1,
    max_bytes: int = 256 * MIB,
    block_s: float = 2.0,
    limit_s: float = 60.0,
    wait_close_s: float = 15.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """B: logged-in clients that never read flood PINGs or stream openings; then wait up to
    ``wait_close_s`` s for relayd to close them."""
    with lab(code_dir, "B") as world:
        d, port = world.relayd()
        probe = world.probe(port)
        clients = []
        for i in range(conns):
            c = RawSession(port)
            c.login(f"flood{i}")
            clients.append(c)
        results = [FloodResult() for _ in range(conns)]
        stop = threading.Event()
        mark = d.mark()
        meter = Meter(d.pid, probe, rss_cap_mib).start()
        t0 = meter.t0
        deadline = t0 + limit_s
        threads = [
            threading.Thread(
                target=flood, args=(c.sock, kind, max_bytes, block_s, deadline, stop, t0, results[i]), daemon=True
            )
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + block_s + 15:
            if meter.capped.is_set():
                stop.set()
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(5)
        sending_ended = time.monotonic() - t0
        settle(d.pid, max(1.0, deadline + 15 - time.monotonic()), meter.capped)
        # did relayd close them (or will it soon)?  Its log says so for a logged-in client.
        pattern = r"client flood\d+ \(.*\) disconnected"
        closed_at: list[float] = []
        wait_until = time.monotonic() + wait_close_s
        while time.monotonic() < wait_until and not meter.capped.is_set():
            closed_at = [t - t0 for t, _ in d.matches(pattern, mark)]
            if len(closed_at) >= conns:
                break
            time.sleep(0.1)
        figs = meter.stop()
        for c in clients:
            c.close()
        figs.update(summarize_floods(results))
        figs["sending_s"] = round(sending_ended, 2)
        figs["conns"] = conns
        figs["closed_by_relayd"] = len(closed_at)
        figs["closed_after_s"] = round(max(closed_at), 2) if closed_at else -1.0
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


# --- C: control stream credit withheld -----------------------------------------------------------


def attack_c(
    code_dir: Path = ROOT,
    *,
    messages: int = 100_000,
    reading_share: float = 0.9,
    block_s: float = 2.0,
    wait_s: float = 30.0,
    limit_s: float = 60.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """C: a logged-in client that never grants credit on stream 1 sends ``messages`` refused
    tunnel_adds: the first ``reading_share`` of them while it still reads relayd's frames (so it
    knows the credit relayd grants it), the rest after it stopped reading, as far as that credit
    goes; then it waits up to ``wait_s`` s for relayd to disconnect it."""
    with lab(code_dir, "C") as world:
        d, port = world.relayd()
        probe = world.probe(port)
        c = RawSession(port, grant_control=False)
        c.login("credit")
        # remote_port 80 is outside allow_ports (1024-65535): every tunnel_add is answered with an error
        msg = tunnel_add(name="c", local_port=1, remote_port=80)
        batch = 500
        blob = msg * batch  # the most we keep queued in our session while reading
        mark = d.mark()
        meter = Meter(d.pid, probe, rss_cap_mib).start()
        t0 = meter.t0
        deadline = t0 + limit_s
        queued = 0  # messages handed to our session (it sends them as relayd's credit allows)
        outcome = "done"

        def transmitted() -> int:
            return (queued * len(msg) - c.session.send_buffered(1)) // len(msg)

        # phase 1: read relayd's frames (learning our credit; never granting any on stream 1) while
        # sending most of the messages
        stalled_since = time.monotonic()
        last = phase1 = 0
        phase2_bytes = 0
        try:
            while transmitted() < int(messages * reading_share) and not c.closed:
                if time.monotonic() > deadline or meter.capped.is_set():
                    outcome = "stopped"
                    break
                if c.session.send_buffered(1) < len(blob) and queued < int(messages * reading_share):
                    n = min(batch, int(messages * reading_share) - queued)
                    c.session.send_data(1, msg * n)
                    queued += n
                c.flush(block_s)
                c.pump(0.05)
                now_sent = transmitted()
                if now_sent != last:
                    last, stalled_since = now_sent, time.monotonic()
                elif time.monotonic() - stalled_since > 10:
                    outcome = "no credit for 10 s (reading)"
                    break
            phase1 = transmitted()
            if c.closed:
                outcome = "closed"
            # phase 2: stop reading; send the rest, as far as the credit learnt allows
            if outcome == "done" and not c.closed:
                rest = messages - queued
                c.session.send_data(1, msg * max(0, rest))
                queued += max(0, rest)
                data = c.session.data_to_send()
                view = memoryview(data)
                c.sock.settimeout(block_s)
                for i in range(0, len(view), FLOOD_CHUNK):
                    if meter.capped.is_set() or time.monotonic() > deadline:
                        outcome = "stopped"
                        break
                    c.sock.sendall(view[i : i + FLOOD_CHUNK])
                    phase2_bytes += len(view[i : i + FLOOD_CHUNK])
                if outcome == "done" and c.session.send_buffered(1):
                    outcome = "out of credit"
        except TimeoutError:
            outcome = "blocked"
        except (OSError, ssl.SSLError):
            outcome = "closed"
        if not phase1:  # phase 1 ended by an exception
            phase1 = transmitted()
        sending_ended = time.monotonic() - t0
        # wait for relayd to disconnect us, sending keepalive frames (not reading)
        keepalive = Keepalive(c)
        got = d.wait_for(r"client credit \(.*\) disconnected", wait_s, mark)
        keepalive.stop()
        figs = meter.stop()
        c.close()
        figs["messages_sent"] = phase1 + phase2_bytes // len(msg)
        figs["messages_sent_reading"] = phase1
        figs["outcome"] = outcome
        figs["sending_s"] = round(sending_ended, 2)
        figs["disconnected"] = int(got is not None)
        figs["disconnected_after_s"] = round(got[0] - t0, 2) if got else -1.0
        figs["statuses_read"] = len(c.messages)
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


# --- D: visitor upload through a client that does not read ---------------------------------------


def client_hello(server_name: str) -> bytes:
    """A real TLS ClientHello (as records) for ``server_name``, from Python's ssl."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_client_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def attack_d(
    code_dir: Path = ROOT,
    *,
    kind: str = "tcp",
    upload_bytes: int = 1 << 30,
    block_s: float = 3.0,
    limit_s: float = 60.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """D: a client registers a tcp, an http and an https tunnel; when relayd opens the visitor's stream
    it grants relayd ~2 GiB of window (session and stream) and stops reading; the visitor of
    ``kind`` uploads up to ``upload_bytes``, until a send blocks ``block_s`` s."""
    http_port, https_port = free_port(), free_port()
    with lab(code_dir, "D") as world:
        d, port = world.relayd(vhost_http_port=http_port, vhost_https_port=https_port, subdomain_host="localhost")
        probe = world.probe(port)
        c = RawSession(port)
        c.login("upload")
        c.send_control(
            tunnel_add(name="t", local_port=9, remote_port=0)
            + tunnel_add(name="h", type="http", local_port=9, subdomain="up")
            + tunnel_add(name="s", type="https", local_port=9, custom_domains=["up.tls.test"])
        )
        statuses: dict[str, dict[str, Any]] = {}
        while len(statuses) < 3:
            m = c.next_message(15)
            if m is None:
                raise RuntimeError(f"D: tunnel statuses missing (got {statuses}); relayd:\n{d.tail()}")
            if m.get("type") == "tunnel_status":
                statuses[m["name"]] = m
        if not all(s.get("ok") for s in statuses.values()):
            raise RuntimeError(f"D: a tunnel was refused: {statuses}")
        if kind == "tcp":
            visitor = socket.create_connection(("127.0.0.1", statuses["t"]["remote_port"]), timeout=10)
            first = b""
        elif kind == "http":
            visitor = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            first = f"POST / HTTP/1.1\r\nHost: up.localhost\r\nContent-Length: {upload_bytes}\r\n\r\n".encode()
        elif kind == "https":
            visitor = socket.create_connection(("127.0.0.1", https_port), timeout=10)
            first = client_hello("up.tls.test")
        else:
            raise ValueError(f"unknown visitor kind {kind!r}")
        try:
            visitor.sendall(first)
            sid = c.wait_opened(15)
            if sid is None:
                raise RuntimeError(f"D: relayd opened no stream for the {kind} visitor; relayd:\n{d.tail()}")
            # a huge window for relayd, on the session and on this stream, then no more reading
            grant = frame_header(FrameType.WINDOW_UPDATE, 0, 0, MAX_WINDOW - 64 * MIB - MIB)
            grant += frame_header(FrameType.WINDOW_UPDATE, 0, sid, MAX_WINDOW - MIB)
            c.send_raw(grant)
            keepalive = Keepalive(c)
            meter = Meter(d.pid, probe, rss_cap_mib).start()
            deadline = meter.t0 + limit_s
            junk = memoryview(bytes(range(256)) * 4096)  # 1 MiB
            accepted = len(first)
            outcome = "done"
            visitor.settimeout(block_s)
            while accepted < upload_bytes:
                if meter.capped.is_set() or time.monotonic() > deadline:
                    outcome = "stopped"
                    break
                try:
                    accepted += visitor.send(junk[: min(len(junk), upload_bytes - accepted)])
                except TimeoutError:
                    outcome = "blocked"
                    break
                except OSError:
                    outcome = "closed"
                    break
            settle(d.pid, 10)
            figs = meter.stop()
            keepalive.stop()
        finally:
            visitor.close()
            c.close()
        figs["accepted_mib"] = round(accepted / MIB, 1)
        figs["outcome"] = outcome
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


def attack_d_many(
    code_dir: Path = ROOT,
    *,
    visitors: int = 600,
    per_visitor: int = 4 * MIB,
    block_s: float = 3.0,
    limit_s: float = 60.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """D-many: a client keeps reading its connection (so relayd's writes never block) but returns
    no credit for any visitor stream; ``visitors`` visitors of one tcp tunnel each upload up to
    ``per_visitor`` bytes until every send blocks ``block_s`` s.  What relayd then holds is what
    waits for credit, over all the client's streams: without a cap per session, up to a window
    and a read per stream."""
    with lab(code_dir, "Dmany") as world:
        d, port = world.relayd()
        probe = world.probe(port)
        c = RawSession(port)
        c.login("hoarder")
        c.send_control(tunnel_add(name="t", local_port=9, remote_port=0))
        status = c.next_message(15)
        if not status or not status.get("ok"):
            raise RuntimeError(f"D-many: tunnel refused: {status}; relayd:\n{d.tail()}")
        stop = threading.Event()

        def read_forever() -> None:  # reads everything, consumes nothing: no credit ever comes back
            while not stop.is_set() and c.pump(0.2):
                c.events.clear()

        reader = threading.Thread(target=read_forever, daemon=True)
        reader.start()
        meter = Meter(d.pid, probe, rss_cap_mib).start()
        deadline = meter.t0 + limit_s
        socks: list[socket.socket] = []
        sent = [0] * visitors
        junk = bytes(64 * 1024)
        outcome = "blocked"
        try:
            for _ in range(visitors):
                v = socket.create_connection(("127.0.0.1", status["remote_port"]), timeout=10)
                v.setblocking(False)
                socks.append(v)
            last_progress = time.monotonic()
            while time.monotonic() - last_progress < block_s:
                if meter.capped.is_set() or time.monotonic() > deadline:
                    outcome = "stopped"
                    break
                progressed = False
                for i, v in enumerate(socks):
                    if sent[i] >= per_visitor:
                        continue
                    try:
                        sent[i] += v.send(junk[: per_visitor - sent[i]])
                        progressed = True
                    except BlockingIOError:
                        continue
                    except OSError:
                        sent[i] = per_visitor  # closed by relayd: count it as done
                if progressed:
                    last_progress = time.monotonic()
                elif all(n >= per_visitor for n in sent):
                    outcome = "done"
                    break
                else:
                    time.sleep(0.01)  # every socket is full: let relayd move (pacing, not waiting)
            settle(d.pid, 10)
            figs = meter.stop()
        finally:
            stop.set()
            reader.join(5)
            for v in socks:
                v.close()
            c.close()
        figs["visitors"] = visitors
        figs["accepted_mib"] = round(sum(sent) / MIB, 1)
        figs["outcome"] = outcome
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


# --- E: registering and removing many tunnels ----------------------------------------------------


def _register_and_remove(code_dir: Path, n_http: int, n_tcp: int, remove_wait_s: float) -> dict[str, Any]:
    overrides: dict[str, Any] = {"vhost_http_port": free_port(), "subdomain_host": "localhost"}
    note = ""
    if accepts_key(code_dir, "max_tunnels_per_client = 0"):
        overrides["max_tunnels_per_client"] = 0
        note = "max_tunnels_per_client = 0 passed"
    else:
        note = "max_tunnels_per_client unknown to this relayd: not passed"
    with lab(code_dir, "E") as world:
        d, port = world.relayd(**overrides)
        probe = world.probe(port)
        c = RawSession(port)
        c.login("many")
        blob = b"".join(tunnel_add(name=f"h{i}", type="http", local_port=9, subdomain=f"t{i}") for i in range(n_http))
        blob += b"".join(tunnel_add(name=f"p{i}", local_port=9, remote_port=0) for i in range(n_tcp))
        want = n_http + n_tcp
        ok = refused = 0
        reg = Meter(d.pid, probe).start()
        c.send_control(blob)  # sent as relayd's credit allows: a few big writes
        deadline = reg.t0 + 120
        last_status = reg.t0
        while ok + refused < want and time.monotonic() < deadline:
            if not c.pump(1.0):
                break
            while c.messages:
                m = c.messages.pop(0)
                if m.get("type") == "tunnel_status":
                    last_status = time.monotonic()
                    if m.get("ok"):
                        ok += 1
                    else:
                        refused += 1
        figs = reg.stop("reg_")
        figs["reg_time_s"] = round(last_status - reg.t0, 2)
        figs["reg_ok"] = ok
        figs["reg_refused"] = refused
        figs["reg_missing"] = want - ok - refused
        figs["reg_closed_by_relayd"] = int(c.closed)
        if c.closed:  # why relayd ended a client that was reading and granting credit
            why = [m.group(1) for _, m in d.matches(r"closing session: (.*)")]
            figs["reg_close_reason"] = why[-1][:200] if why else "?"
        mark = d.mark()
        rm = Meter(d.pid, probe).start()
        c.close()
        got = d.wait_for(r"client many\b.*disconnected", remove_wait_s, mark)
        settle(d.pid, 30, quiet_s=0.5)  # work relayd may have deferred past that log line
        figs.update(rm.stop("rm_"))
        figs["rm_time_s"] = round(got[0] - rm.t0, 2) if got else -1.0
        figs["note"] = note
        return figs


def attack_e(
    code_dir: Path = ROOT, *, n_http: int = 5000, n_tcp: int = 1000, remove_wait_s: float = 60.0
) -> dict[str, Any]:
    """E: register ``n_http`` http + ``n_tcp`` tcp tunnels in a few big writes, then close the
    connection; the same at a quarter of the sizes, and the ratios."""
    full = _register_and_remove(code_dir, n_http, n_tcp, remove_wait_s)
    quarter = _register_and_remove(code_dir, max(1, n_http // 4), max(1, n_tcp // 4), remove_wait_s)
    figs: dict[str, Any] = {"n_http": n_http, "n_tcp": n_tcp}
    for k, v in full.items():
        figs[k] = v
    for k, v in quarter.items():
        if k != "note":
            figs[f"q_{k}"] = v

    def ratio(key: str) -> float:
        a, b = full.get(key, -1), quarter.get(key, -1)
        return round(a / b, 1) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else -1.0

    for key in ("reg_time_s", "reg_cpu_s", "rm_time_s", "rm_cpu_s"):
        figs[f"ratio_{key}"] = ratio(key)
    return figs


# --- F: SNI dribble ------------------------------------------------------------------------------


def padded_handshake(server_name: str, size: int) -> bytes:
    """The handshake message of a real ClientHello for ``server_name``, grown to about ``size`` bytes
    with a padding extension (RFC 7685) when ``size`` is larger than it is."""
    records = client_hello(server_name)
    hs = bytearray()
    pos = 0
    while pos + 5 <= len(records):
        n = int.from_bytes(records[pos + 3 : pos + 5], "big")
        hs += records[pos + 5 : pos + 5 + n]
        pos += 5 + n
    body = bytes(hs[4 : 4 + int.from_bytes(hs[1:4], "big")])
    extra = size - 4 - len(body) - 4
    if extra <= 0:
        return bytes(hs)
    p = 2 + 32
    p += 1 + body[p]  # session id
    p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
    p += 1 + body[p]  # compression methods
    ext_len = int.from_bytes(body[p : p + 2], "big")
    exts = body[p + 2 : p + 2 + ext_len] + b"\x00\x15" + extra.to_bytes(2, "big") + bytes(extra)
    body = body[:p] + len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def dribble(handshake: bytes) -> bytes:
    """The handshake cut into TLS records of one byte each (6 bytes on the wire per byte)."""
    return b"".join(b"\x16\x03\x01\x00\x01" + handshake[i : i + 1] for i in range(len(handshake)))


def attack_f(
    code_dir: Path = ROOT, *, conns: int = 50, hello_size: int = 10_000, piece: int = 600, duration_s: float = 20.0
) -> dict[str, Any]:
    """F: ``conns`` visitors of the https vhost port, each sending, again and again for ``duration_s``,
    a ClientHello (grown to ``hello_size`` bytes; 0 = as Python makes it) for an unknown name cut into
    1-byte TLS records, in ``piece``-byte writes with TCP_NODELAY.  relayd closes each connection
    once it read the name."""
    https_port = free_port()
    hs = padded_handshake("dribble.example.org", hello_size)
    wire = dribble(hs)
    pieces = [wire[i : i + piece] for i in range(0, len(wire), piece)]
    with lab(code_dir, "F") as world:
        d, port = world.relayd(vhost_https_port=https_port)
        probe = world.probe(port)
        counts = {"started": 0, "sent": 0, "closed_by_relayd": 0, "errors": 0, "bytes": 0}
        lock = threading.Lock()
        meter = Meter(d.pid, probe).start()
        deadline = meter.t0 + duration_s

        def one() -> None:
            while time.monotonic() < deadline:
                with lock:
                    counts["started"] += 1
                try:
                    with socket.create_connection(("127.0.0.1", https_port), timeout=10) as s:
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        for p in pieces:
                            s.sendall(p)
                            with lock:
                                counts["bytes"] += len(p)
                        with lock:
                            counts["sent"] += 1
                        s.settimeout(max(1.0, deadline - time.monotonic() + 5))
                        if s.recv(1) == b"":
                            with lock:
                                counts["closed_by_relayd"] += 1
                except OSError:
                    with lock:
                        counts["errors"] += 1

        threads = [threading.Thread(target=one, daemon=True) for _ in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic() + 20))
        figs = meter.stop()
        figs.update({f"hellos_{k}": v for k, v in counts.items() if k != "bytes"})
        figs["sent_mib"] = round(counts["bytes"] / MIB, 2)
        figs["cpu_ms_per_hello"] = round(figs["cpu_s"] * 1000 / max(1, counts["sent"]), 2)
        figs["handshake_bytes"] = len(hs)
        figs["dribble_bytes"] = len(wire)
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


# --- G: dashboard password guessing --------------------------------------------------------------


def basic_get(port: int, password: str, timeout: float, path: str = "/api/v1/overview") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        conn.request("GET", path, headers={"Authorization": f"Basic {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


_NOT_CHECKED = re.compile(r"block|too many|later|locked|rate|slow down", re.I)


def guessing(port: int, threads: int, duration_s: float, answer_timeout: float = 30.0) -> dict[str, Any]:
    """``threads`` threads each sending wrong Basic guesses back to back, starting new ones for
    ``duration_s`` s; the answer to every guess started is waited for (up to ``answer_timeout`` s),
    so a server that checks at once but answers late is counted too.  An answer counts as *checked*
    when it is a 401 that does not say the address is blocked or rate limited."""
    answers: list[tuple[float, int, str]] = []
    started = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(threads)
    deadline = [0.0]

    def one(k: int) -> None:
        barrier.wait()
        i = 0
        while time.monotonic() < deadline[0]:
            with lock:
                started[0] += 1
            try:
                status, body = basic_get(port, f"wrong-guess-{k}-{i}", answer_timeout)
            except OSError:
                continue
            with lock:
                answers.append((time.monotonic(), status, body))
            i += 1

    deadline[0] = time.monotonic() + duration_s
    workers = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration_s + answer_timeout + 10)
    by_status: dict[int, int] = {}
    for _, status, _ in answers:
        by_status[status] = by_status.get(status, 0) + 1
    checked = [t for t, status, body in answers if status == 401 and not _NOT_CHECKED.search(body)]
    figs: dict[str, Any] = {
        "guesses": started[0],
        "answered_in_window": sum(1 for t, _, _ in answers if t <= deadline[0]),
        "answered": len(answers),
        "checked": len(checked),
        "checked_in_window": sum(1 for t in checked if t <= deadline[0]),
        "unanswered": started[0] - len(answers),
    }
    for status, n in sorted(by_status.items()):
        figs[f"status_{status}"] = n
    return figs


def verify_cost_s(code_dir: Path, password_hash: str) -> float:
    """Seconds one check of a wrong password against ``password_hash`` takes (best of 3), using the
    measured code's relay_server.passwords."""
    src = (
        "import sys, time\nfrom relay_server.passwords import verify_password\nbest = 1e9\n"
        "for _ in range(3):\n    t = time.perf_counter(); verify_password('nope', sys.argv[1])\n"
        "    best = min(best, time.perf_counter() - t)\nprint(best)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", src, password_hash],
        env=code_env(code_dir),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    try:
        return float(r.stdout.strip())
    except ValueError:
        return -1.0


def attack_g(
    code_dir: Path = ROOT, *, threads: int = 40, duration_s: float = 10.0, answer_timeout_s: float = 30.0
) -> dict[str, Any]:
    """G: wrong HTTP Basic guesses at the dashboard from ``threads`` threads for ``duration_s`` s, and
    from 1 thread for as long on a fresh relayd; the right password right after the parallel run.
    Each request waits up to ``answer_timeout_s`` s for its answer (status -1: none came)."""
    r = subprocess.run(
        [sys.executable, "-m", "relay_server.cli", "hash-password"],
        input=DASH_PASSWORD + "\n",
        env=code_env(code_dir),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    password_hash = r.stdout.strip()
    if r.returncode != 0 or not password_hash:
        raise RuntimeError(f"relayd hash-password failed: {r.stdout}{r.stderr}")
    figs: dict[str, Any] = {"threads": threads, "duration_s": duration_s}
    cost = verify_cost_s(code_dir, password_hash)
    figs["check_cost_ms"] = round(cost * 1000, 1)
    for label, n in (("par", threads), ("ser", 1)):
        with lab(code_dir, "G") as world:
            d, port = world.relayd(
                dashboard={"addr": "127.0.0.1", "port": 0, "user": "admin", "password_hash": password_hash}
            )
            dash = int(d.need(r"dashboard on https?://\S+:(\d+)", 30).group(1))
            probe = world.probe(port)
            meter = Meter(d.pid, probe).start()
            got = guessing(dash, n, duration_s, answer_timeout_s)
            figs.update(meter.stop(f"{label}_"))
            figs.update({f"{label}_{k}": v for k, v in got.items()})
            if cost > 0:
                figs[f"{label}_checks_est_from_cpu"] = round(figs[f"{label}_cpu_s"] / cost, 1)
            if label == "par":
                try:
                    status, _ = basic_get(dash, DASH_PASSWORD, answer_timeout_s)
                except OSError:
                    status = -1
                figs["correct_password_after_par_status"] = status
                figs["correct_password_after_par_accepted"] = int(status == 200)
    return figs


# --- H: a visitor of a secret tunnel that withholds credit -----------------------------------------


class Pourer:
    """A local service that sends zeros to every connection it accepts (up to ``max_conns``) as fast
    as the kernel takes them, up to ``per_conn`` bytes each, until ``stop()``.  ``sent[i]``: what the
    kernel took for the i-th connection; ``last_progress``: when any connection last sent a byte."""

    def __init__(self, per_conn: int, max_conns: int) -> None:
        self.per_conn = per_conn
        self.max_conns = max_conns
        self.sent: list[int] = []
        self.closed: list[bool] = []
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.srv.settimeout(0.2)
        self.port = int(self.srv.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and len(self.sent) < self.max_conns:
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listening socket was closed: stop() ran
            self.sent.append(0)
            self.closed.append(False)
            t = threading.Thread(target=self._pour, args=(conn, len(self.sent) - 1), daemon=True)
            self._threads.append(t)
            t.start()

    def _pour(self, conn: socket.socket, i: int) -> None:
        junk = memoryview(bytes(MIB))
        conn.settimeout(0.2)
        try:
            while self.sent[i] < self.per_conn and not self._stop.is_set():
                try:
                    n = conn.send(junk[: min(len(junk), self.per_conn - self.sent[i])])
                except TimeoutError:
                    continue  # the kernel's buffers are full: relayc is not reading
                except OSError:
                    self.closed[i] = True
                    return
                self.sent[i] += n
                self.last_progress = time.monotonic()
        finally:
            conn.close()

    def all_done(self) -> bool:
        return len(self.sent) >= self.max_conns and all(
            n >= self.per_conn or closed for n, closed in zip(self.sent, self.closed, strict=True)
        )

    def stop(self) -> None:
        self._stop.set()
        self.srv.close()
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)


def first_message(buf: bytes | bytearray) -> dict[str, Any] | None:
    """The first control message (length-prefixed JSON) at the start of ``buf``, if it is all there."""
    if len(buf) < 4:
        return None
    n = int.from_bytes(buf[:4], "big")
    if len(buf) < 4 + n:
        return None
    obj = json.loads(bytes(buf[4 : 4 + n]))
    return obj if isinstance(obj, dict) else {"not an object": obj}


def attack_h(
    code_dir: Path = ROOT,
    *,
    reading: bool = True,
    visits: int = 20,
    pour_bytes: int = 1 << 30,
    block_s: float = 3.0,
    limit_s: float = 60.0,
    rss_cap_mib: float = 1024,
) -> dict[str, Any]:
    """H: a relayc ("owner") has a secret tunnel (its secret_key known to "evil") to a service that pours
    up to ``pour_bytes`` into every connection; a raw client logs in as "evil", opens ``visits``
    visits (streams starting with visit_open) and never returns credit for them: with ``reading``
    it reads its connection (so relayd's writes never block) but never consumes, otherwise it stops
    reading once the visit_results are in (sending keepalive frames).  The pouring runs until no
    connection sent a byte for ``block_s`` s: what the service got out is what relayd, relayc and
    the kernel's buffers took in between (``owner_rss_growth_mib``: relayc's part of it)."""
    with lab(code_dir, "H") as world:
        d, port = world.relayd()
        probe = world.probe(port)
        pourer = Pourer(pour_bytes, visits)
        stop = threading.Event()
        reader: threading.Thread | None = None
        keepalive: Keepalive | None = None
        c: RawSession | None = None
        try:
            cfg = write_toml(
                world.tmp / "owner-relayc.toml",
                {
                    "server_addr": "127.0.0.1",
                    "server_port": port,
                    "name": "owner",
                    "auth": {"token": TOKEN},
                    "tunnels": [{"name": "pour", "type": "secret", "local_port": pourer.port, "secret_key": VISIT_KEY}],
                },
            )
            owner = world.spawn("relay_client.cli", cfg)
            owner.need(r"tunnel pour: secret", 30)
            c = RawSession(port)
            c.login("evil")
            owner_meter = Meter(owner.pid).start()
            meter = Meter(d.pid, probe, rss_cap_mib).start()
            deadline = meter.t0 + limit_s
            # allowed by the tunnel's secret_key (a name in allow_visitors counts only with a token of its own)
            proof = auth.visit_proof(VISIT_KEY, "evil", "owner", "pour", c.fingerprint)
            visit_open = control_message({"type": "visit_open", "client": "owner", "tunnel": "pour", "proof": proof})
            sids = [c.open(visit_open) for _ in range(visits)]
            answers: dict[int, dict[str, Any]] = {}
            answer_until = time.monotonic() + 15
            while len(answers) < visits and time.monotonic() < answer_until and c.pump(0.2):
                for sid in sids:
                    if sid not in answers and (m := first_message(c.heads[sid])) is not None:
                        answers[sid] = m
            ok = sum(1 for m in answers.values() if m.get("type") == "visit_result" and m.get("ok") is True)
            if not ok:
                raise RuntimeError(f"H: no visit admitted (answers {list(answers.values())[:3]}); relayd:\n{d.tail()}")
            if reading:

                def read_forever() -> None:  # reads everything, consumes nothing on the visits
                    while not stop.is_set() and c is not None and c.pump(0.2):
                        c.events.clear()

                reader = threading.Thread(target=read_forever, daemon=True)
                reader.start()
            else:
                keepalive = Keepalive(c)
            # relayc connects to the service for every admitted visit; then the pouring runs until it stalls
            connect_until = min(deadline, time.monotonic() + 15)
            while len(pourer.sent) < ok and time.monotonic() < connect_until and not meter.capped.is_set():
                time.sleep(0.05)
            outcome = "stalled"
            while True:
                now = time.monotonic()
                if meter.capped.is_set() or now > deadline:
                    outcome = "stopped"
                    break
                if pourer.all_done():
                    outcome = "done"
                    break
                if now - pourer.last_progress >= block_s:
                    break
                time.sleep(0.05)
            stalled_after = pourer.last_progress - meter.t0
            settle(d.pid, 10, meter.capped)
            figs = meter.stop()
            figs["owner_rss_growth_mib"] = owner_meter.stop()["rss_growth_mib"]
        finally:
            stop.set()
            if reader is not None:
                reader.join(5)
            if keepalive is not None:
                keepalive.stop()
            if c is not None:
                c.close()
            pourer.stop()
        poured = sum(pourer.sent)
        received = sum(c.received.values())
        figs["visits"] = visits
        figs["visits_ok"] = ok
        figs["reading"] = int(reading)
        figs["pour_conns"] = len(pourer.sent)
        figs["poured_mib"] = round(poured / MIB, 2)
        figs["poured_mib_per_visit_max"] = round(max(pourer.sent, default=0) / MIB, 2)
        figs["pour_limit_mib"] = round(pour_bytes / MIB, 1)
        figs["visitor_received_mib"] = round(received / MIB, 2)
        figs["outcome"] = outcome
        figs["stalled_after_s"] = round(stalled_after, 2)
        figs["owner_alive"] = int(owner.popen.poll() is None)
        figs["relayd_alive"] = int(d.popen.poll() is None)
        return figs


# --- the command ---------------------------------------------------------------------------------


def plan(quick: bool, rss_cap_mib: float) -> list[tuple[str, Callable[[Path], dict[str, Any]]]]:
    """(name, function of the code dir) for every attack, at full or quick sizes."""
    cap = rss_cap_mib
    if quick:
        a: dict[str, Any] = {"conns": 8, "max_bytes": 256 * 1024, "limit_s": 20, "rss_cap_mib": cap}
        b: dict[str, Any] = {"max_bytes": 8 * MIB, "limit_s": 20, "wait_close_s": 3, "rss_cap_mib": cap}
        c: dict[str, Any] = {"messages": 4000, "wait_s": 5, "limit_s": 20, "rss_cap_mib": cap}
        dd: dict[str, Any] = {"upload_bytes": 64 * MIB, "limit_s": 20, "rss_cap_mib": cap}
        dm: dict[str, Any] = {"visitors": 40, "per_visitor": MIB, "limit_s": 20, "rss_cap_mib": cap}
        e: dict[str, Any] = {"n_http": 200, "n_tcp": 40, "remove_wait_s": 20}
        f: dict[str, Any] = {"conns": 8, "hello_size": 3000, "duration_s": 3}
        g: dict[str, Any] = {"threads": 8, "duration_s": 3}
        h: dict[str, Any] = {"visits": 4, "pour_bytes": 256 * MIB, "limit_s": 20, "rss_cap_mib": cap}
    else:
        a = {"rss_cap_mib": cap}
        b = {"rss_cap_mib": cap}
        c = {"rss_cap_mib": cap}
        dd = {"rss_cap_mib": cap}
        dm = {"rss_cap_mib": cap}
        e = {}
        f = {}
        g = {}
        h = {"rss_cap_mib": cap}
    return [
        ("A-ping", lambda cd: attack_a(cd, kind="ping", **a)),
        ("A-streams", lambda cd: attack_a(cd, kind="streams", **a)),
        ("B-ping", lambda cd: attack_b(cd, kind="ping", **b)),
        ("B-streams", lambda cd: attack_b(cd, kind="streams", **b)),
        ("C", lambda cd: attack_c(cd, **c)),
        ("D-tcp", lambda cd: attack_d(cd, kind="tcp", **dd)),
        ("D-http", lambda cd: attack_d(cd, kind="http", **dd)),
        ("D-https", lambda cd: attack_d(cd, kind="https", **dd)),
        ("D-many", lambda cd: attack_d_many(cd, **dm)),
        ("E", lambda cd: attack_e(cd, **e)),
        ("F", lambda cd: attack_f(cd, **f)),
        ("F-natural", lambda cd: attack_f(cd, **{**f, "hello_size": 0})),
        ("G", lambda cd: attack_g(cd, **g)),
        ("H-credit", lambda cd: attack_h(cd, reading=True, **h)),
        ("H-noread", lambda cd: attack_h(cd, reading=False, **h)),
    ]


def selected(name: str, only: list[str]) -> bool:
    return not only or any(name == o or name.split("-")[0] == o for o in only)


def print_rows(name: str, figs: dict[str, Any]) -> None:
    for k, v in figs.items():
        value = f"{v:,}" if isinstance(v, int) else (f"{v:,.2f}" if isinstance(v, float) else str(v))
        print(f"| {name} | {k} | {value} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.attacks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="attacks to run, e.g. A,C or D-http (default: all)")
    parser.add_argument("--code-dir", default=str(ROOT), help="checkout whose relayd/relayc are measured")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per attack (CI smoke run)")
    parser.add_argument("--json", default="", help="also save the results to this file")
    parser.add_argument("--rss-cap-mib", type=float, default=1024, help="end an attack once relayd grew this much")
    args = parser.parse_args(argv)
    code_dir = Path(args.code_dir).resolve()
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    machine = describe_machine()
    server_file = relay_server_file(code_dir)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, Linux "
        f"{machine['kernel']}, {machine['mem_gib']} GiB, load average {machine['loadavg']}"
    )
    print(f"code measured: {code_dir} (relay_server from {server_file}); harness from {ROOT}")
    print(f"sizes: {'quick' if args.quick else 'full'}; relayd RSS cap per attack {args.rss_cap_mib:g} MiB\n")
    print("| attack | figure | value |\n|---|---|---:|", flush=True)
    results: dict[str, Any] = {}
    for name, run in plan(args.quick, args.rss_cap_mib):
        if not selected(name, only):
            continue
        try:
            figs = run(code_dir)
        except Exception as exc:  # one attack failing to run must not hide the others' figures
            figs = {"error": f"{type(exc).__name__}: {exc}"}
        results[name] = figs
        print_rows(name, figs)
    machine["loadavg_end"] = os.getloadavg()
    print(f"\nload average at the end: {machine['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "code_dir": str(code_dir),
                    "relay_server": server_file,
                    "quick": args.quick,
                    "argv": sys.argv,
                    "results": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
