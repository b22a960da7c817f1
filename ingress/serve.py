"""One SMTP ingress process: listeners, event loop, spool threads; several share a port.

Interface: ``main(settings)`` runs until SIGTERM/SIGINT, then stops listening and lets sessions
in progress finish for up to ``GRACE`` seconds. ``shardmail smtpd`` calls it; ``shardmail run``
starts ``ingress_processes`` of them. Each binds its listeners with SO_REUSEPORT, so the kernel
spreads connections over the processes and every core takes a share.

Failures: a listener that cannot bind is fatal at start (a clear message, exit 78); everything
after that is per session (see ingress.smtpd).

Settings: ``smtp_listen``, ``ingress_threads``, ``timeoutsmtpd``, ``databytes``, ``me``,
``smtpgreeting``, plus those of ingress.smtpd and core.submit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from core.config import Settings
from core.directory import open_directory
from core.redis_conn import connect
from core.submit import Submitter
from ingress.committer import Committer
from ingress.smtpd import Handler, Server

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


async def serve(settings: Settings) -> None:
    # aiosmtpd logs every command line at INFO: per-message cost with no value over our own log line.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    conn = connect(settings, max_connections=settings.ingress_threads + 4)
    submitter = Submitter(settings, conn)
    committer = Committer(submitter, settings.ingress_threads)
    handler = Handler(settings, submitter, committer, open_directory(settings))

    def factory() -> Server:
        return Server(
            handler,
            data_size_limit=settings.databytes or None,
            enable_SMTPUTF8=True,
            hostname=settings.greeting,
            ident="ESMTP shardmail",
            timeout=settings.timeoutsmtpd,
            loop=loop,
        )

    servers = [await loop.create_server(factory, sock=listening_socket(s)) for s in settings.smtp_listen]
    log.info("listening on %s", ", ".join(settings.smtp_listen))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers)), GRACE)
    except TimeoutError:
        log.warning("sessions still open after %.0f s; closing", GRACE)
    committer.close()


def main(settings: Settings) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
