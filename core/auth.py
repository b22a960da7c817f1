"""SMTP AUTH credentials checked against the directory, and AUTH failures throttled through Redis.

Interface: ``Authenticator(settings, directory, throttle=None)``; ``await authenticator.verify(login,
password, peer_ip) -> AuthVerdict`` (``result`` ok | bad | temporary | blocked, ``mail`` of the
account for the Received header, ``reason`` for the log only; ingress.replies turns the result into the SMTP line);
``authenticator.check(...)`` is the same, blocking. ``AuthThrottle(conn, prefix, settings)`` with
``allowed(ip, login) -> bool`` (one MGET) and ``failed(ip, login)`` (one pipelined round trip);
``ThrottleUnavailable``. ``Authenticator.close()`` stops its threads.

Lookup: a login with "@" is matched exactly against ``mail`` or ``mailAlternateAddress`` (never the
catchall rounds of delivery: a catchall's password must not open every address), a login without
"@" against ``uid`` (as qmail-ldap's auth does), and-ed with ``ldapobjectclass``; the LDAP searches
reuse ``core.directory.LdapBackend``'s servers, failover, timeouts and per-thread connections, the
embedded LDIF directory is read from the same file as the delivery lookups. Nothing is cached: a
changed password or status counts at once. ``ldaprebind``: the password is checked by a simple bind
as the entry's DN on a fresh connection (never the pooled one); else ``userPassword`` is compared
(``core.passwords``; any of several values may match).

No enumeration: an unknown login, a wrong password, two entries for one login, an entry without
a password and an account that is ``disabled``, ``deleted`` or ``noaccess`` all give the same
``bad`` verdict and reply (535 5.7.8). The password check always runs: for an unknown login
against an imitation of the last real hash seen (same scheme and cost; sha512-crypt until one is
seen), or with ``ldaprebind`` a bind as a DN that does not exist; and a bad verdict is returned no
sooner than ``authfaildelay`` ms after the check began (an asyncio sleep, no thread held).

The failure counts (``<prefix>:authfail:ip:<net>``, ``<prefix>:authfail:user:<login>``) carry no
node name: a guesser is throttled by the whole cluster, whichever nodes it tries.

Failures: the directory down, slow (``ldaptimeout``) or refusing our bind -> ``temporary``
(454 4.7.0); Redis unreachable for the throttle -> ``temporary`` too: failing closed, because an
open door while Redis is down would let a brute force through unthrottled. Over a throttle limit
-> ``blocked`` (454 4.7.0; the SMTP layer may also disconnect), without looking at the password.
An empty password is ``bad`` without any bind (an LDAP bind with an empty password is anonymous).

Settings: ``ldaprebind``, ``authcleartext``, ``authfailmaxip``, ``authfailmaxuser``,
``authfailwindow``, ``authfaildelay``, ``redis_prefix``; through core.directory ``ldapserver``,
``ldapbasedn``, ``ldaplogin``, ``ldappassword``, ``ldaptimeout``, ``ldapobjectclass``, ``users_ldif``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from core import metrics, passwords
from core.config import Settings
from core.directory import Directory, DirectoryUnavailable, LdapBackend, LdifBackend, LdifFile

log = logging.getLogger("shardmail.auth")

AUTH_THREADS = 4  # concurrent checks per process; each holds one pooled LDAP connection
MAX_LOGIN = 320  # RFC 5321's longest address
REFUSED_STATUSES = frozenset({"disabled", "deleted", "noaccess"})
LDAP_REJECTED_BIND = frozenset({48, 49, 50, 53})  # inappropriateAuth, invalidCredentials, insufficientAccess, unwilling
NO_SUCH_DN = "cn=shardmail-no-such-user"


class AuthResult(enum.Enum):
    OK = "ok"
    BAD = "bad"
    TEMPORARY = "temporary"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    result: AuthResult
    mail: str = ""  # the account's primary address (ok only)
    reason: str = ""  # for the log; never sent to the client

    @property
    def ok(self) -> bool:
        return self.result is AuthResult.OK


@dataclass(frozen=True, slots=True)
class Account:
    dn: str
    mail: str
    status: str
    passwords: tuple[str, ...]


class ThrottleUnavailable(Exception):
    """Redis could not answer; AUTH must be refused for now (fail closed)."""


def _normal_login(login: str) -> str:
    return login.strip().lower()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


def _account(dn: str, attributes: dict[str, Any]) -> Account:
    values = {k.lower(): (v if isinstance(v, list | tuple) else [v]) for k, v in attributes.items()}
    first = [_text(v) for v in values.get("mail", [])[:1]]
    status = [_text(v) for v in values.get("accountstatus", [])[:1]]
    return Account(dn=dn, mail=(first[0] if first else "").lower(), status=(status[0] if status else "active").lower(),
                   passwords=tuple(_text(v) for v in values.get("userpassword", [])))


class LdapAccounts:
    """Entries and binds on the LDAP servers of a ``LdapBackend`` (its pool serves the searches)."""

    def __init__(self, backend: LdapBackend, rebind: bool) -> None:
        self.backend = backend
        self.attributes = ["mail", "accountStatus"] + ([] if rebind else ["userPassword"])

    def find(self, login: str) -> list[Account]:
        backend, ldap3 = self.backend, self.backend._ldap3
        try:
            conn = backend._connection()
            ok = conn.search(backend.base, backend._filter(login, by_uid="@" not in login), ldap3.SUBTREE,
                             attributes=self.attributes, size_limit=2, time_limit=max(1, int(backend.timeout)))
        except (ldap3.core.exceptions.LDAPException, OSError) as exc:
            backend._local.conn = None
            raise DirectoryUnavailable(f"LDAP: {exc}") from None
        result = conn.result or {}
        if not ok and result.get("result") not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
            backend._local.conn = None
            raise DirectoryUnavailable(f"LDAP search failed: {result.get('description')} {result.get('message')}")
        return [_account(e["dn"], e["attributes"]) for e in conn.response or [] if e.get("type") == "searchResEntry"]

    def bind(self, dn: str, password: str | bytes) -> bool:
        """A simple bind as ``dn`` on a new connection: True accepted, False refused by a server."""
        ldap3, problems = self.backend._ldap3, []
        for server in self.backend.servers:
            try:
                conn = ldap3.Connection(server, user=dn, password=password, receive_timeout=self.backend.timeout,
                                        read_only=True, client_strategy=ldap3.SYNC, raise_exceptions=False)
                try:
                    accepted = conn.bind()
                    code = (conn.result or {}).get("result")
                finally:
                    conn.unbind()
            except (ldap3.core.exceptions.LDAPException, OSError) as exc:
                problems.append(f"{server.host}: {exc}")
                continue
            if accepted:
                return True
            if code in LDAP_REJECTED_BIND:
                return False
            problems.append(f"{server.host}: bind answered {code}")
        raise DirectoryUnavailable("no LDAP server took the bind: " + "; ".join(problems))


class LdifAccounts:
    """Entries of the embedded LDIF directory, by address and by uid; re-read when the file changes."""

    def __init__(self, path: str, object_class: str = "") -> None:
        self.file = LdifFile(path, object_class)
        self._by_address: dict[str, list[Account]] = {}
        self._by_uid: dict[str, list[Account]] = {}

    def _load(self) -> None:
        self.file.refresh(self._build)

    def _build(self, entries: list[tuple[str, dict[str, list[str]]]]) -> None:
        by_address: dict[str, list[Account]] = {}
        by_uid: dict[str, list[Account]] = {}
        for dn, attributes in entries:
            lowered = {k.lower(): vs for k, vs in attributes.items()}
            account = _account(dn, attributes)
            for address in {v.lower() for v in lowered.get("mail", []) + lowered.get("mailalternateaddress", [])}:
                by_address.setdefault(address, []).append(account)
            for uid in {v.lower() for v in lowered.get("uid", [])}:
                by_uid.setdefault(uid, []).append(account)
        self._by_address, self._by_uid = by_address, by_uid

    def find(self, login: str) -> list[Account]:
        self._load()
        return list((self._by_address if "@" in login else self._by_uid).get(login, []))


class AuthThrottle:
    """Failure counts per client IP (IPv6 per /64) and per login in Redis, shared by every ingress
    process; each key lives ``authfailwindow`` seconds from its first failure (fixed window)."""

    def __init__(self, conn: redis.Redis, prefix: str, settings: Settings) -> None:
        self.conn = conn
        self.prefix = prefix
        self.max_ip = settings.authfailmaxip
        self.max_user = settings.authfailmaxuser
        self.window = settings.authfailwindow

    def keys(self, ip: str, login: str) -> tuple[str, str]:
        try:
            address = ipaddress.ip_address(ip.strip("[]"))
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            where = str(ipaddress.ip_network(f"{address}/64", strict=False)) if address.version == 6 else str(address)
        except ValueError:
            where = ip[:64] or "unknown"
        user = hashlib.blake2b(_normal_login(login).encode("utf-8", "replace"), digest_size=16).hexdigest()
        return f"{self.prefix}:authfail:ip:{where}", f"{self.prefix}:authfail:user:{user}"

    def allowed(self, ip: str, login: str) -> bool:
        """False once either count reached its limit; raises ``ThrottleUnavailable`` if Redis is down."""
        if not self.max_ip and not self.max_user:
            return True
        try:
            by_ip, by_user = self.conn.mget(self.keys(ip, login))
        except redis.RedisError as exc:
            raise ThrottleUnavailable(str(exc)) from None
        return not ((self.max_ip and int(by_ip or 0) >= self.max_ip)
                    or (self.max_user and int(by_user or 0) >= self.max_user))

    def failed(self, ip: str, login: str) -> None:
        """Count one failure for both keys (SET NX EX then INCR: works on any Redis, keeps the TTL)."""
        if not self.max_ip and not self.max_user:
            return
        pipe = self.conn.pipeline(transaction=False)
        for key in self.keys(ip, login):
            pipe.set(key, 0, ex=self.window, nx=True)
            pipe.incr(key)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("AUTH failure not counted, Redis: %s", exc)  # the next allowed() fails closed


class Authenticator:
    """Checks SMTP AUTH logins; the blocking part runs on its own small thread pool."""

    def __init__(self, settings: Settings, directory: Directory, throttle: AuthThrottle | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.throttle = throttle
        self.rebind = settings.ldaprebind
        self.cleartext = settings.authcleartext
        self.delay = settings.authfaildelay / 1000
        backend = directory.backend
        if isinstance(backend, LdapBackend):
            self.accounts: LdapAccounts | LdifAccounts = LdapAccounts(backend, self.rebind)
            self._no_such_dn = f"{NO_SUCH_DN},{backend.base}" if backend.base else NO_SUCH_DN
        else:
            path = backend.path if isinstance(backend, LdifBackend) else settings.users_file
            self.accounts = LdifAccounts(path, settings.ldapobjectclass)
            if self.rebind:
                log.warning("ldaprebind needs an ldapserver: comparing userPassword from %s instead", path)
                self.rebind = False
        self._dummy_of = ""
        self._dummy = passwords.imitation("")
        self._executor = ThreadPoolExecutor(max_workers=AUTH_THREADS, thread_name_prefix="shardmail-auth")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def verify(self, login: str, password: str | bytes, peer_ip: str) -> AuthVerdict:
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdict = await loop.run_in_executor(self._executor, self.check, login, password, peer_ip)
        if verdict.result is AuthResult.BAD:
            await asyncio.sleep(max(0.0, started + self.delay - loop.time()))
        return verdict

    def check(self, login: str, password: str | bytes, peer_ip: str) -> AuthVerdict:
        """The whole check, blocking (LDAP, Redis, hashing): call it from a thread."""
        if self.throttle is not None:
            try:
                if not self.throttle.allowed(peer_ip, login):
                    return AuthVerdict(AuthResult.BLOCKED, reason=f"too many failures from {peer_ip} or for {login!r}")
            except ThrottleUnavailable as exc:
                log.warning("AUTH refused for now, Redis: %s", exc)
                metrics.redis_error("ingress")
                return AuthVerdict(AuthResult.TEMPORARY, reason=f"throttle unavailable: {exc}")
        try:
            verdict = self._check(_normal_login(login), password)
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable for AUTH: %s", exc)
            metrics.directory_error(self.directory.backend)
            return AuthVerdict(AuthResult.TEMPORARY, reason=f"directory unavailable: {exc}")
        if verdict.result is AuthResult.BAD and self.throttle is not None:
            self.throttle.failed(peer_ip, login)
        return verdict

    def _check(self, login: str, password: str | bytes) -> AuthVerdict:
        wellformed = 0 < len(login) <= MAX_LOGIN and login.isprintable()
        found = self.accounts.find(login) if wellformed else []
        if len(found) != 1:
            self._pretend(password)
            if len(found) > 1:
                log.error("AUTH login %r matches %d entries: %s", login, len(found), ", ".join(a.dn for a in found))
            return AuthVerdict(AuthResult.BAD, reason="unknown login" if not found else "ambiguous login")
        account = found[0]
        if not password:
            self._pretend(password)
            return AuthVerdict(AuthResult.BAD, reason="empty password")
        if self.rebind:
            matched = isinstance(self.accounts, LdapAccounts) and self.accounts.bind(account.dn, password)
        elif account.passwords:
            self._learn(account.passwords[0])
            matched = False
            for stored in account.passwords:  # every value checked: no early exit to time
                matched = passwords.verify(stored, password, cleartext=self.cleartext) or matched
        else:
            self._pretend(password)
            return AuthVerdict(AuthResult.BAD, reason=f"no userPassword in {account.dn}")
        if not matched:
            return AuthVerdict(AuthResult.BAD, reason=f"wrong password for {account.dn}")
        if account.status in REFUSED_STATUSES:
            return AuthVerdict(AuthResult.BAD, reason=f"account {account.status}: {account.dn}")
        return AuthVerdict(AuthResult.OK, mail=account.mail or login, reason=f"authenticated as {account.dn}")

    def _learn(self, stored: str) -> None:
        """Keep the imitation hash in step with the scheme and cost real accounts use."""
        signature = passwords.signature(stored)
        if signature != self._dummy_of:
            self._dummy, self._dummy_of = passwords.imitation(stored), signature

    def _pretend(self, password: str | bytes) -> None:
        """The work a real check would have done, for an answer that must not differ in time."""
        if self.rebind and isinstance(self.accounts, LdapAccounts):
            with contextlib.suppress(DirectoryUnavailable):
                self.accounts.bind(self._no_such_dn, password or "x")
        else:
            passwords.verify(self._dummy, password or "x")
