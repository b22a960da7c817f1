"""Local delivery of one recipient, with qmail-ldap's semantics, and of a claimed batch.

Interface: ``LocalDelivery(settings, directory, submitter, conn)`` with
``deliver(envelope, index, body) -> Outcome`` (each Maildir copy made durable on its own),
``deliver_batch(loaded) -> outcomes`` (``loaded``: (envelope, body) pairs; per message, (index,
outcome) for each pending local recipient) and ``plain(envelope)``; ``MAILDIR_ONLY`` (how the
outcome texts of a mere Maildir copy begin). In a batch, a recipient whose whole delivery is one
Maildir copy (no program, forward, reply or quota) is only staged; the batch's staged copies are
then made durable together (workers.maildir ``commit``: two syncfs for the batch) before any of
its outcomes is returned. ``plain(envelope)`` says whether the directory cache already knows
every pending local recipient of a message as such a copy (the messages worth batching).

For the recipient's entry, in this order:
- ``accountStatus``: deleted → 5.1.1, disabled → 5.2.1, noaccess delivers;
- more than ``maxhops`` Received/Delivered-To lines, counting the one each path adds (core.hops)
  → 5.4.6, before any copy, forward or hand-over;
- ``mailHost`` that is not this node (``me``, ``clusterhosts``): handed to that node over SMTP
  (workers.cluster), or 5.4.6 if a peer sent it here already;
- ``mailSizeMax`` → 5.2.3; a ``Delivered-To`` for this address already in the header → 5.4.6;
- ``deliveryProgramPath`` unless ``noprogram``, only with ``deliveryprograms = true`` (workers.program);
- the Maildir under ``ldapmessagestore`` unless ``deliveryMode: nolocal``, with quotas
  (workers.quota: ``mailQuotaSize``/``mailQuotaCount`` or the defaults): over quota → 4.2.2
  (retried until the lifetime), larger than the whole quota → 5.2.2; past ``quotawarning`` percent,
  a warning into the mailbox once per ``quotawarningperiod``;
- ``mailForwardingAddress`` unless ``noforward``: a new message through core.submit with the
  same envelope sender and a Delivered-To line;
- the autoresponder for ``deliveryMode: reply`` (RFC 3834; once per sender per ``autoreplyinterval``).

For a message with VERP (core.verp), "the envelope sender" above is the recipient's VERP address,
as qmail-local sees it: the Return-Path of the copy, ``SENDER`` of a program, the sender of a
forward (which itself asks for no VERP) and of a cluster hand-over, the address an autoreply goes to.

Failures: directory down → 4.4.3; a disk error → 4.3.0; an unsafe mailMessageStore → 4.3.5
(a configuration error: kept queued and logged until an admin fixes the entry). Never raises for
a delivery problem: outcomes are values.

Settings: ``me``, ``clusterhosts``, ``ldapmessagestore``, ``maxhops``, ``autoreplyinterval``,
``redis_prefix``, ``deliveryprograms``, plus those of workers.quota.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import replace

import redis

from core import hops
from core.address import clean_for_header
from core.config import Settings
from core.directory import Directory, UnsafeStore, User, lookup_outcome, resolve_store
from core.envelope import Envelope
from core.outcome import Deferred, Delivered, Failed, Outcome, QueueUnavailable
from core.submit import Draft, Submitter
from workers.cluster import ClusterForwarder, is_hop
from workers.maildir import Maildir, Staged, commit, discard, file_name
from workers.program import run_program
from workers.quota import Quota, warn

log = logging.getLogger("shardmail.local")
MAILDIR_ONLY = ("delivered to maildir", "already in the maildir")  # outcome texts of a mere Maildir copy

_LIST_HEADERS = re.compile(rb"^(list-id|list-unsubscribe|list-post|mailing-list|x-mailing-list):", re.I | re.M)
_BULK = re.compile(rb"^precedence:[ \t]*(bulk|list|junk)", re.I | re.M)
_AUTO = re.compile(rb"^auto-submitted:[ \t]*(?!no\b)", re.I | re.M)
_NO_REPLY_SENDERS = re.compile(r"^(mailer-daemon|postmaster|listserv|majordomo|owner-.*|.*-request|.*-owner)@", re.I)


FIRST_ATTEMPT_WINDOW = 30.0  # s; any retry (backoff, or a crash then the sweep) comes >= 100 s after birth


def _maybe_retry(envelope: Envelope, index: int) -> bool:
    """Whether an earlier attempt may have left a copy that a reader has since moved to cur/: the
    recipient was attempted before (a mark), or the message is older than a first attempt is."""
    return envelope.states()[index] is not None or time.time() - envelope.birth > FIRST_ATTEMPT_WINDOW


def header_block(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


class LocalDelivery:
    def __init__(self, settings: Settings, directory: Directory, submitter: Submitter, conn: redis.Redis) -> None:
        self.settings = settings
        self.directory = directory
        self.submitter = submitter
        self.conn = conn
        self.own_names = {settings.me.lower(), *(h.lower() for h in settings.clusterhosts)}
        self.cluster = ClusterForwarder(settings)

    def stageable(self, user: User | None) -> bool:
        """Whether mail for this entry is exactly one Maildir copy here (what a batch may stage)."""
        if user is None or user.status in ("deleted", "disabled") or "nolocal" in user.modes:
            return False
        if user.host and user.host not in self.own_names:
            return False
        if user.forwards and "noforward" not in user.modes:
            return False
        if ("reply" in user.modes and user.reply_text) or (user.programs and "noprogram" not in user.modes):
            return False
        return not Quota.of(user, self.settings)

    def plain(self, envelope: Envelope) -> bool:
        """Every pending local recipient is an entry the directory cache knows, whose mail is one
        Maildir copy (nothing a batch must wait for: no look-up, program, forward or quota)."""
        for index in envelope.pending("local"):
            known, user = self.directory.cached(envelope.recipients[index].address)
            if not known or not self.stageable(user):
                return False
        return True

    def deliver(self, envelope: Envelope, index: int, body: bytes) -> Outcome:
        outcome = self._deliver(envelope, index, body, None)
        assert not isinstance(outcome, Staged)  # nothing is staged without a batch
        return outcome

    def deliver_batch(self, loaded: Sequence[tuple[Envelope, bytes]]) -> list[list[tuple[int, Outcome]]]:
        """Per message of ``loaded``, (index, outcome) of each pending local recipient; the batch's
        plain Maildir copies become durable together, before this returns."""
        batch: list[Staged] = []
        try:
            results = [[(i, self._deliver(envelope, i, body, batch)) for i in envelope.pending("local")]
                       for envelope, body in loaded]
        except BaseException:
            discard(batch)
            raise
        committed = dict(zip(map(id, batch), commit(batch), strict=True)) if batch else {}
        return [[(i, _resolve(outcome, committed)) for i, outcome in outcomes] for outcomes in results]

    def _deliver(self, envelope: Envelope, index: int, body: bytes, batch: list[Staged] | None
                 ) -> Outcome | Staged:
        address = envelope.recipients[index].address
        if envelope.verp:  # this recipient's envelope sender everywhere below: Return-Path, SENDER, forwards
            envelope = replace(envelope, sender=envelope.sender_for(index), verp="")
        user, verdict = lookup_outcome(self.directory, address)
        if verdict is not None:
            return verdict
        assert user is not None
        headers = header_block(body)
        looping = hops.check(headers, self.settings.maxhops, added=1)  # our Delivered-To, or the peer's Received
        if looping is not None:
            return looping
        if user.host and user.host not in self.own_names:
            if is_hop(headers):
                return Failed("5.4.6", f"Cluster loop: mailHost {user.host} sent it back")
            return self.cluster.forward(envelope, address, body, user.host)
        if user.size_max and envelope.size > user.size_max:
            return Failed("5.2.3", f"Message larger than the recipient accepts ({user.size_max} bytes)")
        if b"delivered-to:" in headers.lower() and re.search(  # (a pattern per address: only when needed)
                rb"^delivered-to:[ \t]*" + re.escape(address.encode()) + rb"[ \t]*\r?$", headers, re.I | re.M):
            return Failed("5.4.6", "Mail loop: message already delivered to this address")
        outcome: Outcome | Staged = Delivered("delivered")
        acted = False
        if user.programs and "noprogram" not in user.modes and self.settings.deliveryprograms:
            message = self.local_copy(envelope, address, body)
            for command in user.programs:
                outcome, stop = run_program(command, message, envelope, address, self.settings)
                if not isinstance(outcome, Delivered) or stop:
                    return outcome
            acted = True
        elif user.programs and "noprogram" not in user.modes:
            log.warning("deliveryProgramPath of %s ignored: deliveryprograms is off", user.dn)
        if "nolocal" not in user.modes:
            if batch is not None and self.stageable(user):
                return self.to_maildir(envelope, index, user, address, body, batch)
            outcome = self.to_maildir(envelope, index, user, address, body)
            if not isinstance(outcome, Delivered):
                return outcome
            acted = True
        if user.forwards and "noforward" not in user.modes:
            forwarded = self.forward(envelope, user, address, body)
            if not isinstance(forwarded, Delivered):
                return forwarded
            outcome, acted = forwarded, True
        if not acted:
            return Failed("5.7.1", "Recipient takes no local delivery and has no forwarding address")
        if "reply" in user.modes and user.reply_text:
            self.autoreply(envelope, user, address, headers)
        return outcome

    def to_maildir(self, envelope: Envelope, index: int, user: User, address: str, body: bytes,
                   batch: list[Staged] | None = None) -> Outcome | Staged:
        try:
            path = resolve_store(self.settings.message_store_root, user.message_store)
        except UnsafeStore as exc:
            log.error("refusing to deliver to %s (%s): %s", address, user.dn, exc)
            return Deferred("4.3.5", "Mailbox location misconfigured; postmaster notified")
        data = self.local_copy(envelope, address, body)
        maildir = Maildir(path)
        name = file_name(envelope.birth, envelope.id, index, len(data))
        quota = Quota.of(user, self.settings)
        after: tuple[int, int] | None = None  # the mailbox's usage with this copy, where a quota applies
        try:
            if quota.too_big(len(data)):
                return Failed("5.2.2", "Message larger than the recipient's whole mailbox quota")
            retry = _maybe_retry(envelope, index)
            if batch is not None:
                staged = maildir.stage(name, data, retry=retry)
                if isinstance(staged, Staged):
                    batch.append(staged)
                    return staged
                if staged is False:
                    return Delivered("already in the maildir (earlier attempt)")
            if quota and not maildir.has(name, look_in_cur=retry):
                used, count = maildir.usage()
                if quota.exceeded(used + len(data), count + 1):  # held back: warn as if it had fitted
                    warn(maildir, address, used + len(data), count + 1, quota, self.settings)
                    return Deferred("4.2.2", "Mailbox over quota")
                after = used + len(data), count + 1
            fresh = maildir.deliver(name, data, retry=retry)
        except OSError as exc:
            log.error("maildir delivery to %s failed: %s", path, exc)
            return Deferred("4.3.0", f"Mailbox write failed: {exc.strerror}")
        if fresh and after is not None:
            warn(maildir, address, *after, quota, self.settings)
        return Delivered("delivered to maildir" if fresh else "already in the maildir (earlier attempt)")

    @staticmethod
    def local_copy(envelope: Envelope, address: str, body: bytes) -> bytes:
        """The message as a local mailbox or program sees it: Return-Path, Delivered-To, LF lines."""
        prefix = f"Return-Path: <{clean_for_header(envelope.sender, 998)}>\r\nDelivered-To: {address}\r\n".encode()
        return (prefix + body).replace(b"\r\n", b"\n")

    def forward(self, envelope: Envelope, user: User, address: str, body: bytes) -> Outcome:
        targets = [a for a in user.forwards if "@" in a]
        if not targets:
            return Delivered("no forwarding address")
        draft = Draft(self.submitter.new_id(), envelope.sender, targets,
                      f"Delivered-To: {address}\r\n".encode() + body, smtputf8=envelope.smtputf8)
        try:
            forwarded = self.submitter.accept(draft)
        except QueueUnavailable as exc:
            return exc.outcome
        return Delivered(f"forwarded as {forwarded.id}")

    def autoreply(self, envelope: Envelope, user: User, address: str, headers: bytes) -> None:
        """RFC 3834: never to <>, lists, bulk or automatic mail; once per sender per interval."""
        sender = envelope.sender
        if not sender or _NO_REPLY_SENDERS.match(sender) or sender.lower() == address.lower():
            return
        if _AUTO.search(headers) or _BULK.search(headers) or _LIST_HEADERS.search(headers):
            return
        pair = hashlib.sha1(f"{address}\0{sender}".lower().encode()).hexdigest()
        key = f"{self.settings.redis_prefix}:replied:{pair}"  # no node name: once per period for the cluster
        try:
            if not self.conn.set(key, "1", nx=True, ex=self.settings.autoreplyinterval):
                return
        except redis.RedisError as exc:
            log.warning("autoreply for %s skipped: Redis unavailable (%s)", address, exc)
            return
        subject = re.search(rb"^subject:[ \t]*(.*(?:\r\n[ \t].*)*)", headers, re.I | re.M)
        original = subject.group(1).decode("utf-8", "replace").replace("\r\n", "") if subject else ""
        message_id = re.search(rb"^message-id:[ \t]*(<[^>\r\n]*>)", headers, re.I | re.M)
        lines = [
            f"From: <{address}>",
            f"To: <{sender}>",
            f"Subject: Auto: {original[:200]}".rstrip(),
            f"Date: {email.utils.formatdate(localtime=True)}",
            f"Message-ID: {email.utils.make_msgid(domain=self.settings.me)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        if message_id:
            ref = message_id.group(1).decode("ascii", "replace")
            lines += [f"In-Reply-To: {ref}", f"References: {ref}"]
        text = user.reply_text.replace("\r\n", "\n").replace("\n", "\r\n")
        reply = ("\r\n".join(lines) + "\r\n\r\n" + text + "\r\n").encode("utf-8")
        try:
            self.submitter.accept(Draft(self.submitter.new_id(), "", [sender], reply))
        except QueueUnavailable as exc:
            log.warning("autoreply from %s to %s not queued: %s", address, sender, exc)


def _resolve(outcome: Outcome | Staged, committed: dict[int, bool | OSError]) -> Outcome:
    """A staged copy's outcome once its batch was committed."""
    if not isinstance(outcome, Staged):
        return outcome
    result = committed[id(outcome)]
    if result is True:
        return Delivered("delivered to maildir")
    if result is False:
        return Delivered("already in the maildir (earlier attempt)")
    log.error("maildir delivery to %s failed: %s", outcome.maildir.path, result)
    return Deferred("4.3.0", f"Mailbox write failed: {result.strerror}")
