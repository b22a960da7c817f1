"""The cluster's spools: ``shardmail qshape --cluster`` and ``shardmail queue list --cluster``.

Interface: ``handlers(settings, conn)`` (what a node answers for its own spool: ``qshape`` and
``queue``, served by ops.ask's answerer in the node's scheduler); ``gather(settings, conn, what,
args, timeout) -> Gathered`` (every node of the registry, asked or marked); ``qshape_cluster``,
``render_qshape``, ``qshape_dict``; ``queue_cluster``, ``render_queue``, ``queue_dict``.

Only a node's disk knows its spool, so each live node (core.nodes Registry) is asked through
ops.ask and answers with the single-node code itself: ops.qshape's ``shape`` over all its shards
(in the answering thread for a small spool, else in processes started from a fork server: the
scheduler has threads and is never forked), ops.queue's
``listing`` (its JSON, at most ``MAX_LIST`` messages). A node's share is never silently left out:
a node the registry calls dead is not asked and is shown as "dead since HH:MM:SS, share unknown",
one that did not answer within the timeout as "no answer within N s, share unknown", one that
answered with an error with that error; the totals say how many nodes they lack.

JSON (``qshape --cluster --json``): ``version``, ``time``, ``which``, ``by``, ``timeout``,
``nodes``: [{``node``, ``state`` (``ok``, ``dead``, ``no answer``, ``error``), ``heartbeat`` (its
last, epoch s), ``data`` (null unless ok: {``rows``: [{``domain``, ``total``, ``counts``}] with
the node's TOTAL first, ``omitted`` (domains past ``MAX_DOMAINS`` left out of its rows, not of
its TOTAL)}), ``error`` (for ``error``)}], ``total``: {``rows`` (the answering nodes' rows
merged, TOTAL first), ``nodes``, ``answered``, ``unknown`` (the names of the others)}.
``queue list --cluster --json``: the same ``nodes`` with ``data`` = the node's ``queue list
--json`` document (``messages``, ``total``, ``truncated``, ``notes``), and ``total``:
{``messages``, ``held``, ``active``, ``size``, ``recipients`` (over the answering nodes),
``truncated`` (a node listed only its first ``limit``), ``nodes``, ``answered``, ``unknown``}.

Failures: Redis unavailable raises ``redis.RedisError`` (the CLI says so); a node's bad answer is
that node's ``error`` row. Settings: ``redis_prefix``, ``nodedeadafter``, and the node's own.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import redis

from core.config import Settings
from core.nodes import Registry
from core.shards import Namespace, ShardMap
from ops.ask import MAX_REPLY, Handler, ask
from ops.qshape import BUCKETS, Row, render, shape
from ops.queue import Filter, QueueAdmin, render_message, summary_line

log = logging.getLogger("shardmail.cluster_spool")
VERSION = 1
DEFAULT_TIMEOUT = 5.0
MAX_DOMAINS = 5000  # domain rows a node sends (its TOTAL always counts them all)
# Entries from which a node's qshape uses processes. Below, one thread is as quick: 50,000 cached
# entries took 0.5 s in one thread and 1.2 s in eight processes from a fork server (their start
# costs ~0.7 s) on two loaded cores here; a million take ~10 s in one thread, ~6 s in processes.
PARALLEL_FROM = 100_000
DEFAULT_LIST = 100  # messages a node lists by default
MAX_LIST = 1000  # at most, whatever the request says
REPLY_BUDGET = MAX_REPLY // 2  # bytes: a listing bigger than this is cut (its recipients can be many)
QSHAPE = "qshape"
QUEUE = "queue"


# -- the answering node -----------------------------------------------------------------------------
def handlers(settings: Settings, conn: redis.Redis | None) -> dict[str, Handler]:
    """What this node answers for its spool; ``conn``: its queues' deployment (in-flight flags)."""
    return {QSHAPE: lambda args: answer_qshape(settings, args),
            QUEUE: lambda args: answer_queue(settings, conn, args)}


def _choice(args: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = args.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}")
    return str(value)


def row_doc(row: Row) -> dict[str, Any]:
    return {"domain": row.domain, "total": row.total, "counts": list(row.counts)}


def answer_qshape(settings: Settings, args: dict[str, Any], parallel_from: int = PARALLEL_FROM) -> dict[str, Any]:
    """This node's ``qshape`` over all its shards: TOTAL first, then up to ``MAX_DOMAINS`` domains.
    A spool of ``parallel_from`` entries or more is read by ``qshape``'s processes, started from a
    fork server (the answerer is a thread: its process must not fork); a smaller one, or one whose
    processes could not start, in this thread."""
    which = _choice(args, "which", ("all", "ready", "deferred"))
    by = _choice(args, "by", ("recipient", "sender"))
    shard_map = ShardMap(settings)
    shards = shard_map.ids(fresh=True)
    entries = sum(shard_map.spool(shard).census().spooled for shard in shards)  # directory listings only
    rows = None
    if entries >= parallel_from:
        multiprocessing.get_context("forkserver").set_forkserver_preload(["ops.qshape"])  # before it starts
        try:
            rows = shape(settings, shards, which, by, time.time(), start="forkserver")
        except (BrokenProcessPool, OSError) as exc:  # e.g. a main module its processes cannot import
            log.warning("qshape in processes failed (%s): counting in one thread", exc)
    if rows is None:
        rows = shape(settings, shards, which, by, time.time(), processes=1)
    kept = rows[: 1 + MAX_DOMAINS]
    return {"rows": [row_doc(r) for r in kept], "omitted": len(rows) - len(kept)}


def answer_queue(settings: Settings, conn: redis.Redis | None, args: dict[str, Any]) -> dict[str, Any]:
    """This node's ``queue list --json`` (the first ``limit`` messages, at most ``MAX_LIST``), cut
    further if its text would be more than ``REPLY_BUDGET`` bytes."""
    limit, held, domain = args.get("limit", DEFAULT_LIST), args.get("held", False), args.get("domain", "")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError("limit must be a positive whole number")
    if not isinstance(held, bool) or not isinstance(domain, str) or len(domain) > 255:
        raise ValueError("held must be true or false, domain a name")
    out, err = io.StringIO(), io.StringIO()
    admin = QueueAdmin(settings, conn, out, err)
    admin.listing(Filter(admin.map.ids(fresh=True), held, domain), as_json=True, limit=min(limit, MAX_LIST))
    doc = json.loads(out.getvalue())
    doc["notes"] = [line for line in err.getvalue().splitlines() if line]
    while doc["messages"] and len(json.dumps(doc)) > REPLY_BUDGET:
        doc["messages"] = doc["messages"][: len(doc["messages"]) // 2]
        doc["truncated"] = True
        doc["total"] = _list_total(doc["messages"])
    return doc


def _list_total(messages: list[dict[str, Any]]) -> dict[str, int]:
    return {"messages": len(messages), "held": sum(bool(m["held"]) for m in messages),
            "active": sum(bool(m["active"]) for m in messages), "size": sum(int(m["size"]) for m in messages),
            "recipients": sum(len(m["recipients"]) for m in messages)}


# -- the asking side --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeAnswer:
    node: str
    state: str  # "ok", "dead", "no answer", "error"
    heartbeat: float
    data: Any = None
    error: str = ""

    @property
    def known(self) -> bool:
        return self.state == "ok"


@dataclass(frozen=True, slots=True)
class Gathered:
    time: float
    timeout: float
    nodes: list[NodeAnswer]

    @property
    def unknown(self) -> list[str]:
        return [a.node for a in self.nodes if not a.known]


def _is_shape(data: Any) -> bool:
    rows = data.get("rows") if isinstance(data, dict) else None
    return bool(rows) and isinstance(rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("domain"), str) and isinstance(r.get("total"), int)
        and isinstance(r.get("counts"), list) and len(r["counts"]) == len(BUCKETS) + 1
        and all(isinstance(c, int) for c in r["counts"]) for r in rows) and rows[0]["domain"] == "TOTAL"


def _is_listing(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return False
    total = data.get("total")
    return isinstance(total, dict) and all(isinstance(total.get(k), int) for k in
                                           ("messages", "held", "active", "size", "recipients")) and all(
        map(_is_message, data["messages"]))


def _is_message(doc: Any) -> bool:
    return isinstance(doc, dict) and {"id", "shard", "held", "active", "size", "arrival", "sender"} <= doc.keys() \
        and isinstance(doc.get("recipients"), list) and all(
            isinstance(r, dict) and isinstance(r.get("address"), str) and isinstance(r.get("state"), str)
            for r in doc["recipients"])


READABLE = {QSHAPE: _is_shape, QUEUE: _is_listing}  # what an answer must look like to be shown


def gather(settings: Settings, conn: redis.Redis, what: str, args: dict[str, Any], timeout: float,
           now: float | None = None) -> Gathered:
    """Every node of the registry, by name: the live ones asked at once (one deadline), the dead
    ones marked, an answer that does not look like one (another version, say) an error.
    ``conn``: the cluster's main deployment."""
    now = time.time() if now is None else now
    records = Registry.of(settings, conn).nodes(now)
    replies = ask(conn, Namespace.of(settings), [r.name for r in records if r.alive], what, args, timeout)
    answers = []
    for record in records:
        if not record.alive:
            answers.append(NodeAnswer(record.name, "dead", record.beat))
            continue
        reply = replies.get(record.name)
        if reply is None:
            answers.append(NodeAnswer(record.name, "no answer", record.beat))
        elif not reply.ok:
            answers.append(NodeAnswer(record.name, "error", record.beat, error=reply.error))
        elif what in READABLE and not READABLE[what](reply.data):
            answers.append(NodeAnswer(record.name, "error", record.beat, error="an answer of an unknown form"))
        else:
            answers.append(NodeAnswer(record.name, "ok", record.beat, reply.data))
    return Gathered(now, timeout, answers)


def unknown_text(answer: NodeAnswer, timeout: float) -> str:
    """Why a node's share is not shown."""
    if answer.state == "dead":
        return f"{answer.node}: dead since {time.strftime('%H:%M:%S', time.localtime(answer.heartbeat))}, share unknown"
    if answer.state == "no answer":
        return f"{answer.node}: no answer within {timeout:g} s, share unknown"
    return f"{answer.node}: error ({answer.error}), share unknown"


def _node_dict(answer: NodeAnswer) -> dict[str, Any]:
    doc: dict[str, Any] = {"node": answer.node, "state": answer.state, "heartbeat": answer.heartbeat,
                           "data": answer.data if answer.known else None}
    if answer.state == "error":
        doc["error"] = answer.error
    return doc


def _counted(gathered: Gathered) -> dict[str, Any]:
    return {"nodes": len(gathered.nodes), "answered": len(gathered.nodes) - len(gathered.unknown),
            "unknown": gathered.unknown}


# -- qshape --cluster -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClusterShape:
    gathered: Gathered
    which: str
    by: str

    def node_rows(self, answer: NodeAnswer) -> list[Row]:
        return [Row(r["domain"], int(r["total"]), [int(c) for c in r["counts"]]) for r in answer.data["rows"]]

    def merged(self) -> list[Row]:
        """The answering nodes' rows summed: TOTAL (their TOTALs) first, then domains, biggest first."""
        total = Row("TOTAL")
        rows: dict[str, Row] = {}
        for answer in self.gathered.nodes:
            if answer.known:
                own_total, *domains = self.node_rows(answer)
                _add(total, own_total)
                for row in domains:
                    _add(rows.setdefault(row.domain, Row(row.domain)), row)
        return [total, *sorted(rows.values(), key=lambda r: (-r.total, r.domain))]


def _add(target: Row, source: Row) -> None:
    for bucket, count in enumerate(source.counts):
        if count:
            target.add(bucket, count)


def qshape_cluster(settings: Settings, conn: redis.Redis, which: str = "all", by: str = "recipient",
                   timeout: float = DEFAULT_TIMEOUT) -> ClusterShape:
    return ClusterShape(gather(settings, conn, QSHAPE, {"which": which, "by": by}, timeout), which, by)


def qshape_dict(cluster: ClusterShape) -> dict[str, Any]:
    gathered = cluster.gathered
    return {"version": VERSION, "time": gathered.time, "which": cluster.which, "by": cluster.by,
            "timeout": gathered.timeout, "nodes": [_node_dict(a) for a in gathered.nodes],
            "total": {"rows": [row_doc(r) for r in cluster.merged()], **_counted(gathered)}}


def render_qshape(cluster: ClusterShape, top: int = 0) -> str:
    """The merged table (as ``qshape``'s), then one TOTAL row per node, each unknown node's line
    where its row would be, and what the TOTAL lacks."""
    gathered = cluster.gathered
    if not gathered.nodes:
        return "no node has announced itself (each node's scheduler sends its heartbeat)"
    lines = [render(cluster.merged(), top), "", "per node:"]
    answering = [a for a in gathered.nodes if a.known]
    table = render([Row(a.node, total.total, total.counts) for a in answering
                    for total in cluster.node_rows(a)[:1]]).splitlines() if answering else []
    rows = iter(table[1:])  # after the header: one per answering node, in order
    if table:
        lines.append(table[0])
    for answer in gathered.nodes:
        if not answer.known:
            lines.append(unknown_text(answer, gathered.timeout))
            continue
        lines.append(next(rows))
        omitted = answer.data.get("omitted", 0)
        if omitted:
            lines.append(f"  ({answer.node}: {omitted} smaller domains not listed above; in its total)")
    counted = _counted(gathered)
    if counted["unknown"]:
        lines.append(f"-- TOTAL: {counted['answered']} of {counted['nodes']} nodes; unknown: "
                     f"{', '.join(counted['unknown'])} (their mail is not in the TOTAL)")
    else:
        lines.append(f"-- TOTAL: all {counted['nodes']} node(s)")
    return "\n".join(lines)


# -- queue list --cluster ---------------------------------------------------------------------------
def queue_cluster(settings: Settings, conn: redis.Redis, limit: int = DEFAULT_LIST, held: bool = False,
                  domain: str = "", timeout: float = DEFAULT_TIMEOUT) -> Gathered:
    return gather(settings, conn, QUEUE, {"limit": max(1, min(limit, MAX_LIST)), "held": held, "domain": domain},
                  timeout)


def queue_dict(gathered: Gathered, limit: int) -> dict[str, Any]:
    total: dict[str, Any] = {"messages": 0, "held": 0, "active": 0, "size": 0, "recipients": 0, "truncated": False}
    for answer in gathered.nodes:
        if answer.known:
            for key in ("messages", "held", "active", "size", "recipients"):
                total[key] += int(answer.data["total"][key])
            total["truncated"] = total["truncated"] or bool(answer.data.get("truncated"))
    return {"version": VERSION, "time": gathered.time, "timeout": gathered.timeout, "limit": limit,
            "nodes": [_node_dict(a) for a in gathered.nodes], "total": {**total, **_counted(gathered)}}


def render_queue(gathered: Gathered, limit: int) -> str:
    """Each node's messages (their shards named ``<node>/s<N>``) and its closing line, or the line
    saying why its share is unknown; then the cluster's line."""
    if not gathered.nodes:
        return "no node has announced itself (each node's scheduler sends its heartbeat)"
    out: list[str] = []
    for answer in gathered.nodes:
        if not answer.known:
            out.append(f"-- {unknown_text(answer, gathered.timeout)}")
            continue
        doc = answer.data
        out.extend(render_message(m, f"{answer.node}/s{m['shard']}").rstrip("\n") for m in doc["messages"])
        total = doc["total"]
        more = f" (the first {total['messages']}: there are more)" if doc.get("truncated") else ""
        line = (summary_line(total["messages"], total["size"], total["recipients"], total["held"], total["active"])
                if total["messages"] else "-- the queue is empty")
        out.append(f"-- {answer.node}: {line.removeprefix('-- ')}{more}")
        out.extend(f"   {answer.node}: {note}" for note in doc.get("notes", []))
    total = queue_dict(gathered, limit)["total"]
    answered = f"{total['answered']} of {total['nodes']} node(s)"
    unknown = f"; unknown: {', '.join(total['unknown'])}" if total["unknown"] else ""
    more = f"; some nodes listed only their first {limit} (--limit)" if total["truncated"] else ""
    out.append(f"-- cluster: {total['messages']} message(s), {total['recipients']} recipient(s) waiting, "
               f"{total['held']} held, {total['active']} in flight on {answered}{unknown}{more}")
    return "\n".join(out)

