"""A private Dovecot IMAP server for the interop tests, reading Maildirs that shardmail wrote.

Each ``Dovecot`` writes its own dovecot.conf under a tmp dir (base_dir, state_dir, log and the
passwd-file all there; nothing of /etc/dovecot is read) and runs ``dovecot -c <conf> -F`` as a child
process: IMAP only, on a free port of 127.0.0.1, no SSL, cleartext LOGIN allowed.

Dovecot never touches mail as root ("Mail access not allowed for root", whatever first_valid_uid
says), so each user reads as ``nobody:nogroup`` inside a chroot that is their Maildir (home
``<maildir>/./``): the parents (pytest's 0700 tmp dirs) need no permission, but the Maildir itself
is chowned to that user at start; call ``adopt()`` again after delivering more mail as root.
Dovecot keeps its index files (dovecot-uidlist, dovecot.index*) in the Maildir, as in production.

Fixture: ``dovecot_factory(users)`` (register with ``pytest_plugins = ["tests.dovecot"]``), with
``users`` mapping a login name to its Maildir; returns a running ``Dovecot`` with ``.port`` and
``.login(user) -> imaplib.IMAP4``. Every server is stopped at the end of the test.
"""

from __future__ import annotations

import contextlib
import functools
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support import die_with_parent, free_port, read_log, wait_until

PASSWORD = "imap-secret"
MAIL_USER = "nobody"  # with its primary group, nogroup on Debian
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 3  # a port picked free can be taken before dovecot binds it


def _sbin(name: str) -> str:
    """dovecot lives in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or f"/usr/sbin/{name}"


@functools.cache
def version() -> tuple[int, ...]:
    """The installed Dovecot's version, e.g. (2, 3, 19, 1)."""
    out = subprocess.run([_sbin("dovecot"), "--version"], capture_output=True, text=True, timeout=10, check=True)
    return tuple(int(part) for part in out.stdout.split()[0].split(".") if part.isdigit())


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in group ``pgid``: orphans wait for init to reap them, which can be slow."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def _plain(path: Path) -> str:
    """A path that passwd-file fields and colon-separated settings can hold as it is."""
    text = str(path)
    assert path.is_absolute() and not any(c in text for c in ": \t\n\"#"), f"unsuitable path for dovecot: {text}"
    return text


def _reap(pgid: int) -> None:
    """The master's children (login, imap, auth) leave with it: wait for its whole group, SIGKILL stragglers."""
    try:
        wait_until(lambda: not _group_alive(pgid), STOP_TIMEOUT, "dovecot's children exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        wait_until(lambda: not _group_alive(pgid), STOP_TIMEOUT, "dovecot's children killed")


class Dovecot:
    """One dovecot master (and its children) with its files under ``directory``."""

    def __init__(self, directory: Path, users: Mapping[str, Path]) -> None:
        self.directory = directory
        self.users = {name: Path(path).resolve() for name, path in users.items()}
        self.config_path = directory / "dovecot.conf"
        self.passwd_path = directory / "passwd"
        self.log_path = directory / "dovecot.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[imaplib.IMAP4] = []
        entry = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    # -- configuration ------------------------------------------------------------------------

    def passwd(self) -> str:
        """user:password:uid:gid:gecos:home:shell:extra — the "/./" in home chroots to the Maildir.

        The extra field takes the userdb_ prefix even in the userdb: a bare ``mail=`` is dropped."""
        return "".join(f"{name}:{{PLAIN}}{PASSWORD}:{self.uid}:{self.gid}::{_plain(maildir)}/./::"
                       "userdb_mail=maildir:~\n" for name, maildir in self.users.items())

    def config(self) -> str:
        """dovecot.conf for this server (the 2.3 syntax; 2.4 renamed most of these settings)."""
        return "\n".join([
            f"base_dir = {_plain(self.directory / 'run')}",
            f"state_dir = {_plain(self.directory / 'state')}",
            f"log_path = {_plain(self.log_path)}",
            f"instance_name = shardmail-test-{self.port}",
            "protocols = imap",
            "listen = 127.0.0.1",
            "ssl = no",
            "disable_plaintext_auth = no",  # 2.4: auth_allow_cleartext = yes
            "auth_mechanisms = plain",
            "auth_failure_delay = 0",
            f"valid_chroot_dirs = {':'.join(_plain(path) for path in self.users.values())}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = {_plain(self.passwd_path)}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {_plain(self.passwd_path)}",
            "}",
            "service imap-login {",
            "  inet_listener imap {",
            "    address = 127.0.0.1",
            f"    port = {self.port}",
            "  }",
            "  inet_listener imaps {",
            "    port = 0",
            "  }",
            "}",
            # the passwd-file is under pytest's 0700 tmp dir, out of the dovecot user's reach
            "service auth {",
            "  user = root",
            "}",
            "service auth-worker {",
            "  user = root",
            "}",
            "",
        ])

    def adopt(self) -> None:
        """Hand every Maildir (and what was delivered into it as root) to the mail user."""
        for maildir in self.users.values():
            for sub in ("", "tmp", "new", "cur"):
                (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            for root, dirs, files in os.walk(maildir):
                os.chown(root, self.uid, self.gid)
                for name in dirs + files:
                    os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    # -- process ------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, start: int = 0) -> str:
        """dovecot.log from byte offset ``start``."""
        return read_log(self.log_path, start)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Run dovecot and return once the IMAP greeting answers."""
        assert Path(_sbin("dovecot")).exists(), "dovecot is not installed (scripts/setup.sh installs dovecot-imapd)"
        assert os.geteuid() == 0, "tests/dovecot.py runs dovecot as root (it chroots and drops to nobody)"
        if version()[:2] != (2, 3):
            pytest.fail(f"tests/dovecot.py writes Dovecot 2.3 configuration; installed: {version()}")
        if self.running():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.passwd_path.write_text(self.passwd())
        self.passwd_path.chmod(0o600)
        self.adopt()
        output = ""
        for _attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.config_path.write_text(self.config())
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:  # errors before the log process is up go to stderr
                self.proc = subprocess.Popen(
                    [_sbin("dovecot"), "-c", str(self.config_path), "-F"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=die_with_parent,
                )
            wait_until(self._greets_or_exited, timeout, f"dovecot on 127.0.0.1:{self.port}")
            if self.running():
                return
            _reap(self.proc.pid)
            output = self.log(log_start)
            if "Address already in use" not in output:
                break
        code = self.proc.returncode if self.proc else "?"
        self.proc = None
        raise RuntimeError(f"dovecot on 127.0.0.1:{self.port} exited with {code}:\n{output[-2000:]}")

    def _greets_or_exited(self) -> bool:
        return not self.running() or self._greets()

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.makefile("rb").readline().startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        """Log clients out, SIGTERM the master, then wait for its whole process group (SIGKILL on timeout)."""
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.logout()
        self.clients.clear()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _reap(proc.pid)

    # -- clients ------------------------------------------------------------------------------

    def login(self, user: str, timeout: float = 10.0) -> imaplib.IMAP4:
        """A logged-in IMAP connection for ``user``, logged out at stop() if still open."""
        assert user in self.users, f"no such dovecot user: {user}"
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=timeout)
        self.clients.append(client)
        client.login(user, PASSWORD)
        return client


@pytest.fixture
def dovecot_factory(tmp_path: Path) -> Iterator[Callable[[Mapping[str, Path]], Dovecot]]:
    """``dovecot_factory({"alice": maildir})`` starts a private server; all are stopped after the test."""
    servers: list[Dovecot] = []

    def factory(users: Mapping[str, Path]) -> Dovecot:
        server = Dovecot(tmp_path / f"dovecot{len(servers)}", users)
        servers.append(server)
        server.start()
        return server

    yield factory
    for server in servers:
        server.stop()
