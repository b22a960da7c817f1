"""One frozen, typed settings object, read from ``shardmail.toml`` and the environment.

Interface: ``load(path=None, env=os.environ) -> Settings``; ``Settings`` is a frozen dataclass whose
field names follow qmail's control files where qmail has one (``me``, ``rcpthosts``, ``locals``,
``databytes``, ``queuelifetime``, ``concurrencylocal``, ``concurrencyremote``, ``maxrcptcount``...).
Every key may be overridden by ``SHARDMAIL_<KEY>`` (lists comma-separated); the file is found at
``path``, else ``$SHARDMAIL_CONFIG``, else ``./shardmail.toml`` if present, else defaults only.

Failures: a bad value, an unknown key or an unreadable file raises ``ConfigError`` whose message
names the key and where the value came from, so a process dies at start with one clear line
instead of a traceback in the middle of a delivery.

Settings: this module defines them all; each role's docstring lists the keys it reads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.verp import valid_delimiters

ENV_PREFIX = "SHARDMAIL_"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # a DNS label (and what rq allows in job ids)
SHARD_POLICIES = ("roundrobin", "random", "leastloaded")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names the key."""


def _check(test: Callable[[Any], bool], wanted: str) -> Callable[[Any], str | None]:
    return lambda value: None if test(value) else wanted


def _cidr_list(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"a list of CIDR networks (bad entry {value!r})"
    return None


def _listen_list(values: list[str]) -> str | None:
    for value in values:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"a list of host:port (bad entry {value!r})"
    return None


def _address_patterns(values: list[str]) -> str | None:
    """badmailfrom-style entries: user@domain, @domain, .domain (subdomains), <> (the null sender)."""
    for value in values:
        if value == "<>":
            continue
        _, at, domain = value.rpartition("@")
        shaped = (value.startswith(".") and len(value) > 1) or bool(at and domain.strip("."))
        if not shaped or any(c.isspace() or c in "<>" for c in value):
            return f"a list of user@domain, @domain, .domain or <> (bad entry {value!r})"
    return None


def _rbl_list(values: list[str]) -> str | None:
    for value in values:
        zone, _, action = value.partition(":")
        if not zone.strip(".") or any(c.isspace() or c in "@[]" for c in zone) or action not in ("", "reject", "tag"):
            return f"a list of zone[:reject|:tag] (bad entry {value!r})"
    return None


def _group_list(values: list[str]) -> str | None:
    from core.groups import parse

    try:
        parse(values)
    except ValueError as exc:
        return str(exc)
    return None


def _dkim_list(values: list[str]) -> str | None:
    from core.dkim import parse_keys

    try:
        parse_keys(values)
    except ValueError as exc:
        return str(exc)
    return None


def _dkim_fallback_list(values: list[str]) -> str | None:
    from core.dkim import parse_fallback

    try:
        parse_fallback(values)
    except ValueError as exc:
        return str(exc)
    return None


def _dkim_tables(raw: Any, source: str) -> Any:
    from core.dkim import dkim_tables

    return dkim_tables(raw, source)


def _group_tables(raw: Any, source: str) -> Any:
    """``[[redis_group]]`` tables (``nodes`` or ``shards``, and ``url``) as ``pattern=url`` entries."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        return raw
    entries = []
    for table in raw:
        pattern, url = table.get("nodes", table.get("shards")), table.get("url")
        if not isinstance(pattern, str) or not isinstance(url, str) or set(table) - {"nodes", "shards", "url"}:
            raise ConfigError(f"redis_group: expected tables with nodes (or shards) and url, got {table!r} ({source})")
        entries.append(f"{pattern}={url}")
    return entries


def _setting(default: Any, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    meta = {"doc": doc, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


NONNEGATIVE = _check(lambda v: v >= 0, "an integer >= 0")
POSITIVE = _check(lambda v: v > 0, "an integer > 0")


@dataclass(frozen=True)
class Settings:
    """Every setting shardmail reads; see ``shardmail.toml.example`` for the commented reference."""

    me: str = _setting("", "this host's name; default: the machine's FQDN")
    rcpthosts: list[str] = _setting([], "domains accepted from anyone (.example.com = subdomains)")
    locals: list[str] = _setting(["localhost"], "domains delivered here (accepted too); default: localhost and me")
    relaynets: list[str] = _setting(
        ["127.0.0.1/32", "::1/128"], "client networks allowed to relay (tcpserver's RELAYCLIENT)", _cidr_list
    )
    databytes: int = _setting(10240000, "largest message accepted, bytes (0 = no limit)", NONNEGATIVE)
    verpdelimiters: str = _setting("+=", "VERP delimiters when XVERP or sendmail -XV names none (two of -+=)",
                                   lambda v: None if valid_delimiters(v) else "two characters from -+=")
    maxrcptcount: int = _setting(1000, "recipients per message; further ones get 452 4.5.3", POSITIVE)
    maxhops: int = _setting(100, "Received:/Delivered-To: header lines a message may carry; more is a routing "
                                 "loop, refused after DATA and bounced at delivery (5.4.6)", POSITIVE)
    timeoutsmtpd: int = _setting(300, "seconds an SMTP client may stay silent", POSITIVE)
    smtpgreeting: str = _setting("", "text after 220 in the greeting; default: me")
    smtp_listen: list[str] = _setting(["127.0.0.1:2525"], "SMTP listeners, host:port", _listen_list)
    smtps_listen: list[str] = _setting([], "implicit-TLS SMTP listeners (port 465 style), host:port", _listen_list)
    submission_listen: list[str] = _setting([], "submission listeners (port 587 style: AUTH required), host:port",
                                            _listen_list)
    role: str = _setting("node", "node: spool, pools and scheduler here | ingress: SMTP and sendmail only, each "
                                 "message handed to a queue node over QMQP (no spool)",
                         _check(lambda v: v in ("node", "ingress"), "node | ingress"))
    qmqpservers: list[str] = _setting([], "queue nodes an ingress-only node hands mail to (host:port of their QMQP), "
                                          "tried in turn; empty = the cluster's live nodes with qmqp_listen, least "
                                          "loaded first", _listen_list)
    qmqptimeout: int = _setting(60, "seconds an ingress-only node may spend handing one message over (every queue "
                                    "node tried in that time)", POSITIVE)
    qmqp_listen: list[str] = _setting([], "QMQP listeners, host:port (qmail's port is 628); empty = no QMQP server",
                                      _listen_list)
    qmqpclients: list[str] = _setting([], "client networks allowed to hand mail over by QMQP (it relays whatever "
                                          "they send); empty = no one", _cidr_list)
    tlscert: str = _setting("", "certificate (PEM chain) for STARTTLS and smtps; default <var_dir>/tls/cert.pem "
                                "when that file exists; none = no TLS offered")
    tlskey: str = _setting("", "private key (PEM) of tlscert; default <var_dir>/tls/key.pem")
    concurrencyincoming: int = _setting(1000, "SMTP connections per ingress process; 421 4.7.0 beyond", POSITIVE)
    concurrencyperip: int = _setting(20, "SMTP connections from one client address per ingress process "
                                         "(relaynets exempt); 421 4.7.0 beyond", POSITIVE)
    timeoutconnection: int = _setting(3600, "most seconds one SMTP session may last in all", POSITIVE)
    maxerrors: int = _setting(10, "refused commands in one SMTP session before 421 4.7.0 and disconnect",
                              POSITIVE)
    tarpitcount: int = _setting(50, "refused recipients in one session before each further RCPT reply is "
                                    "delayed (0 = never)", NONNEGATIVE)
    tarpitdelay: int = _setting(5, "seconds each RCPT reply is delayed once tarpitting", NONNEGATIVE)
    ingress_processes: int = _setting(0, "SMTP processes sharing the port (0 = one per two cores)", NONNEGATIVE)
    ingress_threads: int = _setting(1, "group-commit threads per SMTP process (one commits bigger batches)",
                                    POSITIVE)
    queuelifetime: int = _setting(604800, "seconds a message may stay queued", POSITIVE)
    concurrencylocal: int = _setting(10, "local deliveries in flight per local delivery process", POSITIVE)
    concurrencyremote: int = _setting(200, "SMTP sessions in flight per remote delivery process", POSITIVE)
    concurrencydestination: int = _setting(20, "SMTP sessions in flight per destination (domain or relay)", POSITIVE)
    remoteprocesses: int = _setting(1, "remote delivery processes started by `shardmail run` (0: none here)",
                                    NONNEGATIVE)
    remoteactivelimit: int = _setting(10000, "messages a remote delivery process holds in memory at once", POSITIVE)
    remotercptlimit: int = _setting(50, "recipients per outgoing SMTP transaction", POSITIVE)
    reusecount: int = _setting(100, "transactions per outgoing connection before it is closed (1 = no reuse)",
                               POSITIVE)
    reuseidle: int = _setting(2, "seconds an idle outgoing connection is kept for the next message", NONNEGATIVE)
    helohost: str = _setting("", "name in our outgoing EHLO; default: me")
    timeoutconnect: int = _setting(60, "seconds an outgoing connection may take to open", POSITIVE)
    timeoutremote: int = _setting(1200, "most seconds to wait for a remote server at any stage (RFC 5321 "
                                        "4.5.3.2 timeouts apply below it)", POSITIVE)
    tlsremote: str = _setting("may", "outgoing STARTTLS: none | may (opportunistic) | verify (certificate checked)",
                              _check(lambda v: v in ("none", "may", "verify"), "none | may | verify"))
    tlscafile: str = _setting("", "CA certificates for tlsremote = verify; empty = the system's")
    localprocesses: int = _setting(1, "local delivery processes started by `shardmail run`", POSITIVE)
    shards: int = _setting(4, "queue shards on this node", _check(lambda v: 1 <= v <= 1024, "1..1024"))
    shard_policy: str = _setting(
        "roundrobin", "how ingress picks a shard", _check(lambda v: v in SHARD_POLICIES, " | ".join(SHARD_POLICIES))
    )
    queue_split: int = _setting(23, "split directories per shard spool (qmail's conf-split)", POSITIVE)
    var_dir: str = _setting("./var", "runtime state: spool, embedded Redis, Maildirs")
    spool_dir: str = _setting("", "spool root; default: <var_dir>/spool")
    redis_url: str = _setting("", "Redis for the queues; empty = start an embedded redis-server")
    redis_prefix: str = _setting("shardmail", "prefix of shardmail's own Redis keys: one per cluster")
    redis_sentinels: list[str] = _setting([], "Redis Sentinels (host:port) to ask for the primary of redis_master; "
                                              "set, they replace redis_url", _listen_list)
    redis_master: str = _setting("mymaster", "the name the sentinels monitor the primary under",
                                 _check(lambda v: bool(v) and not any(c.isspace() for c in v), "a name"))
    redis_password: str = _setting("", "password of the Redis primary and replicas under redis_sentinels "
                                        "(with redis_url it goes in the URL)")
    redis_sentinel_password: str = _setting("", "password of the sentinels themselves (empty: none)")
    redis_tls: bool = _setting(False, "TLS to the sentinels and the primary they name")
    redis_tlscafile: str = _setting("", "CA certificates for redis_tls; empty = the system's")
    node: str = _setting("", "this node's name, unique in the cluster (letters, digits, - and _); default: the "
                             "host name's first label", _check(lambda v: NODE_NAME.fullmatch(v) is not None,
                                                               "a name of letters, digits, - and _ (63 at most)"))
    redis_group: list[str] = _setting([], "shard groups: NODE-PATTERN=URL, the Redis deployment of the queues of "
                                          "nodes matching the glob (first match; none: the main one); in the file "
                                          "also [[redis_group]] tables with nodes and url", _group_list)
    nodedeadafter: int = _setting(30, "seconds without a heartbeat after which a node counts as dead (nodes beat "
                                      "three times in it, every 5 s at most)", _check(lambda v: v >= 3, "3 or more"))
    ldapserver: list[str] = _setting([], "LDAP servers (ldap://host:port), tried in order; empty = users_ldif")
    ldapbasedn: str = _setting("", "search base for users")
    ldaplogin: str = _setting("", "bind DN (empty = anonymous)")
    ldappassword: str = _setting("", "bind password")
    ldaptimeout: int = _setting(5, "seconds an LDAP connect or search may take before it counts as down", POSITIVE)
    ldapobjectclass: str = _setting("", "only entries of this objectClass are users (e.g. qmailUser)")
    ldapcachettl: int = _setting(30, "seconds a found user is cached", NONNEGATIVE)
    ldapnegcachettl: int = _setting(10, "seconds an unknown address is cached", NONNEGATIVE)
    ldaprebind: bool = _setting(False, "SMTP AUTH binds to LDAP as the user instead of comparing userPassword")
    authcleartext: bool = _setting(False, "SMTP AUTH accepts {CLEARTEXT}/{PLAIN} userPassword values")
    authfailmaxip: int = _setting(20, "failed SMTP AUTHs per client IP (IPv6: per /64) per authfailwindow, "
                                      "then 454 4.7.0 (0 = no limit)", NONNEGATIVE)
    authfailmaxuser: int = _setting(10, "failed SMTP AUTHs per login per authfailwindow, then 454 4.7.0 "
                                        "(0 = no limit)", NONNEGATIVE)
    authfailwindow: int = _setting(900, "seconds the SMTP AUTH failure counts are kept (from the first failure)",
                                   POSITIVE)
    authfaildelay: int = _setting(500, "milliseconds a failed SMTP AUTH takes at least (hides hash cost, "
                                       "slows guessing)", NONNEGATIVE)
    users_ldif: str = _setting("", "embedded directory when no ldapserver: default <var_dir>/users.ldif")
    ldapmessagestore: str = _setting("", "root of the Maildirs (mailMessageStore is relative); default <var_dir>/mail")
    ldapdefaultquotasize: int = _setting(0, "quota in bytes for users without mailQuotaSize (0 = none)", NONNEGATIVE)
    ldapdefaultquotacount: int = _setting(
        0, "quota in messages for users without mailQuotaCount (0 = none)", NONNEGATIVE
    )
    quotawarning: int = _setting(0, "percentage of a size or count quota at which a delivery puts a warning "
                                    "into the mailbox, once per quotawarningperiod (0 = off)",
                                 _check(lambda v: 0 <= v <= 100, "a percentage 0..100"))
    quotawarningperiod: int = _setting(86400, "seconds between two quota warnings to one mailbox", POSITIVE)
    quotawarningtext: str = _setting("", "extra text for the quota warning (e.g. whom to contact)")
    clusterhosts: list[str] = _setting([], "other names of this node: mailHost values delivered here")
    clusterforward: str = _setting("smtp", "how mail for a user whose mailHost is another node is handed over: "
                                           "smtp (port 25 or smtproutes) | qmqp (port 628 or qmqproutes)",
                                   _check(lambda v: v in ("smtp", "qmqp"), "smtp | qmqp"))
    qmqproutes: list[str] = _setting([], "where cluster peers take QMQP, host:relay:port (smtproutes' format); "
                                         "default: the mailHost itself on port 628")
    smtproutes: list[str] = _setting([], "static routes, qmail's format host:relay:port (cluster peers too)")
    dnsresolvers: list[str] = _setting([], "DNS resolvers for MX lookups, address[:port]; empty = the system's")
    dnstimeout: int = _setting(10, "seconds a DNS lookup may take before it counts as a temporary failure", POSITIVE)
    badmailfrom: list[str] = _setting([], "refused envelope senders: user@domain, @domain, .domain (subdomains), "
                                          "<> (the null sender)", _address_patterns)
    badrcptto: list[str] = _setting([], "refused recipients, same forms as badmailfrom", _address_patterns)
    relaymailfrom: list[str] = _setting([], "envelope senders that may relay (weak: senders are forged at will)",
                                        lambda v: "a list without <> (the null sender never relays)" if "<>" in v
                                        else _address_patterns(v))
    rbllist: list[str] = _setting([], "DNS blocklists, zone[:reject|:tag] (default reject)", _rbl_list)
    rbltimeout: int = _setting(5, "seconds all DNSBL look-ups of one client may take together (then: not listed)",
                               POSITIVE)
    ratelimitip: int = _setting(0, "messages per ratelimitwindow from one client address (IPv6: its /64); 0 = off",
                                NONNEGATIVE)
    ratelimitsender: int = _setting(0, "messages per ratelimitwindow from one authenticated user; 0 = off",
                                    NONNEGATIVE)
    ratelimitwindow: int = _setting(3600, "seconds over which the rate limits count", POSITIVE)
    deliveryprograms: bool = _setting(False, "run deliveryProgramPath programs at all")
    deliveryprogramuser: str = _setting("nobody", "user the delivery programs run as")
    deliveryprogramtimeout: int = _setting(60, "seconds a delivery program may run", POSITIVE)
    autoreplyinterval: int = _setting(86400, "seconds between two auto-replies to the same sender", POSITIVE)
    doublebounceto: str = _setting("postmaster", "where bounces that cannot be returned go (qmail's doublebounceto)")
    bouncemaxbytes: int = _setting(50000, "a bounce carries the whole original up to this size, else its headers",
                                   NONNEGATIVE)
    sweepinterval: int = _setting(600, "seconds between the scheduler's sweeps of the spool", POSITIVE)
    releasewindow: int = _setting(10000, "jobs a shard's queue may hold before the scheduler stops adding retries",
                                  POSITIVE)
    schedulerprocesses: int = _setting(1, "schedulers started by `shardmail run` (one leads each shard)",
                                       NONNEGATIVE)
    dkim: list[str] = _setting([], "DKIM signing keys, domain:selector:keyfile[:rsa|ed25519] (two for one domain: a "
                                   "dual signature); in the file also [[dkim]] tables with domain, selector, keyfile "
                                   "and algorithm", _dkim_list)
    dkim_fallback: list[str] = _setting([], "signing domain for mail whose From: domain has no key: user@domain=D "
                                            "(authenticated user), domain=D (From: or envelope sender domain), *=D",
                                        _dkim_fallback_list)
    dkim_ldap: bool = _setting(False, "an authenticated user's dkimSigningDomain (directory entry) names the "
                                      "signing domain when the From: domain has no key, before dkim_fallback")
    dkim_expire: int = _setting(0, "seconds a DKIM signature is valid for (x= tag); 0 = no expiry", NONNEGATIVE)
    pop3_listen: list[str] = _setting([], "POP3 listeners (port 110 style: STLS offered with a certificate), "
                                          "host:port; empty (and no pop3s_listen) = no POP3 server", _listen_list)
    pop3s_listen: list[str] = _setting([], "implicit-TLS POP3 listeners (port 995 style), host:port", _listen_list)
    pop3plaintext: bool = _setting(False, "POP3 takes USER/PASS and AUTH PLAIN before STLS (passwords in the clear)")
    pop3timeout: int = _setting(600, "seconds a POP3 client may stay silent (RFC 1939: at least 600)", POSITIVE)
    pop3maxsessions: int = _setting(1000, "POP3 sessions per pop3d process; -ERR [SYS/TEMP] beyond", POSITIVE)
    pop3maxperip: int = _setting(10, "POP3 sessions from one client address per pop3d process; -ERR [SYS/TEMP] "
                                     "beyond (per user: one, the mailbox lock)", POSITIVE)
    metrics_listen: str = _setting("127.0.0.1:9525", "Prometheus endpoint of `shardmail run`, host:port (empty = off)",
                                   lambda v: _listen_list([v]) if v else None)

    @property
    def spool_root(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else Path(self.var_dir) / "spool"

    @property
    def users_file(self) -> str:
        return self.users_ldif or str(Path(self.var_dir) / "users.ldif")

    @property
    def message_store_root(self) -> Path:
        return Path(self.ldapmessagestore) if self.ldapmessagestore else Path(self.var_dir) / "mail"

    @property
    def tls_files(self) -> tuple[Path, Path] | None:
        """(certificate, key) for incoming TLS, or None when none is configured or generated."""
        cert = Path(self.tlscert) if self.tlscert else Path(self.var_dir) / "tls" / "cert.pem"
        key = Path(self.tlskey) if self.tlskey else cert.with_name("key.pem")
        if self.tlscert or cert.exists():
            return cert, key
        return None

    @property
    def greeting(self) -> str:
        return self.smtpgreeting or self.me

    @property
    def processes(self) -> int:
        """SMTP processes: by default one per two cores, as ingress shares the machine with the
        delivery pools, Redis and slapd. On two cores one process took 20 % less CPU per message
        than two, for as many messages a second (bench.local_delivery --ingress 1 and 2, in turn)."""
        return self.ingress_processes or max(1, (os.cpu_count() or 1) // 2)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _coerce(key: str, kind: Any, raw: Any, source: str) -> Any:
    """Turn a TOML value or an environment string into the field's type, or fail naming the key."""
    origin = typing.get_origin(kind)
    try:
        if origin in (list, types.GenericAlias) or kind == list[str]:
            if isinstance(raw, str):
                items = [part.strip() for part in raw.split(",") if part.strip()]
            elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
                items = list(raw)
            else:
                raise TypeError
            return items
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "yes", "true", "on"):
                return True
            if lowered in ("0", "no", "false", "off"):
                return False
            raise TypeError
        if kind is int:
            if isinstance(raw, bool):
                raise TypeError
            if isinstance(raw, int):
                return raw
            return int(str(raw).strip())
        if kind is str:
            if not isinstance(raw, str):
                raise TypeError
            return raw
    except (TypeError, ValueError):
        pass
    wanted = {int: "an integer", str: "a string", bool: "true or false"}.get(kind, "a list of strings")
    raise ConfigError(f"{key}: expected {wanted}, got {raw!r} ({source})")


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the file (if any), apply environment overrides, validate every value."""
    env = os.environ if env is None else env
    chosen = path or env.get(ENV_PREFIX + "CONFIG") or ("shardmail.toml" if Path("shardmail.toml").exists() else None)
    values: dict[str, tuple[Any, str]] = {}
    kinds = _field_types()
    if chosen:
        try:
            with open(chosen, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"config file {chosen}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {chosen}: {exc}") from None
        for key, raw in data.items():
            if key not in kinds:
                raise ConfigError(f"{key}: unknown setting (in {chosen})")
            tables = {"redis_group": _group_tables, "dkim": _dkim_tables}.get(key)
            values[key] = (tables(raw, f"in {chosen}") if tables else raw, f"in {chosen}")
    for key in kinds:
        name = ENV_PREFIX + key.upper()
        if name in env:
            values[key] = (env[name], f"from {name}")
    checked: dict[str, Any] = {}
    for fld in dataclasses.fields(Settings):
        if fld.name not in values:
            continue
        raw, source = values[fld.name]
        value = _coerce(fld.name, kinds[fld.name], raw, source)
        check = fld.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{fld.name}: expected {problem}, got {raw!r} ({source})")
        checked[fld.name] = value
    if not checked.get("node"):
        checked["node"] = default_node()
    if not checked.get("me"):
        checked["me"] = socket.getfqdn() or "localhost"
    if "locals" not in checked:
        checked["locals"] = list(dict.fromkeys(["localhost", checked["me"]]))  # qmail: locals defaults to me
    return Settings(**checked)


def default_node() -> str:
    """The host name's first label, with anything a node name may not hold turned into ``-``."""
    label = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:63].lstrip("-_")
    return label or "node"


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, doc) for each setting: the source of the configuration reference."""
    rows = []
    for fld in dataclasses.fields(Settings):
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[operator]
        rows.append((fld.name, default, fld.metadata["doc"]))
    return rows
