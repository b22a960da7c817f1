"""``shardmail sendmail``: the sendmail-compatible way for local programs to queue a message.

Interface: ``main(argv, stdin, settings_loader) -> int`` (an exit status). Options as Postfix's
sendmail takes them: ``-t`` (recipients from To/Cc/Bcc, added to those on the command line; Bcc
is removed), ``-f sender`` / ``-r sender``, ``-F full name``, ``-i`` / ``-oi`` (a lone "." does not
end the input), ``-C config``; ``-bm`` (the default), and the usual no-op options (``-odi``,
``-oem``, ``-v``, ``-N dsn``, ``-B type``...). Date, Message-ID and From are added when missing.

VERP (core.verp): ``-XV`` or ``-V`` asks for it with the ``verpdelimiters`` setting, ``-XVxy`` or
``-Vxy`` with the delimiters ``x`` and ``y`` (two of ``-+=``), as Postfix's sendmail takes them;
``-V`` followed by anything else is sendmail's DSN envelope id, ignored (write it attached,
``-Venvid``: ``-V`` alone asks for VERP). qmail's spelling works too: ``-f prefix-@host-@[]``
is ``-f prefix@host -XV-=``. VERP needs a sender (not ``-f ''``) and a spooling node.

Failures, as exit statuses (sysexits, like Postfix): 0 queued; 64 bad usage or no recipient;
65 malformed address or message; 74 unreadable input; 75 the queue is unavailable (spool or
Redis fault; try again later); 78 bad configuration.

With ``role = "ingress"`` the message goes to a queue node over QMQP (ingress.handover) instead of
this node's spool; the exit status says the same things.

Settings: ``me``, ``databytes``, ``role``, plus those of core.submit (or ingress.handover).
"""

from __future__ import annotations

import asyncio
import email.utils
import getpass
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from core.address import check_mailbox
from core.config import ConfigError, Settings, load
from core.envelope import Client
from core.outcome import EX_CONFIG, EX_DATAERR, EX_IOERR, EX_OK, EX_USAGE, QueueRefused, QueueUnavailable, exit_code
from core.verp import ALLOWED, qmail_form, valid_delimiters

if TYPE_CHECKING:
    from ingress.handover import Handover

_IGNORED_WITH_ARG = {"N", "B", "R", "L", "O", "p", "X", "h"}
_IGNORED_FLAGS = {"v", "m", "n", "U", "G", "bm"}
_BUNDLED = set("tivmnUG")  # flags without an argument, which getopt lets one write together


class UsageError(Exception):
    pass


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False
    ignore_dots: bool = False
    config: str | None = None
    recipients: list[str] = field(default_factory=list)
    verp: str | None = None  # "" = VERP with the configured delimiters; "xy" = with these; None = none


def parse_args(argv: list[str]) -> Options:
    """sendmail's option syntax: ``-fuser`` and ``-f user`` alike, ``-o`` options, ``--`` ends them."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients.extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        flag, rest = arg[1:2], arg[2:]
        if rest and flag in _BUNDLED and all(c in _BUNDLED for c in rest):
            args[:0] = [f"-{c}" for c in rest]  # getopt-style bundles: -ti = -t -i
            rest = ""

        def value(flag: str = flag, rest: str = rest) -> str:
            if rest:
                return rest
            if not args:
                raise UsageError(f"option -{flag} requires an argument")
            return args.pop(0)

        if flag == "V" or (flag == "X" and rest.startswith("V")):
            delimiters = rest[1:] if flag == "X" else rest
            if flag == "V" and delimiters and not valid_delimiters(delimiters):
                continue  # -Venvid: sendmail's DSN envelope id, ignored as before
            if delimiters and not valid_delimiters(delimiters):
                raise UsageError(f"-XV needs two characters from {ALLOWED}, not {delimiters!r}")
            opts.verp = delimiters
        elif flag in ("f", "r"):
            opts.sender = value()
        elif flag == "F":
            opts.full_name = value()
        elif flag == "t" and not rest:
            opts.from_headers = True
        elif flag == "i" and not rest:
            opts.ignore_dots = True
        elif flag == "C":
            opts.config = value()
        elif flag == "o":
            option = value()
            if option == "i":
                opts.ignore_dots = True
        elif flag == "b":
            mode = value()
            if mode != "m":
                raise UsageError(f"-b{mode} is not supported (use 'shardmail status' for the queue)")
        elif flag in _IGNORED_WITH_ARG:
            value()
        elif arg[1:] in _IGNORED_FLAGS or flag in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option {arg}")
    return opts


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """Input with CRLF line endings; without -i a line holding only "." ends it."""
    lines = []
    size = 0
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if not ignore_dots and line == b".":
            break
        lines.append(line)
        size += len(line) + 2
        if limit and size > limit:
            raise ValueError(f"message larger than databytes ({limit})")
    return b"".join(line + b"\r\n" for line in lines)


_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def split_headers(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields as (lower-cased name, raw lines with folds) and the rest of the message."""
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\r\n", pos)
        end = len(message) if end < 0 else end + 2
        line = message[pos:end]
        if line in (b"\r\n", b""):
            return fields, message[pos:]
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            match = _FIELD.match(line)
            if not match:
                return fields, message[pos:]  # not a header: the body starts here
            fields.append((match.group(1).lower(), line))
        pos = end
    return fields, b""


def _field_value(raw: bytes) -> str:
    value = raw.split(b":", 1)[1]
    return re.sub(r"\r\n[ \t]", " ", value.decode("utf-8", "replace")).strip()


def prepare(message: bytes, opts: Options, me: str, login: str) -> tuple[str, list[str], bytes]:
    """Envelope sender, recipients and the message with missing headers added (and Bcc removed)."""
    fields, rest = split_headers(message)
    names = {name for name, _ in fields}
    recipients = list(opts.recipients)
    if opts.from_headers:
        values = [_field_value(raw) for name, raw in fields if name in (b"to", b"cc", b"bcc")]
        recipients += [addr for _, addr in email.utils.getaddresses(values) if addr]
        fields = [(n, raw) for n, raw in fields if n != b"bcc"]
    recipients = [r if "@" in r else f"{r}@{me}" for r in recipients]
    sender = opts.sender if opts.sender is not None else f"{login}@{me}"
    if sender and (qmail := qmail_form(sender)) is not None:  # qmail's prefix-@host-@[]: VERP with -=
        sender, opts.verp = qmail
    if sender and "@" not in sender:
        sender = f"{sender}@{me}"
    added = []
    if b"from" not in names:
        added.append(f"From: {email.utils.formataddr((opts.full_name or '', sender or f'{login}@{me}'))}")
    if b"date" not in names:
        added.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if b"message-id" not in names:
        added.append(f"Message-ID: {email.utils.make_msgid(domain=me)}")
    head = b"".join(raw for _, raw in fields) + b"".join(a.encode("utf-8") + b"\r\n" for a in added)
    if not rest.startswith(b"\r\n"):
        rest = b"\r\n" + rest
    return sender, recipients, head + rest


def main(argv: list[str], stdin: BinaryIO | None = None,
         loader: Callable[[str | None], Settings] = load) -> int:
    stdin = stdin if stdin is not None else sys.stdin.buffer
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        settings = loader(opts.config)
    except ConfigError as exc:
        print(f"sendmail: configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        message = read_message(stdin, opts.ignore_dots, settings.databytes)
    except ValueError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"sendmail: cannot read the message: {exc}", file=sys.stderr)
        return EX_IOERR
    login = _login()
    sender, recipients, message = prepare(message, opts, settings.me, login)
    if not recipients:
        print("sendmail: no recipient addresses found", file=sys.stderr)
        return EX_USAGE
    verp = "" if opts.verp is None else opts.verp or settings.verpdelimiters
    if verp and not sender:
        print("sendmail: -V option requires non-null sender address", file=sys.stderr)
        return EX_USAGE
    for address in ([sender] if sender else []) + recipients:
        problem = check_mailbox(address, smtputf8=True)
        if problem:
            print(f"sendmail: bad address <{address}>: {problem}", file=sys.stderr)
            return EX_DATAERR
    from core.redis_conn import connect
    from core.submit import Draft, Submitter

    submitter: Submitter | Handover
    try:
        submitter = Submitter(settings, connect(settings)) if settings.role == "node" else _handover(settings)
    except ConfigError as exc:  # a DKIM key that cannot be read: no mail goes out unsigned
        print(f"sendmail: configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    message_id = submitter.new_id()
    received = (f"Received: (shardmail {message_id} invoked by {login});"
                f" {email.utils.formatdate(localtime=True)}\r\n").encode()
    smtputf8 = not all(a.isascii() for a in [sender, *recipients])
    draft = Draft(message_id, sender, recipients, received + message, Client(protocol="local", user=login), smtputf8,
                  verp=verp)
    try:
        if isinstance(submitter, Submitter):
            submitter.accept(draft)
        else:  # an ingress-only node: a queue node's K stands for our commit
            asyncio.run(submitter.commit(draft))
    except QueueUnavailable as exc:
        print(f"sendmail: {exc.outcome.status} {exc.outcome.text}; try again later", file=sys.stderr)
        return exit_code(exc.outcome)
    except QueueRefused as exc:
        print(f"sendmail: {exc.outcome.status} {exc.outcome.text}", file=sys.stderr)
        return exit_code(exc.outcome)
    return EX_OK


def _handover(settings: Settings) -> Handover:
    from core.nodes import Registry
    from core.redis_conn import connect_shared
    from ingress.handover import Handover

    return Handover(settings, None if settings.qmqpservers else Registry.of(settings, connect_shared(settings)))


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "nobody"
