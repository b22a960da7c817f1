"""The Prometheus endpoint: the node's processes' counters summed, plus queue depth read from Redis.

Interface: ``metrics_dir(settings) -> Path`` (``<var_dir>/metrics``, prometheus_client's
multiprocess directory), ``Exporter.start(settings) -> Exporter | None`` (the supervisor's:
wipes the directory, serves ``metrics_listen``; ``child_died(pid)``, ``stop()``),
``registry(settings, directory) -> CollectorRegistry``, ``QueueCollector(settings, conn)``,
``parse_listen("host:port")``.

What a scrape costs: the queue gauges (names in core.metrics: ready, in flight and failed per
shard and channel, deferred and settling per shard, Redis up) come from one pipelined Redis round
trip at scrape time, so no process keeps them up to date and they are as fresh as Redis; the
counters and histograms are read from the per-process files of the multiprocess directory (counters
of processes that died are still summed: totals never go backwards when a child is restarted).

Failures: a scrape while Redis is down reports ``shardmail_redis_up 0`` and no queue gauges; a
``metrics_listen`` address that cannot be bound is logged and the node runs without the endpoint
(mail matters more than its graphs).

Settings: ``metrics_listen``, ``var_dir``, ``redis_prefix``, ``shards``, plus those of core.redis_conn.
"""

from __future__ import annotations

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
from core.envelope import CHANNELS
from core.jobs import Jobs
from core.redis_conn import connect
from core.shards import Namespace, ShardMap

log = logging.getLogger("shardmail.metrics")
SCRAPE_TIMEOUT = 2.0  # s a scrape waits for Redis


def metrics_dir(settings: Settings) -> Path:
    return Path(settings.var_dir).resolve() / "metrics"


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class QueueCollector:
    """Queue depth per shard and channel, from Redis at scrape time (core.jobs' ``census``, one round trip)."""

    def __init__(self, settings: Settings, conn: redis.Redis) -> None:
        self.conn = conn
        self.jobs = Jobs(conn, Namespace.of(settings))
        self.shard_map = ShardMap(settings)

    def collect(self) -> Iterator[Metric]:
        shards = list(self.shard_map.ids())
        up = GaugeMetricFamily(metrics.REDIS_UP, "1 if this scrape's Redis round trip worked")
        try:
            figures, _ = self.jobs.census(shards, time.time(), activity=False)
        except redis.RedisError as exc:
            log.warning("queue depth not scraped: Redis unavailable (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_channel = ["shard", "channel"]
        ready = GaugeMetricFamily(metrics.QUEUE_READY, "Jobs waiting in the shard's rq queue", labels=by_channel)
        flight = GaugeMetricFamily(metrics.QUEUE_IN_FLIGHT, "Jobs claimed by a pool (rq's started registry)",
                                   labels=by_channel)
        failed = GaugeMetricFamily(metrics.QUEUE_FAILED, "Jobs in rq's failed registry (a job raised: a bug)",
                                   labels=by_channel)
        deferred = GaugeMetricFamily(metrics.QUEUE_DEFERRED, "Messages waiting for a retry (the shard's retry set)",
                                     labels=["shard"])
        settling = GaugeMetricFamily(metrics.QUEUE_SETTLING, "Finished attempts the scheduler has yet to settle",
                                     labels=["shard"])
        for shard in shards:
            row = figures[shard]
            for channel in CHANNELS:
                labels = [str(shard), channel]
                queue = row.channels[channel]
                ready.add_metric(labels, queue.ready)
                flight.add_metric(labels, queue.in_flight)
                failed.add_metric(labels, queue.failed)
            deferred.add_metric([str(shard)], row.deferred)
            settling.add_metric([str(shard)], row.settling)
        yield from (ready, flight, failed, deferred, settling)


def registry(settings: Settings, directory: Path | None) -> CollectorRegistry:
    """The node's view: every process's counters (when ``directory`` holds any) and queue depth."""
    reg = CollectorRegistry(auto_describe=False)
    if directory is not None and directory.is_dir():
        MultiProcessCollector(reg, path=str(directory))
    conn = connect(settings, connect_timeout=SCRAPE_TIMEOUT, timeout=SCRAPE_TIMEOUT)
    reg.register(QueueCollector(settings, conn))
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
