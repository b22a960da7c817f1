"""``shardmail ldaplookup -m ADDRESS`` / ``-u UID``: the entry, and what shardmail would do with mail
for it, without sending any.

Interface: ``describe(settings, address=None, uid=None) -> (text, exit status)``.
Exit status: 0 mail would be taken, 67 (EX_NOUSER) refused, 75 (EX_TEMPFAIL) the directory could
not answer or the entry needs fixing, 64 usage.

Settings: those of core.directory, ``me``, ``clusterhosts``, ``ldapmessagestore``, quota defaults,
``smtproutes``, ``deliveryprograms``.
"""

from __future__ import annotations

from core.config import Settings
from core.directory import (
    AmbiguousAddress,
    DirectoryUnavailable,
    UnsafeStore,
    User,
    account_verdict,
    candidates,
    open_directory,
    resolve_store,
)
from core.outcome import EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE


def _entry(user: User) -> list[str]:
    rows = [("dn", user.dn), ("mail", user.mail), ("mailAlternateAddress", ", ".join(user.alternates)),
            ("uid", user.uid), ("accountStatus", user.status), ("mailHost", user.host),
            ("mailMessageStore", user.message_store), ("mailForwardingAddress", ", ".join(user.forwards)),
            ("deliveryMode", ", ".join(sorted(user.modes))), ("deliveryProgramPath", ", ".join(user.programs)),
            ("mailQuotaSize", user.quota_size), ("mailQuotaCount", user.quota_count), ("mailSizeMax", user.size_max),
            ("mailReplyText", user.reply_text[:60] + ("..." if len(user.reply_text) > 60 else ""))]
    return [f"  {name}: {value}" for name, value in rows if value not in ("", None)]


def _plan(settings: Settings, user: User) -> tuple[list[str], int]:
    verdict = account_verdict(user)
    if verdict:
        return [f"refuse: {verdict.status} {verdict.text}"], EX_NOUSER
    own = {settings.me.lower(), *(h.lower() for h in settings.clusterhosts)}
    lines: list[str] = []
    if user.host and user.host not in own:
        relay = next((r for r in settings.smtproutes if r.lower().startswith(user.host + ":")), f"{user.host}:25")
        return [f"cluster: hand over to {user.host} (route {relay})"], EX_OK
    if user.programs and "noprogram" not in user.modes:
        state = "run" if settings.deliveryprograms else "ignored (deliveryprograms is off)"
        lines += [f"program: {p} ({state})" for p in user.programs]
    if "nolocal" not in user.modes:
        try:
            path = resolve_store(settings.message_store_root, user.message_store)
        except UnsafeStore as exc:
            return [*lines, f"refuse to deliver: {exc}"], EX_TEMPFAIL
        size = user.quota_size if user.quota_size is not None else settings.ldapdefaultquotasize
        count = user.quota_count if user.quota_count is not None else settings.ldapdefaultquotacount
        lines.append(f"maildir: {path}/ (quota {size or 'none'} bytes, {count or 'none'} messages)")
    if user.forwards and "noforward" not in user.modes:
        lines.append(f"forward: {', '.join(user.forwards)}")
    if "reply" in user.modes and user.reply_text:
        lines.append(f"auto-reply: once per sender per {settings.autoreplyinterval} s")
    if not lines:
        return ["refuse: 5.7.1 no local delivery and no forwarding address"], EX_NOUSER
    return lines, EX_OK


def describe(settings: Settings, address: str | None = None, uid: str | None = None) -> tuple[str, int]:
    if bool(address) == bool(uid):
        return "give one of -m ADDRESS or -u UID", EX_USAGE
    directory = open_directory(settings)
    try:
        if uid:
            users = directory.backend.search_uid(uid)
            if len(users) > 1:
                raise AmbiguousAddress(f"{len(users)} entries with uid {uid}")
            user = users[0] if users else None
            asked = f"uid {uid}"
        else:
            assert address is not None
            user = directory.lookup(address)
            asked = address
    except DirectoryUnavailable as exc:
        return f"{asked if uid else address}: directory unavailable: {exc}", EX_TEMPFAIL
    except AmbiguousAddress as exc:
        return f"ambiguous: {exc}", EX_TEMPFAIL
    if user is None:
        tried = ", ".join(candidates(address)) if address else uid
        return f"{asked}: no entry (tried {tried})\nrefuse: 5.1.1 No such user here", EX_NOUSER
    plan, status = _plan(settings, user)
    return "\n".join([f"{asked}:", *_entry(user), *plan]), status
