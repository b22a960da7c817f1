"""DKIM signing at acceptance (RFC 6376; Ed25519 by RFC 8463): which mail is signed, with which keys, and how.

The front door (core.submit) asks ``Signer.header(message, sender, client)`` for the DKIM-Signature
lines of a message before its durable commit, so the spool holds the signed bytes and every retry
sends the same ones. The lines go on top of the header block, above our own Received line: a
signer's field sits above what was there when it signed (RFC 6376 §5.6), and the signature is made
over the message as it leaves.

What is signed: mail from a trusted client (an authenticated user, a ``relaynets`` address, or a
local submission by sendmail) with at least one remote recipient; never a stranger's inbound
mail. The key is the From: domain's (or its parent's: DMARC's relaxed alignment), else (with
``dkim_ldap``) the domain in an SMTP-authenticated user's ``dkimSigningDomain``
(core/schema/shardmail.ldif), else the ``dkim_fallback`` domain of the authenticated user, the
From: domain or the envelope sender's domain, else ``*``. Every key of the chosen domain signs
(RSA plus Ed25519 = dual signature); a message that already carries a signature with that d= is
left alone. relaxed/relaxed, the RFC 6376 §5.4.1 header set, From/To/Subject/Date oversigned (one
more time than present), t=, and x= when ``dkim_expire`` is set.

dkimpy does the canonicalisation (its body whitespace step made cheaper: ``relaxed_body``), header
selection and folding; the private-key operation is OpenSSL's through ``cryptography`` (dkimpy's
own RSA is pure Python: 10-20 ms a signature, against 0.3-0.6 ms here), each key parsed once at start.

Interface: ``parse_keys(entries)``, ``parse_fallback(entries)`` (the settings' syntax, also used by
core.config to check values), ``Signer.of(settings) -> Signer | None`` (None: no keys configured),
``Signer.header(message, sender, client) -> bytes`` (b"" = not signed; ``SigningUnavailable`` when the
directory cannot be asked: core.submit answers 4.4.3, never a message signed as someone else).

Failures: a key file that is missing, unreadable, not a private key, of the wrong algorithm or an
RSA key under 1024 bits, or a fallback naming a domain without a key, raises ``ConfigError`` in
``Signer.of``, at start. A message whose header block dkimpy cannot parse is accepted unsigned, with
a warning (it is malformed anyway).

Settings: ``dkim``, ``dkim_fallback``, ``dkim_ldap`` (and the directory's), ``dkim_expire``, ``relaynets``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import (
    CanonicalizationPolicy,
    correct_empty_body,
    strip_trailing_lines,
    strip_trailing_whitespace,
)
from dkim.util import InvalidTagValueList, parse_tag_value

from core.address import a_label, peer_in
from core.config import ConfigError, Settings
from core.envelope import Client

log = logging.getLogger("shardmail.dkim")

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
MIN_RSA_BITS = 1024
POLICY = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
SIGNED = frozenset(dkim.DKIM.SHOULD)  # RFC 6376 §5.4.1's recommended set
OVERSIGNED = (b"from", b"to", b"subject", b"date")  # signed once more than present: no one may add one
FIELD = b"DKIM-Signature"
B64_LINE = 64  # b= folded in lines of this many characters

WSP_RUNS = re.compile(rb"\t[\t ]*| [\t ]+")  # every whitespace run but a lone space, which stays as it is

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class SigningUnavailable(Exception):
    """The directory could not say which domain signs an authenticated user's mail (temporary)."""


def relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation (RFC 6376 §3.4.4), with its whitespace step matching only the
    runs it changes: dkimpy's rewrites every single space of the text, half the cost of a signature."""
    return correct_empty_body(strip_trailing_lines(WSP_RUNS.sub(b" ", strip_trailing_whitespace(body))))


def _domain(text: str) -> str:
    """A domain as d= and the lookups compare it: lower case, A-labels, no trailing dot."""
    return a_label(text.strip().rstrip(".").lower())


@dataclass(frozen=True)
class KeySpec:
    """One ``dkim`` entry: ``domain:selector:keyfile[:rsa|ed25519]`` (algorithm "" = the key's own)."""

    domain: str
    selector: str
    keyfile: str
    algorithm: str = ""


def parse_keys(entries: Iterable[str]) -> list[KeySpec]:
    """The ``dkim`` setting's entries; ValueError naming a bad one."""
    specs = []
    for entry in entries:
        domain, _, rest = entry.partition(":")
        selector, _, keyfile = rest.partition(":")
        path, _, algorithm = keyfile.rpartition(":")
        if algorithm not in ALGORITHMS:
            path, algorithm = keyfile, ""
        if not domain.strip(".") or not selector or not path or any(c.isspace() for c in domain + selector):
            raise ValueError(f"domain:selector:keyfile[:rsa|ed25519] entries (bad entry {entry!r})")
        specs.append(KeySpec(_domain(domain), selector, path, algorithm))
    return specs


def parse_fallback(entries: Iterable[str]) -> dict[str, str]:
    """``dkim_fallback`` entries ``user@domain=D``, ``domain=D``, ``*=D`` as {lower-case key: D}."""
    table = {}
    for entry in entries:
        key, sep, signer = entry.partition("=")
        key = key.strip().lower()
        if not sep or not key or not signer.strip(" .") or any(c.isspace() for c in key):
            raise ValueError(f"user@domain=D, domain=D or *=D entries (bad entry {entry!r})")
        table[key if "@" in key or key == "*" else _domain(key)] = _domain(signer)
    return table


def dkim_tables(raw: object, source: str) -> object:
    """``[[dkim]]`` tables (domain, selector, keyfile, algorithm) as ``dkim`` entries."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        return raw
    entries = []
    for table in raw:
        fields = [table.get(k) for k in ("domain", "selector", "keyfile")]
        algorithm = table.get("algorithm", "")
        if (not all(isinstance(f, str) and f for f in fields) or algorithm not in ("", *ALGORITHMS)
                or set(table) - {"domain", "selector", "keyfile", "algorithm"}):
            raise ConfigError(f"dkim: expected tables with domain, selector, keyfile and algorithm (rsa or "
                              f"ed25519), got {table!r} ({source})")
        entries.append(":".join(str(f) for f in [*fields, algorithm] if f))
    return entries


@dataclass(frozen=True)
class Key:
    """A loaded private key and where its public half is published."""

    domain: str
    selector: str
    algorithm: bytes  # a= value
    private: PrivateKey

    def sign(self, digest: bytes) -> bytes:
        """The signature of the header hash: PKCS#1 v1.5 for RSA, PureEd25519 over the hash (RFC 8463 §3)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)


def load_key(spec: KeySpec) -> Key:
    """Read and check one key file; ConfigError saying which and why."""
    where = f"dkim: key {spec.keyfile} ({spec.selector}._domainkey.{spec.domain})"
    try:
        with open(spec.keyfile, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    private = _private_key(data)
    if private is None:
        raise ConfigError(f"{where}: not an unencrypted PEM private key (RSA or Ed25519)")
    kind = "rsa" if isinstance(private, rsa.RSAPrivateKey) else "ed25519"
    if spec.algorithm and spec.algorithm != kind:
        raise ConfigError(f"{where}: an {kind} key, but algorithm = {spec.algorithm}")
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{where}: RSA keys need {MIN_RSA_BITS} bits at least, this one has {private.key_size}")
    return Key(spec.domain, spec.selector, ALGORITHMS[kind], private)


def _private_key(data: bytes) -> PrivateKey | None:
    """A PEM key (PKCS#1 or PKCS#8), or an Ed25519 seed in base64 (dkimpy's dknewkey writes those)."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (ValueError, binascii.Error):
            return None
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed) if len(seed) == 32 else None
    return private if isinstance(private, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) else None


class Signer:
    """The keys by domain, the fallbacks, and who may have mail signed."""

    def __init__(self, keys: Sequence[Key], fallback: dict[str, str], relaynets: Sequence[str],
                 expire: int = 0, directory: Callable[[str], str] | None = None) -> None:
        """``directory``: an authenticated user's signing domain from their entry ("" = none), or None."""
        self.keys: dict[str, list[Key]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        for source, domain in fallback.items():
            if domain not in self.keys:
                raise ConfigError(f"dkim_fallback: {source}={domain}, but no dkim key is configured for {domain}")
        self.fallback = fallback
        self.relaynets = [ipaddress.ip_network(n, strict=False) for n in relaynets]
        self.expire = expire
        self.directory = directory

    @classmethod
    def of(cls, settings: Settings) -> Signer | None:
        """The node's signer with every key loaded (ConfigError if one cannot be), None without keys."""
        if not settings.dkim:
            if settings.dkim_fallback:
                raise ConfigError("dkim_fallback: set, but no dkim keys are configured")
            return None
        keys = [load_key(spec) for spec in parse_keys(settings.dkim)]
        directory = _directory_domain(settings) if settings.dkim_ldap else None
        return cls(keys, parse_fallback(settings.dkim_fallback), settings.relaynets, settings.dkim_expire, directory)

    def trusted(self, client: Client) -> bool:
        """An authenticated user, a relaynets address or a local submission: mail we vouch for."""
        return bool(client.user) or client.protocol == "local" or peer_in(client.address, self.relaynets)

    def header(self, message: bytes, sender: str, client: Client) -> bytes:
        """The DKIM-Signature lines to put on top of ``message`` (b"": not ours to sign, or signed already)."""
        if not self.trusted(client):
            return b""
        try:
            headers, body = dkim.rfc822_parse(message)
        except dkim.DKIMException as exc:
            log.warning("not signed: unparsable header block (%s)", exc)
            return b""
        login = client.user.lower() if client.protocol != "local" else ""  # sendmail's is a Unix login
        domain = self.choose(_from_domain(headers), _domain(sender.rpartition("@")[2]) if "@" in sender else "",
                             client.user.lower(), login)
        if domain is None or domain in _signed_by(headers):
            return b""
        canonical = POLICY.canonicalize_headers(headers)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        now = int(time.time())
        return b"".join(self._signature(key, headers, canonical, body_hash, now) for key in self.keys[domain])

    def choose(self, from_domain: str, sender_domain: str, user: str, login: str = "") -> str | None:
        """The signing domain: the From: domain's or a parent's (aligned), else the SMTP ``login``'s
        dkimSigningDomain (with dkim_ldap), else the fallbacks, else None."""
        labels = from_domain.split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            if candidate in self.keys:
                return candidate
        if self.directory is not None and login:
            found = self.directory(login)
            chosen = _domain(found) if found else ""
            if chosen in self.keys:
                return chosen
            if chosen:
                log.warning("%s: dkimSigningDomain %s has no dkim key; trying dkim_fallback", login, chosen)
        for source in (user, from_domain, sender_domain, "*"):
            if source and source in self.fallback:
                return self.fallback[source]
        return None

    def _signature(self, key: Key, headers: list[list[bytes]], canonical: list[tuple[bytes, bytes]],
                   body_hash: bytes, now: int) -> bytes:
        present = [name.lower() for name, _ in headers if name.lower() in SIGNED]
        include = present + list(OVERSIGNED)  # one more of each than present: an absent one is signed as empty
        tags = [(b"v", b"1"), (b"a", key.algorithm), (b"c", b"relaxed/relaxed"), (b"d", key.domain.encode()),
                (b"s", key.selector.encode()), (b"t", str(now).encode())]
        if self.expire:
            tags.append((b"x", str(now + self.expire).encode()))
        tags += [(b"h", b" : ".join(include)), (b"bh", body_hash)]
        # everything up to "b=" is folded once and hashed as is; the signature then only follows it
        unsigned = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags) + b"; b=", namelen=len(FIELD))
        hasher = hashlib.sha256()
        dkim.hash_headers(hasher, POLICY, canonical, list(include), (FIELD, b" " + unsigned), None)
        signature = base64.b64encode(key.sign(hasher.digest()))
        folded = b"".join(b"\r\n\t" + signature[i:i + B64_LINE] for i in range(0, len(signature), B64_LINE))
        return FIELD + b": " + unsigned + folded + b"\r\n"


def _directory_domain(settings: Settings) -> Callable[[str], str]:
    """dkimSigningDomain of the entry whose address is ``login`` (the directory caches it for ldapcachettl)."""
    from core.directory import AmbiguousAddress, DirectoryUnavailable, open_directory

    directory = open_directory(settings)

    def domain(login: str) -> str:
        try:
            user = directory.lookup(login)
        except (DirectoryUnavailable, AmbiguousAddress) as exc:
            raise SigningUnavailable(f"directory lookup of {login} for DKIM signing failed: {exc}") from None
        return user.dkim_domain if user is not None and login in (user.mail, *user.alternates) else ""

    return domain


def _from_domain(headers: list[list[bytes]]) -> str:
    """The domain of the (first) From: address, "" if there is none."""
    for name, value in headers:
        if name.lower() == b"from":
            text = value.decode("utf-8", "surrogateescape").replace("\r\n", "")
            for _, address in email.utils.getaddresses([text]):
                if "@" in address:
                    return _domain(address.rpartition("@")[2])
            return ""
    return ""


def _signed_by(headers: list[list[bytes]]) -> set[str]:
    """The d= domains of the signatures a message already carries."""
    domains = set()
    for name, value in headers:
        if name.lower() == FIELD.lower():
            try:
                tags = parse_tag_value(value.replace(b"\r\n", b""))
            except InvalidTagValueList:
                continue
            domains.add(_domain(tags.get(b"d", b"").decode("ascii", "replace")))
    return domains
