"""Routing: static routes (pure) and MX resolution against a real DNS server on loopback."""

from __future__ import annotations

from core.config import load
from workers.routing import Hop, ascii_domain, make_resolver, static_route


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
