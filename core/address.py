"""Mail address syntax and domain matching (pure functions).

Interface: ``check_mailbox(address, smtputf8) -> str | None`` (None when valid, else why not),
``domain_of(address)``, ``without_root_dot(address)``, ``routes_elsewhere(address)``,
``domain_matches(domain, patterns)`` (qmail's rcpthosts rule: an entry ``.example.com`` matches
every subdomain), ``peer_in(ip, networks)``, ``clean_for_header(text)``.

The checks are deliberately strict where a loose parser would open a relay: a source route
(``@a:b@c``) is refused here (aiosmtpd's parser already drops a route in ``<...>``, as RFC 5321
4.1.1.3 allows: the mail goes to ``b@c``); bang paths, percent hacks and quoted ``@`` are valid
syntax but routes of their own (``routes_elsewhere``), taken only from clients allowed to relay,
and never interpreted here.

Failures: none raised; callers map "invalid" to 501 5.1.3 (recipient) or 501 5.1.7 (sender).
Settings: none.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_UTF8_ATEXT = re.compile(r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*\Z")


def domain_of(address: str) -> str:
    """The domain part, lower-cased, without a trailing dot ("" for the null address)."""
    return address.rpartition("@")[2].rstrip(".").lower() if "@" in address else ""


def check_domain(domain: str, smtputf8: bool = False) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
            try:
                ipaddress.IPv6Address(literal)
                return None
            except ValueError:
                return "bad IPv6 address literal"
        try:
            ipaddress.IPv4Address(literal)
            return None
        except ValueError:
            return "bad address literal"
    if not domain or len(domain) > 253:
        return "bad domain length"
    if smtputf8 and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return "bad internationalized domain"
    labels = domain.split(".")
    if any(not _LABEL.match(label) for label in labels):
        return "bad domain syntax"
    return None


def check_mailbox(address: str, smtputf8: bool = False) -> str | None:
    """Why ``address`` (the inside of <...>) is not a deliverable mailbox, or None if it is."""
    if not address:
        return "empty address"
    if not smtputf8 and not address.isascii():
        return "8-bit address without SMTPUTF8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return "control character in address"
    if address.startswith("@"):
        return "source routes are not accepted"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "address needs local-part@domain"
    if len(local.encode()) > 64 or len(address.encode()) > 254:
        return "address too long"
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local) or (smtputf8 and _UTF8_ATEXT.match(local))):
        return "bad local-part syntax"
    return check_domain(domain[:-1] if domain.endswith(".") else domain, smtputf8)


def without_root_dot(address: str) -> str:
    """``user@example.com.`` is ``user@example.com`` (the root's dot names no other domain): the
    form the directory, the routing and the Maildir names all see."""
    return address[:-1] if address.endswith(".") and "@" in address else address


def routes_elsewhere(address: str) -> bool:
    """Whether the local part carries a route of its own: a percent hack (``a%b@ours``), a bang
    path (``b!a@ours``) or a quoted ``@`` (``"a@b"@ours``). Such an address is only taken from a
    client allowed to relay (a host that would interpret it could be made to relay)."""
    local = address.rpartition("@")[0]
    return "%" in local or "!" in local or "@" in local


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """qmail's rcpthosts rule: exact match, or an entry ``.d`` matches any subdomain of d."""
    domain = domain.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("."):
            if domain.endswith(pattern):
                return True
        elif domain == pattern:
            return True
    return False


def peer_in(peer: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether a client address (an IPv4-mapped IPv6 one as its IPv4 form) lies in one of the networks."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


_UNSAFE = re.compile(r"[^\x21-\x7e]")


def clean_for_header(text: str, limit: int = 200) -> str:
    """Printable ASCII without spaces, so a peer's words can never start a header or a line."""
    return _UNSAFE.sub("?", text)[:limit]
