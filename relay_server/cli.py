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


def hash_password_command(argv: list[str]) -> int:
    """`relayd hash-password`: read a password (twice from a terminal, once from a pipe), print its hash."""
    import getpass

    from relay_server.passwords import hash_password

    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: relayd hash-password\n\nReads a password and prints the password_hash for relayd.toml [dashboard]."
        )
        return 0
    if sys.stdin.isatty():
        password = getpass.getpass("Dashboard password: ")
        if password != getpass.getpass("Again: "):
            print("relayd: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("relayd: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-password"]:
        return hash_password_command(argv[1:])
    parser = base_parser("relayd", "relay server: accepts relayc clients and opens their public ports", "relayd.toml")
    parser.epilog = "Also: relayd hash-password (prints a password_hash for [dashboard])."
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
