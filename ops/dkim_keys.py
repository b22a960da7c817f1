"""``shardmail dkim keygen``: a new DKIM key pair, the private half on disk and the public half as DNS TXT.

Interface: ``generate(algorithm, bits)`` (a new private key), ``write_key(path, private)`` (PEM,
mode 0600, never over an existing file), ``txt_value(private)`` (``v=DKIM1; k=...; p=...``),
``zone_line(domain, selector, value)`` (the record in zone-file form, split into strings of 255
characters at most as a TXT record needs), ``keygen(...)`` (all of it, and the text to print);
``signing_cost(algorithm, size, count)`` (µs for one whole signature of a message of ``size`` bytes, as
core.submit makes it: ``shardmail dkim cost``).

Failures: ``FileExistsError`` when the key file exists (a published key is never overwritten by
accident); ``ValueError`` for an unknown algorithm or RSA under 1024 bits.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from core.dkim import ALGORITHMS, MIN_RSA_BITS, Key, PrivateKey, Signer
from core.envelope import Client

TXT_STRING = 255  # longest character-string in a TXT record (RFC 1035 §3.3)


def generate(algorithm: str = "rsa", bits: int = 2048) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise ValueError(f"algorithm: rsa or ed25519, not {algorithm!r}")
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need {MIN_RSA_BITS} bits at least (2048 recommended), not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(path: Path, private: PrivateKey) -> None:
    """PKCS#8 PEM, created 0600 and synced; the directory is made 0700 if it is new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def txt_value(private: PrivateKey) -> str:
    """The key record: RSA's p= is the DER SubjectPublicKeyInfo, Ed25519's the bare 32 bytes (RFC 8463 §4.2)."""
    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def txt_strings(value: str) -> list[str]:
    """The value cut into TXT character-strings (a verifier joins them again)."""
    return [value[i:i + TXT_STRING] for i in range(0, len(value), TXT_STRING)]


def zone_line(domain: str, selector: str, value: str) -> str:
    strings = " ".join(f'"{part}"' for part in txt_strings(value))
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {strings} )"


def keygen(domain: str, selector: str, algorithm: str, bits: int, out: Path) -> str:
    """Write ``out/<domain>.<selector>.key``; the text telling what to publish and configure."""
    private = generate(algorithm, bits)
    path = out / f"{domain}.{selector}.key"
    if path.exists():
        raise FileExistsError(f"{path} exists (a key in use is never replaced: pick a new selector)")
    write_key(path, private)
    size = f"{bits} bits" if algorithm == "rsa" else "RFC 8463"
    return (f"private key: {path} ({algorithm}, {size}, mode 0600)\n"
            f"publish in DNS:\n{zone_line(domain, selector, txt_value(private))}\n"
            f"then add to shardmail.toml (and restart smtpd, qmqpd):\n"
            f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkeyfile = "{path.resolve()}"\n'
            f'algorithm = "{algorithm}"\n')


def sample_message(size: int) -> bytes:
    """A plain-text message of about ``size`` bytes: the usual headers, then lines of prose."""
    head = (b"From: News <news@example.com>\r\nTo: <someone@example.net>\r\nSubject: Our news this week\r\n"
            b"Date: Tue, 08 Dec 2026 01:00:00 +0000\r\nMessage-ID: <cost@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"A line of an ordinary message, with words and  spaces, some seventy characters.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def signing_cost(algorithm: str, size: int = 4096, count: int = 500) -> float:
    """Microseconds per signature (best of five rounds of ``count``), parse and canonicalisation included."""
    private = generate(algorithm)
    signer = Signer([Key("example.com", "cost", ALGORITHMS[algorithm], private)], {}, [])
    message, client = sample_message(size), Client(protocol="local")
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            signer.header(message, "news@example.com", client)
        rounds.append((time.perf_counter() - started) / count * 1e6)
    return min(rounds)
