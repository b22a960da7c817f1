"""The Prometheus endpoint: the node's processes' counters summed, plus queue depth read from Redis.

Interface: ``metrics_dir(settings) -> Path`` (``<var_dir>/metrics``, prometheus_client's
multiprocess directory), ``Exporter.start(settings) -> Exporter | None`` (the supervisor's:
wipes the directory, serves ``metrics_listen``; ``child_died(pid)``, ``stop()``),
``registry(settings, directory) -> CollectorRegistry``, ``QueueCollector(settings, conn, shared)``,
``NodeLabel(collector, node)``, ``cluster_families(records, now)``, ``parse_listen("host:port")``.

Labels: every series carries ``node``, this node's name (the counters get it at scrape time,
``NodeLabel``); per-shard series carry ``shard="s<N>"``, the shard's name on its node, so a shard's
cluster address ``<node>/s<N>`` is the pair. The ``shardmail_node_*`` series describe every node
of the cluster (``node`` is the node described): each node's endpoint reports all of them, so a
scrape of any live node shows which nodes are dead, and dashboards take ``max by (node)``.

What a scrape costs: the queue gauges (names in core.metrics: ready, in flight and failed per
shard and channel, deferred and settling per shard, Redis up) come from one pipelined Redis round
trip at scrape time, so no process keeps them up to date and they are as fresh as Redis; the
cluster's nodes from two more (the registry's set of names, then every node's hash: heartbeat
age, spooled messages and the oldest one, as each node's last heartbeat told); draining shards
from a stat per shard; the counters and histograms are read from the per-process files of the
multiprocess directory (counters of processes that died are still summed: totals never go
backwards when a child is restarted).

Failures: a scrape while Redis is down reports ``shardmail_redis_up 0`` and no queue or node
gauges (a registry read that fails alone drops only the node gauges); a
``metrics_listen`` address that cannot be bound is logged and the node runs without the endpoint
(mail matters more than its graphs).

Settings: ``metrics_listen``, ``var_dir``, ``redis_prefix``, ``node``, ``nodedeadafter``, ``shards``, plus
those of core.redis_conn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from core import metrics, sdnotify
from core.config import Settings
from core.envelope import CHANNELS, id_time
from core.jobs import Jobs, ShardFigures
from core.nodes import NodeRecord, Registry
from core.redis_conn import connect, connect_shared
from core.shards import Namespace, ShardMap, shard_label

log = logging.getLogger("shardmail.metrics")
SCRAPE_TIMEOUT = 2.0  # s a scrape waits for Redis


def metrics_dir(settings: Settings) -> Path:
    return Path(settings.var_dir).resolve() / "metrics"


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class NodeLabel:
    """The processes' counters and histograms, each sample with this node's ``node`` label added at
    scrape time: the hooks on the mail path stay as they are, and a process needs no settings to
    record (core.metrics builds its objects at import)."""

    def __init__(self, collector: MultiProcessCollector, node: str) -> None:
        self.collector = collector
        self.node = node

    def collect(self) -> Iterator[Metric]:
        for family in self.collector.collect():
            family.samples = [s._replace(labels={"node": self.node, **s.labels}) for s in family.samples]
            yield family


class QueueCollector:
    """Queue depth per shard and channel (core.jobs' ``census``, one round trip), then every node
    of the cluster from the registry (core.nodes, two round trips), read from Redis at scrape time;
    and the draining shards, from the spool (a stat per shard)."""

    def __init__(self, settings: Settings, conn: redis.Redis, shared: redis.Redis | None = None) -> None:
        self.conn = conn
        self.space = Namespace.of(settings)
        self.jobs = Jobs(conn, self.space)
        self.shard_map = ShardMap(settings)
        # the registry lives in the cluster's main deployment (core.redis_conn connect_shared), the
        # queues in this node's shard group (``conn``); without groups they are one deployment
        self.nodes = Registry.of(settings, shared if shared is not None else conn)

    def collect(self) -> Iterator[Metric]:
        node = self.space.node
        shards = list(self.shard_map.ids())
        yield _draining(node, shards, self.shard_map.draining())
        up = GaugeMetricFamily(metrics.REDIS_UP, "1 if this scrape's Redis round trip worked", labels=["node"])
        now = time.time()
        try:
            figures, _ = self.jobs.census(shards, now, activity=False)
        except redis.RedisError as exc:
            log.warning("queue depth not scraped: Redis unavailable (%s)", exc)
            up.add_metric([node], 0)
            yield up
            return
        up.add_metric([node], 1)
        yield up
        yield from _queues(node, shards, figures)
        try:
            records = self.nodes.nodes(now)
        except redis.RedisError as exc:
            log.warning("cluster not scraped: Redis unavailable (%s)", exc)
            return
        yield from cluster_families(records, now)


def _draining(node: str, shards: list[int], draining: set[int]) -> Metric:
    family = GaugeMetricFamily(metrics.SHARD_DRAINING, "1 while ingress picks no new mail for the shard",
                               labels=["node", "shard"])
    for shard in shards:
        family.add_metric([node, shard_label(shard)], 1 if shard in draining else 0)
    return family


def _queues(node: str, shards: list[int], figures: dict[int, ShardFigures]) -> Iterator[Metric]:
    by_channel = ["node", "shard", "channel"]
    ready = GaugeMetricFamily(metrics.QUEUE_READY, "Jobs waiting in the shard's rq queue", labels=by_channel)
    flight = GaugeMetricFamily(metrics.QUEUE_IN_FLIGHT, "Jobs claimed by a pool (rq's started registry)",
                               labels=by_channel)
    failed = GaugeMetricFamily(metrics.QUEUE_FAILED, "Jobs in rq's failed registry (a job raised: a bug)",
                               labels=by_channel)
    deferred = GaugeMetricFamily(metrics.QUEUE_DEFERRED, "Messages waiting for a retry (the shard's retry set)",
                                 labels=["node", "shard"])
    settling = GaugeMetricFamily(metrics.QUEUE_SETTLING, "Finished attempts the scheduler has yet to settle",
                                 labels=["node", "shard"])
    for shard in shards:
        row = figures[shard]
        label = shard_label(shard)
        for channel in CHANNELS:
            labels = [node, label, channel]
            queue = row.channels[channel]
            ready.add_metric(labels, queue.ready)
            flight.add_metric(labels, queue.in_flight)
            failed.add_metric(labels, queue.failed)
        deferred.add_metric([node, label], row.deferred)
        settling.add_metric([node, label], row.settling)
    yield from (ready, flight, failed, deferred, settling)


def cluster_families(records: list[NodeRecord], now: float) -> Iterator[Metric]:
    """Every node the registry knows, alive or dead, as of its last heartbeat: what one scrape of
    any node tells about the others (a dead node's own endpoint answers no more)."""
    up = GaugeMetricFamily(metrics.NODE_UP, "1 if the node's heartbeat is younger than nodedeadafter, 0: dead",
                           labels=["node"])
    age = GaugeMetricFamily(metrics.NODE_HEARTBEAT_AGE, "Seconds since the node's last heartbeat", labels=["node"])
    spooled = GaugeMetricFamily(metrics.NODE_SPOOLED, "Messages in the node's spool (its last heartbeat)",
                                labels=["node"])
    oldest = GaugeMetricFamily(metrics.NODE_OLDEST_AGE, "Age of the node's oldest spooled message in seconds "
                               "(its last heartbeat; 0: empty spool)", labels=["node"])
    for record in records:
        up.add_metric([record.name], 1 if record.alive else 0)
        age.add_metric([record.name], max(0.0, now - record.beat))
        spooled.add_metric([record.name], sum(figures[0] for figures in record.spool.values()))
        oldest.add_metric([record.name], _oldest_age(record, now))
    yield from (up, age, spooled, oldest)


def _oldest_age(record: NodeRecord, now: float) -> float:
    births = []
    for _spooled, _held, oldest in record.spool.values():
        if oldest:
            with contextlib.suppress(ValueError):
                births.append(id_time(oldest))
    return max(0.0, now - min(births)) if births else 0.0


def registry(settings: Settings, directory: Path | None) -> CollectorRegistry:
    """The node's view: every process's counters (when ``directory`` holds any), queue depth and
    the cluster's nodes, every series labelled with its ``node``."""
    reg = CollectorRegistry(auto_describe=False)
    if directory is not None and directory.is_dir():
        reg.register(NodeLabel(MultiProcessCollector(None, path=str(directory)), settings.node))
    conn = connect(settings, connect_timeout=SCRAPE_TIMEOUT, timeout=SCRAPE_TIMEOUT)  # this node's group
    shared = connect_shared(settings, connect_timeout=SCRAPE_TIMEOUT, timeout=SCRAPE_TIMEOUT)
    reg.register(QueueCollector(settings, conn, shared))
    return reg


@dataclass
class Exporter:
    """The supervisor's endpoint, served from a daemon thread."""

    directory: Path
    server: WSGIServer
    thread: threading.Thread

    @staticmethod
    def prepare(settings: Settings) -> Path | None:
        """A fresh multiprocess directory (wiped: the previous run's processes are gone), or None
        when metrics are off. Call before any child starts."""
        if not settings.metrics_listen:
            return None
        directory = metrics_dir(settings)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    @classmethod
    def start(cls, settings: Settings, directory: Path | None) -> Exporter | None:
        if directory is None:
            return None
        host, port = parse_listen(settings.metrics_listen)
        try:
            server, thread = start_http_server(port, host, registry(settings, directory))
        except OSError as exc:
            log.error("metrics endpoint not started: cannot listen on %s: %s", settings.metrics_listen, exc)
            return None
        log.info("metrics on http://%s/metrics", settings.metrics_listen)
        return cls(directory, server, thread)

    def child_died(self, pid: int) -> None:
        """Forget a dead process's live gauges (its counters stay summed)."""
        mark_process_dead(pid, str(self.directory))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def child_env(directory: Path | None) -> dict[str, str]:
    """What a child's environment needs so its prometheus_client writes to the shared directory."""
    return {metrics.MULTIPROC_ENV: str(directory)} if directory is not None else {}


def serve_forever(settings: Settings, listen: str) -> None:
    """``shardmail metrics``: the same endpoint in a process of its own (for nodes whose processes
    are started one by one, each with ``PROMETHEUS_MULTIPROC_DIR`` set to ``<var_dir>/metrics``)."""
    directory = Path(os.environ.get(metrics.MULTIPROC_ENV) or metrics_dir(settings))
    host, port = parse_listen(listen)
    _server, thread = start_http_server(port, host, registry(settings, directory))
    log.info("metrics on http://%s/metrics (counters from %s)", listen, directory)
    sdnotify.ready(f"metrics on {listen}")
    thread.join()
