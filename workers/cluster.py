"""Cluster forwarding: a user whose ``mailHost`` is another node gets the message handed to that node
over SMTP, which then delivers it locally (qmail-ldap's clustering).

Interface: ``ClusterForwarder(settings)`` with ``forward(envelope, address, body, host) -> Outcome``;
``route(host, routes) -> (address, port)``; ``HOP_HEADER``.

The node adds ``X-Shardmail-Cluster: <me>`` above the message; a node receiving a message that
already carries it, for a user whose mailHost is again elsewhere, refuses it (5.4.6) instead of
sending it round the cluster. Peers are found in ``smtproutes`` (``host:relay:port``, qmail's
format; the relay may be an address, ``[...]`` for IPv6) or else at the host name on port 25.

Failures: a refused or dropped connection, a timeout or a 4xx is temporary (the local pool keeps
the recipient pending); a 5xx from the peer is permanent for that recipient.

Settings: ``me``, ``smtproutes``, ``timeoutsmtpd`` (the client timeout).
"""

from __future__ import annotations

import logging
import smtplib

from core.config import Settings
from core.envelope import Envelope
from core.outcome import Deferred, Outcome, from_reply
from workers.routing import SMTP_PORT, static_route

log = logging.getLogger("shardmail.cluster")
HOP_HEADER = b"X-Shardmail-Cluster"


def route(host: str, routes: list[str]) -> tuple[str, int]:
    """Where to reach ``host``: its smtproutes entry, else the name itself on port 25."""
    hop = static_route(host.lower(), [r for r in routes if not r.startswith(":")])
    return (hop.address, hop.port) if hop else (host, SMTP_PORT)


class ClusterForwarder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def forward(self, envelope: Envelope, address: str, body: bytes, host: str) -> Outcome:
        relay, port = route(host, self.settings.smtproutes)
        data = HOP_HEADER + f": {self.settings.me}\r\n".encode() + body
        try:
            with smtplib.SMTP(relay, port, local_hostname=self.settings.me, timeout=self.settings.timeoutsmtpd) as peer:
                peer.ehlo_or_helo_if_needed()
                options = ["SMTPUTF8"] if envelope.smtputf8 and peer.has_extn("smtputf8") else []
                code, text = peer.mail(envelope.sender, options)
                if code != 250:
                    return from_reply(code, text.decode("utf-8", "replace"))
                code, text = peer.rcpt(address)
                if code not in (250, 251):
                    return from_reply(code, text.decode("utf-8", "replace"))
                code, text = peer.data(data)
                return from_reply(code, f"{text.decode('utf-8', 'replace')} (cluster peer {host})")
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("cluster peer %s (%s:%d) unavailable: %s", host, relay, port, exc)
            return Deferred("4.4.1", f"cluster peer {host} unavailable: {exc}")
        except UnicodeError as exc:
            return Deferred("4.6.0", f"cannot hand over to {host}: {exc}")


def is_hop(headers: bytes) -> bool:
    return any(line.lower().startswith(HOP_HEADER.lower() + b":") for line in headers.split(b"\r\n"))

