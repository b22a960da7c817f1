"""Mailbox quotas of local delivery: the limits that apply, and qmail-ldap's quota warning.

Interface: ``Quota.of(user, settings)`` → ``Quota(size, count)`` (bytes, messages; 0 = no limit; a
false value when neither applies) with ``too_big(size)`` (larger than the whole size quota),
``exceeded(used, count)`` and ``reached(used, count, percent)``; ``warn(maildir, address, used,
count, quota, settings) -> bool``.

The limits are the entry's ``mailQuotaSize`` / ``mailQuotaCount``, else ``ldapdefaultquotasize`` /
``ldapdefaultquotacount``. Usage counts new/ and cur/ (workers.maildir ``usage``). Local delivery
(workers.local) defers a copy that would take the mailbox over either limit (4.2.2: retried until
``queuelifetime``, then bounced) and fails one larger than the whole size quota (5.2.2).

The warning: when a delivery leaves a mailbox at ``quotawarning`` percent or more of its size or
count quota (and when a copy is held back for the quota), a short notice from MAILER-DAEMON is put
straight into that mailbox (past the quota: it is the mailbox owner who must act), at most once
per ``quotawarningperiod`` per mailbox (the maildir's ``quotawarn`` timestamp file). qmail-ldap
warns at a compiled-in 70 % once its ``quotawarning`` text is configured; here the percentage is
the switch (0, the default, is off) and ``quotawarningtext`` adds the site's text.

Failures: a disk error while warning is logged and the warning dropped (the delivery stands).

Settings: ``ldapdefaultquotasize``, ``ldapdefaultquotacount``, ``quotawarning``,
``quotawarningperiod``, ``quotawarningtext``, ``me``.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from dataclasses import dataclass

from core.config import Settings
from core.directory import User
from workers.maildir import HOST, Maildir

log = logging.getLogger("shardmail.quota")


@dataclass(frozen=True, slots=True)
class Quota:
    size: int = 0
    count: int = 0

    @classmethod
    def of(cls, user: User, settings: Settings) -> Quota:
        return cls(user.quota_size if user.quota_size is not None else settings.ldapdefaultquotasize,
                   user.quota_count if user.quota_count is not None else settings.ldapdefaultquotacount)

    def __bool__(self) -> bool:
        return bool(self.size or self.count)

    def too_big(self, size: int) -> bool:
        return bool(self.size) and size > self.size

    def exceeded(self, used: int, count: int) -> bool:
        return bool((self.size and used > self.size) or (self.count and count > self.count))

    def reached(self, used: int, count: int, percent: int) -> bool:
        return percent > 0 and bool((self.size and used * 100 >= percent * self.size)
                                    or (self.count and count * 100 >= percent * self.count))


def warn(maildir: Maildir, address: str, used: int, count: int, quota: Quota, settings: Settings) -> bool:
    """Put a warning into ``maildir`` if its usage reached ``quotawarning`` percent and none went
    there within ``quotawarningperiod``; whether one was put there."""
    if not quota.reached(used, count, settings.quotawarning):
        return False
    try:
        now = maildir.claim_warning(settings.quotawarningperiod)
        if now is None:
            return False
        data = warning(address, used, count, quota, settings, now)
        maildir.deliver(f"{int(now)}.W{time.time_ns()}P{os.getpid()}.{HOST},S={len(data)}", data, retry=False)
    except OSError as exc:
        log.warning("quota warning for %s not delivered: %s", address, exc)
        return False
    log.info("quota warning delivered to %s (%d bytes, %d messages)", address, used, count)
    return True


def _share(part: int, whole: int, unit: str) -> str:
    return f"{part} of {whole} {unit} ({part * 100 // whole} %)"


def warning(address: str, used: int, count: int, quota: Quota, settings: Settings, now: float) -> bytes:
    """The warning as a mailbox file: Return-Path <>, Delivered-To, LF line ends."""
    shares = [_share(used, quota.size, "bytes") if quota.size else "",
              _share(count, quota.count, "messages") if quota.count else ""]
    lines = [
        "Return-Path: <>",
        f"Delivered-To: {address}",
        f"From: Mail Delivery System <MAILER-DAEMON@{settings.me}>",
        f"To: <{address}>",
        "Subject: Your mailbox is nearly full",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: {email.utils.make_msgid('quotawarn', domain=settings.me)}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"Your mailbox {address} holds {' and '.join(s for s in shares if s)} of its quota.",
        "",
        "Once it is full, new mail for you is held back and retried for a while, then returned to",
        "its senders. Please delete or move messages you do not need.",
    ]
    if settings.quotawarningtext:
        lines += ["", *settings.quotawarningtext.replace("\r\n", "\n").split("\n")]
    return ("\n".join(lines) + "\n").encode("utf-8")
