"""The loopback DNS server (tests/dns_server.py) answers as the remote-delivery tests expect, asked with dnspython."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.dns_server import DnsServer, Zone, standard_zone
from tests.support import wait_until

LIFETIME = 1.0


def mx(resolver: dns.resolver.Resolver, name: str, **kwargs: object) -> list[tuple[int, str]]:
    answer = resolver.resolve(name, "MX", **kwargs)  # type: ignore[arg-type]
    return sorted((r.preference, r.exchange.to_text()) for r in answer)


def addresses(resolver: dns.resolver.Resolver, name: str, kind: str = "A") -> list[str]:
    return sorted(r.to_text() for r in resolver.resolve(name, kind))


def rcodes(error: dns.resolver.NoNameservers) -> list[dns.rcode.Rcode]:
    """The rcode of each answer behind a NoNameservers (errors: server, tcp, port, error, response)."""
    return [entry[4].rcode() for entry in error.kwargs["errors"]]


def test_several_mx_preferences_and_their_addresses(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    assert dns_server.address == "127.0.0.1" and dns_server.hostport == f"127.0.0.1:{dns_server.port}"
    assert mx(resolver, "multi.test") == [(10, "mx1.multi.test."), (10, "mx2.multi.test."),
                                          (20, "backup.multi.test.")]
    assert mx(resolver, "multi.test", tcp=True) == mx(resolver, "multi.test")
    assert addresses(resolver, "mx1.multi.test") == ["127.0.0.11"]
    assert addresses(resolver, "mx1.multi.test", "AAAA") == ["::1"]
    assert addresses(resolver, "mx2.multi.test") == ["127.0.0.12"]
    assert addresses(resolver, "backup.multi.test") == ["127.0.0.13"]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx2.multi.test", "AAAA")


def test_implicit_mx_has_addresses_only(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("implicit.test", "MX")
    assert resolver.resolve("implicit.test", "MX", raise_on_no_answer=False).rrset is None
    assert addresses(resolver, "implicit.test") == ["127.0.0.21"]
    assert addresses(resolver, "implicit.test", "AAAA") == ["::1"]


def test_null_mx(dns_server: DnsServer) -> None:
    answer = dns_server.resolver().resolve("nullmx.test", "MX")
    assert [(r.preference, r.exchange) for r in answer] == [(0, dns.name.root)]


@pytest.mark.parametrize("name", ["nx.test", "nosuch.multi.test", "gone.dangling.test"])
def test_nxdomain(dns_server: DnsServer, name: str) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns_server.resolver().resolve(name, "MX")


def test_dangling_mx_points_at_no_address(dns_server: DnsServer) -> None:
    assert mx(dns_server.resolver(), "dangling.test") == [(10, "gone.dangling.test.")]


@pytest.mark.parametrize("name", ["servfail.test", "mx.servfail.test"])
def test_servfail(dns_server: DnsServer, name: str) -> None:
    with pytest.raises(dns.resolver.NoNameservers) as caught:
        dns_server.resolver().resolve(name, "MX")
    assert rcodes(caught.value) == [dns.rcode.SERVFAIL]
    response = dns.query.tcp(dns.message.make_query(name, "A"), dns_server.address, timeout=LIFETIME,
                             port=dns_server.port)
    assert response.rcode() == dns.rcode.SERVFAIL


def test_outside_the_zones_is_refused(dns_server: DnsServer) -> None:
    with pytest.raises(dns.resolver.NoNameservers) as caught:
        dns_server.resolver().resolve("example.com", "MX")
    assert rcodes(caught.value) == [dns.rcode.REFUSED]


@pytest.mark.parametrize("name", ["timeout.test", "mx.timeout.test"])
def test_one_name_times_out_while_the_rest_answers(dns_server: DnsServer, name: str) -> None:
    resolver = dns_server.resolver(lifetime=LIFETIME)
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve(name, "MX")
    assert LIFETIME * 0.9 <= time.monotonic() - started < LIFETIME + 1.0
    assert mx(resolver, "nullmx.test") == [(0, ".")]


def test_idna_domain(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    assert mx(resolver, "xn--bcher-kva.test") == [(10, "mx.xn--bcher-kva.test.")]
    assert mx(resolver, "bücher.test") == [(10, "mx.xn--bcher-kva.test.")]
    assert addresses(resolver, "mx.xn--bcher-kva.test") == ["127.0.0.31"]


def test_fifty_benchmark_destinations(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    for n in range(1, 51):
        assert mx(resolver, f"d{n}.test") == [(10, f"mail.d{n}.test.")]
        assert addresses(resolver, f"mail.d{n}.test") == [f"127.0.1.{n}"]


def test_paused_server_times_out_then_answers_again(dns_server_factory: Callable[..., DnsServer]) -> None:
    server = dns_server_factory()
    resolver = server.resolver(lifetime=LIFETIME)
    assert mx(resolver, "nullmx.test") == [(0, ".")]
    server.pause()
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("multi.test", "MX")
    assert LIFETIME * 0.9 <= time.monotonic() - started < LIFETIME + 1.0
    server.resume()
    assert mx(resolver, "nullmx.test") == [(0, ".")]
    server.pause()
    server.stop()  # a paused server stops too
    assert not server.running()


def test_factory_serves_custom_zones(dns_server_factory: Callable[..., DnsServer]) -> None:
    zone = Zone("example")
    zone.mx("shop.example", 5, "in.shop.example", "127.0.0.41", "::1")
    zone.add("shop.example", "TXT", '"v=spf1 -all"')
    zone.servfail.add("broken.example")
    extended = standard_zone().mx("new.test", 10, "mx.new.test", "127.0.0.51")
    server = dns_server_factory(zone, extended)
    resolver = server.resolver()
    assert mx(resolver, "shop.example") == [(5, "in.shop.example.")]
    assert addresses(resolver, "in.shop.example", "AAAA") == ["::1"]
    assert [r.to_text() for r in resolver.resolve("shop.example", "TXT")] == ['"v=spf1 -all"']
    assert mx(resolver, "new.test") == [(10, "mx.new.test.")]
    assert mx(resolver, "multi.test")[0] == (10, "mx1.multi.test.")
    with pytest.raises(dns.resolver.NoNameservers) as caught:
        resolver.resolve("broken.example", "MX")
    assert rcodes(caught.value) == [dns.rcode.SERVFAIL]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nx.example", "MX")


def test_zone_rejects_bad_records() -> None:
    with pytest.raises(AssertionError):
        Zone("test").add("elsewhere.example", "A", "127.0.0.1")
    with pytest.raises(dns.exception.SyntaxError):
        Zone("test").add("bad.test", "MX", "ten mx.bad.test")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_stop_frees_the_port(dns_server_factory: Callable[..., DnsServer]) -> None:
    server = dns_server_factory(Zone("test"))
    assert server.proc is not None
    pid, port = server.proc.pid, server.port
    assert not _udp_port_free(port)
    server.stop()
    assert not _alive(pid) and _udp_port_free(port)


CHILD = """
import sys
from pathlib import Path
from tests.dns_server import DnsServer, Zone
server = DnsServer(Path(sys.argv[1]), [Zone("test")])
server.start()
print(server.proc.pid, flush=True)
sys.stdin.read()
"""


def test_server_dies_with_the_test_process(tmp_path: Path) -> None:
    """A test process killed outright takes its unbound with it (PR_SET_PDEATHSIG)."""
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "dns")], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not _alive(pid), 10, "unbound gone with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
