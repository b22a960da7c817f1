"""qmail-style address lists: senders and recipients refused outright, senders allowed to relay.

Interface: ``Policy(settings)`` with ``bad_sender(address)``, ``bad_recipient(address)`` and
``relay_sender(address)`` (all ``-> bool``); ``AddressList(entries)`` with ``matches(address)``,
the matcher behind the three. Addresses are the inside of ``<...>``; ``""`` is the null sender.

Entries (each list the same forms):
- ``user@example.com``: that address only;
- ``@example.com``: every address at exactly that domain;
- ``.example.com`` (or ``@.example.com``): every address at a subdomain of example.com, not at
  example.com itself (the ``rcpthosts`` rule of this project, ``core.address.domain_matches``);
- ``<>``: the null sender (badmailfrom only). Without it the null sender never matches, so a
  ``@domain`` entry cannot refuse bounces: they carry no domain to match.

Matching ignores case in the local part and the domain (qmail does too), a trailing dot of the
domain, and the form of an international domain (``bücher.example`` and ``xn--bcher-kva.example``
are one entry). Lists are sets built once: a check is a few hash look-ups, whatever the list's size.

Why relaymailfrom is weak: the envelope sender is whatever the client says, so anyone who guesses
a listed address relays through us. It exists for qmail-ldap compatibility; prefer relaynets or
SMTP AUTH. The null sender never relays (the config refuses a ``<>`` entry).

Replies the SMTP dialogue should use: a badmailfrom sender is refused at each RCPT, as qmail does
(``553 5.7.1``), so a client that ignores a refused MAIL sees a consistent refusal per recipient;
a badrcptto recipient at its RCPT (``553 5.7.1``).

Failures: none raised. Settings: ``badmailfrom``, ``badrcptto``, ``relaymailfrom``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.address import a_label
from core.config import Settings

NULL_ENTRY = "<>"


def _domain(domain: str) -> str:
    """Lower case, no trailing dot, an international name in its A-label form (as given if it has none)."""
    return a_label(domain.rstrip(".").lower())


def _address(address: str) -> tuple[str, str]:
    """(local part, domain), both normalised; ("", "") for the null sender; no @: the whole as local part."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower(), ""
    return local.lower(), _domain(domain)


@dataclass(frozen=True, slots=True)
class AddressList:
    """One list's entries, sorted by form into sets."""

    addresses: frozenset[str]
    domains: frozenset[str]
    parents: frozenset[str]  # ".example.com": subdomains of example.com
    null: bool

    @classmethod
    def of(cls, entries: Iterable[str]) -> AddressList:
        addresses, domains, parents, null = set(), set(), set(), False
        for entry in entries:
            entry = entry.strip()
            if entry == NULL_ENTRY:
                null = True
            elif entry.startswith("@."):
                parents.add("." + _domain(entry[2:]))
            elif entry.startswith("@"):
                domains.add(_domain(entry[1:]))
            elif entry.startswith("."):
                parents.add("." + _domain(entry[1:]))
            elif entry:
                local, domain = _address(entry)
                addresses.add(f"{local}@{domain}" if domain else local)
        return cls(frozenset(addresses), frozenset(domains), frozenset(parents), null)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains or self.parents or self.null)

    def matches(self, address: str) -> bool:
        if not address or address == NULL_ENTRY:
            return self.null
        local, domain = _address(address)
        if (f"{local}@{domain}" if domain else local) in self.addresses:
            return True
        if not domain:
            return False
        if domain in self.domains:
            return True
        if self.parents:
            dot = domain.find(".")
            while dot >= 0:
                if domain[dot:] in self.parents:
                    return True
                dot = domain.find(".", dot + 1)
        return False


class Policy:
    """The three lists of ``settings``, built once per process."""

    __slots__ = ("badmailfrom", "badrcptto", "relaymailfrom")

    def __init__(self, settings: Settings) -> None:
        self.badmailfrom = AddressList.of(settings.badmailfrom)
        self.badrcptto = AddressList.of(settings.badrcptto)
        self.relaymailfrom = AddressList.of(e for e in settings.relaymailfrom if e.strip() != NULL_ENTRY)

    def bad_sender(self, address: str) -> bool:
        """A sender refused by badmailfrom (the null sender only with a ``<>`` entry)."""
        return self.badmailfrom.matches(address)

    def bad_recipient(self, address: str) -> bool:
        return self.badrcptto.matches(address)

    def relay_sender(self, address: str) -> bool:
        """A sender that may relay by relaymailfrom alone; never the null sender."""
        return bool(address) and self.relaymailfrom.matches(address)
