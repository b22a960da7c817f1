"""The cluster at a glance: every node of one Redis deployment, alive or dead, and their queues
(``shardmail status --cluster``).

Interface: ``gather_cluster(settings, conn, now) -> Cluster``, ``render_cluster(cluster) -> str``,
``cluster_dict(cluster)`` / ``cluster_json(cluster)``; ``node_status(cluster, name) -> Status``
(one node's per-shard detail, for ``--node``).

Nodes come from the registry their heartbeats keep (core.nodes). What Redis holds for a node
(queues, in flight, retries, rates, its pools' workers) is read for every node, dead or alive,
in one round trip per node (ops.depth's ``compose`` over core.jobs' ``census``). What only a
node's disk knows (spooled and held mail, the oldest message) comes from its last heartbeat, so it
is a heartbeat interval old at most (5 s) for a live node; for a dead node those figures
are its last known ones, marked unknown (``?`` in the table, ``spool_known: false`` in JSON),
never left out of the totals silently: the totals say how many nodes they lack.

JSON fields: ``version``, ``time``, ``nodes``: [{``node``, ``alive``, ``host``, ``address``,
``version``, ``started``, ``heartbeat_age``, ``spool_known``, ``status`` (ops.depth's JSON for
the node)}], ``total`` ({``nodes``, ``alive``, ``spool_unknown`` (nodes whose spool figures are
stale), and the sums ``spooled``, ``held``, ``ready``, ``in_flight``, ``deferred``, ``in_per_s``,
``out_per_s``, ``workers``}).

Failures: ``redis.RedisError`` propagates (the CLI says Redis is unavailable: without it there is
no cluster view). Settings: ``redis_prefix``, ``nodedeadafter``, ``redis_group``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from core.config import Settings
from core.groups import group_url
from core.nodes import NodeRecord, Registry
from core.redis_conn import connect
from core.shards import Namespace
from core.spool import Counts
from ops.depth import Status, as_dict, compose

VERSION = 1


@dataclass(frozen=True, slots=True)
class NodeView:
    record: NodeRecord
    status: Status

    @property
    def spool_known(self) -> bool:
        return self.record.alive


@dataclass(frozen=True, slots=True)
class Cluster:
    time: float
    nodes: list[NodeView]


def gather_cluster(settings: Settings, conn: redis.Redis, now: float | None = None) -> Cluster:
    """``conn``: the cluster's main deployment (the registry); each node's figures come from the
    deployment of its shard group (core.groups), one client per deployment."""
    now = time.time() if now is None else now
    views = []
    clients: dict[str | None, redis.Redis] = {None: conn}
    for record in Registry.of(settings, conn).nodes(now):
        grouped = group_url(settings, record.name)
        if grouped not in clients:
            clients[grouped] = connect(settings, node=record.name)
        disk = {shard: Counts(*figures) for shard, figures in record.spool.items()}
        status = compose(Namespace(settings.redis_prefix, record.name), clients[grouped], record.shards, disk,
                         set(record.draining), record.beat, now)
        views.append(NodeView(record, status))
    return Cluster(now, views)


def node_status(cluster: Cluster, name: str) -> Status:
    for view in cluster.nodes:
        if view.record.name == name:
            return view.status
    raise KeyError(name)


def _sums(status: Status) -> dict[str, float]:
    doc = as_dict(status)["total"]
    channels = doc["channels"].values()
    return {"spooled": doc["spooled"], "held": doc["held"], "deferred": doc["deferred"],
            "ready": sum(c["ready"] for c in channels), "in_flight": sum(c["in_flight"] for c in channels),
            "in_per_s": sum(c["in_per_s"] for c in channels), "out_per_s": sum(c["out_per_s"] for c in channels),
            "workers": sum(p.workers for p in status.pools)}


def cluster_dict(cluster: Cluster) -> dict:
    nodes = []
    total: dict[str, float] = {"nodes": len(cluster.nodes), "alive": sum(v.record.alive for v in cluster.nodes),
                               "spool_unknown": sum(not v.spool_known for v in cluster.nodes)}
    for view in cluster.nodes:
        record = view.record
        nodes.append({"node": record.name, "alive": record.alive, "host": record.host, "address": record.address,
                      "version": record.version, "started": record.started,
                      "heartbeat_age": max(0.0, cluster.time - record.beat), "spool_known": view.spool_known,
                      "status": as_dict(view.status)})
        for key, value in _sums(view.status).items():
            if key in ("spooled", "held") and not view.spool_known:
                continue
            total[key] = total.get(key, 0) + value
    return {"version": VERSION, "time": cluster.time, "nodes": nodes, "total": total}


def cluster_json(cluster: Cluster, indent: int | None = 2) -> str:
    return json.dumps(cluster_dict(cluster), indent=indent)


COLUMNS = ("node", "state", "heartbeat", "host", "shards", "workers", "spooled", "held", "ready", "in-flight",
           "deferred", "in/s", "out/s")


def render_cluster(cluster: Cluster) -> str:
    """One line per node, then the cluster's total; a dead node's spool figures show as ``?``."""
    from ops.depth import age_text

    doc = cluster_dict(cluster)
    table: list[tuple[str, ...]] = [COLUMNS]
    for view, node in zip(cluster.nodes, doc["nodes"], strict=True):
        sums = _sums(view.status)
        disk = (str(sums["spooled"]), str(sums["held"])) if view.spool_known else ("?", "?")
        table.append((node["node"], "alive" if node["alive"] else "DEAD", age_text(node["heartbeat_age"]) + " ago",
                      node["host"], str(len(view.record.shards)), str(sums["workers"]), *disk, str(sums["ready"]),
                      str(sums["in_flight"]), str(sums["deferred"]), f"{sums['in_per_s']:.1f}",
                      f"{sums['out_per_s']:.1f}"))
    total = doc["total"]
    unknown = total["spool_unknown"]
    table.append(("all", f"{total['alive']}/{total['nodes']} alive", "", "", "", str(total.get("workers", 0)),
                  str(total.get("spooled", 0)) + ("+?" if unknown else ""),
                  str(total.get("held", 0)) + ("+?" if unknown else ""), str(total.get("ready", 0)),
                  str(total.get("in_flight", 0)), str(total.get("deferred", 0)), f"{total.get('in_per_s', 0):.1f}",
                  f"{total.get('out_per_s', 0):.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                   strict=True)))
             for row in table]
    if not cluster.nodes:
        lines.append("no node has announced itself (each node's scheduler sends its heartbeat)")
    elif unknown:
        lines.append(f"? = unknown: {unknown} node(s) dead, their spool figures are those of their last heartbeat")
    return "\n".join(line.rstrip() for line in lines)
