"""A private OpenSSH server on 127.0.0.1 and the `ssh` client command lines for it.

Debian's openssh-server runs as `sshd -D -e -f <own config>` on a free loopback port with
its own host key, client key and authorized_keys in a temporary directory. Nothing in
/etc/ssh or ~/.ssh is read or written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procs
from benchmarks.model import Unavailable, log

SSHD = Path("/usr/sbin/sshd")
LOOPBACK = "127.0.0.1"
CURVE = "curve25519-sha256"
GCM = "aes128-gcm@openssh.com"


# No known_hosts, key auth only, quiet: every client command line to the private sshd.
CLIENT_OPTIONS = (
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "GlobalKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "LogLevel=ERROR",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def ensure_sshd() -> None:
    """Install Debian's openssh-server when /usr/sbin/sshd is missing (we run as root)."""
    if SSHD.exists() and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0:
        raise Unavailable("/usr/sbin/sshd missing and not root to install openssh-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client"]
    log("installing openssh-server (apt-get) ...")
    for attempt in range(2):
        res = subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
        if res.returncode == 0 and SSHD.exists():
            return
        if attempt == 0:
            log("apt-get install failed; apt-get update and retry ...")
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=False
            )
    raise Unavailable("could not install openssh-server with apt-get")


def keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rexec-bench", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def wait_banner(port: int, timeout: float = 10.0) -> None:
    """Wait until something on LOOPBACK:port speaks SSH."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise Unavailable(f"no SSH banner on {LOOPBACK}:{port} within {timeout:.0f}s ({last})")


SSHD_CONFIG = """\
# rexec benchmark: private sshd, loopback only
Port {port}
ListenAddress {host}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
UseDNS no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
X11Forwarding no
AllowAgentForwarding no
PermitTTY yes
PrintMotd no
PrintLastLog no
Banner none
MaxSessions 1000
MaxStartups 1000:100:1000
LoginGraceTime 60
ClientAliveInterval 0
LogLevel ERROR
# Debian's stock SFTP server: scp (SFTP protocol since OpenSSH 9.0) and sftp need it.
Subsystem sftp /usr/lib/openssh/sftp-server
# Commands run through the login shell (bash for root). Bash sources ~/.bashrc when it sees
# SSH_CLIENT and SHLVL < 2; root's .bashrc here runs `pyenv init` (~100 ms). SHLVL=1 keeps
# OpenSSH's per-command cost to the shell itself, as rexec (which never uses rc files).
SetEnv SHLVL=1
"""


@dataclass
class OpenSSH:
    dir: Path = field(default_factory=lambda: procs.tempdir("rexec-bench-sshd-"))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    user: str = "root"
    masters: dict[str, Path] = field(default_factory=dict)
    version: str = ""
    master_pids: list[int] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.dir / "client_ed25519"

    def start(self) -> None:
        ensure_sshd()
        import pwd

        self.user = pwd.getpwuid(os.getuid()).pw_name
        # Debian's sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        keygen(self.dir / "host_ed25519")
        keygen(self.key)
        (self.dir / "authorized_keys").write_bytes(self.key.with_suffix(".pub").read_bytes())
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.version = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stderr.strip()
        last = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            cfg = self.dir / "sshd_config"
            cfg.write_text(SSHD_CONFIG.format(port=self.port, host=LOOPBACK, dir=self.dir))
            test = subprocess.run(
                [str(SSHD), "-t", "-f", str(cfg)], capture_output=True, timeout=10, check=False
            )
            if test.returncode != 0:
                raise Unavailable(f"sshd -t: {test.stderr.decode(errors='replace').strip()}")
            log_file = (self.dir / "sshd.log").open("ab")
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
            log_file.close()
            procs.on_cleanup("sshd", self.stop)
            try:
                wait_banner(self.port)
                return
            except Unavailable as exc:
                last = str(exc)
                procs.stop_popen(self.proc)
                self.proc = None
        raise Unavailable(f"sshd did not start: {last}; log: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.dir / "sshd.log").read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-3:])
        return ""

    def base(self, *extra: str) -> list[str]:
        """`ssh` with no config files, no known_hosts, key auth only, to our sshd."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.key),
            "-l",
            self.user,
            *CLIENT_OPTIONS,
            *extra,
            LOOPBACK,
        ]

    def opts(self, *extra: str) -> list[str]:
        """The options of base() without the host, for scp and rsync's `-e ssh ...`
        (scp's -p and -l mean something else, hence Port= and User=)."""
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-o",
            f"Port={self.port}",
            "-o",
            f"User={self.user}",
            *CLIENT_OPTIONS,
            *extra,
        ]

    def cmd(self, command: str, *extra: str) -> list[str]:
        return [*self.base(*extra), command]

    def mux_opts(self, name: str) -> list[str]:
        path = self.dir / f"ctl-{name}"
        return [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={path}",
            "-o",
            "ControlPersist=yes",
        ]

    def open_master(self, name: str, *extra: str) -> list[str]:
        """Open a ControlPersist master (extra options fix its kex/cipher); returns the
        options a client needs to multiplex over it."""
        opts = [*self.mux_opts(name), *extra]
        with (self.dir / f"master-{name}.log").open("wb") as errlog:
            # The backgrounded master inherits stdout/stderr: never give it a pipe.
            res = subprocess.run(
                self.cmd("true", *opts),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errlog,
                timeout=30,
                check=False,
            )
        if res.returncode != 0:
            err = (self.dir / f"master-{name}.log").read_text(errors="replace").strip()
            raise Unavailable(f"ControlMaster {name}: exit {res.returncode} {err[-120:]}")
        check = subprocess.run(
            self.base("-o", f"ControlPath={self.dir / f'ctl-{name}'}", "-O", "check"),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        m = re.search(r"pid=(\d+)", check.stderr + check.stdout)
        if m:
            self.master_pids.append(int(m.group(1)))
        self.masters[name] = self.dir / f"ctl-{name}"
        return opts

    def negotiated(self, *extra: str) -> dict[str, str]:
        """The kex and cipher OpenSSH picks with these options (from `ssh -v`)."""
        res = subprocess.run(
            self.cmd("true", "-v", *extra),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        out: dict[str, str] = {}
        if m := re.search(r"kex: algorithm: (\S+)", res.stderr):
            out["kex"] = m.group(1)
        if m := re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", res.stderr):
            out["cipher"] = m.group(1)
            if m.group(2) != "<implicit>":
                out["mac"] = m.group(2)
        return out

    def stop(self) -> None:
        for name, path in list(self.masters.items()):
            if path.exists():
                subprocess.run(
                    self.base("-o", f"ControlPath={path}", "-O", "exit"),
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
            del self.masters[name]
        for pid in self.master_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 15)
        self.master_pids.clear()
        if self.proc is not None:
            # Let the per-connection children finish after their clients closed.
            deadline = time.monotonic() + 3.0
            while procs.descendants(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            procs.stop_popen(self.proc)
            self.proc = None
