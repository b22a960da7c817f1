"""VERP: the per-recipient envelope sender a mailing list asks for, so its bounces name the recipient.

Interface: ``DEFAULT_DELIMITERS`` (``+=``, Postfix's ``default_verp_delimiters``), ``ALLOWED``
(``-+=``, its ``verp_delimiter_filter``), ``valid_delimiters(text) -> bool``,
``verp_sender(sender, recipient, delimiters) -> str``, ``qmail_form(sender) -> (sender,
delimiters) | None``, ``qmail_spelling(sender, delimiters) -> str | None`` (its inverse: how VERP
crosses QMQP, which carries only a sender).

The rule (Postfix's ``verp_sender``, which is qmail's with the delimiters made explicit): sender
``prefix@origin``, recipient ``user@domain``, delimiters ``xy`` give ``prefix<x>user<y>domain@origin``;
with the default ``+=``: ``prefix+user=domain@origin``. qmail's own spelling asks for it in the
sender itself: ``prefix-@origin-@[]`` becomes ``prefix-user=domain@origin``, which is this rule
with sender ``prefix@origin`` and delimiters ``-=`` (``qmail_form`` makes that translation; any
delimiter from ``ALLOWED`` may end the local part, the second is always ``=``).

Details: quoted local parts are taken unquoted (``"a b"@x`` is the prefix ``a b``) and the result
is quoted again when it is no dot-atom; an empty prefix (``""@origin``) gives ``+user=domain@origin``;
a recipient without a domain adds only ``<x>user``; a non-ASCII recipient domain is written in its
IDNA form, so the new local part stays ASCII when the addresses were. The null sender (``<>``) and
the double-bounce sender never get VERP: bounces are not per recipient.

Failures: none (pure). Settings: none (``verpdelimiters`` is read by the callers).
"""

from __future__ import annotations

import re

from core.address import a_label

DEFAULT_DELIMITERS = "+="
ALLOWED = "-+="
NO_VERP_SENDERS = ("", "#@[]")  # the null sender; qmail's double-bounce sender (core.envelope's)
QMAIL_SUFFIX = "-@[]"
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_UTF8_DOT_ATOM = re.compile(r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*\Z")
_ESCAPED = re.compile(r"\\(.)")


def valid_delimiters(text: str) -> bool:
    """Two characters, each one of ``ALLOWED`` (Postfix's check of ``XVERP=`` and ``-XV``)."""
    return len(text) == 2 and all(c in ALLOWED for c in text)


def _unquote(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return _ESCAPED.sub(r"\1", local[1:-1])
    return local


def _quote(local: str) -> str:
    """The local part as an address spells it: bare when a dot-atom, else a quoted string."""
    if _DOT_ATOM.match(local) or (not local.isascii() and _UTF8_DOT_ATOM.match(local)):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def verp_sender(sender: str, recipient: str, delimiters: str) -> str:
    """The envelope sender for ``recipient`` (``sender`` itself for the null and double-bounce senders)."""
    if sender in NO_VERP_SENDERS:
        return sender
    prefix, at, origin = sender.rpartition("@")
    if not at:
        prefix, origin = sender, ""
    user, at_rcpt, domain = recipient.rpartition("@")
    if not at_rcpt:
        user, domain = recipient, ""
    local = _unquote(prefix) + delimiters[0] + _unquote(user)
    if domain:
        local += delimiters[1] + a_label(domain)
    return _quote(local) + (f"@{origin}" if at else "")


def qmail_spelling(sender: str, delimiters: str) -> str | None:
    """``prefix@origin`` with delimiters ``x=`` as qmail spells the request, ``prefix<x>@origin-@[]``;
    None when the second delimiter is not ``=`` (qmail's form cannot say it)."""
    if len(delimiters) != 2 or delimiters[1] != "=" or delimiters[0] not in ALLOWED:
        return None
    local, _, origin = sender.rpartition("@")
    return f"{_quote(_unquote(local) + delimiters[0])}@{origin}{QMAIL_SUFFIX}"


def qmail_form(sender: str) -> tuple[str, str] | None:
    """qmail's ``prefix-@origin-@[]``: (``prefix@origin``, ``-=``); None when ``sender`` is not in that
    form (no ``-@[]`` ending, no origin, or a local part not ending in a delimiter of ``ALLOWED``)."""
    if not sender.endswith(QMAIL_SUFFIX):
        return None
    local, at, origin = sender[: -len(QMAIL_SUFFIX)].rpartition("@")
    if not at or not origin or "@" in origin:
        return None
    local = _unquote(local)
    if not local or local[-1] not in ALLOWED:
        return None
    return f"{_quote(local[:-1])}@{origin}", local[-1] + "="
