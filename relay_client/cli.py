"""The ``relayc`` command."""

from __future__ import annotations

import asyncio
import logging
import sys

from relay_client.client import Relayc
from shared.aio import run
from shared.cli import base_parser, install_stop_handlers, load_or_exit, raise_fd_limit, setup_logging, tune_malloc
from shared.config import ClientConfig

log = logging.getLogger("relayc")


async def serve(relayc: Relayc) -> None:
    task = asyncio.get_running_loop().create_task(relayc.run())

    def stop() -> None:
        relayc.stop()
        asyncio.get_running_loop().call_later(2.0, task.cancel)

    install_stop_handlers(stop)
    try:
        await task
    except asyncio.CancelledError:
        pass
    log.info("relayc stopped")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "relayc", "relay client: connects to relayd and joins visitors to local services", "relayc.toml"
    )
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
