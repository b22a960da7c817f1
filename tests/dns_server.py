"""A private DNS server on loopback for the remote-delivery tests: unbound, serving zones described in Python.

Each ``DnsServer`` writes its own unbound.conf under a tmp dir (nothing of /etc/unbound is read) and
runs ``unbound -d -p -c <conf>`` as one child process (one thread, no fork) on a free port of
127.0.0.1, UDP and TCP. It never sends a query anywhere: every name is answered from local data, and
the only upstream it knows ("." forwarded to 127.0.0.1) is one it may not query.

A ``Zone`` (origin, records, and subtrees that fail) becomes unbound local data in a ``static``
local zone: a name without records is NXDOMAIN, a name without records of the asked type NODATA.
Names outside every zone are REFUSED. Two ways to fail, both per subtree:

* ``zone.servfail``: a ``transparent`` local zone, so the query goes on to the resolver, whose only
  upstream is forbidden (``do-not-query-address``): a real SERVFAIL at once, no traffic.
* ``zone.timeout``: a ``deny`` local zone: unbound drops the query (UDP) or closes the connection
  (TCP) without an answer, so the client times out while the rest of the zone still answers.

``pause()``/``resume()`` SIGSTOP/SIGCONT the whole server, for timeouts of every name.

Fixtures (register with ``pytest_plugins = ["tests.dns_server"]``): ``dns_server``, one per session
serving ``standard_zone()`` (never pause or stop it), and ``dns_server_factory(*zones)``, servers of
their own for one test (``standard_zone()`` when no zone is given; ``address=``/``port=`` to listen at a
fixed place), stopped at the end of the test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from tests.support import die_with_parent, free_port, read_log, wait_until

ADDRESS = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 3  # a port picked free (TCP) can be taken, or be busy for UDP, before unbound binds it
DEFAULT_TTL = 60


def _sbin(name: str) -> str:
    """unbound lives in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def _name(name: str) -> dns.name.Name:
    """An absolute name; a Unicode one in its IDNA form (bücher.test → xn--bcher-kva.test.)."""
    return dns.name.from_text(name.rstrip(".") + ".") if name not in ("", ".") else dns.name.root


def _quoted(text: str) -> str:
    """An unbound.conf string: double quotes, or single ones around text that has double quotes."""
    assert not ("'" in text and '"' in text) and "\n" not in text, f"unsuitable for unbound.conf: {text!r}"
    return f"'{text}'" if '"' in text else f'"{text}"'


@dataclass(frozen=True)
class Record:
    """One resource record; ``name`` and ``data`` are normalised by ``Zone.add``."""

    name: str
    rtype: str
    data: str
    ttl: int = DEFAULT_TTL

    def text(self) -> str:
        return f"{self.name} {self.ttl} IN {self.rtype} {self.data}"


@dataclass
class Zone:
    """A zone as unbound local data: records, plus subtrees answered SERVFAIL or not at all.

    Names are absolute, trailing dot optional, Unicode allowed (stored in IDNA form); names inside
    record data too (``"10 mx.bücher.test"``). ``txt`` adds a TXT record of any length (DKIM keys).
    """

    origin: str = "test"
    records: list[Record] = field(default_factory=list)
    servfail: set[str] = field(default_factory=set)
    timeout: set[str] = field(default_factory=set)

    def add(self, name: str, rtype: str, *data: str, ttl: int = DEFAULT_TTL) -> Zone:
        """Records of one type at ``name``, one per ``data`` (presentation format); checked by dnspython."""
        owner = self._inside(name)
        kind = dns.rdatatype.from_text(rtype)
        for item in data:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, kind, item, origin=dns.name.root)
            self.records.append(Record(owner.to_text(), dns.rdatatype.to_text(kind), rdata.to_text(), ttl))
        return self

    def address(self, name: str, *addresses: str, ttl: int = DEFAULT_TTL) -> Zone:
        """A and AAAA records for ``name``, by the form of each address."""
        for item in addresses:
            self.add(name, "AAAA" if ipaddress.ip_address(item).version == 6 else "A", item, ttl=ttl)
        return self

    def mx(self, domain: str, preference: int, host: str, *addresses: str, ttl: int = DEFAULT_TTL) -> Zone:
        """An MX record for ``domain``, and the exchanger's addresses (none: add them yourself, or don't)."""
        self.add(domain, "MX", f"{preference} {_name(host)}", ttl=ttl)
        return self.address(host, *addresses, ttl=ttl)

    def txt(self, name: str, text: str, ttl: int = DEFAULT_TTL) -> Zone:
        """One TXT record holding ``text``, cut into character-strings of 255 at most (a DKIM key's
        record is longer than one string may be; a reader joins them again)."""
        strings = " ".join('"' + text[i:i + 255].replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for i in range(0, len(text), 255))
        return self.add(name, "TXT", strings or '""', ttl=ttl)

    def _inside(self, name: str) -> dns.name.Name:
        owner = _name(name)
        assert owner.is_subdomain(_name(self.origin)), f"{owner} is outside zone {self.origin}"
        return owner

    def unbound_config(self) -> list[str]:
        """``server:`` clauses for this zone."""
        failing = {_name(n): "transparent" for n in self.servfail} | {_name(n): "deny" for n in self.timeout}
        lines = [f"local-zone: {_quoted(_name(self.origin).to_text())} static"]
        for subtree, kind in sorted(failing.items()):
            self._inside(subtree.to_text())
            clash = [r.name for r in self.records if _name(r.name).is_subdomain(subtree)]
            assert not clash, f"records inside {kind} subtree {subtree}: {clash}"
            lines.append(f"local-zone: {_quoted(subtree.to_text())} {kind}")
        lines.extend(f"local-data: {_quoted(record.text())}" for record in self.records)
        return lines


def standard_zone() -> Zone:
    """The remote-delivery tests' zone ``test`` (a new object each call: add to it freely).

    multi.test       MX 10 mx1, MX 10 mx2, MX 20 backup (.multi.test) → 127.0.0.11/.12/.13, mx1 also ::1
    implicit.test    no MX; A 127.0.0.21, AAAA ::1
    nullmx.test      MX 0 . (RFC 7505)
    dangling.test    MX 10 gone.dangling.test, which has no address (NXDOMAIN)
    bücher.test      (xn--bcher-kva.test) MX 10 mx.xn--bcher-kva.test → 127.0.0.31
    d1..d50.test     MX 10 mail.dN.test → 127.0.1.N
    servfail.test    SERVFAIL, and every name under it
    timeout.test     never answered, and every name under it
    nx.test, nosuch.multi.test, anything else in test: NXDOMAIN; outside test: REFUSED
    """
    zone = Zone("test")
    zone.mx("multi.test", 10, "mx1.multi.test", "127.0.0.11", "::1")
    zone.mx("multi.test", 10, "mx2.multi.test", "127.0.0.12")
    zone.mx("multi.test", 20, "backup.multi.test", "127.0.0.13")
    zone.address("implicit.test", "127.0.0.21", "::1")
    zone.add("nullmx.test", "MX", "0 .")
    zone.mx("dangling.test", 10, "gone.dangling.test")
    zone.mx("bücher.test", 10, "mx.bücher.test", "127.0.0.31")
    for n in range(1, 51):
        zone.mx(f"d{n}.test", 10, f"mail.d{n}.test", f"127.0.1.{n}")
    zone.servfail.add("servfail.test")
    zone.timeout.add("timeout.test")
    return zone


class DnsServer:
    """One unbound process serving ``zones`` on 127.0.0.1:``port`` (UDP and TCP), files under ``directory``."""

    def __init__(self, directory: Path, zones: Sequence[Zone], address: str = ADDRESS, port: int = 0) -> None:
        """``address``/``port``: where to listen (port 0 = a free one); a resolver that only takes
        an address (glibc's resolv.conf: port 53) needs a fixed port on an address of its own."""
        self.directory = directory
        self.zones = list(zones)
        self.config_path = directory / "unbound.conf"
        self.log_path = directory / "unbound.log"
        self.address = address
        self.fixed_port = port
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hostport(self) -> str:
        """``127.0.0.1:PORT``, as the ``dnsresolvers`` setting takes it."""
        return f"{self.address}:{self.port}"

    def config(self) -> str:
        """unbound.conf: loopback only, root's privileges kept (no chroot, no user switch), no upstream."""
        server = [
            f"interface: {self.address}",
            f"port: {self.port}",
            "do-ip6: no",
            "so-reuseport: no",  # else a second socket on the port is no bind error: queries would be shared
            'chroot: ""',
            'username: ""',
            f"directory: {_quoted(str(self.directory))}",
            'pidfile: ""',
            "use-syslog: no",
            'logfile: ""',  # stderr, which start() sends to unbound.log
            "verbosity: 1",
            "num-threads: 1",  # one process, one thread: SIGSTOP stops it all, PDEATHSIG kills it all
            'module-config: "iterator"',  # no validator: no trust anchor to fetch
            f"outgoing-interface: {self.address}",
            "do-not-query-localhost: yes",
            "do-not-query-address: 0.0.0.0/0",  # never a query to anyone, whatever the zones say
            "do-not-query-address: ::/0",
            'local-zone: "." refuse',
        ]
        for zone in self.zones:
            server.extend(zone.unbound_config())
        # what reaches the resolver (the servfail subtrees) goes to this forbidden upstream: SERVFAIL, no priming
        forward = ['name: "."', f"forward-addr: {self.address}@9"]
        sections = {"server": server, "forward-zone": forward}
        return "".join(f"{title}:\n" + "".join(f"    {line}\n" for line in lines) for title, lines in sections.items())

    # -- process ------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, start: int = 0) -> str:
        """unbound.log from byte offset ``start``."""
        return read_log(self.log_path, start)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Run unbound and return once it answers over UDP and TCP."""
        assert Path(_sbin("unbound")).exists(), "unbound is not installed (scripts/setup.sh installs it)"
        if self.running():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        output = ""
        for _attempt in range(PORT_ATTEMPTS):
            self.port = self.fixed_port or free_port(self.address)
            self.config_path.write_text(self.config())
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [_sbin("unbound"), "-d", "-p", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=die_with_parent,
                )
            wait_until(self._answers_or_exited, timeout, f"unbound on {self.hostport}")
            if self.running():
                return
            self.proc.wait()
            output = self.log(log_start)
            if "already in use" not in output:
                break
        code = self.proc.returncode if self.proc else "?"
        self.proc = None
        raise RuntimeError(f"unbound on {self.hostport} exited with {code}:\n{output[-2000:]}")

    def _answers_or_exited(self) -> bool:
        return not self.running() or self.answers()

    def answers(self, timeout: float = 0.5) -> bool:
        """Whether a query (for ".", REFUSED by design) gets a reply over UDP and over TCP."""
        query = dns.message.make_query(".", "SOA")
        try:
            dns.query.udp(query, self.address, timeout=timeout, port=self.port)
            dns.query.tcp(query, self.address, timeout=timeout, port=self.port)
        except (OSError, EOFError, dns.exception.DNSException):
            return False
        return True

    def _state(self) -> str:
        """The process state letter from /proc (T: stopped)."""
        assert self.proc is not None, "unbound is not running"
        return Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def pause(self) -> None:
        """SIGSTOP: every query times out (the kernel still queues them) until ``resume()``."""
        assert self.running(), "unbound is not running"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: self._state() == "T", STOP_TIMEOUT, "unbound stopped")

    def resume(self) -> None:
        """SIGCONT after ``pause()``: queued queries are answered (late), new ones at once."""
        assert self.running(), "unbound is not running"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: self._state() != "T", STOP_TIMEOUT, "unbound continued")

    def stop(self) -> None:
        """SIGTERM (and SIGCONT, should it be paused), SIGKILL on timeout."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------------

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver asking this server only (no system configuration, no search list)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.address]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    """The session's server for ``standard_zone()``: shared, so never pause or stop it."""
    with DnsServer(tmp_path_factory.mktemp("dns"), [standard_zone()]) as server:
        yield server


@pytest.fixture
def dns_server_factory(tmp_path: Path) -> Iterator[Callable[..., DnsServer]]:
    """``dns_server_factory(zone, ...)`` starts a private server (``standard_zone()`` if no zone given)."""
    servers: list[DnsServer] = []

    def factory(*zones: Zone, address: str = ADDRESS, port: int = 0) -> DnsServer:
        server = DnsServer(tmp_path / f"dns{len(servers)}", zones or [standard_zone()], address, port)
        servers.append(server)
        server.start()
        return server

    yield factory
    for server in servers:
        server.stop()
