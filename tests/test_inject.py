"""`shardmail sendmail` (ingress/inject.py) as a real process against a real Redis: options, headers, exits."""

from __future__ import annotations

import email
import email.policy
import getpass
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from core.envelope import Envelope
from core.shards import ShardMap

if TYPE_CHECKING:
    from conftest import Node, RedisServer

ME = "mx.test.example"  # conftest's make_node sets SHARDMAIL_ME to this
MESSAGE = b"Subject: hello\nTo: ignored@example.org\n\nfirst line\n.\nafter the dot\n"


def stored(node: Node) -> list[tuple[Envelope, bytes]]:
    """Every spooled message of the node, as (envelope, body)."""
    shard_map = ShardMap(node.settings())
    found = []
    for shard in shard_map.ids():
        spool = shard_map.spool(shard)
        found += [(spool.read(i), spool.body(i)) for i in spool.ids()]
    return found


def only(node: Node) -> tuple[Envelope, bytes]:
    messages = stored(node)
    assert len(messages) == 1, messages
    return messages[0]


def headers(body: bytes) -> email.message.Message:
    return email.message_from_bytes(body, policy=email.policy.compat32)


@pytest.fixture
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory()


def send(node: Node, *args: str, message: bytes = MESSAGE) -> tuple[int, str]:
    result = node.command("sendmail", *args, input=message)
    return result.returncode, result.stderr.decode()


def test_queues_message_for_argument_recipients(node: Node) -> None:
    code, err = send(node, "alice@test.example", "bob@remote.example")
    assert code == 0, err
    envelope, body = only(node)
    assert [r.address for r in envelope.recipients] == ["alice@test.example", "bob@remote.example"]
    assert [r.channel for r in envelope.recipients] == ["local", "remote"]
    assert envelope.sender == f"{getpass.getuser()}@{ME}"
    assert envelope.client.protocol == "local"
    assert body.startswith(b"Received: (shardmail " + envelope.id.encode())
    assert b"\r\nSubject: hello\r\n" in body
    assert b"\n" not in body.replace(b"\r\n", b"")  # CRLF line endings throughout
    assert node.spooled() == [envelope.id]


def test_dash_t_takes_to_cc_bcc_and_strips_bcc(node: Node) -> None:
    message = (
        b"From: Sender <s@test.example>\n"
        b"To: Ann <ann@test.example>, bare\n"
        b"Cc: cc@remote.example\n"
        b"Bcc: hidden@remote.example,\n"
        b" hidden2@remote.example\n"
        b"Subject: t\n\nbody mentions Bcc: nothing\n"
    )
    code, err = send(node, "-t", "extra@test.example", message=message)
    assert code == 0, err
    envelope, body = only(node)
    assert sorted(r.address for r in envelope.recipients) == sorted([
        "extra@test.example", "ann@test.example", f"bare@{ME}", "cc@remote.example",
        "hidden@remote.example", "hidden2@remote.example",
    ])
    parsed = headers(body)
    assert parsed["Bcc"] is None
    assert b"hidden" not in body
    assert parsed["To"] == "Ann <ann@test.example>, bare"
    assert parsed["Cc"] == "cc@remote.example"
    assert b"body mentions Bcc: nothing" in body


def test_missing_date_message_id_from_are_added(node: Node) -> None:
    code, err = send(node, "-F", "Full Name", "alice@test.example", message=b"Subject: bare\n\nhi\n")
    assert code == 0, err
    envelope, body = only(node)
    parsed = headers(body)
    assert parsed["From"] == f"Full Name <{envelope.sender}>"
    assert email.utils.parsedate_to_datetime(parsed["Date"]) is not None
    assert parsed["Message-ID"].endswith(f"@{ME}>")
    assert parsed.get_payload() == "hi\r\n"


def test_present_date_message_id_from_are_not_duplicated(node: Node) -> None:
    message = (
        b"from: Me <me@test.example>\n"
        b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\n"
        b"Message-Id: <fixed@test.example>\n"
        b"Subject: full\n\nhi\n"
    )
    code, err = send(node, "-F", "Ignored Name", "alice@test.example", message=message)
    assert code == 0, err
    _, body = only(node)
    parsed = headers(body)
    assert parsed.get_all("From") == ["Me <me@test.example>"]
    assert parsed.get_all("Date") == ["Mon, 1 Jan 2024 00:00:00 +0000"]
    assert parsed.get_all("Message-ID") == ["<fixed@test.example>"]
    assert b"Ignored Name" not in body


@pytest.mark.parametrize("args", [("-f", "bounces@test.example"), ("-fbounces@test.example",),
                                  ("-r", "bounces@test.example")])
def test_dash_f_sets_envelope_sender(node: Node, args: tuple[str, ...]) -> None:
    code, err = send(node, *args, "alice@test.example", message=b"Subject: s\n\nx\n")
    assert code == 0, err
    envelope, body = only(node)
    assert envelope.sender == "bounces@test.example"
    assert headers(body)["From"] == "bounces@test.example"


def test_dash_f_bare_name_gets_me(node: Node) -> None:
    code, err = send(node, "-f", "daemon", "alice@test.example")
    assert code == 0, err
    assert only(node)[0].sender == f"daemon@{ME}"


def test_lone_dot_ends_message_without_dash_i(node: Node) -> None:
    code, err = send(node, "alice@test.example")
    assert code == 0, err
    _, body = only(node)
    assert body.endswith(b"\r\nfirst line\r\n")
    assert b"after the dot" not in body


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_lone_dot_kept_with_dash_i(node: Node, flag: str) -> None:
    code, err = send(node, flag, "alice@test.example")
    assert code == 0, err
    _, body = only(node)
    assert body.endswith(b"\r\nfirst line\r\n.\r\nafter the dot\r\n")


def test_bare_recipient_names_get_me(node: Node) -> None:
    code, err = send(node, "postmaster", "alice@test.example")
    assert code == 0, err
    envelope, _ = only(node)
    assert [r.address for r in envelope.recipients] == [f"postmaster@{ME}", "alice@test.example"]


def test_ignored_options_are_accepted(node: Node) -> None:
    code, err = send(node, "-oem", "-odi", "-v", "-N", "never", "-B", "8BITMIME", "-bm", "--", "alice@test.example")
    assert code == 0, err
    assert len(stored(node)) == 1


def test_no_recipients_exits_64(node: Node) -> None:
    code, err = send(node)
    assert code == 64
    assert "no recipient" in err
    code, _ = send(node, "-t", message=b"Subject: nobody\n\nx\n")
    assert code == 64
    assert stored(node) == []


@pytest.mark.parametrize("args", [("-Z", "alice@test.example"), ("-bp",), ("alice@test.example", "-f")])
def test_bad_usage_exits_64(node: Node, args: tuple[str, ...]) -> None:
    code, err = send(node, *args)
    assert code == 64
    assert err.startswith("sendmail: ")
    assert "Traceback" not in err
    assert stored(node) == []


@pytest.mark.parametrize("args", [("alice@@test.example",), ("a..b@test.example",), ("-f", "x@y@z", "ok@test.example"),
                                  ("@relay.example:user@test.example",)])
def test_malformed_address_exits_65(node: Node, args: tuple[str, ...]) -> None:
    code, err = send(node, *args)
    assert code == 65
    assert "bad address" in err
    assert stored(node) == []


def test_redis_down_exits_75_and_leaves_nothing(node_factory: Callable[..., Node], own_redis: RedisServer) -> None:
    node = node_factory(redis_url=own_redis.url)
    code, err = send(node, "alice@test.example")
    assert code == 0, err  # the private server works first
    assert len(stored(node)) == 1
    own_redis.stop()
    code, err = send(node, "bob@test.example")
    assert code == 75
    assert "try again later" in err
    assert "Traceback" not in err
    assert [e.recipients[0].address for e, _ in stored(node)] == ["alice@test.example"]
    shard_map = ShardMap(node.settings())
    assert all(not any(shard_map.spool(s).tmp.iterdir()) for s in shard_map.ids())


def test_bad_config_exits_78(node_factory: Callable[..., Node]) -> None:
    node = node_factory(databytes="abc")
    code, err = send(node, "alice@test.example")
    assert code == 78
    assert "databytes" in err and "SHARDMAIL_DATABYTES" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not [p for p in node.var_dir.rglob("*") if p.is_file()]  # nothing queued


def test_bundled_flags_parse_like_getopt() -> None:
    from ingress.inject import parse_args

    for argv in (["-ti", "x@y.example"], ["-it", "x@y.example"]):
        opts = parse_args(argv)
        assert opts.from_headers and opts.ignore_dots and opts.recipients == ["x@y.example"]
    assert parse_args(["-odi", "-oem", "x@y.example"]).recipients == ["x@y.example"]
