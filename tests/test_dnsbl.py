"""ingress.dnsbl against a real DNS server (unbound on loopback, tests/dns_server.py) serving blocklist zones."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest

from core.config import Settings, load
from ingress import replies
from ingress.dnsbl import REASON_LIMIT, Blocklist, Dnsbl, Hit, parse, query_name
from tests.dns_server import DnsServer, Zone

LISTED_V6 = "2001:db8::1"
UNLISTED = ("192.0.2.99", "2001:db8::99", "::ffff:192.0.2.99")
BOUND = 1  # rbltimeout in the tests, seconds
SLACK = 0.5  # what a loaded test machine may add to it


def dnsbl_zone() -> Zone:
    """Blocklists under dnsbl.test (a new object each call).

    block.dnsbl.test  127.0.0.2 (the RFC 5782 test entry) and 192.0.2.10 listed with TXT reasons;
                      192.0.2.20 listed without TXT; 192.0.2.30 answers 127.255.255.254 (an error
                      code), 192.0.2.40 a public address (both: not listed); 192.0.2.50 a TXT with
                      control characters and 500 characters; 2001:db8::1 listed
    tag.dnsbl.test    127.0.0.2 and 2001:db8::1 listed
    slow.dnsbl.test   never answers; broken.dnsbl.test: SERVFAIL
    everything else (192.0.2.99, 2001:db8::99, 127.0.0.1): NXDOMAIN, negative TTL 30 s (the SOA)
    """
    zone = Zone("dnsbl.test")
    zone.add("dnsbl.test", "SOA", "ns.dnsbl.test. hostmaster.dnsbl.test. 1 3600 600 86400 30")
    block = "block.dnsbl.test"
    zone.address(query_name("127.0.0.2", block), "127.0.0.2")
    zone.add(query_name("127.0.0.2", block), "TXT", '"Test entry, see https://block.example/q?127.0.0.2"')
    zone.address(query_name("192.0.2.10", block), "127.0.0.4", "127.0.0.10")
    zone.add(query_name("192.0.2.10", block), "TXT", '"Spam source" " 192.0.2.10"')
    zone.address(query_name("192.0.2.20", block), "127.0.0.2")
    zone.address(query_name("192.0.2.30", block), "127.255.255.254")
    zone.address(query_name("192.0.2.40", block), "192.0.2.40")
    zone.address(query_name("192.0.2.50", block), "127.0.0.2")
    zone.add(query_name("192.0.2.50", block), "TXT",
             '"bad\\013\\010X-Injected: yes\\009\\009end ' + "x" * 200 + '" "' + "y" * 250 + '"')
    zone.address(query_name(LISTED_V6, block), "127.0.0.2")
    zone.add(query_name(LISTED_V6, block), "TXT", '"IPv6 source listed"')
    zone.address(query_name("127.0.0.2", "tag.dnsbl.test"), "127.0.0.3")
    zone.add(query_name("127.0.0.2", "tag.dnsbl.test"), "TXT", '"Tagged: suspicious"')
    zone.address(query_name(LISTED_V6, "tag.dnsbl.test"), "127.0.0.3")
    zone.timeout.add("slow.dnsbl.test")
    zone.servfail.add("broken.dnsbl.test")
    return zone


@pytest.fixture(scope="module")
def dnsbl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with DnsServer(tmp_path_factory.mktemp("dnsbl"), [dnsbl_zone()]) as server:
        yield server


def settings(server: DnsServer, *lists: str) -> Settings:
    return load(env={"SHARDMAIL_ME": "mx.test", "SHARDMAIL_DNSRESOLVERS": server.hostport,
                     "SHARDMAIL_RBLLIST": ",".join(lists), "SHARDMAIL_RBLTIMEOUT": str(BOUND)})


def check(dnsbl: Dnsbl, address: str) -> list[Hit]:
    return asyncio.run(dnsbl.check(address))


@pytest.fixture
def both(dnsbl_server: DnsServer) -> Dnsbl:
    return Dnsbl(settings(dnsbl_server, "block.dnsbl.test:reject", "tag.dnsbl.test:tag"))


def test_query_names_reverse_octets_and_nibbles() -> None:
    assert query_name("192.0.2.10", "zen.example") == "10.2.0.192.zen.example."
    assert query_name("::ffff:192.0.2.10", "zen.example.") == "10.2.0.192.zen.example."
    assert query_name("2001:DB8::1", "zen.example") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.zen.example."
    with pytest.raises(ValueError):
        query_name("unix:/run/socket", "zen.example")


def test_lists_parse_with_reject_by_default() -> None:
    assert parse(["Zen.Example.", "tag.example:tag", "zen.example:tag", "r.example:reject"]) == [
        Blocklist("zen.example", "reject"), Blocklist("tag.example", "tag"), Blocklist("r.example", "reject")]


def test_listed_ipv4_in_each_list_in_rbllist_order(both: Dnsbl) -> None:
    hits = check(both, "127.0.0.2")
    assert hits == [
        Hit("block.dnsbl.test", "reject", "Test entry, see https://block.example/q?127.0.0.2", ("127.0.0.2",)),
        Hit("tag.dnsbl.test", "tag", "Tagged: suspicious", ("127.0.0.3",)),
    ]
    assert replies.LISTED.format(reason=hits[0].reason) == "554 5.7.1 Test entry, see https://block.example/q?127.0.0.2"
    assert hits[1].header() == "X-RBL-Check: tag.dnsbl.test Tagged: suspicious"
    assert check(both, "192.0.2.10") == [
        Hit("block.dnsbl.test", "reject", "Spam source 192.0.2.10", ("127.0.0.10", "127.0.0.4"))]


def test_listed_ipv6_and_mapped_ipv4(both: Dnsbl) -> None:
    assert [(h.zone, h.reason) for h in check(both, LISTED_V6)] == [
        ("block.dnsbl.test", "IPv6 source listed"), ("tag.dnsbl.test", "listed in tag.dnsbl.test (127.0.0.3)")]
    assert [h.zone for h in check(both, "::ffff:127.0.0.2")] == ["block.dnsbl.test", "tag.dnsbl.test"]


@pytest.mark.parametrize("address", [*UNLISTED, "127.0.0.1", "not an address", ""])
def test_unlisted_addresses_have_no_hits(both: Dnsbl, address: str) -> None:
    assert check(both, address) == []


def test_without_txt_the_reason_names_zone_and_code(both: Dnsbl) -> None:
    assert check(both, "192.0.2.20") == [
        Hit("block.dnsbl.test", "reject", "listed in block.dnsbl.test (127.0.0.2)", ("127.0.0.2",))]


def test_error_codes_and_public_addresses_are_no_listing(both: Dnsbl, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "shardmail.dnsbl"):
        assert check(both, "192.0.2.30") == []
        assert check(both, "192.0.2.40") == []
    assert "127.255.255.254" in caplog.text and "not a listing" in caplog.text


def test_txt_reason_is_printable_and_bounded(both: Dnsbl) -> None:
    [hit] = check(both, "192.0.2.50")
    assert hit.reason.startswith("bad?X-Injected: yes?end xxx")
    assert len(hit.reason) == REASON_LIMIT
    assert all(0x20 <= ord(c) < 0x7F for c in hit.reason + hit.header())


def test_a_silent_zone_costs_the_bound_and_the_others_still_count(dnsbl_server: DnsServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    dnsbl = Dnsbl(settings(dnsbl_server, "slow.dnsbl.test", "broken.dnsbl.test", "block.dnsbl.test"))
    with caplog.at_level(logging.WARNING, "shardmail.dnsbl"):
        start = time.monotonic()
        hits = check(dnsbl, "127.0.0.2")
        elapsed = time.monotonic() - start
    assert [h.zone for h in hits] == ["block.dnsbl.test"]
    assert BOUND - 0.1 <= elapsed < BOUND + SLACK
    assert "slow.dnsbl.test" in caplog.text and "broken.dnsbl.test" in caplog.text


def test_servfail_is_not_listed_and_quick(dnsbl_server: DnsServer) -> None:
    dnsbl = Dnsbl(settings(dnsbl_server, "broken.dnsbl.test"))
    start = time.monotonic()
    assert check(dnsbl, "127.0.0.2") == []
    assert time.monotonic() - start < BOUND


def test_trouble_is_logged_once_a_minute_per_zone(dnsbl_server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    dnsbl = Dnsbl(settings(dnsbl_server, "broken.dnsbl.test"))
    with caplog.at_level(logging.WARNING, "shardmail.dnsbl"):
        for n in range(5):
            assert check(dnsbl, f"192.0.2.{n}") == []
    assert len([r for r in caplog.records if "broken.dnsbl.test" in r.getMessage()]) == 1


def test_a_stopped_server_answers_nothing_within_the_bound(dns_server_factory: Callable[..., DnsServer]) -> None:
    server = dns_server_factory(dnsbl_zone())
    dnsbl = Dnsbl(settings(server, "block.dnsbl.test", "tag.dnsbl.test:tag"))
    server.pause()
    try:
        start = time.monotonic()
        assert check(dnsbl, "127.0.0.2") == []
        assert time.monotonic() - start < BOUND + SLACK
    finally:
        server.resume()
    assert [h.zone for h in check(dnsbl, "127.0.0.2")] == ["block.dnsbl.test", "tag.dnsbl.test"]


def test_answers_are_cached_for_their_ttl(dns_server_factory: Callable[..., DnsServer]) -> None:
    server = dns_server_factory(dnsbl_zone())
    dnsbl = Dnsbl(settings(server, "block.dnsbl.test"))
    listed, unlisted = check(dnsbl, "192.0.2.10"), check(dnsbl, "192.0.2.99")
    assert [h.zone for h in listed] == ["block.dnsbl.test"] and unlisted == []
    server.stop()  # from now on only the cache can answer; a listing would be lost without it
    start = time.monotonic()
    assert check(dnsbl, "192.0.2.10") == listed
    assert check(dnsbl, "192.0.2.99") == []  # cached NXDOMAIN: no wait for the bound either
    assert time.monotonic() - start < BOUND / 2
    assert check(dnsbl, "192.0.2.20") == []  # never asked before: nobody answers


def test_no_lists_no_queries(dnsbl_server: DnsServer) -> None:
    dnsbl = Dnsbl(settings(dnsbl_server))
    assert not dnsbl and check(dnsbl, "127.0.0.2") == []
