"""DNS blocklists (RFC 5782): is a client address listed, where, and why; asked of every zone at once.

Interface: ``Dnsbl(settings, resolver=None)``, ``await dnsbl.check(address) -> list[Hit]`` (hits in
``rbllist`` order; empty when listed nowhere), ``Hit`` (zone, action, reason, codes) with
``hit.header()`` (the ``X-RBL-Check`` header line, for ``tag`` lists; a ``reject`` list's reason
becomes ingress.replies' ``LISTED``), ``query_name(address, zone)``, ``parse(entries)``,
``make_resolver(settings)``.

Query: IPv4 ``192.0.2.10`` in ``zone`` is ``10.2.0.192.zone``; IPv6 is the 32 nibbles of the
address, least significant first (RFC 5782 2.1, 2.4); an IPv4-mapped IPv6 address is asked as the
IPv4 address it carries. Listed: an A record in 127.0.0.0/8. Other answers are not listings: a
public address is what a lapsed blocklist domain's parking wildcard returns, and 127.255.255.0/24 is
how some lists (Spamhaus) signal a refused or malformed query. The reason is the name's TXT record,
asked only once the A record says listed (most clients are listed nowhere: one query per zone);
without one it names the zone and the code. TXT text is made printable ASCII and cut to 200
characters before it reaches an SMTP reply or a header.

Time: all zones are asked concurrently and the whole check ends after ``rbltimeout`` seconds;
zones that have not answered by then count as not listing the client. Answers are cached for their
TTL (NXDOMAIN for the zone's negative TTL) in the resolver's LRU cache, so a client that reconnects
costs no query.

Failures: none raised. A timeout, SERVFAIL, unreachable resolver or an error code counts as not
listed, is counted in ``shardmail_dns_errors_total`` and logged (once a minute per zone): a
blocklist is a third party's opinion, and its outage must not become an outage of our mail.
A ``check`` of something that is not an IP address (a unix socket peer) returns no hits.

Settings: ``rbllist`` (``zone[:reject|:tag]``, default reject), ``rbltimeout``, ``dnsresolvers``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from core import metrics
from core.config import Settings
from core.resolver import make_resolver as configured_resolver

log = logging.getLogger("shardmail.dnsbl")

ACTIONS = ("reject", "tag")
HEADER = "X-RBL-Check"
CACHE_SIZE = 10_000
REASON_LIMIT = 200
LOG_INTERVAL = 60.0
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_SPACES = re.compile(r" {2,}")


@dataclass(frozen=True, slots=True)
class Blocklist:
    zone: str
    action: str


@dataclass(frozen=True, slots=True)
class Hit:
    zone: str
    action: str
    reason: str  # printable ASCII, at most REASON_LIMIT characters
    codes: tuple[str, ...]  # the A records, e.g. ("127.0.0.2",)

    def header(self) -> str:
        """The header line (no CRLF) a ``tag`` list adds to the message."""
        return f"{HEADER}: {self.zone} {self.reason}"


def parse(entries: list[str]) -> list[Blocklist]:
    """``zone[:reject|:tag]`` entries (checked by core.config) as Blocklists; a repeated zone counts once."""
    lists: dict[str, Blocklist] = {}
    for entry in entries:
        zone, _, action = entry.strip().partition(":")
        zone = zone.strip(".").lower()
        lists.setdefault(zone, Blocklist(zone, action or "reject"))
    return list(lists.values())


def make_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    """An asyncio resolver asking ``dnsresolvers`` (``addr``, ``addr:port``, ``[v6]:port``), with a TTL cache."""
    return configured_resolver(settings, settings.rbltimeout, CACHE_SIZE)


def _client(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # a scope (fe80::1%eth0) is no part of the address
    except (ValueError, AttributeError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def query_name(address: str, zone: str) -> str:
    """The name to ask ``zone`` about ``address`` (absolute, trailing dot); ValueError if no IP address."""
    ip = _client(address)
    if ip is None:
        raise ValueError(f"not an IP address: {address!r}")
    reverse = ip.reverse_pointer  # 10.2.0.192.in-addr.arpa, b.a.9.8. ... .ip6.arpa
    return reverse.rsplit(".", 2)[0] + "." + zone.strip(".") + "."


def _clean(text: str) -> str:
    return _SPACES.sub(" ", _UNPRINTABLE.sub("?", text)).strip()[:REASON_LIMIT]


class Dnsbl:
    """The blocklists of ``settings`` and one resolver (with its cache) for all of them."""

    def __init__(self, settings: Settings, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.lists = parse(settings.rbllist)
        self.timeout = float(settings.rbltimeout)
        self.resolver = resolver or make_resolver(settings)
        self._logged: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.lists)

    async def check(self, address: str) -> list[Hit]:
        """Every list naming ``address``, within ``rbltimeout`` seconds in all."""
        ip = _client(address)
        if ip is None or not self.lists:
            return []
        deadline = time.monotonic() + self.timeout
        tasks = [asyncio.ensure_future(self._ask(bl, query_name(str(ip), bl.zone), deadline)) for bl in self.lists]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            for bl, task in zip(self.lists, tasks, strict=True):
                if task in pending:
                    self._trouble(bl.zone, f"no answer within {self.timeout:g} s", dns.exception.Timeout())
        hits: list[Hit] = []
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is None:
                hit = task.result()
                if hit is not None:
                    hits.append(hit)
        return hits

    async def _ask(self, bl: Blocklist, name: str, deadline: float) -> Hit | None:
        answer = await self._resolve(bl.zone, name, "A", deadline)
        if answer is None:
            return None
        codes = sorted({r.to_text() for r in answer.rrset or ()})
        listed = tuple(c for c in codes if ipaddress.ip_address(c) in _LOOPBACK
                       and ipaddress.ip_address(c) not in _ERROR_CODES)
        if len(listed) < len(codes):
            self._trouble(bl.zone, f"answered {', '.join(c for c in codes if c not in listed)} for {name} "
                                   "(not a listing)", None)
        if not listed:
            return None
        reason = ""
        texts = await self._resolve(bl.zone, name, "TXT", deadline)
        if texts is not None and texts.rrset:
            reason = _clean(" ".join(sorted(b"".join(r.strings).decode("utf-8", "replace") for r in texts.rrset)))
        return Hit(bl.zone, bl.action, reason or f"listed in {bl.zone} ({', '.join(listed)})", listed)

    async def _resolve(self, zone: str, name: str, rtype: str, deadline: float) -> dns.resolver.Answer | None:
        """The answer (None: NXDOMAIN, or trouble, which is logged)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return await self.resolver.resolve(name, rtype, search=False, lifetime=remaining,
                                               raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except (dns.exception.DNSException, OSError) as exc:
            self._trouble(zone, f"{rtype} {name}: {type(exc).__name__}", exc)
            return None

    def _trouble(self, zone: str, what: str, exc: BaseException | None) -> None:
        if exc is not None:
            metrics.dns_error(exc)
        now = time.monotonic()
        if now - self._logged.get(zone, -LOG_INTERVAL) < LOG_INTERVAL:
            self._quiet[zone] = self._quiet.get(zone, 0) + 1
            return
        self._logged[zone] = now
        quiet = self._quiet.pop(zone, 0)
        log.warning("dnsbl %s: %s; counted as not listed%s", zone, what,
                    f" ({quiet} more such since the last report)" if quiet else "")
