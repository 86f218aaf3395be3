"""The baseline: an OpenSSH reverse tunnel (``ssh -N -R``) through a private sshd on loopback.

Needs the Debian packages openssh-server and openssh-client.  Everything listens on 127.0.0.1,
with throwaway keys made in a temporary directory; ``stop()`` ends only the processes started here.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> str | None:
    """None when usable, else what is missing (with the Debian package to install)."""
    if not os.path.exists(SSHD):
        return "sshd not found (apt-get install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "ssh not found (apt-get install openssh-client)"
    return None


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class SshReverse:
    def __init__(self, workdir: Path, sshd_port: int) -> None:
        self.dir = workdir
        self.sshd_port = sshd_port
        self.sshd: subprocess.Popen[bytes] | None = None
        self.clients: list[subprocess.Popen[bytes]] = []

    def start_sshd(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for key in ("host_key", "user_key"):
            if not (d / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{self.sshd_port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nAllowTcpForwarding yes\nGatewayPorts no\nStrictModes no\nLogLevel ERROR\n"
            "MaxSessions 100\nMaxStartups 100\nSubsystem sftp internal-sftp\n"
        )
        self.sshd = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
        wait_port(self.sshd_port)

    def forward(self, public_port: int, target_port: int) -> None:
        """Start ``ssh -N -R 127.0.0.1:public:127.0.0.1:target`` and wait until the port listens."""
        cmd = [
            "ssh", "-N", "-p", str(self.sshd_port), "-i", str(self.dir / "user_key"),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-R", f"127.0.0.1:{public_port}:127.0.0.1:{target_port}",
            f"{getpass.getuser()}@127.0.0.1",
        ]  # fmt: skip
        self.clients.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        wait_port(public_port)

    def pids(self) -> list[int]:
        """ssh clients and the sshd processes serving them (children of the listener)."""
        pids = [c.pid for c in self.clients]
        if self.sshd is not None:
            out = subprocess.run(["pgrep", "-P", str(self.sshd.pid)], capture_output=True, text=True).stdout
            for child in out.split():
                pids.append(int(child))
                grand = subprocess.run(["pgrep", "-P", child], capture_output=True, text=True).stdout
                pids += [int(g) for g in grand.split()]
        return pids

    def stop(self) -> None:
        for p in [*self.clients, *([self.sshd] if self.sshd else [])]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.clients, *([self.sshd] if self.sshd else [])]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
