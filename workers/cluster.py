"""Cluster forwarding: a user whose ``mailHost`` is another node gets the message handed to that node
over SMTP or QMQP (``clusterforward``), which then delivers it locally (qmail-ldap's clustering).

Interface: ``ClusterForwarder(settings)`` with ``forward(envelope, address, body, host) -> Outcome``;
``route(host, routes, port) -> (address, port)``; ``HOP_HEADER``.

The node adds ``X-Shardmail-Cluster: <me>`` above the message; a node receiving a message that
already carries it, for a user whose mailHost is again elsewhere, refuses it (5.4.6) instead of
sending it round the cluster. Peers are found in ``smtproutes`` (``host:relay:port``, qmail's
format; the relay may be an address, ``[...]`` for IPv6) or else at the host name on port 25; over
QMQP in ``qmqproutes`` (the same format) or else at the host name on port 628.

Failures: a refused or dropped connection, a timeout or a 4xx (QMQP: Z) is temporary (the local
pool keeps the recipient pending); a 5xx (QMQP: D) from the peer is permanent for that recipient.

Settings: ``me``, ``clusterforward``, ``smtproutes``, ``qmqproutes``, ``timeoutsmtpd`` (the client
timeout).
"""

from __future__ import annotations

import logging
import smtplib

from core import qmqp
from core.config import Settings
from core.envelope import Envelope
from core.outcome import Deferred, Outcome, from_reply
from workers.routing import SMTP_PORT, static_route

log = logging.getLogger("shardmail.cluster")
HOP_HEADER = b"X-Shardmail-Cluster"
QMQP_PORT = 628


def route(host: str, routes: list[str], port: int = SMTP_PORT) -> tuple[str, int]:
    """Where to reach ``host``: its routes entry (with no port of its own: ``port``), else the name
    itself on ``port``."""
    hop = static_route(host.lower(), [r for r in routes if not r.startswith(":")])
    if hop is None:
        return host, port
    return hop.address, (port if hop.port == SMTP_PORT else hop.port)  # static_route's default is 25


class ClusterForwarder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def forward(self, envelope: Envelope, address: str, body: bytes, host: str) -> Outcome:
        data = HOP_HEADER + f": {self.settings.me}\r\n".encode() + body
        if self.settings.clusterforward == "qmqp":
            return self._by_qmqp(envelope, address, data, host)
        relay, port = route(host, self.settings.smtproutes)
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

    def _by_qmqp(self, envelope: Envelope, address: str, data: bytes, host: str) -> Outcome:
        relay, port = route(host, self.settings.qmqproutes, QMQP_PORT)
        reply = qmqp.send(relay, port, qmqp.pack(data, envelope.sender, [address]), self.settings.timeoutsmtpd)
        if reply.code == "Z":
            log.warning("cluster peer %s (%s:%d, QMQP) did not take it: %s", host, relay, port, reply.text)
        return reply.outcome(f"cluster peer {host} by QMQP")


def is_hop(headers: bytes) -> bool:
    return any(line.lower().startswith(HOP_HEADER.lower() + b":") for line in headers.split(b"\r\n"))

