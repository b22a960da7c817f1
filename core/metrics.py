"""Every Prometheus metric shardmail's processes record, defined once (the README's table lists them).

Interface: the recording hooks ``outcomes(channel, marks)`` (a pool's delivery attempts),
``settled(envelope, marks)`` (the scheduler's expiries and bounces), ``committed(results, seconds)``
(one group commit), ``redis_error(role)``, ``directory_error(backend)``, ``dns_error(exc)``; the
names ``QUEUE_*`` of the queue-depth gauges that ``ops.metrics`` reads from Redis at scrape time;
``MULTIPROC_ENV``.

Why here: every process imports this module (about 12 ms once a process has imported redis and rq;
the objects are built at import), and each hook is one call at its site, so the hot-path files
carry one line per site. Counters with fixed labels are bound at import (``labels()`` costs a lock
and a dict look-up); an increment is about 1 µs in multiprocess mode (``bench/metrics_hooks.py``).
The ``node`` label is not recorded here: the exporter adds it to every sample at scrape time (a
process records without knowing its settings, and the hooks cost what they did).

Multiprocess: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before its children start, so
prometheus_client writes each process's values to memory-mapped files there that the supervisor
sums at scrape time; without it values stay in the process (tests, one-off commands).

Failures: none; a hook never raises into the mail path. Settings: none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Histogram

from core.envelope import CHANNELS, Channel, Envelope, Mark
from core.outcome import QueueUnavailable

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("delivered", "deferred", "failed", "bounced")

# gauges computed by ops.metrics at scrape time; every series carries ``node`` (this node's name;
# for the NODE_* series, the node described) and ``shard`` is the shard's name on its node, ``s<N>``
QUEUE_READY = "shardmail_queue_ready"  # {node, shard, channel}: jobs waiting in the rq queue
QUEUE_IN_FLIGHT = "shardmail_queue_in_flight"  # {node, shard, channel}: claimed (rq's started registry)
QUEUE_FAILED = "shardmail_queue_failed"  # {node, shard, channel}: rq's failed registry (a job raised)
QUEUE_DEFERRED = "shardmail_queue_deferred"  # {node, shard}: waiting for a retry (ZCARD <prefix>:retry:<node>/s<N>)
QUEUE_SETTLING = "shardmail_queue_settling"  # {node, shard}: finished attempts the scheduler has not settled
SHARD_DRAINING = "shardmail_shard_draining"  # {node, shard}: 1 while ingress avoids the shard (from the spool)
NODE_UP = "shardmail_node_up"  # {node}: every node in the registry, 1 alive, 0 dead (heartbeat too old)
NODE_HEARTBEAT_AGE = "shardmail_node_heartbeat_age_seconds"  # {node}: since its last heartbeat
NODE_SPOOLED = "shardmail_node_spooled"  # {node}: messages in its spool, as of its last heartbeat
NODE_OLDEST_AGE = "shardmail_node_oldest_age_seconds"  # {node}: its oldest spooled message (0: none)
REDIS_UP = "shardmail_redis_up"  # {node}: 1 if the scrape's Redis round trip worked

DELIVERIES = Counter("shardmail_deliveries", "Recipient delivery attempts by outcome (bounced: failed recipients "
                     "the scheduler reported)", ["channel", "outcome"])
DEFERRALS = Counter("shardmail_deferrals", "Deferred recipient attempts by enhanced status class.subject (4.4 = "
                    "network/routing, 4.2 = mailbox, 4.3 = system...)", ["channel", "reason"])
SUBMISSIONS = Counter("shardmail_submissions", "Messages through the front door (SMTP, sendmail, forwards, "
                      "bounces): queued, or refused with a 4xx (tempfail)", ["result"])
COMMIT_SECONDS = Histogram("shardmail_spool_commit_seconds", "One group commit: spool writes and flushes plus "
                           "the Redis enqueue, per batch", buckets=(
                               .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0))
REDIS_ERRORS = Counter("shardmail_redis_errors", "Redis operations that failed (the caller backs off or "
                       "tempfails)", ["role"])
DIRECTORY_ERRORS = Counter("shardmail_directory_errors", "User look-ups that found the directory unavailable "
                           "(LDAP down or slow, unreadable users file)", ["backend"])
DNS_ERRORS = Counter("shardmail_dns_errors", "DNS look-ups that failed temporarily", ["error"])

_delivery = {(c, o): DELIVERIES.labels(c, o) for c in CHANNELS for o in OUTCOMES}
_queued = SUBMISSIONS.labels("queued")
_tempfail = SUBMISSIONS.labels("tempfail")
for _role in ("ingress", "local", "remote", "scheduler"):
    REDIS_ERRORS.labels(_role)
for _backend in ("ldap", "ldif"):
    DIRECTORY_ERRORS.labels(_backend)
for _error in ("timeout", "no_nameservers", "other"):
    DNS_ERRORS.labels(_error)


def reason_class(status: str) -> str:
    """``4.4.1`` -> ``4.4``: RFC 3463's class and subject (a bounded label); anything else is ``other``."""
    if len(status) >= 3 and status[0] == "4" and status[1] == "." and status[2] in "01234567" \
            and (len(status) == 3 or status[3] == "."):
        return status[:3]
    return "other"


def outcomes(channel: Channel, marks: Iterable[Mark]) -> None:
    """A pool recorded these attempts (one call per message or transaction)."""
    for mark in marks:
        counter = _delivery.get((channel, mark.state))
        if counter is not None:
            counter.inc()
        if mark.state == "deferred":
            DEFERRALS.labels(channel, reason_class(mark.status)).inc()


def settled(envelope: Envelope, marks: Iterable[Mark]) -> None:
    """The scheduler marked these recipients (failed at the end of the lifetime, or bounced)."""
    for mark in marks:
        counter = _delivery.get((envelope.recipients[mark.index].channel, mark.state))
        if counter is not None:
            counter.inc()


def committed(results: Sequence[object], seconds: float) -> None:
    """One group commit of ``results`` (an Envelope each when queued) took ``seconds``."""
    refused = sum(1 for r in results if isinstance(r, QueueUnavailable))
    if refused:
        _tempfail.inc(refused)
    if len(results) > refused:
        _queued.inc(len(results) - refused)
    COMMIT_SECONDS.observe(max(0.0, seconds))


def redis_error(role: str) -> None:
    REDIS_ERRORS.labels(role).inc()


def directory_error(backend: object) -> None:
    """``backend``: the Directory's backend object (its class tells LDAP from the LDIF file)."""
    DIRECTORY_ERRORS.labels("ldap" if type(backend).__name__.startswith("Ldap") else "ldif").inc()


def dns_error(exc: BaseException) -> None:
    name = type(exc).__name__
    DNS_ERRORS.labels("timeout" if "Timeout" in name else "no_nameservers" if name == "NoNameservers"
                      else "other").inc()
