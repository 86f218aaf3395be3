"""``relayc status``: a running relayc answers what its tunnels are doing, over a unix socket.

The socket is ``<config stem>.sock`` in relayc's ``state_dir`` (``relayc.sock`` for
``relayc.toml``), so the relayc of each config has its own.  It is made only for the owner (mode
0600, and the peer's uid is checked too: the same user or root), put in place with a rename (so a
stale socket left by a crashed relayc is replaced, and a live one is never half-made) and removed
on a clean exit.

One request per connection: a line of JSON (``{"request": "status"}``) of at most
``REQUEST_MAX`` bytes within ``REQUEST_TIMEOUT`` seconds, answered by one line of JSON, then the
connection closes.  At most ``MAX_CLIENTS`` are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("relayc")

REQUEST_MAX = 4096
REQUEST_TIMEOUT = 5.0
ANSWER_MAX = 16 * 1024 * 1024  # what ``ask`` reads at most
MAX_CLIENTS = 16
# sun_path holds 108 bytes on Linux (104 elsewhere); a longer path is reached through its folder's
# descriptor (/proc/self/fd/N/name) where there is a /proc
SUN_PATH_MAX = 100


def socket_path(state_dir: Path, config_path: Path) -> Path:
    """Where the relayc running with ``config_path`` answers ``relayc status``."""
    return state_dir / f"{config_path.stem}.sock"


@contextlib.contextmanager
def _short(path: Path) -> Any:
    """``path`` as something ``bind``/``connect`` accept: itself, or through its folder's descriptor."""
    text = str(path)
    if len(text.encode()) <= SUN_PATH_MAX or not Path("/proc/self/fd").is_dir():
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class StatusServer:
    """The server side: answers with ``snapshot()`` (a JSON-ready dict)."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients = 0

    async def start(self) -> bool:
        """Listen on ``path``; False (logged) when it cannot: relayc runs on without ``status``."""
        path = self.path
        if path.exists() and _answers(path):
            log.warning("status: another relayc answers on %s; this one serves no status (is the same config "
                        "running twice?)", path)  # fmt: skip
            return False
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            old_umask = os.umask(0o177)  # the file is born 0600: nobody else can connect in between
            try:
                with _short(tmp) as where:
                    sock.bind(where)
            finally:
                os.umask(old_umask)
            os.chmod(tmp, 0o600)
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
            os.replace(tmp, path)  # a stale socket of a crashed relayc goes here
            self._inode = path.stat().st_ino
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=REQUEST_MAX)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("status: cannot listen on %s: %s; `relayc status` will not work", path, exc.strerror or exc)
            return False
        log.info("status: answering `relayc status` on %s", path)
        return True

    def close(self) -> None:
        """Stop answering and remove the socket (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass
        self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS or not _peer_allowed(writer):
                return
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, ValueError, OSError):  # ValueError: a line over REQUEST_MAX
                return
            try:
                request = json.loads(line) if line.strip() else {}
            except ValueError:
                request = None
            if not isinstance(request, dict) or request.get("request", "status") != "status":
                answer: dict[str, Any] = {"error": 'unknown request; send {"request": "status"}'}
            else:
                answer = self.snapshot()
            writer.write(json.dumps(answer).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            pass
        except Exception:
            log.exception("status: internal error answering a request")
        finally:
            self._clients -= 1
            writer.close()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """The socket's mode already keeps others out; where the peer's credentials can be read, only
    our own user and root are answered."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return True
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return True
    return uid in (os.getuid(), 0)


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _short(path) as where:
            s.settimeout(2.0)
            s.connect(where)
            return True
    except OSError:
        return False


class NotRunning(Exception):
    """No relayc answers for this config; ``str()`` says why, for people."""


def ask(path: Path, config_path: Path, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """The status of the relayc listening on ``path`` (``NotRunning`` when none does)."""
    whose = f"no relayc is running for {config_path}"
    if not path.exists():
        raise NotRunning(f"{whose} (no socket at {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _short(path) as where:
                s.connect(where)
        except ConnectionRefusedError:
            raise NotRunning(f"{whose} (stale socket at {path}: connection refused; a relayc that stopped "
                             "uncleanly left it, the next start replaces it)") from None  # fmt: skip
        except PermissionError:
            raise NotRunning(f"cannot ask the relayc running for {config_path}: permission denied on {path} "
                             "(run as the user relayc runs as)") from None  # fmt: skip
        except OSError as exc:
            raise NotRunning(f"{whose} (cannot connect to {path}: {exc.strerror or exc})") from None
        try:
            s.sendall(b'{"request": "status"}\n')
            data = bytearray()
            while len(data) <= ANSWER_MAX:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise NotRunning(f"the relayc running for {config_path} did not answer on {path}: {reason}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise NotRunning(f"the relayc running for {config_path} sent no valid answer on {path}") from None
    if not isinstance(answer, dict):
        raise NotRunning(f"the relayc running for {config_path} sent no valid answer on {path}")
    return answer


# --- the table ------------------------------------------------------------------------------------


def state_text(tunnel: dict[str, Any]) -> str:
    state = str(tunnel.get("state", "?"))
    error = tunnel.get("error") or ""
    return f"{state}: {error}" if error and state in ("refused", "service down", "pending") else state


def _when(wall: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall)) if wall else "-"


def format_table(status: dict[str, Any]) -> str:
    """What ``relayc status`` prints without ``--json``."""
    lines = [f"relayc {status.get('client', '?')} (pid {status.get('pid', '?')}, config {status.get('config', '?')})"]
    for node in status.get("nodes", []):
        if node.get("connected"):
            lines.append(f"relayd {node['addr']}: connected since {_when(node.get('since'))}")
        else:
            why = f": {node['error']}" if node.get("error") else ""
            lines.append(f"relayd {node['addr']}: not connected{why}")
    tunnels = status.get("tunnels", [])
    if not tunnels:
        lines.append("no tunnels")
    else:
        header = ("TUNNEL", "TYPE", "PUBLIC", "OPEN", "TOTAL", "BYTES_IN", "BYTES_OUT", "STATE")
        rows = [header] + [
            (str(t["name"]), str(t["type"]), t.get("public") or "-", str(t["conns_open"]), str(t["conns_total"]),
             str(t["bytes_in"]), str(t["bytes_out"]), state_text(t))
            for t in tunnels
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
    for v in status.get("visitors", []):
        lines.append(f"visitor {v['client']}/{v['tunnel']}: listening on {v['listen']}")
    return "\n".join(lines)
