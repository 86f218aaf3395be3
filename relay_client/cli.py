"""The ``relayc`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from relay_client.client import Relayc
from relay_client.reload import ConfigReloader
from relay_client.status import NotRunning, StatusServer, ask, format_table, socket_path
from relay_client.visitor import PipePair, VisitBridge, visit_preamble
from shared.aio import run
from shared.checks import check_name
from shared.cli import (
    base_parser,
    install_service,
    install_stop_handlers,
    load_or_exit,
    raise_fd_limit,
    setup_logging,
    tune_malloc,
)
from shared.config import ClientConfig, resolve_path
from shared.errors import RelayError
from shared.frames import GoAwayCode

log = logging.getLogger("relayc")


async def serve(relayc: Relayc) -> None:
    """Run until SIGTERM/SIGINT (a second one exits at once); SIGHUP or a change of the config file
    reloads it; ``relayc status`` is answered on the status socket meanwhile."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(relayc.run())
    status = StatusServer(socket_path(relayc.state_dir, relayc.config_path), relayc.snapshot)
    reloader = ConfigReloader(relayc)
    background: set[asyncio.Task[Any]] = set()

    def on_stop() -> None:
        status.close()
        relayc.stop()
        loop.call_later(2.0, task.cancel)

    def on_hup() -> None:
        reload = loop.create_task(reloader.reload("SIGHUP"))
        background.add(reload)
        reload.add_done_callback(background.discard)

    install_stop_handlers(on_stop, "stopping (%s)", log)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await status.start()
    watcher = loop.create_task(reloader.watch())
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        watcher.cancel()
        status.close()
    log.info("relayc stopped")


def status_main(argv: list[str]) -> int:
    """``relayc status``: ask the relayc running with this config; 0 answered, 1 none runs, 2 bad config."""
    parser = argparse.ArgumentParser(
        prog="relayc status",
        description="Show the tunnels of the relayc running with this config: state, public address, "
        "connections and bytes (exit 0; 1 when no relayc runs for it; 2 when the config is invalid).",
    )
    parser.add_argument("-c", "--config", default="relayc.toml", metavar="FILE", help="the config relayc runs with")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    config = load_or_exit("relayc", ClientConfig, args.config)
    path = socket_path(resolve_path(args.config, config.state_dir), Path(args.config))
    try:
        answer = ask(path, Path(args.config))
    except NotRunning as exc:
        print(f"relayc status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(format_table(answer))
    return 0


async def connect(relayc: Relayc, client: str, tunnel: str) -> int:
    """``relayc connect``: a visitor-only session, one visit, joined to stdin/stdout."""
    cfg = relayc.config
    secret_key = next((v.secret_key for v in cfg.visitors if v.client == client and v.tunnel == tunnel), "")
    try:
        session = await relayc.open_session(role="visitor")
    except (OSError, asyncio.TimeoutError, RelayError, ssl.SSLError) as exc:
        why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or exc.__class__.__name__
        log.error("relayc connect: cannot reach relayd at %s: %s", relayc.server_key, why)
        return 1
    answer: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()

    def result(ok: bool, error: str) -> None:
        if not answer.done():
            answer.set_result((ok, error))

    bridge = VisitBridge(session.mux, result)
    pipes = PipePair()
    try:
        bridge.open(visit_preamble(cfg.name, client, tunnel, secret_key, session.fingerprint))
        try:
            await pipes.open(bridge)
        except (ValueError, OSError) as exc:  # a regular file is not a pipe, socket or terminal
            log.error("relayc connect: stdin and stdout must be pipes, sockets or a terminal: %s", exc)
            return 1
        ok, error = await answer
        if not ok:
            log.error("relayc connect: %s/%s: %s", client, tunnel, error)
            return 1
        await pipes.closed
        return 0
    finally:
        pipes.close()
        session.mux.close(GoAwayCode.NORMAL)


def connect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="relayc connect",
        description="Join stdin/stdout to another client's secret tunnel (for ssh's ProxyCommand): only the "
        "tunnel's bytes go to stdout, messages go to stderr; exit 1 when relayd refuses.",
        epilog="~/.ssh/config:  Host lab\n  ProxyCommand relayc connect -c ~/.config/relay/relayc.toml lab-gpu-01/%h",
    )
    parser.add_argument("-c", "--config", default="relayc.toml", metavar="FILE",
                        help="this client's relayc.toml (name, token, relayd; [[visitors]] secret_key)")  # fmt: skip
    parser.add_argument("target", metavar="CLIENT/TUNNEL", help="the owning client's name and its secret tunnel")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    client, _, tunnel = args.target.partition("/")
    try:
        check_name(client)
        check_name(tunnel)
    except ValueError as exc:
        parser.error(f"{args.target!r} is not CLIENT/TUNNEL: {exc}")
    config = load_or_exit("relayc", ClientConfig, args.config)
    return run(connect(Relayc(config, args.config), client, tunnel))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["connect"]:
        return connect_main(argv[1:])
    if argv[:1] == ["install-service"]:
        return install_service("relayc", "relay_client.cli", ClientConfig, argv[1:])
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    parser = base_parser(
        "relayc", "relay client: connects to relayd and joins visitors to local services", "relayc.toml"
    )
    parser.epilog = ("Also: relayc status [-c FILE] [--json] (the running relayc's tunnels); "
                     "relayc connect [-c FILE] CLIENT/TUNNEL (stdin/stdout to a secret tunnel, for ssh); "
                     "relayc install-service [-c FILE] [--user] [--print] (a systemd unit). "
                     "SIGHUP, or a change of the config file, reloads it.")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = load_or_exit("relayc", ClientConfig, args.config)
    if args.check:
        print(f"relayc: {args.config}: configuration is valid")
        return 0
    raise_fd_limit()
    tune_malloc()
    run(serve(Relayc(config, args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
