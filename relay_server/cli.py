"""The ``relayd`` command."""

from __future__ import annotations

import asyncio
import logging
import sys

from relay_server.server import Relayd
from shared.aio import run
from shared.cli import base_parser, install_stop_handlers, load_or_exit, raise_fd_limit, setup_logging, tune_malloc
from shared.config import ServerConfig

log = logging.getLogger("relayd")


async def serve(relayd: Relayd) -> None:
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    await relayd.start()
    await stop.wait()
    await relayd.shutdown(grace=5.0)
    log.info("relayd stopped")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("relayd", "relay server: accepts relayc clients and opens their public ports", "relayd.toml")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = load_or_exit("relayd", ServerConfig, args.config)
    if args.check:
        print(f"relayd: {args.config}: configuration is valid")
        return 0
    raise_fd_limit()
    tune_malloc()
    relayd = Relayd(config, args.config)
    try:
        run(serve(relayd))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
