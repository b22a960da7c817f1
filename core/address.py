"""Mail address syntax and domain matching (pure functions).

Interface: ``parse_path(text, smtputf8=None, null=False, postmaster=False) -> Path | str`` (the
argument of MAIL FROM:/RCPT TO: after the colon, as RFC 5321 4.1.2 spells it; a ``Path`` or why not),
``check_mailbox(address, smtputf8) -> str | None`` (None when valid, else why not),
``domain_of(address)``, ``without_root_dot(address)``, ``routes_elsewhere(address)``,
``domain_matches(domain, patterns)`` (qmail's rcpthosts rule: an entry ``.example.com`` matches
every subdomain), ``peer_in(ip, networks)``, ``clean_for_header(text)``.

``parse_path`` is the SMTP grammar, exactly: ``<`` [source route ``:``] Mailbox ``>`` then nothing
or SP and the ESMTP parameters; Local-part a Dot-string or Quoted-string; a domain or an address
literal (IPv4, ``IPv6:``, or General-address-literal ``tag:dcontent``); ``<>`` only where ``null``
(MAIL), ``<Postmaster>`` only where ``postmaster`` (RCPT, RFC 5321 4.1.1.3 and 4.5.1); the limits of
4.5.3.1 (local part 64 octets, domain 255, path 256, counted in UTF-8). 8-bit local parts and
domains (RFC 6531) only with SMTPUTF8: ``smtputf8=None`` takes it from the parameters in ``text``
(MAIL), a bool from the transaction (RCPT). Nothing is ever rewritten: the mailbox comes back as
the client spelled it. Two leniencies, both older than this parser: a domain may end in the root's
dot (``user@example.com.``, see ``without_root_dot``), and C1 controls count as controls (refused).

The checks are deliberately strict where a loose parser would open a relay: a source route
(``@a,@b:c@d``) is grammatical and ``parse_path`` drops it, as RFC 5321 4.1.1.3 allows (the mail
goes to ``c@d``; the route is kept in ``Path.route`` for the record); ``check_mailbox`` refuses one
outright (``@a:b@c``). Bang paths, percent hacks and quoted ``@`` are valid syntax but routes of
their own (``routes_elsewhere``), taken only from clients allowed to relay, and never interpreted
here. ``check_mailbox`` is the policy after the grammar: it refuses address literals other than
IPv4/IPv6, labels over 63 octets and domains IDNA cannot encode.

Failures: none raised; callers map "invalid" to 501 5.1.3 (recipient) or 501 5.1.7 (sender).
Settings: none.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_UTF8_ATEXT = re.compile(r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*\Z")


# RFC 5321 4.1.2 and 4.1.3 as one regular expression, built twice: ASCII, and with RFC 6531's
# UTF8-non-ascii in atext, qtextSMTP and sub-domain (for SMTPUTF8 transactions).
_IPV4 = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]?[0-9])){3}"
_PARAMS = r"(?: (?P<params>[^\x00-\x20\x7f][^\x00-\x1f\x7f]*))?\Z"  # SP Mail-parameters, for aiosmtpd to parse
_LITERAL = (r"\[(?:" + _IPV4 + r"|[Ii][Pp][Vv]6:(?P<ipv6>[0-9A-Fa-f:.]+)"
            r"|(?![Ii][Pp][Vv]6:)[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]")
_ASCII_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = r"\u00a0-\ud7ff\ue000-\U0010ffff"  # UTF8-non-ascii, without C1 controls and surrogates


def _path_regex(atext: str, sub_domain: str, qtext_extra: str) -> re.Pattern[str]:
    domain = rf"{sub_domain}(?:\.{sub_domain})*"
    local = rf'[{atext}]++(?:\.[{atext}]++)*+|"(?:[\x20\x21\x23-\x5b\x5d-\x7e{qtext_extra}]|\\[\x20-\x7e])*"'
    return re.compile(rf"<(?:(?P<route>@{domain}(?:,@{domain})*):)?"
                      rf"(?P<mailbox>(?P<local>{local})@(?P<domain>{domain}\.?|{_LITERAL}))>" + _PARAMS)


# sub-domain = Let-dig [Ldh-str], written so that nothing backtracks (possessive quantifiers)
_PATH = _path_regex(_ASCII_ATEXT, r"[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+", "")
_PATH_UTF8 = _path_regex(_ASCII_ATEXT + _UTF8, rf"[A-Za-z0-9{_UTF8}]++(?:-++[A-Za-z0-9{_UTF8}]++)*+", _UTF8)
_POSTMASTER = re.compile(r"<([Pp][Oo][Ss][Tt][Mm][Aa][Ss][Tt][Ee][Rr])>" + _PARAMS)
_IPV4_TAIL = re.compile(_IPV4 + r"\Z")
_IPV6_PART = re.compile(r"[0-9A-Fa-f]{1,4}\Z")


class Path(NamedTuple):
    """A MAIL/RCPT path that matched the grammar: the mailbox as sent ("" for ``<>``, ``Postmaster``
    for a bare ``<Postmaster>``), the ESMTP parameters after the SP, the dropped source route."""

    mailbox: str
    params: str = ""
    route: str = ""


def parse_path(text: str, smtputf8: bool | None = None, null: bool = False, postmaster: bool = False) -> Path | str:
    """``text`` (what follows ``MAIL FROM:`` or ``RCPT TO:``) as a ``Path``, or why it is not one.

    ``null``: ``<>`` is allowed (MAIL); ``postmaster``: ``<Postmaster>`` without a domain is (RCPT);
    ``smtputf8``: whether 8-bit is allowed, None for "if the parameters in ``text`` say SMTPUTF8"."""
    match = _PATH.match(text)
    if match is None:
        if text.startswith("<>") and (text == "<>" or (text[2] == " " and len(text) > 3 and text[3] > " ")):
            return Path("", text[3:]) if null else "the null path <> is only for MAIL"
        if postmaster:
            special = _POSTMASTER.match(text)
            if special:
                return Path(special.group(1), special.group("params") or "")
        if text.isascii() or smtputf8 is False:
            return _path_problem(text, smtputf8 is not False)
        match = _PATH_UTF8.match(text)
        if match is None:
            return _path_problem(text, True)
        route, mailbox, local, domain, ipv6, params = match.groups()
        if smtputf8 is None and not _says_smtputf8(params):
            return "8-bit address without SMTPUTF8"
        local_octets, domain_octets = len(local.encode()), len(domain.encode())
        path_octets = len(mailbox.encode()) + (len(route.encode()) + 3 if route else 2)
    else:
        route, mailbox, local, domain, ipv6, params = match.groups()
        local_octets, domain_octets = len(local), len(domain)
        path_octets = len(mailbox) + (len(route) + 3 if route else 2)
    if local_octets > 64:
        return "local part over 64 octets"
    if domain_octets > 255:
        return "domain over 255 octets"
    if path_octets > 256:
        return "path over 256 octets"
    if ipv6 is not None and not _ipv6_ok(ipv6):
        return "bad IPv6 address literal"
    return Path(mailbox, params or "", route or "")


def _says_smtputf8(params: str | None) -> bool:
    return bool(params) and any(p.upper() == "SMTPUTF8" for p in params.split(" "))  # type: ignore[union-attr]


def _ipv6_ok(text: str) -> bool:
    """RFC 5321's IPv6-addr: full, or compressed with at most 6 groups beside the ``::`` (4 before
    an IPv4 tail); no zone index."""
    head, sep, tail = text.rpartition(":")
    if "." in tail:
        if not sep or not _IPV4_TAIL.match(tail):
            return False
        text = head + ":0:0"  # the IPv4 tail stands for two groups
    if text.count("::") > 1:
        return False
    if "::" in text:
        left, _, right = text.partition("::")
        parts = (left.split(":") if left else []) + (right.split(":") if right else [])
        if len(parts) > 6:
            return False
    else:
        parts = text.split(":")
        if len(parts) != 8:
            return False
    return all(_IPV6_PART.match(p) for p in parts)


def _path_problem(text: str, eight_bit_ok: bool) -> str:
    """Why ``text`` is not a path (only on the refusal path, so it may take its time)."""
    if not text.startswith("<"):
        return "the path must start with <"
    if not eight_bit_ok and not text.isascii():
        return "8-bit address without SMTPUTF8"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
        return "control character in address"
    end = text.find(">", 1)
    while end > 0 and text.count('"', 0, end) % 2:
        end = text.find(">", end + 1)
    if end < 0:
        return "the path must end with >"
    if "<" in text[1:end]:
        return "< inside the path"
    if end + 1 < len(text) and text[end + 1] != " ":
        return "text after > that is not SP and parameters"
    if end + 1 < len(text) and (end + 2 == len(text) or text[end + 2] <= " "):
        return "bad parameter separator after >"
    inner = text[1:end]
    if inner.startswith("@"):
        _, colon, inner = inner.partition(":")
        if not colon:
            return "bad source route"
    if "@" not in inner:
        return "address needs local-part@domain"
    local, _, domain = inner.rpartition("@")
    if not local:
        return "empty local part"
    if local.startswith('"'):
        return "bad quoted local part"
    if " " in inner:
        return "space in address (quote the local part)"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "bad dots in local part"
    if not domain:
        return "empty domain"
    if domain.startswith("["):
        return "bad address literal"
    return "bad local part or domain syntax"


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


def a_label(domain: str) -> str:
    """An international domain name in its IDNA (A-label) form; an ASCII one, or one IDNA cannot
    encode, as given (the callers compare or print it, and a bad one matches nothing)."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def clean_for_header(text: str, limit: int = 200) -> str:
    """Printable ASCII without spaces, so a peer's words can never start a header or a line."""
    return _UNSAFE.sub("?", text)[:limit]
