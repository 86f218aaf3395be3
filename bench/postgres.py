"""A throwaway PostgreSQL server for the benchmark's cluster row (row 8), from Debian's ``postgresql``
package (server binaries in ``/usr/lib/postgresql/VERSION/bin``).

The essentials of tests/e2e/postgres.py (which the bench does not import): ``initdb`` in a private
directory under /tmp (superuser ``postgres`` with a random password, scram-sha-256, ``--no-sync``),
``pg_ctl -w start`` on a port the OS chose, listening on 127.0.0.1 only (and a unix socket in the
private directory) with ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off (the data is
thrown away), then a role ``relay`` and the databases asked for, owned by it.  As root, ``initdb``
and ``pg_ctl`` run as the ``postgres`` user through ``runuser -u postgres --`` (both refuse root),
and the private directory is that user's (mode 0700).  :meth:`Postgres.stop` stops the server with
``pg_ctl -m fast stop`` (SIGKILL to the postmaster and its children, checked by our data directory,
only if that fails), waits until they are gone, and removes the directory.  Nothing here touches a
system cluster.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
PACKAGE = "apt-get install postgresql"
SERVER_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
SUPERUSER = "postgres"


def bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/VERSION/bin`` with initdb, pg_ctl, postgres and psql, or None."""
    found: list[tuple[int, Path]] = []
    needed = ("initdb", "pg_ctl", "postgres", "psql")
    with contextlib.suppress(OSError):
        for entry in SERVER_ROOT.iterdir():
            tools = entry / "bin"
            if entry.name.isdigit() and all(os.access(tools / n, os.X_OK) for n in needed):
                found.append((int(entry.name), tools))
    return max(found)[1] if found else None


def available() -> str | None:
    """None if a PostgreSQL server can be started here, else why not (naming the Debian package)."""
    if bin_dir() is None:
        return f"no PostgreSQL server in {SERVER_ROOT}/VERSION/bin ({PACKAGE})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root but there is no {SERVER_USER!r} user to run the server as ({PACKAGE})"
        if shutil.which("runuser") is None:
            return "running as root but runuser is missing (apt-get install util-linux)"
    return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class Postgres:
    """A PostgreSQL server of its own on 127.0.0.1; :meth:`url` names one of ``databases``."""

    def __init__(self, databases: list[str], timeout: float = 60.0) -> None:
        self.databases = databases
        self.timeout = timeout
        self.user = "relay"
        self.password = secrets.token_hex(16)
        self.admin_password = secrets.token_hex(16)
        self.as_root = os.geteuid() == 0
        self.bin = bin_dir()
        self.port = 0
        self.run_dir: Path | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "pgdata"

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir.parent / "postgres.log").read_text(errors="replace")[-4000:]
        return ""

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``argv`` as the server's user (``runuser`` as root), in the private directory."""
        if self.as_root:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_clean_env(),
                              cwd=self.run_dir, timeout=timeout)  # fmt: skip

    def start(self) -> Postgres:
        """initdb, start, create the role and the databases; RuntimeError (nothing left running) if
        a step fails."""
        problem = available()
        if problem:
            raise RuntimeError(problem)
        assert self.bin is not None
        self.run_dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        try:
            if self.as_root:
                shutil.chown(self.run_dir, SERVER_USER, SERVER_USER)
            pwfile = self.run_dir / "pwfile"
            pwfile.touch(mode=0o600)
            pwfile.write_text(self.admin_password + "\n")
            if self.as_root:
                shutil.chown(pwfile, SERVER_USER, SERVER_USER)
            done = self._run([str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                              f"--pwfile={pwfile}", "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                             self.timeout)  # fmt: skip
            pwfile.unlink(missing_ok=True)
            if done.returncode != 0:
                raise RuntimeError(f"initdb exited with {done.returncode}: {done.stdout}{done.stderr}")
            for attempt in range(5):  # the port was free a moment ago; someone may have taken it since
                with socket.socket() as s:
                    s.bind((HOST, 0))
                    self.port = int(s.getsockname()[1])
                options = (f"-c listen_addresses={HOST} -p {self.port} -k {self.run_dir} -c fsync=off "
                           "-c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
                done = self._run([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l",
                                  str(self.run_dir / "postgres.log"), "-o", options, "-w", "-t",
                                  str(int(self.timeout)), "start"], self.timeout + 10)  # fmt: skip
                if done.returncode == 0:
                    break
                if attempt == 4 or "Address already in use" not in self.log():
                    raise RuntimeError(f"pg_ctl start exited with {done.returncode}: {done.stderr}\n{self.log()}")
            sql = "\\set pw '" + self.password + "'\n" + f"CREATE ROLE {self.user} LOGIN PASSWORD :'pw';\n"
            sql += "".join(f"CREATE DATABASE {db} OWNER {self.user} ENCODING 'UTF8' TEMPLATE template0;\n"
                           for db in self.databases)  # fmt: skip
            env = {**_clean_env(), "PGPASSWORD": self.admin_password, "PGCONNECT_TIMEOUT": "10"}
            done = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p",
                                   str(self.port), "-U", SUPERUSER, "-d", "postgres"], input=sql,
                                  capture_output=True, text=True, env=env, timeout=self.timeout)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"psql exited with {done.returncode}: {done.stderr}")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The postmaster's pid if it is alive and ours (our data directory on its command line)."""
        if self.run_dir is None:
            return None
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and os.fsencode(self.data_dir) in argv else None

    def processes(self) -> list[int]:
        """The postmaster and its children (checkpointer, the nodes' backends, ...)."""
        postmaster = self.pid
        return [] if postmaster is None else [postmaster, *_children(postmaster)]

    def stop(self) -> None:
        """``pg_ctl -m fast stop``, SIGKILL to our postmaster and children if that fails; wait until
        they are gone; remove the private directory.  Idempotent."""
        if self.run_dir is None:
            return
        pids = self.processes()
        try:
            if pids and self.bin is not None:
                try:
                    self._run([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t",
                               str(int(self.timeout)), "stop"], self.timeout + 10)  # fmt: skip
                except subprocess.TimeoutExpired:
                    pass
                deadline = time.monotonic() + 15
                while any(map(_alive, pids)) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if any(map(_alive, pids)):
                    for pid in self.processes() or [p for p in pids if _alive(p)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
