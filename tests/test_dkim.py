"""DKIM signing at acceptance (core.dkim) through real processes: smtpd, sendmail, qmqpd and the remote pool,
with the keys published by unbound on loopback and the signatures checked by two independent verifiers,
dkimpy's and OpenDKIM's ``opendkim-testmsg`` (which reads glibc's resolv.conf: it runs in a private mount
namespace whose /etc/resolv.conf names the test server, on port 53 of an address of its own)."""

from __future__ import annotations

import base64
import re
import smtplib
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.resolver
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value
from hypothesis import given
from hypothesis import strategies as st

from core.dkim import KeySpec, load_key, relaxed_body
from core.qmqp import pack, send
from ops.dkim_keys import generate, txt_value, write_key
from tests.conftest import Node
from tests.dns_server import DnsServer, Zone, standard_zone
from tests.slapd import Slapd
from tests.smtp_peers import Sink
from tests.support import free_port, wait_until
from tests.test_qmqpd import listens
from tests.test_recovery import start
from tests.test_smtp_auth import Session
from tests.test_smtp_limits import make_cert

DNS_ADDRESS = "127.0.53.1"  # port 53 here: resolv.conf takes no port
SINK = "127.0.1.49"  # mail.d49.test
DOMAIN = "shop.example"
MESSAGE = ("From: Shop <news@shop.example>\r\nTo: <u@d49.test>\r\nSubject: Grüße aus dem Laden\r\n"
           "Date: Tue, 08 Dec 2026 01:00:00 +0000\r\nMessage-ID: <m1@shop.example>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           "Grüße,  mit   Leerzeichen  \r\n.a leading dot\r\n..two dots\r\n.\r\n"
           + "long " * 198 + "\r\n\r\nend\r\n\r\n\r\n").encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An RSA-2048 and an Ed25519 key for shop.example (selectors r2026, e2026)."""
    directory = tmp_path_factory.mktemp("dkim-keys")
    paths = {"r2026": directory / "rsa.key", "e2026": directory / "ed25519.key"}
    write_key(paths["r2026"], generate("rsa", 2048))
    write_key(paths["e2026"], generate("ed25519"))
    return paths


@pytest.fixture(scope="module")
def dkim_dns(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Iterator[DnsServer]:
    """unbound with the standard zone (d49.test's MX) and the two public keys under _domainkey.shop.example."""
    zone = Zone("example")
    for selector, path in keys.items():
        zone.txt(f"{selector}._domainkey.{DOMAIN}", txt_value(load_key(KeySpec(DOMAIN, selector, str(path))).private))
    with DnsServer(tmp_path_factory.mktemp("dkim-dns"), [standard_zone(), zone], DNS_ADDRESS, 53) as server:
        yield server


@pytest.fixture(scope="module")
def resolv_conf(tmp_path_factory: pytest.TempPathFactory, dkim_dns: DnsServer) -> Path:
    path = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    path.write_text(f"nameserver {dkim_dns.address}\noptions timeout:2 attempts:1\n")
    return path


def signing_node(node_factory: Callable[..., Node], keys: dict[str, Path], dns: DnsServer, **overrides: str) -> Node:
    entries = f"{DOMAIN}:r2026:{keys['r2026']}:rsa,{DOMAIN}:e2026:{keys['e2026']}:ed25519"
    settings = {"dkim": entries, "dkim_expire": "86400", "dnsresolvers": dns.hostport, "dnstimeout": "2",
                "timeoutremote": "10", **overrides}
    return node_factory(**settings)


def smtp_send(node: Node, message: bytes, sender: str, recipients: list[str], source: str = "127.0.0.1") -> str:
    """One message by SMTP (smtplib dot-stuffs it) from ``source``; the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", node.port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("client.example")
        client.mail(sender, ["BODY=8BITMIME"])
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(message)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature field, top first."""
    headers, _ = dkim.rfc822_parse(message)
    return [parse_tag_value(value.replace(b"\r\n", b"")) for name, value in headers
            if name.lower() == b"dkim-signature"]


def dkimpy_verifies(message: bytes, server: DnsServer, index: int) -> bool:
    resolver = server.resolver()

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            return b"".join(resolver.resolve(name.decode(), "TXT")[0].strings)
        except dns.resolver.NXDOMAIN:
            return None

    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=txt))
    except dkim.ValidationError:  # a body hash mismatch is raised, not returned
        return False


def only_signature(message: bytes, index: int) -> bytes:
    """The message with its other DKIM-Signature fields taken out (none of them is signed by another), so
    OpenDKIM's verdict is about this one signature."""
    head, separator, body = message.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    signed = [i for i, field in enumerate(fields) if field.lower().startswith(b"dkim-signature:")]
    kept = [field for i, field in enumerate(fields) if i not in signed or i == signed[index]]
    return b"\r\n".join(kept) + separator + body


def opendkim_testmsg(message: bytes, resolv_conf: Path) -> subprocess.CompletedProcess[bytes]:
    """opendkim-testmsg verifying ``message`` (exit 0: good), its DNS from the test server."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec opendkim-testmsg'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, str(resolv_conf)], input=message,
                          capture_output=True, timeout=30)


def test_relayed_mail_is_dual_signed_before_the_commit_and_verifies_at_the_sink_byte_for_byte(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer, resolv_conf: Path,
        sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory(SINK)
    node = signing_node(node_factory, keys, dkim_dns)
    node.start_smtpd()
    message_id = smtp_send(node, MESSAGE, "news@shop.example", ["u@d49.test"])
    _, spooled = node.message(message_id)
    # on top: RSA, then Ed25519 (both d=shop.example), then our Received line, then the message as sent
    assert spooled.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; ")
    assert re.search(rb"\A(DKIM-Signature: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*){2}Received: from client\.example", spooled)
    assert spooled.endswith(MESSAGE)
    tags = signatures(spooled)
    assert [(t[b"a"], t[b"d"], t[b"s"], t[b"c"]) for t in tags] == [
        (b"rsa-sha256", b"shop.example", b"r2026", b"relaxed/relaxed"),
        (b"ed25519-sha256", b"shop.example", b"e2026", b"relaxed/relaxed")]
    for tag in tags:
        names = [n.strip() for n in tag[b"h"].split(b":")]
        assert names == [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                         b"content-transfer-encoding", b"from", b"to", b"subject", b"date"]  # 4 oversigned
        assert int(tag[b"x"]) == int(tag[b"t"]) + 86400
    start(node, "worker", "remote")
    [transaction] = sink.wait_for(1)
    data = transaction.data
    assert data == spooled  # the queued bytes are the bytes that left (dots un-stuffed by the sink)
    for index in (0, 1):
        assert dkimpy_verifies(data, dkim_dns, index), index
        verdict = opendkim_testmsg(only_signature(data, index), resolv_conf)
        assert verdict.returncode == 0, verdict.stderr
    tampered = opendkim_testmsg(only_signature(data.replace(b"two dots", b"two dotz"), 0), resolv_conf)
    assert tampered.returncode != 0 and b"Bad signature" in tampered.stderr  # the verifier does check
    assert not dkimpy_verifies(data.replace(b"two dots", b"two dotz"), dkim_dns, 1)


def test_sendmail_and_qmqp_submissions_are_signed_mail_for_local_users_is_not(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer, resolv_conf: Path) -> None:
    port = free_port()
    node = signing_node(node_factory, keys, dkim_dns, qmqp_listen=f"127.0.0.1:{port}", qmqpclients="127.0.0.0/8")
    proc = start(node, "qmqpd")
    wait_until(lambda: proc.poll() is not None or listens(port), timeout=20, what="qmqpd listening")
    before = set(node.spooled())
    done = node.command("sendmail", "-f", "news@shop.example", "u@d49.test", input=MESSAGE.replace(b"\r\n", b"\n"))
    assert done.returncode == 0, done.stderr
    [by_sendmail] = set(node.spooled()) - before
    reply = send("127.0.0.1", port, pack(MESSAGE, "news@shop.example", ["u@d49.test"]), 10)
    assert reply.accepted, reply
    by_qmqp = reply.text.removeprefix("ok ")
    for message_id in (by_sendmail, by_qmqp):
        _, spooled = node.message(message_id)
        assert [t[b"a"] for t in signatures(spooled)] == [b"rsa-sha256", b"ed25519-sha256"], message_id
        assert dkimpy_verifies(spooled, dkim_dns, 0) and dkimpy_verifies(spooled, dkim_dns, 1)
        assert opendkim_testmsg(only_signature(spooled, 1), resolv_conf).returncode == 0
    local = send("127.0.0.1", port, pack(MESSAGE, "news@shop.example", ["someone@test.example"]), 10)
    assert local.accepted, local
    assert signatures(node.message(local.text.removeprefix("ok "))[1]) == []  # it never leaves: nothing to vouch


def test_a_strangers_mail_is_never_signed_a_relay_clients_is(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer) -> None:
    node = signing_node(node_factory, keys, dkim_dns, relaynets="127.0.0.1/32")
    node.start_smtpd()
    # hosted.example is in rcpthosts: anyone may send to it, and it goes out through the remote pool
    stranger = smtp_send(node, MESSAGE, "news@shop.example", ["r@hosted.example"], source="127.0.0.2")
    relayed = smtp_send(node, MESSAGE, "news@shop.example", ["r@hosted.example"], source="127.0.0.1")
    assert b"DKIM-Signature" not in node.message(stranger)[1]
    assert [t[b"d"] for t in signatures(node.message(relayed)[1])] == [b"shop.example", b"shop.example"]


def test_the_signing_domain_follows_from_then_the_fallbacks_and_a_domain_never_signs_twice(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer) -> None:
    node = signing_node(node_factory, keys, dkim_dns, dkim_fallback="other.example=shop.example")
    node.start_smtpd()

    def domains(from_header: str, extra: bytes = b"") -> list[bytes]:
        message = extra + MESSAGE.replace(b"From: Shop <news@shop.example>", f"From: {from_header}".encode())
        _, spooled = node.message(smtp_send(node, message, "bounces@lists.example", ["u@d49.test"]))
        return [t[b"d"] for t in signatures(spooled)]

    assert domains("<news@Shop.Example>") == [b"shop.example"] * 2
    assert domains("News <a@news.shop.example>") == [b"shop.example"] * 2  # a parent's key aligns (relaxed)
    assert domains("<a@other.example>") == [b"shop.example"] * 2  # other.example=shop.example
    assert domains("<a@unknown.example>") == []  # no key, no fallback: unsigned, not signed as someone else
    ours = b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=shop.example; s=old; h=from; bh=x; b=y\r\n"
    assert domains("<news@shop.example>", ours) == [b"shop.example"]  # the one it came with
    theirs = ours.replace(b"d=shop.example", b"d=esp.example")
    assert domains("<news@shop.example>", theirs) == [b"shop.example", b"shop.example", b"esp.example"]


def test_a_missing_key_stops_run_smtpd_qmqpd_and_sendmail_at_start_with_78(
        node_factory: Callable[..., Node], tmp_path: Path) -> None:
    path = tmp_path / "nonexistent.key"
    node = node_factory(dkim=f"{DOMAIN}:r2026:{path}:rsa", qmqp_listen=f"127.0.0.1:{free_port()}")
    for args in (["run"], ["smtpd"], ["qmqpd"], ["sendmail", "u@d49.test"]):
        done = node.command(*args, input=MESSAGE)
        assert done.returncode == 78, (args, done.stderr)
        assert f"dkim: key {path} (r2026._domainkey.shop.example): No such file".encode() in done.stderr
        assert b"Traceback" not in done.stderr, done.stderr
    assert node.spooled() == []
    edge = node_factory(role="ingress", qmqpservers="127.0.0.1:1", dkim=f"{DOMAIN}:r2026:{path}:rsa")
    for args in (["smtpd"], ["sendmail", "u@d49.test"]):  # an ingress-only node signs too: the same check
        done = edge.command(*args, input=MESSAGE)
        assert done.returncode == 78 and b"No such file" in done.stderr and b"Traceback" not in done.stderr, args


@pytest.mark.parametrize("problem", ["not a key", "wrong algorithm"])
def test_a_key_that_cannot_be_used_stops_smtpd_at_start_with_78(
        node_factory: Callable[..., Node], keys: dict[str, Path], tmp_path: Path, problem: str) -> None:
    if problem == "not a key":
        path = tmp_path / "garbage.key"
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        expected = b"not an unencrypted PEM private key"
    else:
        path, expected = keys["e2026"], b"an ed25519 key, but algorithm = rsa"
    done = node_factory(dkim=f"{DOMAIN}:r2026:{path}:rsa").command("smtpd")
    assert done.returncode == 78 and str(path).encode() in done.stderr, done.stderr
    assert expected in done.stderr and b"Traceback" not in done.stderr


def test_a_fallback_without_a_key_is_a_configuration_error_for_smtpd_and_config(node_factory: Callable[..., Node],
                                                          keys: dict[str, Path]) -> None:
    node = node_factory(dkim=f"{DOMAIN}:r2026:{keys['r2026']}", dkim_fallback="*=elsewhere.example")
    for command in ("smtpd", "config"):
        done = node.command(command)
        assert done.returncode == 78 and b"no dkim key is configured for elsewhere.example" in done.stderr


def test_keygen_writes_a_0600_key_prints_its_record_and_never_overwrites(tmp_path: Path) -> None:
    def keygen(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.cli", "dkim", "keygen", "--domain", DOMAIN,
                               "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=60)

    for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519")):
        done = keygen("--selector", selector, "--algorithm", algorithm)
        assert done.returncode == 0, done.stderr
        path = tmp_path / f"{DOMAIN}.{selector}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        record = re.search(rf"^{selector}\._domainkey\.{DOMAIN}\. IN TXT \( (.*) \)$", done.stdout, re.M)
        assert record is not None, done.stdout
        published = "".join(re.findall(r'"([^"]*)"', record.group(1)))
        key = load_key(KeySpec(DOMAIN, selector, str(path)))
        assert published == txt_value(key.private) and f"k={algorithm};" in published
        assert f'keyfile = "{path}"' in done.stdout and key.algorithm.startswith(algorithm.encode())
    assert len(base64.b64decode(txt_value(load_key(KeySpec(DOMAIN, "r1", str(tmp_path / f"{DOMAIN}.r1.key")))
                                          .private).split("p=")[1])) == 294  # DER of a 2048-bit RSA public key
    again = keygen("--selector", "r1")
    assert again.returncode == 1 and "exists" in again.stderr
    small = keygen("--selector", "r2", "--bits", "512")
    assert small.returncode == 1 and "1024 bits at least" in small.stderr
    assert not (tmp_path / f"{DOMAIN}.r2.key").exists()


SELLERS_LDIF = """dn: dc=example,dc=test
objectClass: top
objectClass: dcObject
objectClass: organization
dc: example
o: shardmail tests
""" + "".join(f"""
dn: uid={uid},dc=example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
objectClass: shardmailUser
uid: {uid}
cn: {uid}
sn: {uid}
mail: {uid}@market.example
mailMessageStore: {uid}/
userPassword: {{SSHA}}2ClhvWnecDR/xveBC/QuAPUb4sERVsjD
""" + extra for uid, extra in (("seller", "dkimSigningDomain: Shop.Example\n"), ("buyer", "")))  # pw-ssha-secret


def test_an_authenticated_users_dkim_signing_domain_comes_from_the_directory(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer, tmp_path: Path) -> None:
    (tmp_path / "sellers.ldif").write_text(SELLERS_LDIF)
    slapd = Slapd(tmp_path / "slapd", tmp_path / "sellers.ldif")  # slapadd checks the entries against the schema
    with slapd.serving():
        node = signing_node(node_factory, keys, dkim_dns, ldapserver=slapd.url, ldapbasedn=slapd.base_dn,
                            dkim_ldap="true", ldapcachettl="0", ldapnegcachettl="0", ldaptimeout="2",
                            relaynets="10.0.0.0/8", authfaildelay="0")
        context = make_cert(node)
        node.start_smtpd()

        def submit(talk: Session, uid: str) -> str:
            assert talk.cmd(f"MAIL FROM:<{uid}@market.example>").startswith("250")
            assert talk.cmd("RCPT TO:<u@d49.test>").startswith("250")
            assert talk.cmd("DATA").startswith("354")
            message = MESSAGE.replace(b"news@shop.example", f"{uid}@market.example".encode())
            return talk.cmd(message.decode("utf-8").replace("\r\n.", "\r\n..") + ".")

        for uid, expected in (("seller", [b"shop.example", b"shop.example"]), ("buyer", [])):
            talk = Session(node.port, context)
            assert talk.plain(f"{uid}@market.example", "pw-ssha-secret").startswith("235"), uid
            queued = submit(talk, uid)
            assert queued.startswith("250"), queued
            assert [t[b"d"] for t in signatures(node.message(queued.rsplit(" ", 1)[-1])[1])] == expected, uid
        late = Session(node.port, context)
        assert late.plain("seller@market.example", "pw-ssha-secret").startswith("235")
        slapd.stop()  # the directory goes away after AUTH: 451, not a message signed by guess
        assert submit(late, "seller").startswith("451 4.4.3"), "directory down"
        assert len(node.spooled()) == 2


@given(st.lists(st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"a", b"bc", b"\r\n", b"\r\n\r\n", b".", b"\xc3\xa9"]),
                max_size=40))
def test_relaxed_body_is_dkimpys_canonicalisation(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert relaxed_body(body) == CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(body)


def test_dkim_cost_prints_microseconds_per_signature_for_each_algorithm() -> None:
    done = subprocess.run([sys.executable, "-m", "ops.cli", "dkim", "cost", "--count", "5", "--size", "2000"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    figures = re.findall(r"^(rsa|ed25519): (\d+) µs per signature \(2000-byte message\)$", done.stdout, re.M)
    assert [name for name, _ in figures] == ["rsa", "ed25519"] and all(int(us) > 0 for _, us in figures)


def test_an_ingress_only_node_signs_before_it_hands_over(
        node_factory: Callable[..., Node], keys: dict[str, Path], dkim_dns: DnsServer) -> None:
    """The edge knows the client, so it signs, and a stranger's mail it passes on stays unsigned at
    the queue node (the same keys there; the edge is not in its relaynets, as the README asks)."""
    from tests.test_qmqpd import qmqp_node

    queue, port = qmqp_node(node_factory, node="q1", relaynets="127.0.0.9/32",
                            dkim=f"{DOMAIN}:r2026:{keys['r2026']}:rsa,{DOMAIN}:e2026:{keys['e2026']}:ed25519")
    edge = signing_node(node_factory, keys, dkim_dns, node="edge", role="ingress", relaynets="127.0.0.1/32",
                        qmqpservers=f"127.0.0.1:{port}")
    edge.start_smtpd()
    smtp_send(edge, MESSAGE, "news@shop.example", ["r@hosted.example"], source="127.0.0.1")
    stranger = smtp_send(edge, MESSAGE, "news@shop.example", ["s@hosted.example"], source="127.0.0.2")
    assert stranger
    spooled = {tuple(e.address for e in queue.message(m)[0].recipients): queue.message(m)[1]
               for m in queue.spooled()}
    signed = spooled[("r@hosted.example",)]
    assert [t[b"a"] for t in signatures(signed)] == [b"rsa-sha256", b"ed25519-sha256"]
    assert dkimpy_verifies(signed, dkim_dns, 0) and dkimpy_verifies(signed, dkim_dns, 1)
    assert signatures(spooled[("s@hosted.example",)]) == []  # the stranger's mail stays unsigned at the edge
