"""TLS for the SMTP listeners: the server context, and a self-signed pair for testing.

Interface: ``server_context(settings) -> ssl.SSLContext | None`` (None: no TLS configured, so no
STARTTLS is offered and no smtps listener can start); ``gencert(cert, key, host, days=365)``
(``shardmail gencert``: an RSA key and a self-signed certificate for ``host``, written with mode
0600 for the key; made by the ``openssl`` command, which every Debian system has).

TLS 1.2 is the floor (RFC 8996 retired 1.0 and 1.1); the cipher choice is OpenSSL's default for
that floor. The certificate is read once per process, at start: a renewed certificate takes a
restart of the SMTP processes (as with Postfix's smtpd).

Failures: an unreadable or mismatched certificate or key raises ``TLSConfigError`` at start,
naming the files, so ``shardmail smtpd`` exits with one clear line (78) rather than failing the
first STARTTLS. ``gencert`` raises ``TLSConfigError`` when openssl fails or is missing.

Settings: ``tlscert``, ``tlskey`` (default ``<var_dir>/tls/{cert,key}.pem`` when they exist).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

from core.config import Settings


class TLSConfigError(Exception):
    """The certificate or key cannot be used (or made)."""


def server_context(settings: Settings) -> ssl.SSLContext | None:
    files = settings.tls_files
    if files is None:
        return None
    cert, key = files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use certificate {cert} with key {key}: {exc}") from None
    return context


def gencert(cert: Path, key: Path, host: str, days: int = 365) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TLSConfigError("openssl is not installed (apt-get install openssl)")
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    fresh_key = key.with_name(key.name + ".new")
    fresh_cert = cert.with_name(cert.name + ".new")
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
            "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host}",
            "-keyout", str(fresh_key), "-out", str(fresh_cert)]
    old_umask = os.umask(0o077)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60)
    finally:
        os.umask(old_umask)
    if done.returncode != 0:
        fresh_key.unlink(missing_ok=True)
        fresh_cert.unlink(missing_ok=True)
        raise TLSConfigError(f"openssl failed: {done.stderr.decode(errors='replace').strip()}")
    os.chmod(fresh_cert, 0o644)
    os.replace(fresh_key, key)
    os.replace(fresh_cert, cert)
