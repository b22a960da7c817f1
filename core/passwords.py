"""Check a password against an LDAP ``userPassword`` value in the schemes qmail-ldap directories hold.

Interface: ``verify(stored, password, *, cleartext=False) -> bool``; ``scheme(stored) -> str`` (the
upper-case scheme name, ``CRYPT`` for a bare crypt(3) string, ``""`` when unrecognisable);
``signature(stored) -> str`` (what sets its cost: scheme, method, rounds, salt length);
``imitation(stored) -> str`` (a hash of a random password in the same scheme and at the same cost,
for making an unknown user cost what a known one does). Schemes, case-insensitive: ``{SHA}``,
``{SSHA}``, ``{SHA256}``, ``{SSHA256}``, ``{SHA384}``, ``{SSHA384}``, ``{SHA512}``, ``{SSHA512}``,
``{MD5}``, ``{SMD5}`` (base64 of digest [+ salt], as slappasswd writes them), ``{CRYPT}`` and bare
crypt(3) strings (DES, ``$1$``, ``$5$``, ``$6$``, and whatever else the system's libcrypt knows, e.g.
``$2y$``), and ``{CLEARTEXT}`` / ``{PLAIN}`` only when ``cleartext`` is set (off by default: a
directory holding plain passwords should be fixed, not relied on).

Failures: none raised. A malformed value, an unknown scheme, a locked crypt value (``*``, ``!``), an
empty password or a crypt(3) library that is missing all give False. Digests are compared with
``hmac.compare_digest``.

Settings: none (pure); ``core.auth`` passes ``authcleartext``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger("shardmail.passwords")

# scheme -> (hashlib name, salted)
DIGESTS: dict[str, tuple[str, bool]] = {
    "SHA": ("sha1", False), "SSHA": ("sha1", True),
    "SHA256": ("sha256", False), "SSHA256": ("sha256", True),
    "SHA384": ("sha384", False), "SSHA384": ("sha384", True),
    "SHA512": ("sha512", False), "SSHA512": ("sha512", True),
    "MD5": ("md5", False), "SMD5": ("md5", True),
}  # fmt: skip
CLEARTEXT = ("CLEARTEXT", "PLAIN")
MAX_STORED = 1024  # no real hash is longer; bounds the work an odd directory value can cause
MAX_PASSWORD = 1024
_SCHEME = re.compile(r"\{([A-Za-z0-9._-]{1,32})\}")
_MODULAR = re.compile(r"\$([0-9a-z]{1,4})\$")  # $1$, $5$, $6$, $2y$, $y$ ...
_DES = re.compile(r"[./0-9A-Za-z]{13}")
_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _load_crypt() -> Callable[[str, str], Any] | None:
    """crypt(3) through the stdlib module (deprecated in 3.11, gone in 3.13) or ``legacycrypt``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt as module  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            try:
                import legacycrypt as module  # type: ignore[import-not-found,no-redef,unused-ignore]
            except ImportError:
                log.warning("no crypt(3) available (install legacycrypt): {CRYPT} passwords never match")
                return None
    return module.crypt


_crypt = _load_crypt()


def _split(stored: str) -> tuple[str, str]:
    """(SCHEME, rest); a bare value counts as crypt(3), as qmail-ldap reads it."""
    match = _SCHEME.match(stored)
    if match:
        return match.group(1).upper(), stored[match.end():]
    return "CRYPT", stored


def scheme(stored: str) -> str:
    if not isinstance(stored, str) or not stored or len(stored) > MAX_STORED:
        return ""
    name, rest = _split(stored)
    if name == "CRYPT":
        return name if _crypt_shaped(rest) else ""
    return name if name in DIGESTS or name in CLEARTEXT else ""


def _crypt_shaped(value: str) -> bool:
    return bool(_MODULAR.match(value) or _DES.fullmatch(value))


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_digest(name: str, rest: str, secret: bytes) -> bool:
    algorithm, salted = DIGESTS[name]
    size = hashlib.new(algorithm).digest_size
    if name == "MD5" and re.fullmatch(r"[0-9a-fA-F]{32}", rest.strip()):
        raw: bytes | None = bytes.fromhex(rest.strip())  # some old tools wrote {MD5} as hex
    else:
        raw = _b64(rest)
    if raw is None or (len(raw) < size if salted else len(raw) != size):
        return False
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(hashlib.new(algorithm, secret + salt).digest(), digest)


def _check_crypt(rest: str, secret: bytes) -> bool:
    if _crypt is None or not _crypt_shaped(rest):
        return False
    try:
        word = secret.decode("utf-8")
        result = _crypt(word, rest)
    except (ValueError, OSError, UnicodeDecodeError):  # NUL in the word, a setting libcrypt refuses
        return False
    if not isinstance(result, str) or not result or result.startswith("*"):  # libxcrypt's failure token
        return False
    return hmac.compare_digest(result.encode(), rest.encode())


def verify(stored: str, password: str | bytes, *, cleartext: bool = False) -> bool:
    """True when ``password`` matches ``stored``; False for anything else, never an exception."""
    try:
        if not isinstance(stored, str) or not stored or len(stored) > MAX_STORED:
            return False
        secret = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        if not secret or len(secret) > MAX_PASSWORD:
            return False
        name, rest = _split(stored)
        if name in DIGESTS:
            return _check_digest(name, rest, secret)
        if name == "CRYPT":
            return _check_crypt(rest, secret)
        if name in CLEARTEXT:
            return cleartext and bool(rest) and hmac.compare_digest(rest.encode("utf-8"), secret)
        return False
    except Exception:  # a pure check must not take a session down: log it, refuse
        log.exception("password check failed on a %d-character value", len(stored) if isinstance(stored, str) else 0)
        return False


def _random_text(length: int) -> str:
    return "".join(_SALT_CHARS[b % 64] for b in os.urandom(length))


def _crypt_setting(value: str) -> str:
    """The salt/cost part of a crypt(3) string with a fresh salt of the same length."""
    if _DES.fullmatch(value):
        return _random_text(2)
    parts = value.split("$")  # ['', id, params..., salt, hash]
    if parts[1].startswith("2"):  # bcrypt: $2y$NN$ then 22 salt characters packed with the hash
        return f"${parts[1]}${parts[2]}${_random_text(22)}"
    return "$".join(["", parts[1], *parts[2:-2], _random_text(max(1, len(parts[-2])))]) + "$"


def signature(stored: str) -> str:
    """What sets a value's cost: its scheme, crypt(3) method and rounds, salt length (not the salt)."""
    name = scheme(stored)
    rest = _split(stored)[1] if name else ""
    if name == "CRYPT" and rest.startswith("$"):
        parts = rest.split("$")
        if parts[1].startswith("2") and len(parts) > 2:  # bcrypt: $2y$NN$, salt and hash in one
            return "$".join(["CRYPT", *parts[1:3]])
        return "$".join(["CRYPT", *parts[1:-2], str(len(parts[-2]))])
    return f"{name}:{len(rest)}"


def imitation(stored: str) -> str:
    """A hash of a random password, same scheme and cost as ``stored`` (sha512-crypt if unrecognised)."""
    name = scheme(stored)
    secret = _random_text(16)
    if name in DIGESTS:
        algorithm, salted = DIGESTS[name]
        raw = _b64(_split(stored)[1]) or b""
        size = hashlib.new(algorithm).digest_size
        salt = os.urandom(max(4, len(raw) - size)) if salted else b""
        digest = hashlib.new(algorithm, secret.encode() + salt).digest()
        return "{" + name + "}" + base64.b64encode(digest + salt).decode()
    if name == "CRYPT" and _crypt is not None:
        try:
            made = _crypt(secret, _crypt_setting(_split(stored)[1]))
            if isinstance(made, str) and made and not made.startswith("*"):
                return "{CRYPT}" + made
        except (ValueError, OSError, IndexError):
            pass
    if name in CLEARTEXT:
        return "{CLEARTEXT}" + secret
    if _crypt is not None:
        made = _crypt(secret, "$6$" + _random_text(16) + "$")
        if isinstance(made, str) and made.startswith("$6$"):
            return "{CRYPT}" + made
    digest = hashlib.sha512(secret.encode() + b"salt").digest()
    return "{SSHA512}" + base64.b64encode(digest + b"salt").decode()
