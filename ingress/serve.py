"""One SMTP ingress process: listeners, event loop, spool threads; several share a port.

Interface: ``main(settings)`` runs until SIGTERM/SIGINT, then stops listening and lets sessions
in progress finish for up to ``GRACE`` seconds. ``shardmail smtpd`` calls it; ``shardmail run``
starts ``ingress_processes`` of them. Each binds its listeners with SO_REUSEPORT, so the kernel
spreads connections over the processes and every core takes a share.

Three kinds of listener: ``smtp_listen`` (port 25 style: STARTTLS offered when a certificate is
configured, AUTH only after it), ``submission_listen`` (587: STARTTLS, then AUTH before any mail,
RFC 6409) and ``smtps_listen`` (465: TLS from the first byte, then AUTH before any mail, RFC 8314).

Failures: a listener that cannot bind, or an unusable certificate, is fatal at start (a clear
message, exit 78); everything after that is per session (see ingress.smtpd, ingress.guard).

Settings: ``smtp_listen``, ``submission_listen``, ``smtps_listen``, ``tlscert``, ``tlskey``,
``ingress_threads``, ``timeoutsmtpd``, ``databytes``, ``me``,
``smtpgreeting``, plus those of ingress.smtpd and core.submit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from core import sdnotify
from core.auth import Authenticator, AuthThrottle
from core.config import Settings
from core.directory import open_directory
from core.nodes import Registry
from core.ratelimit import AsyncRateLimiter
from core.redis_conn import connect, connect_async, connect_shared
from core.submit import Submitter
from ingress.aiosmtpd_adapter import Server
from ingress.committer import Committer
from ingress.gate import GatedHandler
from ingress.guard import ConnectionLimits, SessionGuard
from ingress.handover import Handover
from ingress.smtp_auth import AuthMechanisms
from ingress.tls import TLSConfigError, server_context

log = logging.getLogger("shardmail.ingress")
GRACE = 10.0


def listening_socket(spec: str) -> socket.socket:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_until_stopped(servers: list[asyncio.Server]) -> None:
    """Serve until SIGTERM or SIGINT, then stop listening and give the sessions in progress up to
    ``GRACE`` seconds to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers)), GRACE)
    except TimeoutError:
        log.warning("sessions still open after %.0f s; closing", GRACE)


class IngressServer(SessionGuard, AuthMechanisms, Server):  # type: ignore[misc]  # push: see SessionGuard
    """The SMTP server of every listener: shardmail's replies (ingress.aiosmtpd_adapter, ingress.replies)
    with its limits (ingress.guard) and SMTP AUTH (ingress.smtp_auth)."""


async def serve(settings: Settings) -> None:
    # aiosmtpd logs every command line at INFO: per-message cost with no value over our own log line;
    # and it warns per connection about settings made on purpose (AUTH without STARTTLS on smtps,
    # where the socket is TLS already; its deprecated login_data).
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    tls = server_context(settings)
    if tls is None and (settings.submission_listen or settings.smtps_listen):
        raise TLSConfigError("submission_listen and smtps_listen need a certificate (tlscert, or `shardmail "
                             "gencert`): AUTH is only offered over TLS")
    intake: Handover | Submitter
    if settings.role == "ingress":  # no spool here: each message goes to a queue node over QMQP
        intake = Handover(settings, None if settings.qmqpservers else Registry.of(settings, connect_shared(settings)))
        committer: Handover | Committer = intake
    else:
        intake = Submitter(settings, connect(settings, max_connections=settings.ingress_threads + 4))
        committer = Committer(intake, settings.ingress_threads)
    directory = open_directory(settings)
    limiter = None
    if settings.ratelimitip or settings.ratelimitsender:
        limiter = AsyncRateLimiter(connect_async(settings, connect_timeout=2, timeout=5), settings.redis_prefix,
                                   settings)
    handler = GatedHandler(settings, intake, committer, directory, limiter)
    IngressServer.limits = ConnectionLimits(settings)
    IngressServer.guard_settings = settings
    throttle = AuthThrottle(connect_shared(settings), settings.redis_prefix, settings)  # for the cluster
    IngressServer.authenticator = Authenticator(settings, directory, throttle)

    def factory(kind: str) -> Callable[[], Server]:
        """Port 25 style (STARTTLS offered when there is a certificate), submission (STARTTLS, then
        AUTH before any mail) or smtps (TLS from the first byte, then AUTH before any mail)."""
        kinds: dict[str, dict[str, Any]] = {
            "smtp": {"tls_context": tls},
            "submission": {"tls_context": tls, "auth_required": True},
            "smtps": {"auth_required": True, "auth_require_tls": False},  # the socket is TLS already
        }
        options = kinds[kind]

        def make() -> Server:
            return IngressServer(
                handler,
                data_size_limit=settings.databytes or None,
                enable_SMTPUTF8=True,
                hostname=settings.greeting,
                ident="ESMTP shardmail",
                timeout=settings.timeoutsmtpd,
                loop=loop,
                **options,
            )

        return make

    listeners = [(spec, "smtp") for spec in settings.smtp_listen]
    listeners += [(spec, "submission") for spec in settings.submission_listen]
    listeners += [(spec, "smtps") for spec in settings.smtps_listen]
    servers = [await loop.create_server(factory(kind), sock=listening_socket(spec),
                                        ssl=tls if kind == "smtps" else None)
               for spec, kind in listeners]
    log.info("listening on %s%s", ", ".join(f"{spec} ({kind})" for spec, kind in listeners),
             "" if tls is None else "; STARTTLS offered")
    sdnotify.ready("SMTP on " + ", ".join(spec for spec, _ in listeners))
    await serve_until_stopped(servers)
    if isinstance(committer, Committer):
        committer.close()


def run_on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's coroutine on uvloop, as every listener of ours runs: uvloop reads and writes
    sockets holding the interpreter lock, where asyncio's own loop lets it go for every recv and
    send and a commit thread then keeps it (60-90 us per call measured for qmqpd)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(settings: Settings) -> None:
    run_on_uvloop(serve(settings))
