"""What relayd's and relayc's command lines have in common: flags, logging, config errors, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from shared import __version__
from shared.config import ModelT, load_config
from shared.errors import ConfigError

EXIT_CONFIG = 2


def base_parser(prog: str, description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "-c",
        "--config",
        default=default_config,
        metavar="FILE",
        help=f"TOML configuration file (default: {default_config})",
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit (0 ok, 2 invalid)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser


def raise_fd_limit() -> None:
    """Every tunnelled connection costs relayd two descriptors: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: run with the limit we have


def tune_malloc() -> None:
    """Keep glibc from returning freed buffers to the kernel after every burst.

    Bulk transfers allocate and free buffers of 256 KiB to a few MiB at a high rate; with glibc's
    defaults many are mmap()ed or trimmed off the heap and every reuse page-faults (measured: about
    a fifth of the throughput).  A 4 MiB mmap threshold and a 16 MiB trim threshold keep them in the
    heap.  A no-op on other C libraries.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 4 << 20)
        libc.mallopt(m_trim_threshold, 16 << 20)
    except (OSError, AttributeError):
        pass  # not glibc


# C0 controls, DEL and C1 controls: each becomes a visible escape.  Log lines carry names a peer
# chose (client and tunnel names, hosts, reasons); a newline from the network must never start a
# fake log line, and an escape sequence must never reach an operator's terminal.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
# line and paragraph separators (str.splitlines() splits on them), and the invisible format
# characters that reorder or hide text on a terminal (bidi overrides and isolates, zero widths)
_CONTROL_ESCAPES.update({c: f"\\u{c:04x}" for c in [0x2028, 0x2029, 0x061C, 0x200B, 0x200C, 0x200D, 0x200E,
                                                      0x200F, *range(0x202A, 0x202F), 0x2060,
                                                      *range(0x2066, 0x206A), 0xFEFF]})  # fmt: skip
_CONTROL_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return text.translate(_CONTROL_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """Formats a record with control characters in its message escaped (a traceback appended
    after the message keeps its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def load_or_exit(prog: str, model: type[ModelT], path: str) -> ModelT:
    try:
        return load_config(model, path)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def install_stop_handlers(
    stop: Callable[[], None], message: str = "%s received: shutting down", logger: logging.Logger | None = None
) -> None:
    """SIGTERM/SIGINT log ``message`` (with the signal's name) and call ``stop`` once; a second
    signal exits at once."""
    loop = asyncio.get_running_loop()
    count = 0
    logger = logger or logging.getLogger(Path(sys.argv[0]).name)

    def handler(signum: int) -> None:
        nonlocal count
        count += 1
        if count > 1:
            os._exit(1)
        logger.info(message, signal.Signals(signum).name)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)


def install_service(prog: str, module: str, model: type[ModelT], argv: list[str]) -> int:
    """``relayc install-service`` / ``relayd install-service``: write a systemd unit for this
    config (system-wide, ``--user``, or ``--print`` to stdout) and say how to enable it; systemctl
    is never run here.  A bad config exits 2 first, like any command."""
    kind = "client: this machine's tunnels through relayd" if prog == "relayc" else "server: accepts relayc clients"
    what = f"Write a systemd unit that runs {prog} with this config."
    parser = argparse.ArgumentParser(prog=f"{prog} install-service", description=what)
    parser.add_argument("-c", "--config", default=f"{prog}.toml", metavar="FILE", help="the config the unit runs")
    parser.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user), no root needed")
    parser.add_argument("--print", action="store_true", dest="print_only", help="print the unit instead of writing it")
    args = parser.parse_args(argv)
    config = Path(args.config).resolve()
    load_or_exit(prog, model, str(config))
    exe = Path(sys.executable).absolute()  # not resolve(): a venv's python is a symlink to one without the venv
    lines = [
        "[Unit]",
        f"Description=relay {kind}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        f"ExecStart={exe} -m {module} -c {config}",
        f"WorkingDirectory={config.parent}",
        "Restart=always",
        "RestartSec=5",
    ]
    if not args.user:
        owner = config.stat().st_uid
        if owner != 0:  # run as the config's owner, not root
            import pwd

            lines.append(f"User={pwd.getpwuid(owner).pw_name}")
        if prog == "relayd":
            lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")  # ports 80/443 without root
    lines += ["", "[Install]", f"WantedBy={'default.target' if args.user else 'multi-user.target'}", ""]
    unit = "\n".join(lines)
    if args.print_only:
        sys.stdout.write(unit)
        return 0
    if args.user:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    else:
        base = Path("/etc/systemd/system")
    target = base / f"{prog}.service"
    try:
        base.mkdir(parents=True, exist_ok=True)
        target.write_text(unit)
    except OSError as exc:
        print(f"{prog}: cannot write {target}: {exc.strerror or exc} (as root, or with --user)", file=sys.stderr)
        return 1
    scope = "--user " if args.user else ""
    print(f"{prog}: wrote {target}\nEnable and start it with:\n  systemctl {scope}daemon-reload && "
          f"systemctl {scope}enable --now {prog}")  # fmt: skip
    if args.user:
        print(f"(to keep it running after you log out: loginctl enable-linger {os.environ.get('USER', '$USER')})")
    return 0
