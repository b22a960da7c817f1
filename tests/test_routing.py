"""Routing: static routes (pure) and MX resolution against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time

import dns.asyncresolver

from core.config import load
from core.outcome import Deferred, Failed
from tests.dns_server import DnsServer
from workers.routing import Hop, ascii_domain, make_resolver, static_route
from workers.routing import route as route_async


def test_static_routes_follow_qmail_rules() -> None:
    routes = ["example.com:127.0.0.5:2525", ".sub.example.com:[::1]:26", ":127.0.0.9", "bare.example:"]
    assert static_route("example.com", routes) == Hop("127.0.0.5", "127.0.0.5", 2525, 0)
    assert static_route("a.sub.example.com", routes) == Hop("::1", "::1", 26, 0)
    assert static_route("elsewhere.example", routes) == Hop("127.0.0.9", "127.0.0.9", 25, 0)
    assert static_route("bare.example", routes) == Hop("bare.example", "bare.example", 25, 0)
    assert static_route("elsewhere.example", routes[:2]) is None


def test_idna_and_bad_names() -> None:
    assert ascii_domain("Bücher.Test.") == "xn--bcher-kva.test"
    assert ascii_domain("plain.example") == "plain.example"
    assert ascii_domain("ü..example") is None  # an empty label
    assert ascii_domain("ü" * 70 + ".example") is None  # a label over 63 octets


def test_resolver_configuration_parses_ports() -> None:
    resolver = make_resolver(load(env={"SHARDMAIL_DNSRESOLVERS": "127.0.0.1:5353,[::1]:5354,127.0.0.2",
                                        "SHARDMAIL_DNSTIMEOUT": "3"}))
    assert resolver.nameservers == ["127.0.0.1", "::1", "127.0.0.2"]
    assert resolver.nameserver_ports == {"127.0.0.1": 5353, "::1": 5354}
    assert resolver.lifetime == 3


def route(domain: str, resolver: dns.asyncresolver.Resolver, routes: list[str] | None = None) -> object:
    return asyncio.run(route_async(domain, resolver, routes))


def _resolver(dns_server: DnsServer, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    return make_resolver(load(env={"SHARDMAIL_DNSRESOLVERS": f"{dns_server.address}:{dns_server.port}",
                                   "SHARDMAIL_DNSTIMEOUT": str(int(lifetime))}))


def test_mx_by_preference_random_among_equals(dns_server: DnsServer) -> None:
    resolver = _resolver(dns_server)
    firsts = set()
    for _ in range(30):
        hops = route("multi.test", resolver)
        assert isinstance(hops, list)
        assert [h.preference for h in hops] == sorted(h.preference for h in hops)
        assert {(h.host, h.address) for h in hops} == {
            ("mx1.multi.test", "127.0.0.11"), ("mx1.multi.test", "::1"), ("mx2.multi.test", "127.0.0.12"),
            ("backup.multi.test", "127.0.0.13")}
        assert hops[-1].host == "backup.multi.test"
        firsts.add(hops[0].host)
    assert firsts == {"mx1.multi.test", "mx2.multi.test"}  # equal preferences in random order


def test_implicit_null_nxdomain_dangling_idna(dns_server: DnsServer) -> None:
    resolver = _resolver(dns_server)
    implicit = route("implicit.test", resolver)
    assert isinstance(implicit, list) and {h.address for h in implicit} == {"127.0.0.21", "::1"}
    assert route("nullmx.test", resolver) == Failed("5.1.10", "nullmx.test accepts no mail (null MX)")
    nx = route("nx.test", resolver)
    assert isinstance(nx, Failed) and nx.status == "5.1.2"
    dangling = route("dangling.test", resolver)
    assert isinstance(dangling, Failed) and dangling.status == "5.4.4"
    idna = route("bücher.test", resolver)
    assert isinstance(idna, list) and [h.address for h in idna] == ["127.0.0.31"]


def test_servfail_and_timeout_are_temporary(dns_server: DnsServer) -> None:
    resolver = _resolver(dns_server, lifetime=1.0)
    servfail = route("servfail.test", resolver)
    assert isinstance(servfail, Deferred) and servfail.status == "4.4.3"
    started = time.monotonic()
    timeout = route("timeout.test", resolver)
    assert isinstance(timeout, Deferred) and timeout.status == "4.4.3"
    assert time.monotonic() - started < 3


def test_static_route_skips_dns(dns_server: DnsServer) -> None:
    hops = route("nx.test", _resolver(dns_server), ["nx.test:127.0.0.77:2526"])
    assert hops == [Hop("127.0.0.77", "127.0.0.77", 2526, 0)]
