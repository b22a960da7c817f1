"""Users from the directory: LDAP (ldap3) or, with no LDAP configured, an LDIF file with the same
attributes (so ``ldapadd -f users.ldif`` moves them to a real directory unchanged).

Interface: ``User`` (a qmailUser entry, typed), ``open_directory(settings) -> Directory``,
``lookup_outcome(directory, address)`` (the entry, and the refusal or deferral to give, if any),
``LdifFile(path, object_class)`` (the embedded users file, parsed again when it changes; its AUTH
accounts index it too), ``resolve_store(root, mailMessageStore) -> Path`` (raises ``UnsafeStore``
for an absolute path, a ".." or a symbolic link on the way: nothing may resolve outside ``ldapmessagestore``);
``Directory.lookup(address) -> User | None`` runs qmail-ldap's rounds: the exact address, then the
dash-extension catchalls (``a-b-c-catchall@d``, ``a-b-catchall@d``, ``a-catchall@d``, at most four
levels), then ``catchall@d``; each round is one search ``(|(mail=A)(mailAlternateAddress=A))``
(RFC 4515-escaped), optionally and-ed with ``(objectClass=<ldapobjectclass>)``. Results, found or
not, are cached for ``ldapcachettl`` / ``ldapnegcachettl`` seconds.

Failures: ``DirectoryUnavailable`` (temporary, 4.4.3) for LDAP down, slow (``ldaptimeout``),
refusing the bind, or an unreadable LDIF file; ``AmbiguousAddress`` (temporary, 4.3.0) when two
entries match one address: never deliver to a guess; an admin must fix the directory.

Settings: ``ldapserver``, ``ldapbasedn``, ``ldaplogin``, ``ldappassword``, ``ldaptimeout``,
``ldapobjectclass``, ``ldapcachettl``, ``ldapnegcachettl``, ``users_ldif``.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core import metrics
from core.config import Settings
from core.outcome import Deferred, Failed

log = logging.getLogger("shardmail.directory")

ATTRIBUTES = (
    "mail", "mailAlternateAddress", "mailMessageStore", "mailHost", "mailForwardingAddress",
    "deliveryMode", "mailReplyText", "accountStatus", "mailQuotaSize", "mailQuotaCount", "mailSizeMax",
    "deliveryProgramPath", "qmailUID", "qmailGID", "uid", "objectClass", "dkimSigningDomain",
)  # fmt: skip
CATCHALL = "catchall"
MAX_DASH_LEVELS = 4


class DirectoryUnavailable(Exception):
    """The directory could not answer (down, slow, refusing the bind): try again later."""


class AmbiguousAddress(Exception):
    """More than one entry claims the address."""


@dataclass(frozen=True, slots=True)
class User:
    dn: str
    mail: str
    alternates: tuple[str, ...] = ()
    message_store: str = ""
    host: str = ""
    forwards: tuple[str, ...] = ()
    modes: frozenset[str] = frozenset()
    reply_text: str = ""
    status: str = "active"
    quota_size: int | None = None
    quota_count: int | None = None
    size_max: int | None = None
    programs: tuple[str, ...] = ()
    uid: str = ""
    qmail_uid: int | None = None
    qmail_gid: int | None = None
    dkim_domain: str = ""  # dkimSigningDomain (core/schema/shardmail.ldif): core.dkim's signer for this user


def _first(values: Mapping[str, list[str]], name: str) -> str:
    found = values.get(name.lower()) or []
    return str(found[0]) if found else ""


def _integer(values: Mapping[str, list[str]], name: str) -> int | None:
    text = _first(values, name).strip()
    try:
        return int(text) if text else None
    except ValueError:
        log.warning("ignoring non-numeric %s: %r", name, text)
        return None


def user_from_attributes(dn: str, attributes: Mapping[str, Iterable[Any]]) -> User:
    """Build a User from an entry's attributes (names matched case-insensitively)."""
    values = {
        k.lower(): [str(v) for v in (vs if isinstance(vs, list | tuple) else [vs])] for k, vs in attributes.items()
    }
    return User(
        dn=dn,
        mail=_first(values, "mail").lower(),
        alternates=tuple(v.lower() for v in values.get("mailalternateaddress", [])),
        message_store=_first(values, "mailMessageStore"),
        host=_first(values, "mailHost").lower(),
        forwards=tuple(values.get("mailforwardingaddress", [])),
        modes=frozenset(m.strip().lower() for v in values.get("deliverymode", []) for m in v.split(",") if m.strip()),
        reply_text=_first(values, "mailReplyText"),
        status=(_first(values, "accountStatus") or "active").lower(),
        quota_size=_integer(values, "mailQuotaSize"),
        quota_count=_integer(values, "mailQuotaCount"),
        size_max=_integer(values, "mailSizeMax"),
        programs=tuple(values.get("deliveryprogrampath", [])),
        uid=_first(values, "uid"),
        qmail_uid=_integer(values, "qmailUID"),
        qmail_gid=_integer(values, "qmailGID"),
        dkim_domain=_first(values, "dkimSigningDomain").strip().rstrip(".").lower(),
    )


def candidates(address: str) -> list[str]:
    """The addresses to try, in qmail-ldap's order."""
    address = address.lower()
    local, _, domain = address.rpartition("@")
    rounds = [address]
    parts = local.split("-")
    for cut in range(len(parts) - 1, max(0, len(parts) - 1 - MAX_DASH_LEVELS), -1):
        rounds.append(f"{'-'.join(parts[:cut])}-{CATCHALL}@{domain}")
    rounds.append(f"{CATCHALL}@{domain}")
    return list(dict.fromkeys(rounds))


class Backend(Protocol):
    def search(self, address: str) -> list[User]:
        """Entries whose mail or mailAlternateAddress is exactly ``address`` (lower-case)."""

    def search_uid(self, uid: str) -> list[User]:
        """Entries whose uid is exactly ``uid`` (for ``shardmail ldaplookup -u``)."""


class Directory:
    """Lookup rounds and the cache, over a backend (LDAP or LDIF)."""

    def __init__(self, backend: Backend, ttl: float = 30.0, negative_ttl: float = 10.0) -> None:
        self.backend = backend
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._cache: dict[str, tuple[float, User | None]] = {}
        self._lock = threading.Lock()

    def cached(self, address: str) -> tuple[bool, User | None]:
        """(True, answer) when the cache still knows the answer; no I/O."""
        key = address.lower()
        hit = self._cache.get(key)
        if hit and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def lookup(self, address: str) -> User | None:
        known, user = self.cached(address)
        if known:
            return user
        found: User | None = None
        for candidate in candidates(address):
            entries = self.backend.search(candidate)
            if len(entries) > 1:
                raise AmbiguousAddress(f"{len(entries)} entries claim {candidate}: {', '.join(e.dn for e in entries)}")
            if entries:
                found = entries[0]
                break
        expiry = time.monotonic() + (self.ttl if found else self.negative_ttl)
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[address.lower()] = (expiry, found)
        return found


def parse_ldif(text: str) -> list[tuple[str, dict[str, list[str]]]]:
    """Entries of an LDIF file (continuation lines, ``::`` base64 values, comments)."""
    entries: list[tuple[str, dict[str, list[str]]]] = []
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.startswith(" ") and lines:
            lines[-1] += raw[1:]
        elif not raw.startswith("#"):
            lines.append(raw)
    dn = ""
    attributes: dict[str, list[str]] = {}
    for line in [*lines, ""]:
        if not line.strip():
            if dn:
                entries.append((dn, attributes))
            dn, attributes = "", {}
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad LDIF line: {line[:60]!r}")
        if name.lower() == "version" and not dn:
            continue
        value = base64.b64decode(value[1:].strip()).decode("utf-8") if value.startswith(":") else value.strip()
        if name.lower() == "dn":
            dn = value
        else:
            attributes.setdefault(name.strip(), []).append(value)
    return entries


class LdifFile:
    """An LDIF users file's entries (only those of ``object_class``, when given), parsed again when
    the file changes: what the embedded directory and its AUTH accounts both index."""

    def __init__(self, path: str, object_class: str = "") -> None:
        self.path = path
        self.object_class = object_class.lower()
        self._stamp: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def refresh(self, build: Callable[[list[tuple[str, dict[str, list[str]]]]], None]) -> None:
        """Call ``build`` with the entries when the file is new or changed since it was last built
        ([] while it is missing); a caller meanwhile waits for that build, never sees a half-made
        index. Raises ``DirectoryUnavailable`` when the file cannot be read or parsed."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                build([])
                self._stamp = None
            return
        except OSError as exc:
            raise DirectoryUnavailable(f"users file {self.path}: {exc.strerror}") from None
        stamp = (info.st_mtime, info.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                with open(self.path, encoding="utf-8") as handle:
                    entries = parse_ldif(handle.read())
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise DirectoryUnavailable(f"users file {self.path}: {exc}") from None
            if self.object_class:
                entries = [(dn, attributes) for dn, attributes in entries if self.object_class in {
                    c.lower() for k, vs in attributes.items() if k.lower() == "objectclass" for c in vs}]
            build(entries)
            self._stamp = stamp


class LdifBackend:
    """The embedded directory: an LDIF file, re-read when it changes."""

    def __init__(self, path: str, object_class: str = "") -> None:
        self.path = path
        self.file = LdifFile(path, object_class)
        self._index: dict[str, list[User]] = {}

    def _load(self) -> None:
        self.file.refresh(self._build)

    def _build(self, entries: list[tuple[str, dict[str, list[str]]]]) -> None:
        index: dict[str, list[User]] = {}
        for dn, attributes in entries:
            user = user_from_attributes(dn, attributes)
            for address in {user.mail, *user.alternates} - {""}:
                index.setdefault(address, []).append(user)
        self._index = index

    def search(self, address: str) -> list[User]:
        self._load()
        return list(self._index.get(address.lower(), []))

    def search_uid(self, uid: str) -> list[User]:
        self._load()
        return list({u.dn: u for users in self._index.values() for u in users if u.uid == uid}.values())


class LdapBackend:
    """ldap3 searches on the first of ``ldapserver`` that answers, one connection per thread."""

    def __init__(self, settings: Settings) -> None:
        import ldap3
        from ldap3.core.exceptions import LDAPException

        self._ldap3 = ldap3
        self._ldap_error = LDAPException
        # Failover by hand: ldap3's active ServerPool sleeps between rounds when all servers are
        # down (10 s), far beyond ldaptimeout; here each server costs at most one connect timeout.
        # get_info=NONE: no schema read at every bind (an extra search per connection), and no
        # schema on the shared Server objects, which ldap3 swaps unguarded while another thread's
        # search reads it (seen: AttributeError 'NoneType' ... 'attribute_types' when several
        # threads bound at once)
        self.servers = [ldap3.Server(url, connect_timeout=settings.ldaptimeout, get_info=ldap3.NONE)
                        for url in settings.ldapserver]
        self.base = settings.ldapbasedn
        self.login = settings.ldaplogin or None
        self.password = settings.ldappassword or None
        self.timeout = settings.ldaptimeout
        self.object_class = settings.ldapobjectclass
        self._local = threading.local()

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        problems = []
        for server in self.servers:
            try:
                conn = self._ldap3.Connection(
                    server, user=self.login, password=self.password, receive_timeout=self.timeout,
                    auto_bind=self._ldap3.AUTO_BIND_NO_TLS if self.login else True, read_only=True,
                    client_strategy=self._ldap3.SYNC, raise_exceptions=False,
                )
            except self._ldap_error as exc:
                problems.append(f"{server.host}: {exc}")
                continue
            self._local.conn = conn
            return conn
        raise DirectoryUnavailable("no LDAP server answered: " + "; ".join(problems))

    def _filter(self, address: str, by_uid: bool = False) -> str:
        from ldap3.utils.conv import escape_filter_chars

        escaped = escape_filter_chars(address)
        match = f"(uid={escaped})" if by_uid else f"(|(mail={escaped})(mailAlternateAddress={escaped}))"
        if self.object_class:
            return f"(&(objectClass={escape_filter_chars(self.object_class)}){match})"
        return match

    def search_uid(self, uid: str) -> list[User]:
        return self.search(uid, by_uid=True)

    def search(self, address: str, by_uid: bool = False) -> list[User]:
        if any(ord(c) < 0x20 or c == "\x7f" for c in address):
            return []  # no address holds one; and slapd reads an escaped NUL as the end of the value
        ldap3 = self._ldap3
        try:
            conn = self._connection()
            ok = conn.search(self.base, self._filter(address, by_uid), ldap3.SUBTREE, attributes=list(ATTRIBUTES),
                             size_limit=2, time_limit=max(1, int(self.timeout)))
        except ldap3.core.exceptions.LDAPException as exc:
            self._local.conn = None
            raise DirectoryUnavailable(f"LDAP: {exc}") from None
        except OSError as exc:
            self._local.conn = None
            raise DirectoryUnavailable(f"LDAP: {exc}") from None
        result = conn.result or {}
        if not ok and result.get("result") not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
            self._local.conn = None
            why = f"{result.get('description')} {result.get('message')}"
            raise DirectoryUnavailable(f"LDAP search failed: {why}")
        entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        return [user_from_attributes(e["dn"], e["attributes"]) for e in entries]


class UnsafeStore(ValueError):
    """A mailMessageStore that would lead outside the message store root."""


def resolve_store(root: Path, store: str) -> Path:
    """``root/store``, refusing anything that could resolve outside ``root``."""
    if not store or store.startswith("/") or "\x00" in store:
        raise UnsafeStore(f"mailMessageStore {store!r} must be a relative path")
    parts = [p for p in store.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UnsafeStore(f"mailMessageStore {store!r} climbs out of the store")
    path = root
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            break  # created on first delivery, by us
        if stat.S_ISLNK(mode):
            raise UnsafeStore(f"mailMessageStore {store!r} passes through a symbolic link at {path}")
    return path


def account_verdict(user: User | None) -> Failed | None:
    """Why mail for this entry must be refused (at RCPT time and at delivery), or None."""
    if user is None or user.status == "deleted":
        return Failed("5.1.1", "No such user here")
    if user.status == "disabled":
        return Failed("5.2.1", "Mailbox disabled, not accepting messages")
    return None


def lookup_outcome(directory: Directory, address: str) -> tuple[User | None, Failed | Deferred | None]:
    """The entry for an address and, when mail for it cannot be taken now, the outcome to give."""
    try:
        user = directory.lookup(address)
    except DirectoryUnavailable as exc:
        log.warning("directory unavailable looking up %s: %s", address, exc)
        metrics.directory_error(directory.backend)
        return None, Deferred("4.4.3", "Directory server unavailable, try again later")
    except AmbiguousAddress as exc:
        log.error("ambiguous directory entries: %s", exc)
        return None, Deferred("4.3.0", "Directory lookup ambiguous, try again later")
    return user, account_verdict(user)


def open_directory(settings: Settings) -> Directory:
    if settings.ldapserver:
        backend: Backend = LdapBackend(settings)
    else:
        backend = LdifBackend(settings.users_file, settings.ldapobjectclass)
    return Directory(backend, settings.ldapcachettl, settings.ldapnegcachettl)
