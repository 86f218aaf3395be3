"""A real, throwaway PostgreSQL server for tests, from Debian's ``postgresql`` package
(``apt-get install postgresql``), which puts the server binaries in ``/usr/lib/postgresql/VERSION/bin``.

``Postgres(tmp_path)`` (a context manager, or :meth:`Postgres.start` / :meth:`Postgres.stop`):

1. makes a short private directory ``/tmp/pgXXXXXXXX`` for the server's unix socket (a socket path
   must fit in about 107 bytes, which pytest's ``tmp_path`` may not);
2. runs ``initdb`` (superuser ``postgres`` with a random password from ``--pwfile``,
   ``-A scram-sha-256`` for local and TCP connections alike, UTF8, C locale, ``--no-sync``);
3. starts the server with ``pg_ctl -w start`` on a port the OS chose, listening on 127.0.0.1 only
   (and on the socket in the private directory), with ``fsync``, ``synchronous_commit`` and
   ``full_page_writes`` off: the data is thrown away anyway (``synchronous_commit`` can be kept on,
   see :meth:`Postgres.kill`);
4. checks that 127.0.0.1:PORT accepts connections, then creates the role ``relay`` (random password)
   and the database ``relay`` it owns, through ``psql`` over TCP as the superuser.

:attr:`Postgres.url` is ``postgresql://relay:PASSWORD@127.0.0.1:PORT/relay``;
:attr:`Postgres.admin_url` is the superuser's.  :meth:`Postgres.stop_server` and
:meth:`Postgres.start_server` take the server down and bring it back on the same data directory and
port (so clients reconnect to the same URL); :meth:`Postgres.kill` crashes it (SIGKILL, recovered
by the next start), :meth:`Postgres.pause` / :meth:`Postgres.resume` freeze it (SIGSTOP/SIGCONT:
connections hang instead of failing).  :meth:`Postgres.stop` ends the server, checks that its
postmaster and every child are gone and removes the private directory.

Root: ``initdb`` and ``postgres`` refuse to run as root.  When the tests run as root, ``initdb`` and
``pg_ctl`` run as the ``postgres`` user (which the Debian package creates) through
``runuser -u postgres --``, and everything the server touches (data directory, socket, log) is in
the private directory, owned by ``postgres`` with mode 0700: pytest's ``tmp_path`` lies under
``/tmp/pytest-of-root`` (mode 0700), which ``postgres`` cannot even traverse.  :meth:`Postgres.stop`
then copies the server log into the caller's directory (``postgres.log``) before removing the
private directory.  Not as root, the data directory (``pgdata``) and the log are in the caller's
directory and the tools run as the current user.

Nothing here touches a system cluster (``/var/lib/postgresql``, ``/etc/postgresql``, the service
scripts) and every signal goes to a process this instance started, checked by its command line (the
postmaster's ``-D`` is our data directory) or its parent (the postmaster).

Facts about the packaged version (PostgreSQL 15, Debian 12):

* ``pg_ctl stop -w`` returns once ``postmaster.pid`` is removed, which the postmaster does just
  before it exits: its pid may still exist for a moment afterwards, so :meth:`Postgres.stop_server`
  waits for the pid itself.
* The postmaster's children each call ``setsid()``: they are found by their parent pid, not by
  process group or session.
* The postmaster daemonizes (its parent is init, not us), so once dead it stays a zombie until init
  reaps it, which in some containers takes seconds.  :func:`process_alive` counts a zombie as gone,
  and :meth:`Postgres.kill` removes the lock files of the postmaster it killed: a new postmaster
  refuses to start while the pid in ``postmaster.pid`` still exists, zombie or not.
* With ``synchronous_commit=off`` a SIGKILLed server does lose the commits of its last few hundred
  milliseconds (seen: a table created and filled just before :meth:`Postgres.kill` was gone after
  recovery).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.waiting import wait_until

HOST = "127.0.0.1"
PACKAGE_HINT = "apt-get install postgresql"
SERVER_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the OS user the server runs as when the tests run as root (Debian's)
SUPERUSER = "postgres"  # the database superuser initdb creates
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; PostgreSQL refuses longer socket paths


def bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/VERSION/bin`` holding ``initdb``, ``pg_ctl`` and ``postgres``
    (and ``psql``), or None."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list(SERVER_ROOT.iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        tools = entry / "bin"
        if all(os.access(tools / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres", "psql")):
            found.append((int(entry.name), tools))
    return max(found)[1] if found else None


def available() -> str | None:
    """None if a PostgreSQL server can be started here, else why not (naming the Debian package)."""
    if bin_dir() is None:
        return f"no PostgreSQL server in {SERVER_ROOT}/VERSION/bin ({PACKAGE_HINT})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root but there is no {SERVER_USER!r} user to run the server as ({PACKAGE_HINT})"
        if shutil.which("runuser") is None:
            return "running as root but runuser is missing (apt-get install util-linux)"
    return None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound with port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Postgres:
    """A PostgreSQL server of its own, on 127.0.0.1 at a port the OS chose, for one test.

    ``directory`` is the caller's fresh temporary directory (pytest's ``tmp_path``).  ``database``
    and ``user`` name the database and the role owning it that :attr:`url` points at.
    ``startup_timeout`` bounds each wait (initdb, start, stop, readiness).  ``synchronous_commit``
    is off unless asked for: then a commit is acknowledged before its WAL is written, and
    :meth:`kill` loses the last fraction of a second of commits (up to 3 x ``wal_writer_delay``,
    200 ms), like a real crash would with that setting.  A test that kills the server and counts on
    every acknowledged commit surviving passes ``synchronous_commit=True`` (``fsync`` stays off:
    WAL written to the OS survives the death of the server's processes).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with Postgres(tmp_path) as pg:
            conn = await asyncpg.connect(pg.url)

    Every method blocks (it runs ``pg_ctl`` or ``psql``); in an async test whose event loop must
    keep running meanwhile (to see its connections drop, say), call it through
    ``asyncio.to_thread``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        database: str = "relay",
        user: str = "relay",
        synchronous_commit: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.database = database
        self.user = user
        self.synchronous_commit = synchronous_commit
        self.startup_timeout = startup_timeout
        self.password = secrets.token_hex(16)  # the role ``user``'s
        self.admin_password = secrets.token_hex(16)  # the superuser ``postgres``'s
        self.port = 0
        self.as_root = os.geteuid() == 0
        self.bin: Path | None = None
        self.run_dir: Path | None = None  # /tmp/pgXXXXXXXX: the socket (and, as root, data and log)
        self.data_dir = self.directory / "pgdata"
        self.log_file = self.directory / "postgres.log"
        self._started = False
        self._paused = False

    # -- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://relay:PASSWORD@127.0.0.1:PORT/relay``: the role owning the test database."""
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres``: the superuser."""
        return f"postgresql://{SUPERUSER}:{self.admin_password}@{HOST}:{self.port}/postgres"

    @property
    def host(self) -> str:
        """The only address the server listens on (TCP)."""
        return HOST

    @property
    def socket_dir(self) -> Path | None:
        """The directory of the server's unix socket (``.s.PGSQL.PORT``), while started."""
        return self.run_dir

    @property
    def version(self) -> int:
        """The PostgreSQL major version used (the newest installed)."""
        tools = self.bin or bin_dir()
        if tools is None:
            raise RuntimeError(available() or "no PostgreSQL server")
        return int(tools.parent.name)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Postgres:
        """initdb, start the server, create the role and database :attr:`url` names.

        Raises RuntimeError (with the server log) if a step fails or its deadline passes; nothing is
        left running and the private directory is removed then."""
        if self._started:
            raise RuntimeError("Postgres already started")
        problem = available()
        if problem is not None:
            raise RuntimeError(problem)
        self.bin = bin_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp" if Path("/tmp").is_dir() else None))
        self._started = True
        atexit.register(self.stop)  # a test process that exits without stop() leaves no server
        try:
            if len(str(self.run_dir / ".s.PGSQL.65535")) > SOCKET_PATH_MAX:
                raise RuntimeError(f"socket path under {self.run_dir} too long for a unix socket")
            if self.as_root:
                self.data_dir = self.run_dir / "pgdata"
                self.log_file = self.run_dir / "postgres.log"
                shutil.chown(self.run_dir, SERVER_USER, SERVER_USER)
            self._initdb()
            for attempt in range(5):  # the port was free a moment ago; someone may have taken it since
                self.port = _free_port()
                try:
                    self.start_server()
                    break
                except RuntimeError as e:
                    if attempt == 4 or "Address already in use" not in str(e):
                        raise
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        """``initdb`` the data directory, the superuser's password passed in a file removed after."""
        assert self.run_dir is not None and self.bin is not None
        pwfile = self.run_dir / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.admin_password + "\n")
        if self.as_root:
            shutil.chown(pwfile, SERVER_USER, SERVER_USER)
        try:
            argv = [
                str(self.bin / "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "-A", "scram-sha-256",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ]  # fmt: skip
            done = self._run_as_server(argv, self.startup_timeout)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb exited with {done.returncode}:\n{done.stdout}{done.stderr}")

    def _create_database(self) -> None:
        """The role :attr:`user` (LOGIN, random password) and the database :attr:`database` it owns."""
        self.admin_sql(
            "CREATE ROLE :\"user\" LOGIN PASSWORD :'password';\n"
            'CREATE DATABASE :"database" OWNER :"user" ENCODING \'UTF8\' TEMPLATE template0;\n',
            variables={"user": self.user, "password": self.password, "database": self.database},
        )

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m fast stop``, then harder if it must), check that the
        postmaster and its children are gone, remove the private directory; idempotent.

        As root the server log is copied to ``directory/postgres.log`` first, so :meth:`log` still
        works."""
        if not self._started:
            return
        try:
            try:
                self.stop_server()
            except (RuntimeError, AssertionError):  # pg_ctl failed, or the processes outlived the deadline
                self.kill()
            if self.run_dir is not None and self.as_root and self.log_file.is_relative_to(self.run_dir):
                kept = self.directory / "postgres.log"
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.log_file, kept)
                self.log_file = kept
        finally:
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
            self._started = False
            atexit.unregister(self.stop)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- outages --------------------------------------------------------------------------------

    def start_server(self) -> None:
        """Start the server on :attr:`data_dir` and :attr:`port` (``pg_ctl -w start``) and wait until
        127.0.0.1:PORT accepts connections.  After :meth:`stop_server` or :meth:`kill`, clients
        reconnect to the same :attr:`url`.  RuntimeError with the log if it does not come up."""
        assert self.bin is not None and self.run_dir is not None, "start() first"
        if self.pid is not None:
            raise RuntimeError(f"the server is already running (postmaster {self.pid})")
        options = " ".join([
            f"-c listen_addresses={HOST}",
            f"-p {self.port}",
            f"-k {self.run_dir}",
            "-c fsync=off",
            f"-c synchronous_commit={'on' if self.synchronous_commit else 'off'}",
            "-c full_page_writes=off",
        ])  # fmt: skip
        timeout = max(1, int(self.startup_timeout))
        log_start = self._log_size()
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                "-w", "-t", str(timeout), "start"]  # fmt: skip
        try:
            done = self._run_as_server(argv, timeout + 10)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"pg_ctl start did not return in {timeout + 10} s:\n{self.log()}") from None
        if done.returncode != 0:
            self.kill()  # whatever it left behind, if anything
            raise RuntimeError(
                f"pg_ctl start exited with {done.returncode}:\n{done.stdout}{done.stderr}\n{self.log()[log_start:]}"
            )
        wait_until(
            lambda: _accepts(self.port),
            self.startup_timeout,
            lambda: f"PostgreSQL to accept connections on {HOST}:{self.port}:\n{self.log()[log_start:]}",
        )

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl -m MODE stop``: ``smart``, ``fast`` or ``immediate``) and wait
        until its postmaster and children are gone, keeping the data directory and port for
        :meth:`start_server`.  Does nothing if it is not running; RuntimeError if it does not stop."""
        assert self.bin is not None, "start() first"
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, not {mode!r}")
        pids = self.processes()
        if not pids:
            return
        self.resume()  # a stopped postmaster would never act on the request
        timeout = max(1, int(self.startup_timeout))
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(timeout), "stop"]
        try:
            done = self._run_as_server(argv, timeout + 10)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"pg_ctl stop did not return in {timeout + 10} s:\n{self.log()[-4000:]}") from e
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        # pg_ctl returns once postmaster.pid is gone, a moment before the postmaster exits
        wait_until(lambda: not any(map(process_alive, pids)), self.startup_timeout, f"PostgreSQL {pids} to exit")

    def kill(self) -> None:
        """Crash the server: SIGKILL its postmaster and every child, and wait until they are gone.
        The data directory is kept; :meth:`start_server` then recovers it like after a crash.

        Without ``synchronous_commit=True`` the commits of the last ~0.6 s may be lost (their WAL
        was still in shared memory)."""
        postmaster = self.pid
        if postmaster is None:
            return
        _signal(postmaster, signal.SIGSTOP)  # frozen, it cannot fork while its children are listed
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        self._paused = False
        wait_until(lambda: not any(map(process_alive, pids)), self.startup_timeout, f"PostgreSQL {pids} to die")
        self._remove_stale_locks(postmaster)

    def _remove_stale_locks(self, postmaster: int) -> None:
        """Remove the lock files (``DATA/postmaster.pid``, the socket's ``.lock``) and the socket a
        killed ``postmaster`` left, if they name it.

        A new postmaster removes stale locks itself, but only once the old pid no longer exists,
        and a dead postmaster stays a zombie until its parent, init, reaps it (which can take
        seconds in a container whose pid 1 reaps lazily).  Until then it would refuse to start
        ("lock file postmaster.pid already exists")."""
        assert not process_alive(postmaster)
        locks = [self.data_dir / "postmaster.pid"]
        if self.run_dir is not None:
            locks.append(self.run_dir / f".s.PGSQL.{self.port}.lock")
        for lock in locks:
            try:
                named = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if named == postmaster:
                lock.unlink(missing_ok=True)
                if lock.name.endswith(".lock"):
                    lock.with_suffix("").unlink(missing_ok=True)  # the socket itself

    def pause(self) -> None:
        """Freeze the server (SIGSTOP to the postmaster, then its children): its port still accepts
        TCP connections (the kernel does) but nothing answers, like a hung server.  :meth:`resume`
        thaws it; :meth:`stop` and :meth:`stop_server` do too."""
        postmaster = self.pid
        if postmaster is None:
            raise RuntimeError("the server is not running")
        _signal(postmaster, signal.SIGSTOP)
        for pid in _children(postmaster):
            _signal(pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a server frozen by :meth:`pause` (SIGCONT to its children, then the postmaster)."""
        if not self._paused:
            return
        postmaster = self.pid
        if postmaster is not None:
            for pid in _children(postmaster):
                _signal(pid, signal.SIGCONT)
            _signal(postmaster, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def down(self, mode: str = "fast") -> Iterator[None]:
        """``with pg.down(): ...``: the server is stopped (:meth:`stop_server`) inside the block and
        started again (:meth:`start_server`, same URL) when it ends."""
        self.stop_server(mode)
        try:
            yield
        finally:
            self.start_server()

    # -- what a test reads ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (from ``DATA/postmaster.pid``) if it is alive and ours, else None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if len(lines) < 2 or Path(lines[1]) != self.data_dir or not process_alive(pid):
            return None
        try:  # a recycled pid would not have our data directory on its command line
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if os.fsencode(self.data_dir) in argv else None

    def processes(self) -> list[int]:
        """The postmaster's pid then its children's (checkpointer, backends, ...); [] when stopped."""
        postmaster = self.pid
        return [] if postmaster is None else [postmaster, *_children(postmaster)]

    def log(self) -> str:
        """The server's log so far (every start and stop of this instance)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _log_size(self) -> int:
        return len(self.log())

    def admin_sql(self, sql: str, *, database: str = "postgres", variables: dict[str, str] | None = None) -> str:
        """Run ``sql`` with ``psql`` over TCP as the superuser; its output, unaligned and tuples only.

        ``sql`` is read from stdin, statement after statement (autocommit, so ``CREATE DATABASE``
        works), stopping at the first error (RuntimeError).  ``variables`` are psql variables:
        ``:'name'`` in ``sql`` becomes a quoted literal, ``:"name"`` a quoted identifier."""
        assert self.bin is not None, "start() first"
        argv = [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, "-d", database]  # fmt: skip
        script = "".join(f"\\set {name} {_psql_quote(value)}\n" for name, value in (variables or {}).items()) + sql
        env = _clean_env()
        env.update({"PGPASSWORD": self.admin_password, "PGCONNECT_TIMEOUT": "10"})
        try:
            done = subprocess.run(argv, input=script, capture_output=True, text=True, env=env,
                                  timeout=self.startup_timeout, cwd=self.directory)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"psql did not finish in {self.startup_timeout:g} s") from e
        if done.returncode != 0:
            raise RuntimeError(f"psql exited with {done.returncode}: {done.stderr}")
        return done.stdout

    # -- running the tools ----------------------------------------------------------------------

    def _run_as_server(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the server's user (``runuser -u postgres --`` as root, else directly) in
        the private directory, without stdin and with a clean environment; its output captured."""
        assert self.run_dir is not None
        if self.as_root:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_clean_env(),
                              cwd=self.run_dir, timeout=timeout)  # fmt: skip


def _psql_quote(value: str) -> str:
    """``value`` as a single-quoted psql meta-command argument (backslash escapes, ``''`` for ``'``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """This process's environment without libpq's and the server's ``PG*`` variables (PGDATA,
    PGPORT, PGHOST, ...), with the C locale so that messages are in English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


if __name__ == "__main__":  # a manual check: start, print what a test would use, stop
    with tempfile.TemporaryDirectory() as tmp, Postgres(Path(tmp)) as pg:
        print(f"PostgreSQL {pg.version}", pg.url, pg.admin_url, f"processes {pg.processes()}", sep="\n")
