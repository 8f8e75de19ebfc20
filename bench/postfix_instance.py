"""A throwaway Postfix instance for benchmarks: its own config, queue and data directories in a
temp directory, an smtpd on a loopback port, relaying everything to ``[127.0.0.1]:SINKPORT``.

It never touches a system instance: every command gets ``-c CONFIG_DIR`` (and MAIL_CONFIG),
nothing is written under /etc/postfix or /var/spool/postfix. Postfix's own files (daemons,
/etc/postfix/postfix-files as meta data) are only read. Needs root (Postfix's master runs as
root and drops to mail_owner ``postfix``). If Postfix is not installed, ``ensure_installed()``
installs Debian's package unconfigured, as ci/install-system-packages.sh does.

Usable on its own for a look around:
    python bench/postfix_instance.py SINKPORT   # starts, prints the smtpd port, waits for ^C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"


def ensure_installed() -> None:
    """Install Debian's postfix package (no configuration: no daemon starts) if it is missing."""
    if shutil.which("postfix") or os.path.exists(POSTFIX):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("postfix not found: installing Debian's package (No configuration)", file=sys.stderr)
    subprocess.run(
        [*sudo, "debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
    )
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run(
        [
            *sudo,
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "postfix",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Only the services a relay-to-a-next-hop needs; no chroot (the queue is in a temp dir).
MASTER_CF = """\
{port} inet  n       -       n       -       {maxproc}       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {dir}
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
myhostname = postfix-bench.example
mydomain = example
myorigin = $myhostname
mydestination =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
relayhost = [127.0.0.1]:{sinkport}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtputf8_enable = no
biff = no
alias_maps =
alias_database =
default_process_limit = {maxproc}
disable_dns_lookups = yes
smtp_dns_support_level = disabled
append_dot_mydomain = no
"""


class PostfixInstance:
    """``start()`` builds and starts the instance; ``stop()`` stops it and removes the dir."""

    def __init__(
        self, sink_port: int, port: int | None = None, maxproc: int = 150, keep: bool = False
    ):
        self.sink_port = sink_port
        self.port = port or free_port()
        self.maxproc = maxproc
        self.keep = keep
        self.dir: Path | None = None
        self.started = False

    def _env(self) -> dict[str, str]:
        return {**os.environ, "MAIL_CONFIG": str(self.dir)}

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTFIX, "-c", str(self.dir), *args],
            env=self._env(),
            capture_output=True,
            text=True,
            check=check,
        )

    def build(self) -> Path:
        ensure_installed()
        if os.geteuid() != 0:
            raise SystemExit("the Postfix instance needs root (its master runs as root)")
        d = Path(tempfile.mkdtemp(prefix="tern-bench-postfix-"))
        os.chmod(d, 0o755)
        self.dir = d
        (d / "main.cf").write_text(
            MAIN_CF.format(dir=d, sinkport=self.sink_port, maxproc=self.maxproc)
        )
        (d / "master.cf").write_text(
            MASTER_CF.format(port=f"127.0.0.1:{self.port}", maxproc=self.maxproc)
        )
        (d / "queue").mkdir(mode=0o755)
        (d / "data").mkdir(mode=0o700)
        shutil.chown(d / "data", "postfix", "postfix")
        # create-missing makes the queue subdirectories with the owners postfix-files wants;
        # set-permissions would also rewrite files under /usr, so it is not used here.
        r = self._postfix("check", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix check failed:\n{r.stdout}{r.stderr}{self.log_tail()}")
        return d

    def start(self, timeout: float = 20.0) -> None:
        if self.dir is None:
            self.build()
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{r.stdout}{r.stderr}\n{self.log_tail()}")
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(512).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix smtpd did not answer on {self.port}\n{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, TypeError):
            return None

    def queue_count(self) -> int:
        """Messages still in the instance's queue (incoming, active, deferred, maildrop)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.dir / "queue" / sub):
                n += len(files)
        return n

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "maillog").read_text().splitlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        if self.dir is None:
            return
        if self.started:
            pid = self.master_pid()
            self._postfix("stop", check=False)
            # postfix stop returns before the master has gone; wait for it (bounded)
            deadline = time.monotonic() + 10
            while pid and time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            self.started = False
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    inst = PostfixInstance(int(sys.argv[1]))
    try:
        inst.start()
        print(f"postfix in {inst.dir}, smtpd on 127.0.0.1:{inst.port}, master {inst.master_pid()}")
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(3600)
    finally:
        inst.stop()
