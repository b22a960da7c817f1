"""Where mail for a domain goes: static routes, then MX records (dnspython), as a list of hops.

Interface: ``Hop`` (host, address, port, preference), ``make_resolver(settings)`` (an asyncio
resolver with an LRU cache that honours TTLs), ``async route(domain, resolver, routes) -> list[Hop] |
Deferred | Failed``, ``static_route(domain, routes) -> Hop | None`` (pure).

Order: an ``smtproutes`` entry for the domain (qmail's ``domain:relay:port``; ``.domain`` covers
subdomains, an empty domain is the default route) wins; else the MX records by preference, in
random order among equal preferences, each host's A and AAAA addresses; no MX → the domain itself
(implicit MX, RFC 5321 5.1). International domains are looked up in their IDNA form.

Failures: NXDOMAIN → ``Failed 5.1.2``; a null MX (RFC 7505) → ``Failed 5.1.10``; no address for any
exchanger → ``Failed 5.4.4`` when every answer was definite, else ``Deferred 4.4.3``; SERVFAIL,
timeouts and unreachable resolvers → ``Deferred 4.4.3``. Only a definite answer is permanent.

Settings: ``dnsresolvers`` (host:port list; empty = the system's), ``dnstimeout``, ``smtproutes``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from core import metrics
from core.config import Settings
from core.outcome import Deferred, Failed
from core.resolver import make_resolver as configured_resolver

SMTP_PORT = 25
CACHE_SIZE = 50_000


@dataclass(frozen=True, slots=True)
class Hop:
    host: str
    address: str
    port: int
    preference: int


def make_resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    return configured_resolver(settings, settings.dnstimeout, CACHE_SIZE)


def ascii_domain(domain: str) -> str | None:
    """The IDNA (A-label) form, or None when the name cannot be one."""
    domain = domain.rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None


def static_route(domain: str, routes: list[str]) -> Hop | None:
    """qmail's smtproutes: ``domain:relay:port``, ``.domain`` for subdomains, ``:relay`` for all."""
    best: tuple[int, Hop] | None = None
    for entry in routes:
        name, _, rest = entry.partition(":")
        name = name.lower()
        if rest.startswith("["):
            relay, _, port = rest[1:].partition("]")
            port = port.lstrip(":")
        else:
            relay, _, port = rest.partition(":")
        if name == domain:
            rank = 3
        elif name.startswith(".") and domain.endswith(name):
            rank = 2
        elif name == "":
            rank = 1
        else:
            continue
        if best is None or rank > best[0]:
            best = (rank, Hop(relay or domain, relay or domain, int(port or SMTP_PORT), 0))
    return best[1] if best else None


async def _addresses(host: str, resolver: dns.asyncresolver.Resolver) -> tuple[list[str], bool]:
    """Addresses of an exchanger, and whether any lookup failed temporarily."""
    found: list[str] = []
    temporary = False
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, kind, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return found, temporary
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.NoAnswer) as exc:
            metrics.dns_error(exc)
            temporary = True
            continue
        found.extend(r.to_text() for r in answer.rrset or [])
    return found, temporary


async def route(domain: str, resolver: dns.asyncresolver.Resolver, routes: list[str] | None = None
                ) -> list[Hop] | Deferred | Failed:
    name = ascii_domain(domain)
    if name is None:
        return Failed("5.1.2", f"{domain}: not a valid domain name")
    static = static_route(name, routes or [])
    if static is not None:
        return [static]
    try:
        answer = await resolver.resolve(name, "MX", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return Failed("5.1.2", f"{domain}: no such domain")
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        metrics.dns_error(exc)
        return Deferred("4.4.3", f"{domain}: DNS lookup failed temporarily ({type(exc).__name__})")
    records = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer.rrset or []]
    if len(records) == 1 and records[0][1] in ("", "."):
        return Failed("5.1.10", f"{domain} accepts no mail (null MX)")
    records = [r for r in records if r[1] not in ("", ".")]
    if not records:
        records = [(0, name)]  # implicit MX
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(host)
    hops: list[Hop] = []
    temporary = False
    for preference in sorted(by_preference):
        hosts = by_preference[preference]
        random.shuffle(hosts)
        for host in hosts:
            addresses, failed = await _addresses(host, resolver)
            temporary = temporary or failed
            hops.extend(Hop(host, address, SMTP_PORT, preference) for address in addresses)
    if hops:
        return hops
    if temporary:
        return Deferred("4.4.3", f"{domain}: no address for its mail exchangers yet (DNS trouble)")
    return Failed("5.4.4", f"{domain}: its mail exchangers have no address")
