"""SMTP AUTH in the dialogue, against a real shardmail SMTP process, a real slapd holding one account
per password scheme (tests/data/auth.ldif) and real TLS handshakes: each scheme over PLAIN, LOGIN,
no enumeration by reply, AUTH only after STARTTLS, an authenticated client relaying (tricks
included) with its user in the Received header, 200 wrong passwords throttled while another
address still logs in, the per-user message rate limit, and the throttle shared by the nodes of a cluster."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable

from tests.conftest import Conversation, Node
from tests.slapd import Slapd
from tests.support import wait_until
from tests.test_auth import SCHEMES, wrong
from tests.test_smtp_limits import make_cert


class Session(Conversation):
    """EHLO, STARTTLS, EHLO again: ready for AUTH."""

    def __init__(self, port: int, context: ssl.SSLContext, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        self.buffer = b""
        self.greeting = self.reply()
        assert "STARTTLS" in self.cmd("EHLO client.example")
        assert self.cmd("STARTTLS").startswith("220")
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.test.example")
        self.ehlo = self.cmd("EHLO client.example")

    def plain(self, login: str, password: str) -> str:
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {blob}")

    def login(self, login: str, password: str) -> str:
        assert self.cmd("AUTH LOGIN").startswith("334 VXNlcm5hbWU6")  # "Username:"
        assert self.cmd(base64.b64encode(login.encode()).decode()).startswith("334 UGFzc3dvcmQ6")
        return self.cmd(base64.b64encode(password.encode()).decode())


def auth_node(node_factory: Callable[..., Node], auth_slapd: Slapd, **extra: str) -> tuple[Node, ssl.SSLContext]:
    options = {"ldapserver": auth_slapd.url, "ldapbasedn": auth_slapd.base_dn, "relaynets": "10.0.0.0/8",
               "authfaildelay": "0", "locals": "test.example,example.test"}
    options.update(extra)
    node = node_factory(**options)
    context = make_cert(node)
    node.start_smtpd()
    return node, context


def test_each_scheme_and_no_enumeration(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    node, context = auth_node(node_factory, auth_slapd, authfailmaxip="1000", authfailmaxuser="1000")
    assert "AUTH LOGIN PLAIN" in Session(node.port, context).ehlo
    for login, password in SCHEMES:
        talk = Session(node.port, context)
        assert talk.plain(login, wrong(password)) == "535 5.7.8 Authentication credentials invalid", login
        assert talk.plain(login, password).startswith("235 2.7.0"), login
        assert talk.plain(login, password).startswith("503")  # once per session
        talk.close()
    talk = Session(node.port, context)
    assert talk.login("auth-ssha@auth.example", "pw-ssha-secret").startswith("235 2.7.0")
    talk.close()
    unknown = Session(node.port, context).plain("nobody@auth.example", "whatever")
    disabled = Session(node.port, context).plain("auth-disabled@auth.example", "pw-status-secret")
    assert unknown == disabled == "535 5.7.8 Authentication credentials invalid"


def test_plain_before_tls_is_refused(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    node, _ = auth_node(node_factory, auth_slapd)
    talk = Conversation(node.port)
    assert "AUTH" not in talk.cmd("EHLO client.example")
    blob = base64.b64encode(b"\0auth-ssha@auth.example\0pw-ssha-secret").decode()
    assert talk.cmd(f"AUTH PLAIN {blob}").startswith("538 5.7.11")
    talk.close()


def test_authenticated_client_relays_and_is_recorded(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    node, context = auth_node(node_factory, auth_slapd)
    outsider = Session(node.port, context)
    assert outsider.cmd("MAIL FROM:<a@example.net>").startswith("250")
    assert outsider.cmd("RCPT TO:<x@elsewhere.example>").startswith("554 5.7.1")
    assert outsider.cmd("RCPT TO:<x%y@elsewhere.example>").startswith("554 5.7.1")
    outsider.close()
    talk = Session(node.port, context)
    assert talk.plain("auth-ssha@auth.example", "pw-ssha-secret").startswith("235")
    assert talk.cmd("MAIL FROM:<auth-ssha@auth.example>").startswith("250")
    for address in ("x@elsewhere.example", "x%y@elsewhere.example", "y!x@elsewhere.example",
                    '"x@y"@elsewhere.example', "x@[192.0.2.1]"):
        assert talk.cmd(f"RCPT TO:<{address}>").startswith("250"), address
    assert talk.cmd("DATA").startswith("354")
    assert talk.cmd("Subject: relayed\r\n\r\nbody\r\n.").startswith("250")
    talk.close()
    wait_until(lambda: node.spooled(), timeout=10, what="the message spooled")
    message_id = node.spooled()[0]
    envelope, body = node.message(message_id)
    received = body.split(b"\r\nSubject:")[0]
    assert b"(authenticated as auth-ssha@auth.example)" in received
    assert b"with ESMTPSA id " + message_id.encode() in received
    assert envelope.client.user == "auth-ssha@auth.example"


def test_brute_force_is_throttled_while_another_address_gets_in(node_factory: Callable[..., Node],
                                                                auth_slapd: Slapd) -> None:
    node, context = auth_node(node_factory, auth_slapd, authfailmaxip="20", authfailmaxuser="1000")
    answers: list[str] = []
    talk = Session(node.port, context, "127.0.0.8")
    while len(answers) < 200:
        try:
            reply = talk.plain("auth-ssha@auth.example", f"guess{len(answers)}")
        except (ConnectionError, OSError):
            talk = Session(node.port, context, "127.0.0.8")  # thrown out: come back, as an attacker would
            continue
        if reply.startswith("421"):  # ten errors in one session: thrown out (ingress.guard's maxerrors)
            talk.close()
            talk = Session(node.port, context, "127.0.0.8")
            continue
        answers.append(reply[:9])
        if reply.startswith("454"):
            talk.close()
            talk = Session(node.port, context, "127.0.0.8")
    assert answers.count("535 5.7.8") == 20
    assert answers.count("454 4.7.0") == 180
    assert Session(node.port, context, "127.0.0.8").plain("auth-ssha@auth.example", "pw-ssha-secret") \
        .startswith("454")  # even the right password, from that address, for now
    other = Session(node.port, context, "127.0.0.9")
    assert other.plain("auth-ssha@auth.example", "pw-ssha-secret").startswith("235")


def test_rate_limit_per_authenticated_sender(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    node, context = auth_node(node_factory, auth_slapd, ratelimitsender="2", ratelimitwindow="3600")
    replies = []
    for source in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):  # the limit follows the user, not the address
        talk = Session(node.port, context, source)
        assert talk.plain("auth-sha@auth.example", "pw-sha-secret").startswith("235")
        replies.append(talk.cmd("MAIL FROM:<auth-sha@auth.example>")[:9])
        talk.close()
    assert replies == ["250 2.1.0", "250 2.1.0", "451 4.7.1"]



def test_the_throttle_holds_for_the_cluster(node_factory: Callable[..., Node], auth_slapd: Slapd) -> None:
    """Two nodes on one Redis and prefix: failures counted on one throttle the guesser on the other."""
    alpha, context_a = auth_node(node_factory, auth_slapd, node="alpha", authfailmaxip="3", authfailmaxuser="1000")
    beta, context_b = auth_node(node_factory, auth_slapd, node="beta", authfailmaxip="3", authfailmaxuser="1000")
    replies = []
    for node, context in ((alpha, context_a), (beta, context_b), (alpha, context_a), (beta, context_b)):
        talk = Session(node.port, context, "127.0.0.12")
        replies.append(talk.plain("auth-ssha@auth.example", "not-it")[:9])
        talk.close()
    assert replies == ["535 5.7.8", "535 5.7.8", "535 5.7.8", "454 4.7.0"]
    assert Session(alpha.port, context_a, "127.0.0.13").plain("auth-ssha@auth.example", "pw-ssha-secret") \
        .startswith("235")  # another address is not throttled
