"""A private OpenLDAP server for the tests, so directory lookups run against a real slapd and schema.

Each ``Slapd`` builds its own cn=config (slapadd -n0) in a tmp dir: the system core, cosine, nis and
inetorgperson schemas plus the project's ``core/schema/qmailuser.ldif`` and ``shardmail.ldif``, one mdb
database for ``dc=example,dc=test`` (or another ``suffix``) loaded from ``tests/data/users.ldif`` (slapadd checks every
entry against the schema; ``users_ldif=None`` leaves it empty, as a fresh install), then runs slapd in
the foreground on 127.0.0.1 only. Nothing of the system slapd is used.

Fixtures (register with ``pytest_plugins = ["tests.slapd"]`` in the top conftest): ``slapd``, one
server for the session (read-only by convention: a test that changes entries or stops the server
takes ``slapd_fresh``, a private server torn down after the test).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path

import ldap3
import pytest
from ldap3.core.exceptions import LDAPException

from core.directory import parse_ldif
from tests.support import die_with_parent, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
QMAIL_SCHEMA = REPO / "core" / "schema" / "qmailuser.ldif"
SHARDMAIL_SCHEMA = REPO / "core" / "schema" / "shardmail.ldif"
USERS_LDIF = REPO / "tests" / "data" / "users.ldif"
SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS = ("core", "cosine", "nis", "inetorgperson")  # the order their dependencies need
MODULE_DIR = Path("/usr/lib/ldap")  # Debian builds back_mdb as a module, not into slapd
SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "secret"
SIZE_LIMIT = 500
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 3  # a port picked free can be taken before slapd binds it

Values = str | Iterable[str]


def _sbin(name: str) -> str:
    """slapd and slapadd live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def _ldif_line(name: str, value: str) -> str:
    safe = value.isascii() and value.isprintable() and not value.startswith((" ", ":", "<")) and value == value.strip()
    return f"{name}: {value}" if safe else f"{name}:: {base64.b64encode(value.encode()).decode()}"


def _values(values: Values) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


class Slapd:
    """One slapd process and its files under ``directory``; start() again after stop() keeps the data."""

    def __init__(self, directory: Path, users_ldif: Path | None = USERS_LDIF, suffix: str = SUFFIX) -> None:
        """``users_ldif=None``: an empty database (not even the suffix entry), as after a fresh install."""
        self.directory = directory
        self.users_ldif = users_ldif
        self.config_dir = directory / "slapd.d"
        self.db_dir = directory / "db"
        self.log_path = directory / "slapd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.base_dn = suffix
        self.admin_dn = f"cn=admin,{suffix}"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    # -- configuration ------------------------------------------------------------------------

    def config_ldif(self) -> str:
        """cn=config for this server; paths point into ``directory`` so servers never share files."""
        parts = [
            "\n".join([
                "dn: cn=config",
                "objectClass: olcGlobal",
                "cn: config",
                _ldif_line("olcPidFile", str(self.directory / "slapd.pid")),
                _ldif_line("olcArgsFile", str(self.directory / "slapd.args")),
            ]),
        ]
        if any((MODULE_DIR / f"back_mdb.{ext}").exists() for ext in ("la", "so")):
            parts.append("\n".join([
                "dn: cn=module{0},cn=config",
                "objectClass: olcModuleList",
                "cn: module{0}",
                _ldif_line("olcModulePath", str(MODULE_DIR)),
                "olcModuleLoad: back_mdb",
            ]))
        parts.append("dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema")
        schemas = [SYSTEM_SCHEMA_DIR / f"{name}.ldif" for name in SYSTEM_SCHEMAS] + [QMAIL_SCHEMA, SHARDMAIL_SCHEMA]
        parts += [path.read_text().strip() for path in schemas]
        parts.append("\n".join([
            "dn: olcDatabase={1}mdb,cn=config",
            "objectClass: olcDatabaseConfig",
            "objectClass: olcMdbConfig",
            "olcDatabase: {1}mdb",
            _ldif_line("olcSuffix", self.base_dn),
            _ldif_line("olcRootDN", self.admin_dn),
            _ldif_line("olcRootPW", ADMIN_PASSWORD),
            _ldif_line("olcDbDirectory", str(self.db_dir)),
            "olcDbNoSync: TRUE",  # test data: speed over durability
            "olcDbIndex: objectClass eq",
            "olcDbIndex: mail,mailAlternateAddress eq",
            "olcDbIndex: uid eq",
            f"olcSizeLimit: {SIZE_LIMIT}",
            "olcAccess: {0}to * by * read",
        ]))
        return "\n\n".join(parts) + "\n"

    def _slapadd(self, *args: str) -> None:
        result = subprocess.run([_sbin("slapadd"), "-F", str(self.config_dir), *args],
                                capture_output=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"slapadd {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")

    def build(self) -> None:
        """A fresh config and database from the files; slapadd -q skips nothing the schema checks."""
        assert Path(_sbin("slapd")).exists(), "slapd is not installed (scripts/setup.sh installs it)"
        for path in (self.config_dir, self.db_dir):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        config = self.directory / "config.ldif"
        config.write_text(self.config_ldif())
        self._slapadd("-n0", "-l", str(config))
        if self.users_ldif is not None:
            self._slapadd("-q", "-b", self.base_dn, "-l", str(self.users_ldif))

    # -- process ------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Run slapd and return once an anonymous search answers."""
        if self.running():
            return
        if not (self.config_dir / "cn=config.ldif").exists():
            self.build()
        fixed_port = self.port != 0
        for _attempt in range(1 if fixed_port else PORT_ATTEMPTS):
            if not fixed_port:
                self.port = free_port()
            with self.log_path.open("ab") as log:
                log_start = log.tell()
                # -d none: foreground, and only what slapd always logs (startup errors), to slapd.log
                self.proc = subprocess.Popen(
                    [_sbin("slapd"), "-d", "none", "-h", f"ldap://127.0.0.1:{self.port}/", "-F", str(self.config_dir)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                )
            self.paused = False
            wait_until(partial(self._answers_or_exited, self.proc), timeout, f"slapd on {self.url}")
            if self.running():
                return
            with self.log_path.open("rb") as log:
                log.seek(log_start)
                output = log.read().decode(errors="replace")
            if "Address already in use" not in output:
                break
        code = self.proc.returncode if self.proc else "?"
        self.proc = None
        raise RuntimeError(f"slapd on {self.url} exited with {code}:\n{output[-2000:]}")

    @contextlib.contextmanager
    def serving(self) -> Iterator[Slapd]:
        """Started for the block, stopped after it whatever happens (the fixtures' shape)."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT: a stopped process cannot act on it), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        self.paused = False
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, but nothing is ever answered."""
        assert self.proc and self.running(), "slapd is not running"
        self.proc.send_signal(signal.SIGSTOP)
        pid = self.proc.pid
        wait_until(lambda: _state(pid) in "Tt", 5.0, "slapd stopped")
        self.paused = True

    def resume(self) -> None:
        assert self.proc and self.running(), "slapd is not running"
        self.proc.send_signal(signal.SIGCONT)
        pid = self.proc.pid
        wait_until(lambda: _state(pid) not in "Tt", 5.0, "slapd continued")
        self.paused = False

    # -- clients ------------------------------------------------------------------------------

    def server(self, timeout: int = 2) -> ldap3.Server:
        """No schema or DSE read at bind: each connection stays one round trip."""
        return ldap3.Server(self.url, connect_timeout=timeout, get_info=ldap3.NONE)

    def connection(self, timeout: int = 2) -> ldap3.Connection:
        """Anonymous, bound; a search gives up after ``timeout`` whole seconds (ldap3 packs it as an int)."""
        return ldap3.Connection(self.server(timeout), auto_bind=True, receive_timeout=timeout)

    def admin(self, timeout: int = 5) -> ldap3.Connection:
        """Bound as the rootdn; server errors raise ``LDAPException`` subclasses."""
        return ldap3.Connection(self.server(timeout), self.admin_dn, ADMIN_PASSWORD, auto_bind=True,
                                receive_timeout=timeout, raise_exceptions=True)

    def _answers_or_exited(self, proc: subprocess.Popen[bytes]) -> bool:
        return proc.poll() is not None or self._answers()

    def _answers(self) -> bool:
        try:
            conn = self.connection(timeout=1)
        except LDAPException:
            return False
        try:
            return bool(conn.search("", "(objectClass=*)", ldap3.BASE))  # the root DSE: an empty database too
        except LDAPException:
            return False
        finally:
            conn.unbind()

    def add(self, ldif_text: str) -> list[str]:
        """Add every entry of ``ldif_text``; returns their DNs."""
        records = parse_ldif(ldif_text)
        conn = self.admin()
        try:
            for dn, attributes in records:
                conn.add(dn, attributes=attributes)
        finally:
            conn.unbind()
        return [dn for dn, _ in records]

    def modify(self, dn: str, replace: Mapping[str, Values] | None = None, add: Mapping[str, Values] | None = None,
               delete: Mapping[str, Values] | None = None) -> None:
        """One modify operation; ``delete={"attr": []}`` removes every value of attr."""
        changes: dict[str, list[tuple[str, list[str]]]] = {}
        for operation, given in ((ldap3.MODIFY_REPLACE, replace), (ldap3.MODIFY_ADD, add),
                                 (ldap3.MODIFY_DELETE, delete)):
            for name, values in (given or {}).items():
                changes.setdefault(name, []).append((operation, _values(values)))
        conn = self.admin()
        try:
            conn.modify(dn, changes)
        finally:
            conn.unbind()

    def delete(self, dn: str) -> None:
        conn = self.admin()
        try:
            conn.delete(dn)
        finally:
            conn.unbind()


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, ...); the command name may hold spaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One server for the session: do not change its entries, stop or pause it (take slapd_fresh)."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    with server.serving():
        yield server


def combined_ldif(directory: Path) -> Path:
    """users.ldif and the SMTP AUTH accounts of auth.ldif (one per password scheme) in one file."""
    path = directory / "users-and-auth.ldif"
    path.write_text(USERS_LDIF.read_text() + "\n\n" + (USERS_LDIF.parent / "auth.ldif").read_text())
    return path


@pytest.fixture(scope="session")
def auth_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One server with the users and the AUTH accounts for the session (read-only)."""
    directory = tmp_path_factory.mktemp("auth-slapd")
    server = Slapd(directory, combined_ldif(directory))
    with server.serving():
        yield server


@pytest.fixture
def slapd_fresh(tmp_path: Path) -> Iterator[Slapd]:
    """A private server with the test data, which the test may change, pause, stop and start."""
    directory = tmp_path / "slapd"
    directory.mkdir()
    server = Slapd(directory)
    with server.serving():
        yield server

