"""SMTP conversations against a real ``shardmail smtpd`` process and a real redis-server."""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.shards import Namespace, ShardMap
from tests.conftest import Conversation, Node, RedisServer, wait_until

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
MESSAGE = "Subject: hello\r\nFrom: a@example.net\r\n\r\nbody line\r\n"


def transaction(c: Conversation, rcpts: list[str], data: str = MESSAGE, sender: str = "a@example.net") -> list[str]:
    replies = [c.cmd(f"MAIL FROM:<{sender}>")]
    replies += [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
    replies.append(c.cmd("DATA"))
    if replies[-1].startswith("354"):
        c.send(data + ".\r\n")
        replies.append(c.reply())
    return replies


def queued_id(reply: str) -> str:
    match = re.match(r"250 2\.0\.0 Ok: queued as ([0-9A-F]{26})$", reply)
    assert match, reply
    return match.group(1)


def stored(node: Node, message_id: str) -> tuple[object, bytes]:
    shard_map = ShardMap(node.settings())
    for shard in shard_map.ids():
        spool = shard_map.spool(shard)
        if spool.path(message_id).exists():
            return spool.read(message_id), spool.body(message_id)
    raise AssertionError(f"{message_id} not in the spool")


def test_ehlo_advertises_the_extensions(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    assert c.greeting.startswith("220 mx.test.example ESMTP")
    reply = c.cmd("EHLO client.example")
    keywords = {line[4:].split()[0] for line in reply.splitlines()[1:]}
    assert {"PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"} <= keywords
    assert "250-SIZE 10240000" in reply.splitlines()


def test_accepted_message_is_durable_with_received_header_and_jobs(
    smtpd: Node, smtp: Callable[[], Conversation]
) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    replies = transaction(c, ["user@test.example", "other@elsewhere.example"])
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"]
    message_id = queued_id(replies[-1])
    envelope, body = stored(smtpd, message_id)
    assert [(r.address, r.channel) for r in envelope.recipients] == [
        ("user@test.example", "local"), ("other@elsewhere.example", "remote")]
    assert envelope.sender == "a@example.net"
    assert body.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.test.example (shardmail)")
    assert f"id {message_id}".encode() in body.split(b"\r\n\r\n")[0]
    assert body.endswith(MESSAGE.encode())
    conn = smtpd.settings()
    from core.jobs import Jobs
    from core.redis_conn import connect

    jobs = Jobs(connect(conn), Namespace.of(conn))
    local = jobs.queue(envelope.shard, "local")
    remote = jobs.queue(envelope.shard, "remote")
    assert f"n1-{message_id}-local" in local.get_job_ids()
    assert f"n1-{message_id}-remote" in remote.get_job_ids()


def test_every_reply_carries_an_enhanced_status_code(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    replies = [c.cmd("MAIL FROM:<a@example.net>")]  # before EHLO: aiosmtpd wants HELO first
    c.cmd("EHLO client.example")
    replies += [
        c.cmd("RCPT TO:<x@test.example>"),  # no MAIL yet
        c.cmd("DATA"),
        c.cmd("MAIL FROM:<a@example.net>"),
        c.cmd("MAIL FROM:<b@example.net>"),  # nested
        c.cmd("RSET"),
        c.cmd("NOOP"),
        c.cmd("VRFY someone"),
        c.cmd("EXPN list"),
        c.cmd("BOGUS"),
        c.cmd("MAIL FROM:<a@example.net> FOO=BAR"),
        c.cmd("HELP"),
        c.cmd("QUIT"),
    ]
    for reply in replies:
        for line in reply.splitlines():
            assert ENHANCED.match(line), line


def test_commands_out_of_order_get_503_5_5_1(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd("RCPT TO:<x@test.example>").startswith("503 5.5.1")
    assert c.cmd("DATA").startswith("503 5.5.1")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("MAIL FROM:<a@example.net>").startswith("503 5.5.1")
    assert c.cmd("DATA").startswith("503 5.5.1")


@pytest.mark.parametrize("address", ["a@@test.example", "no-at-sign", "x@-bad-.example", "x@test..example"])
def test_malformed_recipient_gets_501_5_1_3(smtp: Callable[[], Conversation], address: str) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd(f"RCPT TO:<{address}>").startswith("501 5.1.3")


def test_malformed_sender_gets_501(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@@example.net>").startswith("501 5.1.")
    assert c.cmd("MAIL FROM:<>").startswith("250 2.1.0")  # the null sender is fine


# The forms of issue 13 §4 (lenient parsing once accepted or rewrote them) and a few more, over the wire.
# (Trailing white space after a path is not among them: the command line is stripped before parsing,
# as Postfix does.)
BAD_SENDERS = ["<a@b", "a@b>", "<a b@c>", "<a@b>x", "<<a@b>>", "Name <a@b>", "<a..b@example.net>",
               "<" + "a" * 65 + "@example.net>", "<a@" + "b" * 252 + ".net>", "<a@[1.2.3]>"]
BAD_RECIPIENTS = ["<postmaster@localhost", "postmaster@test.example>", "<a b@test.example>",
                  '<"x".y@test.example>', "<x@test.example>>", "<@relay.example x@test.example>"]


@pytest.mark.parametrize("path", BAD_SENDERS)
def test_a_sender_outside_the_path_grammar_gets_501_5_1_7_and_the_session_goes_on(
    smtp: Callable[[], Conversation], smtpd: Node, path: str
) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd(f"MAIL FROM:{path}").startswith("501 5.1.7"), path
    assert c.cmd("RSET").startswith("250")
    replies = transaction(c, ["user@test.example"])
    assert replies[0].startswith("250 2.1.0") and replies[-1].startswith("250 2.0.0"), replies
    _, body = stored(smtpd, queued_id(replies[-1]))
    assert b"a@example.net" in body and b"a b" not in body


@pytest.mark.parametrize("path", BAD_RECIPIENTS)
def test_a_recipient_outside_the_path_grammar_gets_501_5_1_3_and_the_transaction_goes_on(
    smtp: Callable[[], Conversation], path: str
) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.net>").startswith("250")
    assert c.cmd(f"RCPT TO:{path}").startswith("501 5.1.3"), path
    assert c.cmd("RCPT TO:<user@test.example>").startswith("250 2.1.5")
    assert c.cmd("RSET").startswith("250")


def test_a_quoted_local_part_is_kept_as_sent_never_rewritten(smtpd: Node, smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    replies = transaction(c, ["user@test.example"], sender='"a b"@example.net')
    assert replies[0].startswith("250 2.1.0") and replies[-1].startswith("250 2.0.0"), replies
    envelope, _ = stored(smtpd, queued_id(replies[-1]))
    assert envelope.sender == '"a b"@example.net'  # type: ignore[attr-defined]


def test_address_literals_and_a_source_route_are_accepted(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<@relay.example,@other.example:a@[192.0.2.1]>").startswith("250 2.1.0")
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("MAIL FROM:<a@[IPv6:2001:db8::1]> SIZE=100").startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<Postmaster>").startswith("250 2.1.5")  # RFC 5321 4.5.1: bare postmaster


def test_relaying_denied_for_outside_client(node_factory: Callable[..., Node]) -> None:
    node = node_factory(relaynets="192.0.2.0/24")
    node.start_smtpd()
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == "554 5.7.1 Relaying denied"
    assert c.cmd("RCPT TO:<x@test.example>").startswith("250")  # locals
    assert c.cmd("RCPT TO:<x@hosted.example>").startswith("250")  # rcpthosts
    assert c.cmd("RCPT TO:<x@deep.sub.example>").startswith("250")  # .sub.example
    assert c.cmd("RCPT TO:<x@sub.example.evil>") == "554 5.7.1 Relaying denied"
    # RFC 5321 C: a source route is ignored; only the final address counts for relay control
    assert c.cmd("RCPT TO:<@test.example:x@elsewhere.example>") == "554 5.7.1 Relaying denied"
    assert c.cmd("RCPT TO:<@elsewhere.example:x@test.example>").startswith("250")
    c.close()


def test_relaying_allowed_from_relaynets(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<x@elsewhere.example>").startswith("250 2.1.5")


def test_size_limits_give_552_5_3_4(node_factory: Callable[..., Node]) -> None:
    node = node_factory(databytes="2000")
    node.start_smtpd()
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.net> SIZE=5000").startswith("552 5.3.4")
    c.cmd("MAIL FROM:<a@example.net> SIZE=100")
    c.cmd("RCPT TO:<x@test.example>")
    assert c.cmd("DATA").startswith("354")
    c.send("Subject: big\r\n\r\n" + ("x" * 70 + "\r\n") * 100 + ".\r\n")
    assert c.reply().startswith("552 5.3.4")
    assert node.spooled() == []
    # the session goes on
    assert c.cmd("MAIL FROM:<a@example.net>").startswith("250")
    c.close()


def test_too_many_recipients_gets_452_4_5_3(node_factory: Callable[..., Node]) -> None:
    node = node_factory(maxrcptcount="3")
    node.start_smtpd()
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    replies = transaction(c, [f"u{i}@test.example" for i in range(5)])
    assert replies[1:4] == ["250 2.1.5 Ok"] * 3
    assert replies[4].startswith("452 4.5.3") and replies[5].startswith("452 4.5.3")
    envelope, _ = stored(node, queued_id(replies[-1]))
    assert [r.address for r in envelope.recipients] == ["u0@test.example", "u1@test.example", "u2@test.example"]
    c.close()


SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("marker", SMUGGLING, ids=repr)
def test_smuggling_never_yields_a_second_message(smtpd: Node, marker: bytes) -> None:
    c = Conversation(smtpd.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    c.cmd("RCPT TO:<x@test.example>")
    assert c.cmd("DATA").startswith("354")
    smuggled = (b"Subject: first\r\n\r\nfirst body" + marker
                + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@test.example>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n")
    c.send(smuggled)
    first = c.reply()
    # Whatever the first reply, no reply may be the acceptance of a second message.
    c.send(b"NOOP\r\n")
    rest = []
    while True:
        line = c.reply()
        rest.append(line)
        if line.startswith("250 2.0.0") and "queued" not in line:
            break
    accepted = [r for r in [first, *rest] if "queued as" in r]
    assert len(accepted) <= 1
    for message_id in smtpd.spooled():
        _, body = stored(smtpd, message_id)
        assert b"Subject: smuggled" not in body.split(b"\r\n\r\n", 1)[0]
    assert len(smtpd.spooled()) <= 1
    if marker != b"\r\n\x00.\r\n":  # bare CR/LF variants are refused outright
        assert first.startswith("554 5.5.2") and smtpd.spooled() == []
    c.close()


def test_bare_lf_in_data_is_refused(smtp: Callable[[], Conversation], smtpd: Node) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    replies = transaction(c, ["x@test.example"], data="Subject: x\r\n\r\nline one\nline two\r\n")
    assert replies[-1].startswith("554 5.5.2")
    assert smtpd.spooled() == []


def test_pipelined_transactions_are_all_answered(smtpd: Node) -> None:
    c = Conversation(smtpd.port)
    c.cmd("EHLO client.example")
    batch = "".join(f"MAIL FROM:<a@example.net>\r\nRCPT TO:<u{i}@test.example>\r\nDATA\r\n{MESSAGE}.\r\n"
                    for i in range(5))
    c.send(batch)
    ids = []
    for _ in range(5):
        assert c.reply() == "250 2.1.0 Ok"
        assert c.reply() == "250 2.1.5 Ok"
        assert c.reply().startswith("354")
        ids.append(queued_id(c.reply()))
    assert sorted(ids) == smtpd.spooled()
    c.close()


def test_redis_down_gives_451_and_leaves_nothing(node_factory: Callable[..., Node], own_redis: RedisServer) -> None:
    node = node_factory(redis_url=own_redis.url)
    node.start_smtpd()
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    assert queued_id(transaction(c, ["x@test.example"])[-1])
    own_redis.stop()
    reply = transaction(c, ["y@test.example"])[-1]
    assert reply.startswith("451 4.3.0"), reply
    assert len(node.spooled()) == 1  # only the first message
    own_redis.start()
    assert queued_id(transaction(c, ["z@test.example"])[-1])
    c.close()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def test_full_spool_gives_451_and_no_entry(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    spool_dir = tmp_path / "small-spool"
    mounted = _tmpfs(spool_dir, "256k")
    extra = {} if mounted else {"SHARDMAIL_FAULT": "spool.write=ENOSPC"}
    node = node_factory(spool_dir=str(spool_dir), shards="1")
    try:
        node.start_smtpd(**extra)
        c = Conversation(node.port)
        c.cmd("EHLO client.example")
        big = "Subject: fill\r\n\r\n" + ("y" * 998 + "\r\n") * 400  # 400 KB > 256 KB tmpfs
        reply = transaction(c, ["x@test.example"], data=big)[-1]
        assert reply.startswith("451 4.3.0"), reply
        assert node.spooled() == []
        assert list((spool_dir / "s0" / "tmp").iterdir()) == []
        c.close()
    finally:
        node.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(spool_dir)], check=False)


def test_unexpected_exception_gives_451_not_500(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    node.start_smtpd(SHARDMAIL_FAULT="smtpd.rcpt=BUG")
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<x@test.example>").startswith("451 4.3.0")
    c.close()


def test_smtplib_client_sends_a_message(smtpd: Node) -> None:
    with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=10) as client:
        refused = client.sendmail("a@example.net", ["x@test.example"], MESSAGE.encode())
        assert refused == {}
    wait_until(lambda: len(smtpd.spooled()) == 1)


def test_smtputf8_address_needs_the_parameter(smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<jöran@example.net>").startswith("501 5.1.7")
    assert c.cmd("MAIL FROM:<jöran@example.net> SMTPUTF8").startswith("250")
    assert c.cmd("RCPT TO:<øyvind@test.example>").startswith("250")


def test_data_transparency_and_content_are_exact(smtpd: Node, smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    lines = ["Subject: dots", "", ".. leading dot", "...", "a line ending in a dot.", ".", "x" * 998, "last"]
    wire = "".join(("." + line if line.startswith(".") else line) + "\r\n" for line in lines)
    message_id = queued_id(transaction(c, ["x@test.example"], data=wire)[-1])
    _, body = stored(smtpd, message_id)
    assert body.split(b"\r\n", 3)[-1] == "".join(line + "\r\n" for line in lines).encode()


def test_large_message_and_empty_message(smtpd: Node, smtp: Callable[[], Conversation]) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    big = "Subject: big\r\n\r\n" + "".join(f"line {i} " + "y" * 70 + ".\r\n" for i in range(8000))
    _, body = stored(smtpd, queued_id(transaction(c, ["x@test.example"], data=big)[-1]))
    assert body.endswith(big.encode()) and len(body) > 600_000
    _, body = stored(smtpd, queued_id(transaction(c, ["x@test.example"], data="")[-1]))
    assert body.startswith(b"Received: ") and body.endswith(b"\r\n")


def test_overlong_line_is_refused_after_the_data(smtp: Callable[[], Conversation], smtpd: Node) -> None:
    c = smtp()
    c.cmd("EHLO client.example")
    reply = transaction(c, ["x@test.example"], data="Subject: long\r\n\r\n" + "z" * 1200 + "\r\n")[-1]
    assert reply.startswith("500 5.5.2")
    assert smtpd.spooled() == []
    assert c.cmd("NOOP").startswith("250")


def test_an_idle_client_is_dropped_after_timeoutsmtpd_and_commands_keep_it_alive(
        node_factory: Callable[..., Node]) -> None:
    """The timer is re-armed by deadline, not per command: a client that keeps talking past the
    first deadline stays, one that goes silent is closed about ``timeoutsmtpd`` later."""
    node = node_factory(timeoutsmtpd="1")
    node.start_smtpd()
    c = Conversation(node.port)
    started = time.monotonic()
    c.cmd("EHLO client.example")
    while time.monotonic() - started < 2.0:  # the client's own pace (not a synchronisation)
        assert c.cmd("NOOP").startswith("250")
        time.sleep(0.3)
    silent = time.monotonic()
    with pytest.raises(ConnectionError):
        c.reply()  # blocks until the server closes the session
    assert 0.5 < time.monotonic() - silent < 3.0
    c.close()
