"""``shardmail pop3d`` against real clients: Python's poplib over STLS and implicit TLS, and a raw
socket for the bytes on the wire. Messages are Maildir files named as the local pool names them
(workers.maildir); accounts are in the embedded LDIF directory or a real slapd (ldaprebind); the
failure throttle is in the test Redis, shared with a real SMTP process's AUTH. Listing and
retrieval byte for byte, deletions only at QUIT, UIDLs stable across sessions and a SIGKILL of the
server, [IN-USE], wrong passwords and the throttle, no plain-text login before STLS, each kind of
bad input, the idle timeout and the per-address limit; and Debian's fetchmail in keep mode, which
must fetch each message once (by UIDL), over port 995 and STLS."""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Node, _connectable
from tests.slapd import Slapd
from tests.support import free_port, wait_until
from tests.test_smtp_auth import Session
from tests.test_smtp_limits import make_cert
from workers.maildir import Maildir, file_name


def ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def account(uid: str, password: str, status: str = "active", host: str = "") -> str:
    return (f"dn: uid={uid},ou=people,dc=test\nobjectClass: qmailUser\nuid: {uid}\nmail: {uid}@test.example\n"
            f"mailMessageStore: {uid}/\naccountStatus: {status}\nuserPassword: {ssha(password)}\n"
            + (f"mailHost: {host}\n" if host else "") + "\n")


MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nline1\n.dot line\n..two dots\n.\nend\n",
    b"From: b@example.org\nSubject: two\n\nno final newline",
    b"Subject: three\r\n\r\ncrlf body\r\nsecond\r\n",
]
# as sent: CRLF everywhere, a final line end (before byte-stuffing)
WIRE = [
    b"From: a@example.org\r\nSubject: one\r\n\r\nline1\r\n.dot line\r\n..two dots\r\n.\r\nend\r\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nno final newline\r\n",
    b"Subject: three\r\n\r\ncrlf body\r\nsecond\r\n",
]


@dataclass
class Pop3Node:
    node: Node
    port: int
    tls_port: int
    context: ssl.SSLContext
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = self.node.var_dir.parent / f"pop3d-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "pop3d"], env=self.node.env, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_until(lambda: proc.poll() is not None or (_connectable(self.port) and _connectable(self.tls_port)),
                   timeout=20, what="pop3d listening")
        assert proc.poll() is None, log.read_text(errors="replace")
        return proc

    def maildir(self, uid: str = "alice") -> Path:
        return self.node.var_dir / "mail" / uid

    def deliver(self, uid: str = "alice") -> list[str]:
        """The test messages, as the local pool writes them; their Maildir unique names."""
        box, names = Maildir(self.maildir(uid)), []
        for index, data in enumerate(MESSAGES):
            name = file_name(1_700_000_000 + index, f"Q{index}test", index, len(data))
            assert box.deliver(name, data, retry=False)
            names.append(name)
        return names

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def pop3_factory(node_factory: Callable[..., Node], tmp_path: Path) -> Iterator[Callable[..., Pop3Node]]:
    made: list[Pop3Node] = []

    def factory(**overrides: str) -> Pop3Node:
        users = tmp_path / f"pop3-users-{len(made)}.ldif"
        users.write_text(account("alice", "alice-secret") + account("dora", "dora-secret", "disabled")
                         + account("nora", "nora-secret", "nopop") + account("remo", "remo-secret", host="mx2.example"))
        port, tls_port = free_port(), free_port()
        options = {"users_ldif": str(users), "pop3_listen": f"127.0.0.1:{port}",
                   "pop3s_listen": f"127.0.0.1:{tls_port}", "authfaildelay": "0"}
        node = node_factory(**{**options, **overrides})
        context = make_cert(node)
        context.check_hostname = False  # the certificate names mx.test.example; we dial 127.0.0.1
        server = Pop3Node(node, port, tls_port, context)
        made.append(server)
        server.start()
        return server

    yield factory
    for server in made:
        server.stop()


class Raw:
    """A POP3 client that sends bytes exactly as given and returns replies as received."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(sock) if context else sock
        self.buffer = b""
        self.greeting = self.line()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; pending {self.buffer!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def cmd(self, line: bytes | str) -> bytes:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.line()

    def multi(self, line: str) -> tuple[bytes, bytes]:
        """A multi-line reply: the status line and the rest, up to and with the final ".CRLF"."""
        status = self.cmd(line)
        if not status.startswith(b"+OK"):
            return status, b""
        while not (self.buffer == b".\r\n" or self.buffer.endswith(b"\r\n.\r\n")):
            self._fill()
        body, self.buffer = self.buffer, b""
        return status, body

    def login(self, user: str = "alice", password: str = "alice-secret") -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def closed(self) -> bool:
        """True once the server has closed the connection (after what it sent)."""
        try:
            while True:
                self._fill()
        except ConnectionError:
            return True


def plain(login: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


def test_poplib_over_stls_lists_and_retrieves_byte_for_byte(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory()
    names = server.deliver()
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    before = client.capa()
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    client.stls(server.context)
    after = client.capa()
    assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN"]
    assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"} <= set(after)
    client.user("alice")
    assert client.pass_("alice-secret").startswith(b"+OK 3")
    assert client.stat() == (3, sum(len(w) for w in WIRE))
    assert client.list()[1] == [f"{i} {len(w)}".encode() for i, w in enumerate(WIRE, 1)]
    assert client.uidl()[1] == [f"{i} {n}".encode() for i, n in enumerate(names, 1)]
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == WIRE[0]  # poplib undoes the byte-stuffing
    assert client.top(1, 1)[1] == [b"From: a@example.org", b"Subject: one", b"", b"line1"]
    client.quit()
    assert not os.listdir(server.maildir() / "new")
    assert sorted(os.listdir(server.maildir() / "cur")) == sorted(f"{n}:2," for n in names)

    raw = Raw(server.tls_port, server.context)
    assert raw.login().startswith(b"+OK")
    status, body = raw.multi("RETR 1")
    assert status == f"+OK {len(WIRE[0])} octets".encode()
    assert body == (b"From: a@example.org\r\nSubject: one\r\n\r\nline1\r\n..dot line\r\n...two dots\r\n"
                    b"..\r\nend\r\n.\r\n")
    for number, wire in enumerate(WIRE, 1):
        status, body = raw.multi(f"RETR {number}")
        assert body.replace(b"\r\n..", b"\r\n.").removesuffix(b".\r\n") == wire
    assert raw.multi("TOP 1 0")[1] == b"From: a@example.org\r\nSubject: one\r\n\r\n.\r\n"
    assert raw.multi("TOP 2 5")[1] == WIRE[1] + b".\r\n"
    assert raw.cmd("LIST 3") == f"+OK 3 {len(WIRE[2])}".encode()
    assert raw.cmd("UIDL 2") == f"+OK 2 {names[1]}".encode()
    assert raw.cmd("QUIT") == b"+OK bye"


def test_deletions_apply_only_at_quit_in_the_update_state(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory()
    names = server.deliver()

    def session() -> poplib.POP3_SSL:
        client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=server.context, timeout=10)
        assert client._shortcmd("AUTH PLAIN " + plain("alice", "alice-secret")).startswith(b"+OK")
        return client

    client = session()
    client.dele(1)
    assert client.stat()[0] == 2
    client.rset()
    client.quit()
    assert Maildir(server.maildir()).usage()[1] == 3

    client = session()
    client.dele(1)
    client.close()  # gone without QUIT
    raw = Raw(server.tls_port, server.context)

    def logged_in() -> bool:  # once the server has seen the dropped session end
        assert raw.cmd("AUTH PLAIN") == b"+ "  # without the initial response
        answer = raw.cmd(plain("alice", "alice-secret"))
        assert answer.startswith((b"+OK", b"-ERR [IN-USE]")), answer
        return answer.startswith(b"+OK")

    wait_until(logged_in, what="the dropped session's lock released")
    assert raw.cmd("STAT").startswith(b"+OK 3 ")
    assert raw.cmd("DELE 1") == b"+OK message 1 deleted"
    assert raw.cmd("QUIT") == b"+OK bye"
    used, count = Maildir(server.maildir()).usage()
    assert (used, count) == (len(MESSAGES[1]) + len(MESSAGES[2]), 2)  # the quota's view, right after deletion

    client = session()
    assert client.uidl()[1] == [f"1 {names[1]}".encode(), f"2 {names[2]}".encode()]
    client.quit()


def test_in_use_and_no_lock_left_by_a_killed_server(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory()
    names = server.deliver()
    first = Raw(server.tls_port, server.context)
    assert first.login() == b"+OK 3 messages"
    assert first.cmd("DELE 2").startswith(b"+OK")
    second = Raw(server.tls_port, server.context)
    assert second.login().startswith(b"-ERR [IN-USE]")
    assert second.cmd("STAT").startswith(b"-ERR")  # still not logged in
    server.procs[-1].send_signal(signal.SIGKILL)
    server.procs[-1].wait(10)
    server.start()
    after = Raw(server.tls_port, server.context)
    assert after.login() == b"+OK 3 messages"  # the DELE of the killed session was never applied
    assert after.multi("UIDL")[1] == b"".join(f"{i} {n}\r\n".encode() for i, n in enumerate(names, 1)) + b".\r\n"
    assert after.cmd("QUIT") == b"+OK bye"


def test_wrong_passwords_are_refused_then_throttled(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory(authfailmaxuser="3", authfailmaxip="100")
    server.deliver()
    raw = Raw(server.tls_port, server.context)
    unknown = raw.login("nobody", "whatever")
    disabled = raw.login("dora", "dora-secret")
    assert unknown == disabled == b"-ERR [AUTH] authentication failed"  # no enumeration
    assert raw.login("nora", "nora-secret") == b"-ERR [AUTH] POP access disabled for this account"
    assert raw.login("remo", "remo-secret") == b"-ERR [SYS/TEMP] this mailbox is served by another node"
    for _ in range(3):
        assert raw.login("alice", "wrong") == b"-ERR [AUTH] authentication failed"
    assert raw.login("alice", "alice-secret") == b"-ERR [SYS/TEMP] too many failed logins, try again later"
    assert raw.closed()
    other = Raw(server.tls_port, server.context)
    assert other.cmd("AUTH PLAIN " + plain("alice", "alice-secret")).startswith(b"-ERR [SYS/TEMP]")  # shared


def test_plain_text_login_is_refused_before_stls(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory()
    raw = Raw(server.port)
    assert raw.greeting.startswith(b"+OK")
    assert b"USER" not in raw.multi("CAPA")[1]
    assert raw.cmd("USER alice") == b"-ERR [AUTH] plain-text login refused before STLS"
    assert raw.cmd("PASS alice-secret").startswith(b"-ERR [AUTH]")
    assert raw.cmd("AUTH PLAIN " + plain("alice", "alice-secret")).startswith(b"-ERR [AUTH]")
    # a command sent with STLS, before the +OK, must not count as said inside TLS
    raw.sock.sendall(b"STLS\r\nUSER alice\r\n")
    assert raw.line() == b"+OK begin TLS"
    raw.sock = server.context.wrap_socket(raw.sock)
    raw.buffer = b""
    assert raw.cmd("PASS alice-secret") == b"-ERR USER first"
    assert raw.cmd("STLS") == b"-ERR TLS already active"
    assert raw.login().startswith(b"+OK")


def test_bad_input_gets_err_and_the_session_goes_on(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory()
    names = server.deliver()
    raw = Raw(server.tls_port, server.context)
    assert raw.cmd("STAT") == b"-ERR command not valid in this state"
    assert raw.cmd(b"FROB \xff\xfe") == b"-ERR unknown command"  # not UTF-8 either
    assert raw.cmd("") == b"-ERR unknown command"
    assert raw.cmd("NOOP " + "x" * 300).startswith(b"-ERR command line too long")
    assert raw.cmd("NOOP " + "x" * 20000).startswith(b"-ERR command line too long")
    assert raw.cmd(b"NO\x00OP") == b"-ERR NUL in command"
    assert raw.cmd("AUTH PLAIN !!!").startswith(b"-ERR [AUTH] invalid base64")
    assert raw.cmd("AUTH PLAIN " + plain("alice", "alice-secret", authzid="bob")).startswith(b"-ERR [AUTH]")
    assert raw.cmd("AUTH CRAM-MD5") == b"-ERR unsupported SASL mechanism"
    assert raw.cmd("AUTH PLAIN") == b"+ "
    assert raw.cmd("*") == b"-ERR [AUTH] authentication cancelled"
    assert raw.login().startswith(b"+OK 3")
    assert raw.cmd("USER alice") == b"-ERR command not valid in this state"
    assert raw.cmd("RETR 99") == b"-ERR no such message"
    assert raw.cmd("RETR 0") == b"-ERR no such message"
    assert raw.cmd("RETR one") == b"-ERR invalid message number"
    assert raw.cmd("RETR") == b"-ERR invalid message number"
    assert raw.cmd("TOP 1") == b"-ERR TOP needs a message number and a count of lines"
    assert raw.cmd("DELE 1").startswith(b"+OK")
    assert raw.cmd("RETR 1") == b"-ERR message 1 already deleted"
    assert raw.cmd("DELE 1") == b"-ERR message 1 already deleted"
    os.unlink(server.maildir() / "cur" / f"{names[1]}:2,")  # removed behind the session's back
    assert raw.cmd("RETR 2") == b"-ERR no such message (removed by another reader)"
    assert raw.cmd("NOOP") == b"+OK"
    assert raw.cmd("RSET") == b"+OK 3 messages"
    assert raw.cmd("QUIT") == b"+OK bye"
    assert sorted(os.listdir(server.maildir() / "cur")) == sorted(f"{n}:2," for n in (names[0], names[2]))


def test_idle_timeout_and_sessions_per_address(pop3_factory: Callable[..., Pop3Node]) -> None:
    server = pop3_factory(pop3timeout="1", pop3maxperip="2")
    server.deliver()
    idle = Raw(server.tls_port, server.context)
    assert idle.login().startswith(b"+OK")
    assert idle.cmd("DELE 1").startswith(b"+OK")
    busy = Raw(server.port)
    assert Raw(server.port).greeting == b"-ERR [SYS/TEMP] too many sessions, try again later"
    assert idle.line() == b"-ERR [SYS/TEMP] idle for too long, logged out"
    assert idle.closed() and busy.closed()
    assert Maildir(server.maildir()).usage()[1] == 3  # a timed-out session deletes nothing


def test_directory_logins_with_ldaprebind_and_the_throttle_shared_with_smtp_auth(
        pop3_factory: Callable[..., Pop3Node], auth_slapd: Slapd) -> None:
    server = pop3_factory(ldapserver=auth_slapd.url, ldapbasedn=auth_slapd.base_dn, ldaprebind="true",
                          authfailmaxuser="2", authfailmaxip="100", locals="test.example,auth.example")
    server.deliver("auth-ssha")
    for login in ("auth-ssha@auth.example", "auth-ssha"):  # by address, or by uid
        raw = Raw(server.tls_port, server.context)
        assert raw.login(login, "pw-ssha-secret") == b"+OK 3 messages"
        assert raw.cmd("QUIT") == b"+OK bye"
    assert Raw(server.tls_port, server.context).login("auth-ssha", "pw-wrong") == b"-ERR [AUTH] authentication failed"
    server.node.start_smtpd()
    talk = Session(server.node.port, server.context)
    for _ in range(2):
        assert talk.plain("auth-sha@auth.example", "pw-wrong").startswith("535 5.7.8")
    raw = Raw(server.tls_port, server.context)
    assert raw.login("auth-sha@auth.example", "pw-sha-secret").startswith(b"-ERR [SYS/TEMP] too many failed")


FETCHMAIL = shutil.which("fetchmail")


def fetchmail(server: Pop3Node, home: Path, tls: str) -> tuple[int, str]:
    """One run of Debian's fetchmail in keep mode, its seen UIDLs in ``home``, each message handed to
    a shell that writes it to its own file in ``home/got``: (exit status, output)."""
    got = home / "got"
    got.mkdir(parents=True, exist_ok=True)
    cert = server.node.var_dir / "tls" / "cert.pem"
    port, mode = (server.tls_port, "ssl") if tls == "implicit" else (server.port, "")  # else STLS, required
    rc = home / "fetchmailrc"
    rc.write_text(f'set no bouncemail\nset no syslog\n'
                  f'poll 127.0.0.1 with proto POP3 port {port} auth password uidl\n'
                  f'  user "alice" there with password "alice-secret" is "alice" here\n'
                  f'  options keep {mode} sslproto "tls1.2+" sslcertck sslcertfile "{cert}" '
                  f'sslcommonname "mx.test.example" mda "cat > {got}/$$"\n')
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
    done = subprocess.run([FETCHMAIL, "-f", str(rc), "--idfile", str(home / "uidls"), "--nodetach"],
                          env=env, capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed (scripts/setup.sh installs it)")
def test_fetchmail_keep_mode_fetches_each_message_once(pop3_factory: Callable[..., Pop3Node],
                                                        tmp_path: Path) -> None:
    server = pop3_factory()
    server.deliver()
    home = tmp_path / "fetchmail"
    status, output = fetchmail(server, home, "implicit")
    assert status == 0, output  # 0: mail fetched
    assert len(os.listdir(home / "got")) == 3, output
    fetched = sorted((home / "got" / name).read_bytes() for name in os.listdir(home / "got"))
    assert all(any(body.endswith(m.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n") for body in fetched)
               for m in MESSAGES), fetched
    status, output = fetchmail(server, home, "stls")  # the other listener: same UIDLs
    assert status == 1, output  # 1: no new mail
    assert len(os.listdir(home / "got")) == 3
    box = Maildir(server.maildir())
    box.deliver(file_name(1_700_000_100, "Q9test", 0, 20), b"Subject: four\n\nnew\n", retry=False)
    status, output = fetchmail(server, home, "stls")
    assert status == 0, output
    assert len(os.listdir(home / "got")) == 4
    assert box.usage()[1] == 4  # keep: nothing deleted
