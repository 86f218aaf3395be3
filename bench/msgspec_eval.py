"""msgspec against relay's own validators: relayc's idle memory, control-message speed, error texts.

    python3 -m bench.msgspec_eval [--json FILE] [--rounds 5] [--mem-runs 7]

What is compared:

1. relayc idle memory: VmRSS (``/proc/self/status``) of a fresh ``python3 -c`` that imports what
   relayc imports (``relay_client.client``) and has parsed a config and decoded/encoded a message
   once (the checkers build their caches lazily), against the same plus ``import msgspec`` and the
   equivalent Structs of ``define_structs`` used once.  Each variant runs ``--mem-runs`` times,
   interleaved; the medians are given.  The RSS of ``import msgspec`` alone (against ``pass``) too.
2. decode speed of ``stream_open`` (one per visitor connection in relayc) and ``tunnel_add`` (a
   realistic http tunnel spec): ``shared.messages.decode_message`` against a
   ``msgspec.json.Decoder`` of the tagged union of the equivalent Structs.
3. encode speed of the same two messages (framed: 4-byte length prefix, as on the wire).
4. error texts, side by side, for bad control messages and bad relayc.toml tables
   (``parse_config`` against ``msgspec.convert``), and whether msgspec's ``$.tunnels[1].port``
   path maps onto our ``tunnels[1].port``.

Timings: ``timeit`` with a loop count that makes one sample ~20 ms; in each of ``--rounds`` rounds
every case takes ``--repeat`` samples and their median; the figure is the best of those medians
(the machine is shared and noisy; the best median is the least disturbed one).  The cases are
interleaved within a round so they see the same noise.

The code measured is a snapshot: ``shared/`` and ``relay_client/`` as committed at ``--ref``
(default HEAD) are extracted to a temporary directory at start and everything, the subprocesses
included, imports that copy, so edits made in the work tree during the run are not measured.
"""

import argparse
import copy
import inspect
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_DIRS = ("shared", "relay_client")
SAMPLE_SECONDS = 0.02  # one timeit sample

# --- the msgspec equivalents ----------------------------------------------------------------------


def define_structs(forbid_unknown: bool = False) -> dict[str, Any]:
    """msgspec Structs equivalent to shared.messages and the relayc tables of shared.config.

    Self-contained on purpose: the memory subprocess runs this function's source as it is.  The
    control messages ignore unknown fields like ``decode_message`` does (a newer peer may add some)
    unless ``forbid_unknown``; the config tables forbid them, like ``shared.schema``.  Checks that
    are code in shared.config (domains, CIDRs, rates...) run in ``__post_init__`` with the same
    functions; a tunnel or client name is a ``Meta(pattern=...)``.
    """
    import socket
    from typing import Annotated, Literal, Union

    import msgspec
    from msgspec import Meta, Struct, field

    from shared.config import (
        check_domain,
        check_host_rewrite,
        check_label,
        check_locations,
        check_sources,
        check_targets,
    )
    from shared.limits import parse_rate
    from shared.tls import normalize_fingerprint

    def text(lo: int, hi: int) -> Any:
        return Annotated[str, Meta(min_length=lo, max_length=hi)]

    def num(lo: int, hi: int) -> Any:
        return Annotated[int, Meta(ge=lo, le=hi)]

    def texts(item_max: int) -> Any:
        return Annotated[tuple[Annotated[str, Meta(min_length=1, max_length=item_max)], ...], Meta(max_length=64)]

    class Msg(Struct, frozen=True, tag_field="type", forbid_unknown_fields=forbid_unknown):
        """The base of the messages: tagged by "type"."""

    class Hello(Msg, tag="hello"):
        name: text(1, 128)
        client_nonce: text(32, 128)
        version: text(0, 64) = ""

    class Challenge(Msg, tag="challenge"):
        server_nonce: text(32, 128)

    class Login(Msg, tag="login"):
        proof: text(64, 64)

    class LoginOk(Msg, tag="login_ok"):
        proof: text(64, 64)
        version: text(0, 64) = ""

    class LoginFailed(Msg, tag="login_failed"):
        reason: text(0, 1024)
        code: text(0, 32) = ""
        retry_after: num(0, 86400) = 0

    class TunnelSpec(Struct, frozen=True, rename={"kind": "type"}, forbid_unknown_fields=forbid_unknown):
        name: text(1, 128)
        local_port: num(1, 65535)
        kind: Literal["tcp", "http", "https"] = "tcp"
        local_ip: text(1, 255) = "127.0.0.1"
        remote_port: num(0, 65535) = 0
        subdomain: text(0, 63) = ""
        custom_domains: texts(253) = ()
        locations: texts(1024) = ()
        http_user: text(0, 256) = ""
        http_password: text(0, 256) = ""
        host_header_rewrite: text(0, 253) = ""
        max_connections: num(0, 2**31) = 0
        bandwidth_limit: num(0, 2**62) = 0
        allow_sources: texts(64) = ()

    class TunnelAdd(Msg, tag="tunnel_add"):
        tunnel: TunnelSpec

    class TunnelStatus(Msg, tag="tunnel_status"):
        name: text(1, 128)
        ok: bool
        remote_port: num(0, 65535) = 0
        error: text(0, 4096) = ""
        url: text(0, 4096) = ""

    class TunnelPush(Msg, tag="tunnel_push"):
        tunnel: TunnelSpec

    class TunnelPushRefused(Msg, tag="tunnel_push_refused"):
        name: text(1, 128)
        error: text(0, 4096) = ""

    class TunnelRemove(Msg, tag="tunnel_remove"):
        name: text(1, 128)

    class StreamOpen(Msg, tag="stream_open"):
        tunnel: text(1, 128)
        visitor: text(0, 300) = ""

    message = Union[
        Hello,
        Challenge,
        Login,
        LoginOk,
        LoginFailed,
        TunnelAdd,
        TunnelStatus,
        TunnelPush,
        TunnelPushRefused,
        TunnelRemove,
        StreamOpen,
    ]

    name_re = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")]
    port = Annotated[int, Meta(ge=1, le=65535)]

    class ClientAuth(Struct, kw_only=True, forbid_unknown_fields=True):
        token: str = ""

    class ClientTLS(Struct, kw_only=True, forbid_unknown_fields=True):
        enable: bool = True
        server_fingerprint: str = ""
        server_name: str = ""
        ca_file: str = ""

        def __post_init__(self) -> None:
            if self.server_fingerprint:
                self.server_fingerprint = normalize_fingerprint(self.server_fingerprint)

    class TunnelConfig(Struct, kw_only=True, forbid_unknown_fields=True):
        name: name_re
        type: Literal["tcp", "http", "https"] = "tcp"
        local_ip: str = "127.0.0.1"
        local_port: port
        remote_port: Annotated[int, Meta(ge=0, le=65535)] = 0
        subdomain: str = ""
        custom_domains: list[str] = []
        locations: list[str] = []
        http_user: str = ""
        http_password: str = ""
        host_header_rewrite: str = ""
        max_connections: Annotated[int, Meta(ge=0)] = 0
        bandwidth_limit: int | str = 0
        allow_sources: list[str] = []

        def __post_init__(self) -> None:
            self.subdomain = check_label(self.subdomain)
            self.custom_domains = [check_domain(d) for d in self.custom_domains]
            check_locations(self.locations)
            check_host_rewrite(self.host_header_rewrite)
            check_sources(self.allow_sources)
            self.bandwidth_limit = parse_rate(self.bandwidth_limit)

    class ClientConfig(Struct, kw_only=True, forbid_unknown_fields=True):
        server_addr: str = "127.0.0.1"
        server_port: port = 7000
        name: name_re = field(default_factory=socket.gethostname)
        keepalive_timeout: Annotated[float, Meta(ge=1.0, le=600.0)] = 30.0
        auth: ClientAuth = field(default_factory=ClientAuth)
        tls: ClientTLS = field(default_factory=ClientTLS)
        allow_targets: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1", "localhost"])
        tunnels: list[TunnelConfig] = []

        def __post_init__(self) -> None:
            check_targets(self.allow_targets)

    return {
        "msgspec": msgspec,
        "StreamOpen": StreamOpen,
        "TunnelAdd": TunnelAdd,
        "TunnelSpec": TunnelSpec,
        "ClientConfig": ClientConfig,
        "decoder": msgspec.json.Decoder(message),
        "encoder": msgspec.json.Encoder(),
    }


# --- inputs -----------------------------------------------------------------------------------------

STREAM_OPEN = b'{"type":"stream_open","tunnel":"ssh","visitor":"1.2.3.4:5555"}'
SPEC: dict[str, Any] = {
    "name": "jupyter",
    "local_port": 8888,
    "kind": "http",
    "local_ip": "127.0.0.1",
    "remote_port": 0,
    "subdomain": "jupyter",
    "custom_domains": ("notebook.lab.example.org",),
    "locations": ("/", "/api/"),
    "http_user": "alice",
    "http_password": "correct-horse-battery",
    "host_header_rewrite": "",
    "max_connections": 200,
    "bandwidth_limit": 12_500_000,
    "allow_sources": ("10.0.0.0/8", "192.168.1.0/24"),
}
CONFIG: dict[str, Any] = {  # a relayc.toml as tomllib gives it
    "server_addr": "relay.example.org",
    "server_port": 7000,
    "name": "lab-box",
    "auth": {"token": "a-long-random-token-for-the-benchmark"},
    "tls": {"server_fingerprint": "sha256:" + "ab" * 32},
    "tunnels": [
        {"name": "ssh", "type": "tcp", "local_port": 22, "remote_port": 6022},
        {"name": "jupyter", "type": "http", "local_port": 8888, "subdomain": "jupyter", "bandwidth_limit": "10MB"},
    ],
}


def _tunnel_add(**tunnel: Any) -> bytes:
    spec = {("type" if k == "kind" else k): (list(v) if isinstance(v, tuple) else v) for k, v in SPEC.items()}
    return json.dumps({"type": "tunnel_add", "tunnel": {**spec, **tunnel}}, separators=(",", ":")).encode()


BAD_MESSAGES: list[tuple[str, bytes]] = [
    ("missing field", b'{"type":"stream_open","visitor":"1.2.3.4:5555"}'),
    ("wrong type", b'{"type":"stream_open","tunnel":22,"visitor":"1.2.3.4:5555"}'),
    ("out-of-range port", b'{"type":"tunnel_status","name":"ssh","ok":true,"remote_port":70000}'),
    ("too-long string", b'{"type":"stream_open","tunnel":"' + b"x" * 129 + b'"}'),
    ("unknown type", b'{"type":"stream_close","tunnel":"ssh"}'),
    ("no type", b'{"tunnel":"ssh"}'),
    ("unknown field", b'{"type":"stream_open","tunnel":"ssh","priority":1}'),
    ("not JSON (truncated)", b'{"type":"stream_open","tunnel":'),
    ("not JSON (missing comma)", b'{"type":"stream_open" "tunnel":"ssh"}'),
    ("not UTF-8", b'{"type":"stream_open","tunnel":"ss\xffh"}'),
    ("not an object", b'["stream_open","ssh"]'),
    ("nested: tunnel.local_port", _tunnel_add(local_port=70000)),
    ("nested: tunnel.type", _tunnel_add(type="udp")),
]


def _config_with(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(CONFIG)
    edit(data)
    return data


def _rename_key(table: dict[str, Any], old: str, new: str) -> None:
    table[new] = table.pop(old)


BAD_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("tunnels[1].local_port = 70000", _config_with(lambda d: d["tunnels"][1].update(local_port=70000))),
    ("tunnels[0].locl_port (typo)", _config_with(lambda d: _rename_key(d["tunnels"][0], "local_port", "locl_port"))),
    ('server_port = "x"', _config_with(lambda d: d.update(server_port="x"))),
    ('tunnels[1].name = "my tunnel!"', _config_with(lambda d: d["tunnels"][1].update(name="my tunnel!"))),
    ("tunnels[0] without local_port", _config_with(lambda d: d["tunnels"][0].pop("local_port"))),
    ('tunnels[1].type = "udp"', _config_with(lambda d: d["tunnels"][1].update(type="udp"))),
    ('tunnels[1].subdomain = "a_b" (a check)', _config_with(lambda d: d["tunnels"][1].update(subdomain="a_b"))),
    (
        "two problems (server_port 0, tunnels[0].local_port 0)",
        _config_with(lambda d: (d.update(server_port=0), d["tunnels"][0].update(local_port=0))),
    ),
]

_MSGSPEC_PATH = re.compile(r"(?s)(.*) - at `\$((?:\.|\[).*)?`")


_MSGSPEC_FIELD = re.compile(r"Object (?:missing required|contains unknown) field `([^`]+)`")


def msgspec_config_line(error: str, data: Any, path: str) -> str:
    """A msgspec ValidationError as our ConfigError line, mechanically: ``$.tunnels[1].local_port``
    becomes ``tunnels[1].local_port``; a missing or unknown field named in the text (msgspec puts
    the path at the table) is moved into the path; the value found there in ``data`` is appended
    as ``(got ...)`` unless quoted already (msgspec's errors carry only the text, so the value comes from the input)."""
    m = _MSGSPEC_PATH.fullmatch(error)
    if not m:
        return f"{path}: {error}"
    reason = m.group(1)
    loc: list[int | str] = [int(i) if i else k for k, i in re.findall(r"\.([^.\[]+)|\[(\d+)\]", m.group(2) or "")]
    f = _MSGSPEC_FIELD.fullmatch(reason)
    if f:
        loc.append(f.group(1))
    value: Any = data
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    if value is not None and not isinstance(value, (dict, list)) and repr(value) not in reason:
        reason += f" (got {value!r})"
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")
    return f"{path}: {where}: {reason}" if where else f"{path}: {reason}"


# --- snapshot and machine -----------------------------------------------------------------------------


def snapshot(ref: str) -> tuple[Path, str]:
    """Extract ``shared/`` and ``relay_client/`` as committed at ``ref`` into a temporary directory;
    return it and the commit measured."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix="msgspec-eval-"))
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, *SNAPSHOT_DIRS], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest, commit


def uncommitted() -> int:
    """How many files under shared/ and relay_client/ differ from HEAD in the work tree (not measured)."""
    r = subprocess.run(["git", "status", "--porcelain", "--", *SNAPSHOT_DIRS], cwd=ROOT, capture_output=True, text=True)
    return len(r.stdout.splitlines())


def describe_machine() -> dict[str, Any]:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = m.group(1).strip() if m else ""
    except OSError:
        model = ""
    import msgspec

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "msgspec": msgspec.__version__,
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


# --- 1. memory ----------------------------------------------------------------------------------------

_READ_RSS = """
import gc
gc.collect()
status = open("/proc/self/status").read()
print(*(int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS:", "RssAnon:"))))
"""

_RELAYC = f"""
import relay_client.client
assert relay_client.client.__file__.startswith(__import__("os").getcwd()), relay_client.client.__file__
from shared.config import ClientConfig, parse_config
from shared.messages import decode_message, encode_message
parse_config(ClientConfig, {CONFIG!r}, "relayc.toml")
for body in ({STREAM_OPEN!r}, {_tunnel_add()!r}):
    encode_message(decode_message(body))
"""

_STRUCTS = f"""
from typing import Any
{inspect.getsource(define_structs)}
ns = define_structs()
ns["msgspec"].convert({CONFIG!r}, ns["ClientConfig"])
for body in ({STREAM_OPEN!r}, {_tunnel_add()!r}):
    ns["encoder"].encode(ns["decoder"].decode(body))
"""

_CHECKER_DEPS = "import collections.abc, dataclasses, enum, functools, json, struct, types, typing, shared.errors\n"
_CHECKERS = f"""
import shared.schema
from shared.messages import decode_message, encode_message
for body in ({STREAM_OPEN!r}, {_tunnel_add()!r}):
    encode_message(decode_message(body))
"""

MEMORY_VARIANTS: dict[str, str] = {
    "python3 -c pass": "pass\n",
    "import msgspec alone": "import msgspec\n",
    "relayc (relay_client.client)": _RELAYC,
    "relayc + import msgspec": _RELAYC + "import msgspec\n",
    "relayc + msgspec + Structs": _RELAYC + _STRUCTS,
    # what our own checkers cost on top of the modules they import: the most adopting msgspec could drop
    "checkers' stdlib imports": _CHECKER_DEPS,
    "+ shared.schema, shared.messages": _CHECKER_DEPS + _CHECKERS,
}


def measure_memory(snap: Path, runs: int) -> dict[str, dict[str, Any]]:
    samples: dict[str, list[tuple[int, int]]] = {name: [] for name in MEMORY_VARIANTS}
    env = {**os.environ, "PYTHONPATH": str(snap)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for i in range(runs + 1):  # the first pass writes the snapshot's .pyc files: not counted
        for name, code in MEMORY_VARIANTS.items():
            r = subprocess.run(
                [sys.executable, "-c", code + _READ_RSS], cwd=snap, env=env, capture_output=True, text=True, timeout=120
            )
            if r.returncode != 0:
                raise RuntimeError(f"memory variant {name!r} failed:\n{r.stderr}")
            rss, anon = (int(x) for x in r.stdout.split())
            if i:
                samples[name].append((rss, anon))
    return {
        name: {
            "rss_kib": statistics.median(s[0] for s in got),
            "rss_anon_kib": statistics.median(s[1] for s in got),
            "rss_kib_all": [s[0] for s in got],
        }
        for name, got in samples.items()
    }


def msgspec_new_modules(snap: Path) -> list[str]:
    code = "import sys, relay_client.client\nold = set(sys.modules)\nimport msgspec\n"
    code += "print(*sorted(set(sys.modules) - old))"
    r = subprocess.run([sys.executable, "-c", code], cwd=snap, capture_output=True, text=True, timeout=120, check=True)
    return r.stdout.split()


# --- 2/3. speed -------------------------------------------------------------------------------------


def _loops(stmt: str, env: dict[str, Any]) -> int:
    timer = timeit.Timer(stmt, globals=env)
    n, took = timer.autorange()
    return max(1, int(n * SAMPLE_SECONDS / took))


def time_cases(cases: dict[str, tuple[str, dict[str, Any]]], rounds: int, repeat: int) -> dict[str, dict[str, Any]]:
    """µs per call: the best, over ``rounds``, of the median of ``repeat`` samples; interleaved."""
    loops = {name: _loops(stmt, env) for name, (stmt, env) in cases.items()}
    medians: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (stmt, env) in cases.items():
            got = timeit.Timer(stmt, globals=env).repeat(repeat=repeat, number=loops[name])
            medians[name].append(statistics.median(got) / loops[name] * 1e6)
    return {name: {"us": min(m), "round_medians_us": m, "loops": loops[name]} for name, m in medians.items()}


def speed_cases(msgs: Any, ns: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    tunnel_add = _tunnel_add()
    dec, enc = ns["decoder"].decode, ns["encoder"].encode
    cur_so, cur_ta = msgs.decode_message(STREAM_OPEN), msgs.decode_message(tunnel_add)
    ms_so, ms_ta = dec(STREAM_OPEN), dec(tunnel_add)
    frame = "b = enc(m)\nif len(b) > MAX:\n    raise ValueError\nout = pack(len(b)) + b"
    ms_env = {"enc": enc, "pack": msgs._LEN.pack, "MAX": msgs.MAX_MESSAGE_SIZE}
    return {
        "decode stream_open: current": ("f(b)", {"f": msgs.decode_message, "b": STREAM_OPEN}),
        "decode stream_open: msgspec": ("f(b)", {"f": dec, "b": STREAM_OPEN}),
        "decode tunnel_add: current": ("f(b)", {"f": msgs.decode_message, "b": tunnel_add}),
        "decode tunnel_add: msgspec": ("f(b)", {"f": dec, "b": tunnel_add}),
        "encode stream_open: current encode_message": ("f(m)", {"f": msgs.encode_message, "m": cur_so}),
        "encode stream_open: current encode_stream_open": (
            "f(t, v)",
            {"f": msgs.encode_stream_open, "t": cur_so.tunnel, "v": cur_so.visitor},
        ),
        "encode stream_open: msgspec": (frame, {**ms_env, "m": ms_so}),
        "encode tunnel_add: current": ("f(m)", {"f": msgs.encode_message, "m": cur_ta}),
        "encode tunnel_add: msgspec": (frame, {**ms_env, "m": ms_ta}),
    }


def config_cases(cfg: Any, ns: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "parse relayc config: current parse_config": (
            "f(C, d, 'relayc.toml')",
            {"f": cfg.parse_config, "C": cfg.ClientConfig, "d": CONFIG},
        ),
        "parse relayc config: msgspec.convert": (
            "f(d, C)",
            {"f": ns["msgspec"].convert, "C": ns["ClientConfig"], "d": CONFIG},
        ),
    }


def check_equivalence(msgs: Any, ns: dict[str, Any]) -> dict[str, bool]:
    """The msgspec side decodes to the same fields and encodes the same bytes."""
    out: dict[str, bool] = {}
    for label, body in (("stream_open", STREAM_OPEN), ("tunnel_add", _tunnel_add())):
        cur, ms = msgs.decode_message(body), ns["decoder"].decode(body)
        out[f"{label}: same bytes on encode"] = msgs.encode_message(cur)[4:] == ns["encoder"].encode(ms)
        out[f"{label}: round trip"] = ns["decoder"].decode(ns["encoder"].encode(ms)) == ms
    return out


# --- 4. errors --------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "(accepted)"


def message_errors(msgs: Any, ns: dict[str, Any], strict: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for label, body in BAD_MESSAGES:
        row = {
            "case": label,
            "current": _attempt(lambda b=body: msgs.decode_message(b)),
            "msgspec": _attempt(lambda b=body: ns["decoder"].decode(b)),
        }
        forbid = _attempt(lambda b=body: strict["decoder"].decode(b))
        if forbid != row["msgspec"]:
            row["msgspec, forbid_unknown_fields=True"] = forbid
        rows.append(row)
    return rows


def config_errors(cfg: Any, ns: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for label, data in BAD_CONFIGS:
        current = _attempt(lambda d=data: cfg.parse_config(cfg.ClientConfig, d, "relayc.toml"))
        try:
            ns["msgspec"].convert(data, ns["ClientConfig"])
            raw, mapped = "(accepted)", "(accepted)"
        except ns["msgspec"].ValidationError as exc:
            raw, mapped = f"ValidationError: {exc}", msgspec_config_line(str(exc), data, "relayc.toml")
        rows.append({"case": label, "current": current, "msgspec": raw, "msgspec mapped": mapped})
    return rows


# --- main -------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; the best median is kept")
    parser.add_argument("--repeat", type=int, default=7, help="timeit samples per case per round")
    parser.add_argument("--ref", default="HEAD", help="the commit whose shared/ and relay_client/ are measured")
    parser.add_argument("--mem-runs", type=int, default=7, help="subprocesses per memory variant")
    args = parser.parse_args(argv)
    try:
        import msgspec  # noqa: F401
    except ImportError:
        print("msgspec is not installed: python3 -m pip install msgspec", file=sys.stderr)
        return 2

    snap, commit = snapshot(args.ref)
    try:
        sys.path.insert(0, str(snap))
        import shared.config as cfg
        import shared.messages as msgs

        assert Path(msgs.__file__).is_relative_to(snap), msgs.__file__
        ns, strict = define_structs(), define_structs(forbid_unknown=True)
        results: dict[str, Any] = {
            "machine": describe_machine(),
            "code": {"commit": commit, "uncommitted_files_not_measured": uncommitted()},
            "command": " ".join(["python3 -m bench.msgspec_eval", *(argv if argv is not None else sys.argv[1:])]),
        }
        m = results["machine"]
        print(
            f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']},"
            f" Python {m['python']}, msgspec {m['msgspec']}"
        )
        print(
            f"code:    shared/ and relay_client/ at {commit} ({results['code']['uncommitted_files_not_measured']} files"
            f" changed in the work tree, not measured); load average {m['loadavg_start'][0]:.2f}"
        )

        results["equivalence"] = check_equivalence(msgs, ns)
        print("\nequivalence: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["equivalence"].items()))

        mem = results["memory"] = measure_memory(snap, args.mem_runs)
        print(f"\n1. memory (VmRSS / RssAnon in KiB, median of {args.mem_runs} fresh processes)")
        for name, got in mem.items():
            print(f"   {name:34} {got['rss_kib']:>8.0f} {got['rss_anon_kib']:>8.0f}   all RSS: {got['rss_kib_all']}")
        base = mem["relayc (relay_client.client)"]
        deltas = {
            "import msgspec alone (vs pass)": (mem["import msgspec alone"], mem["python3 -c pass"]),
            "relayc + import msgspec": (mem["relayc + import msgspec"], base),
            "relayc + msgspec + Structs": (mem["relayc + msgspec + Structs"], base),
            "shared.schema + shared.messages": (
                mem["+ shared.schema, shared.messages"],
                mem["checkers' stdlib imports"],
            ),
        }
        results["memory_delta_kib"] = {}
        for name, (a, b) in deltas.items():
            d = {"rss": a["rss_kib"] - b["rss_kib"], "rss_anon": a["rss_anon_kib"] - b["rss_anon_kib"]}
            results["memory_delta_kib"][name] = d
            print(f"   delta {name:28} {d['rss']:>+8.0f} {d['rss_anon']:>+8.0f}")

        new = results["modules_msgspec_adds_to_relayc"] = msgspec_new_modules(snap)
        print(f"   modules import msgspec adds to relayc's: {len(new)}: {', '.join(new)}")

        speed = results["speed"] = time_cases(
            {**speed_cases(msgs, ns), **config_cases(cfg, ns)}, args.rounds, args.repeat
        )
        print(
            f"\n2/3. speed (µs per call, best of {args.rounds} medians of {args.repeat} samples;"
            " ratio = current/msgspec)"
        )
        for name, got in speed.items():
            what, _, who = name.partition(": ")
            ms = speed.get(f"{what}: msgspec") or speed.get(f"{what}: msgspec.convert")
            ratio = "" if ms is None or ms is got else _ratio(got["us"], ms["us"])
            spread = max(got["round_medians_us"]) / got["us"]
            print(f"   {what:20} {who:32} {got['us']:8.2f}  {ratio:>7}   (worst round {spread:.2f}x the best)")

        results["message_errors"] = message_errors(msgs, ns, strict)
        results["config_errors"] = config_errors(cfg, ns)
        print("\n4a. bad control messages")
        for row in results["message_errors"]:
            print(f"   [{row['case']}]")
            for k, v in row.items():
                if k != "case":
                    print(f"      {k + ':':36} {v}")
        print("\n4b. bad relayc.toml tables (parse_config vs msgspec.convert; mapped = msgspec's path in our form)")
        for row in results["config_errors"]:
            print(f"   [{row['case']}]")
            for k, v in row.items():
                if k != "case":
                    print(f"      {k + ':':16} {v}")

        results["machine"]["loadavg_end"] = os.getloadavg()
        print(f"\nload average at the end: {results['machine']['loadavg_end'][0]:.2f}")
    finally:
        shutil.rmtree(snap, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
