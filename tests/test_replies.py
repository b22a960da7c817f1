"""ingress.replies: the one table of SMTP reply lines (each line's codes agree), the outcome mapping,
and no reply line written anywhere else in the server's code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.auth import AuthResult
from core.outcome import Deferred, Delivered, Failed
from ingress import replies

ROOT = Path(__file__).resolve().parent.parent
REPLY_LITERAL = re.compile(r"""["'][2345]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b""")
TABLE = {name: value for name, value in vars(replies).items() if isinstance(value, replies.Reply)}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_reply_has_matching_codes_and_one_line(name: str) -> None:
    reply = TABLE[name]
    assert 200 <= reply.code < 600 and str(reply.code)[0] == reply.enhanced[0], name
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.enhanced), name
    assert reply.line == f"{reply.code} {reply.enhanced} {reply.text}"
    assert "\r" not in reply.line and "\n" not in reply.line


def test_fields_are_filled_in() -> None:
    assert replies.QUEUED.format(id="0123") == "250 2.0.0 Ok: queued as 0123"
    assert replies.BAD_SENDER.format(why="space").startswith("501 5.1.7 ")
    assert replies.TOO_MANY_CONNECTIONS.format(me="mx.example", what="") == \
        "421 4.7.0 mx.example Too many connections, try again later"


def test_outcomes_become_replies_by_kind() -> None:
    assert replies.outcome(Delivered()) == "250 2.0.0 Ok"
    assert replies.outcome(Deferred("4.3.0", "Queue unavailable")) == "451 4.3.0 Queue unavailable"
    assert replies.outcome(Failed("5.1.1", "No such user")) == "554 5.1.1 No such user"
    assert replies.outcome(Failed("5.1.1", "No such user"), refusal=550) == "550 5.1.1 No such user"


@pytest.mark.parametrize("result", list(AuthResult))
def test_every_auth_result_has_its_reply(result: AuthResult) -> None:
    line = replies.auth(result)
    assert line[:3] == {"ok": "235", "bad": "535", "temporary": "454", "blocked": "454"}[result.value]


def test_no_reply_line_is_written_outside_the_table() -> None:
    """(aiosmtpd's own lines, which the adaptation recognises to rewrite, are marked so and allowed.)"""
    found = [f"{path.relative_to(ROOT)}:{n}" for package in ("core", "ingress", "workers", "scheduler", "ops")
             for path in sorted((ROOT / package).rglob("*.py")) if path.name != "replies.py"
             for n, text in enumerate(path.read_text().splitlines(), 1)
             if REPLY_LITERAL.search(text) and "aiosmtpd's" not in text]
    assert found == []
