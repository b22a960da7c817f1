"""``shardmail adopt``: a live node takes in a dead node's spool as extra shards of its own.

Interface: ``adopt(settings, conn, source, from_node, force=False, progress=None) -> Adoption``;
``forget(settings, conn, node, force=False) -> int`` (a dead node whose spool is lost: only its
traces in Redis go, the third step below).

The dead node's spool (a moved disk, a restored backup, shared storage it used) is checked first:
its node file must name ``from_node``; the node's heartbeat must be dead (``--force`` overrides,
for a node known to be gone whose record still looks fresh); and no process on this machine may
hold the spool's lock (core.nodes ``lock_for_adoption``: every serving process holds it shared).
Then, in this order:

1. the spool's node file records the adoption (durably), so the old node refuses to serve it
   should it come back;
2. each of its non-empty shards gets a new shard of ours (core.shards ``add``), remembered in
   ``<source>/adopted.json`` so that a rerun after a crash puts the rest in the same place, and
   every entry, queued or held, moves there (core.spool ``take_in``: a rename on one file system,
   else a durable copy; the source's name goes only once ours is durable). The marks travel with
   the entry, so each recipient's checkpoint holds: nothing delivered is delivered again, beyond
   the one duplicate a remote delivery cut short by the crash may give (DESIGN §2);
3. what Redis held for the dead node goes (core.jobs ``purge``: its jobs, claims, retries, settle
   lists, leases), and its record leaves the node registry.

From then on our scheduler leads the new shards (a fresh lease sweeps a shard's spool, which
enqueues every entry under our name, deferred ones at their retry time) and our pools deliver,
retry and bounce that mail as ours. Held mail stays held. An interrupted adoption is finished by
running the same command again.

Failures: ``AdoptRefused`` (wrong node, live heartbeat, spool in use, nothing to adopt) with one
line saying why; OSError from the disk propagates (a rerun continues); Redis errors propagate
after the spool part is done (a rerun only cleans up).

``conn`` is the cluster's main deployment (the node registry); the dead node's queues are purged
in its shard group's deployment (core.groups).

Settings: ``spool_dir``/``var_dir``, ``queue_split``, ``redis_prefix``, ``node``, ``nodedeadafter``,
``redis_group``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core.config import Settings
from core.groups import group_url
from core.jobs import Jobs
from core.lease import lease_key
from core.nodes import NodeRecord, Registry, SpoolOwned, lock_for_adoption, mark_adopted, read_node_file
from core.redis_conn import connect
from core.shards import LABEL_PATTERN, Namespace, ShardMap
from core.spool import Spool, fsync_dir

JOURNAL = "adopted.json"  # in the source spool root: its shard -> our shard
_SHARD_DIR = re.compile(LABEL_PATTERN)


class AdoptRefused(Exception):
    """The spool cannot be adopted (the message says why)."""


@dataclass
class Adoption:
    """What an adoption did: per source shard the shard it became here, entries moved, jobs dropped."""

    shards: dict[int, int] = field(default_factory=dict)
    moved: int = 0
    held: int = 0
    jobs_dropped: int = 0


def _source_shards(root: Path) -> list[tuple[int, int]]:
    """(shard, split) of every shard directory in the source spool root (its split read from its
    queue/ directories: a node may have had another ``queue_split``)."""
    found = []
    for name in sorted(os.listdir(root)):
        match = _SHARD_DIR.fullmatch(name)
        if match and (root / name / "queue").is_dir():
            split = sum(1 for d in os.listdir(root / name / "queue") if d.isdigit())
            found.append((int(match.group(1)), max(split, 1)))
    return found


def _save_journal(root: Path, mapping: dict[int, int]) -> None:
    temporary = root / f".{JOURNAL}.{os.getpid()}"
    with open(temporary, "w") as out:
        json.dump({str(k): v for k, v in mapping.items()}, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, root / JOURNAL)
    fsync_dir(root)


def adopt(settings: Settings, conn: redis.Redis, source: Path, from_node: str, force: bool = False,
          progress: Callable[[int], None] | None = None) -> Adoption:
    source = source.resolve()
    if source == settings.spool_root.resolve():
        raise AdoptRefused("that is this node's own spool")
    try:
        owner = read_node_file(source)
    except FileNotFoundError:
        raise AdoptRefused(f"{source} holds no spool node file: not a shardmail spool root") from None
    if owner.get("node") != from_node:
        raise AdoptRefused(f"the spool {source} belongs to node {owner.get('node')!r}, not {from_node!r}")
    if owner.get("adopted_by") not in (None, settings.node):
        raise AdoptRefused(f"the spool {source} was adopted by node {owner['adopted_by']!r} already")
    registry = Registry.of(settings, conn)
    record = _dead_record(settings, registry, from_node, force)
    try:
        lock = lock_for_adoption(source)
    except SpoolOwned as exc:
        raise AdoptRefused(str(exc)) from None
    try:
        mark_adopted(source, settings.node)
        result = _move(settings, source, progress)
    finally:
        os.close(lock)
    result.jobs_dropped = _purge(settings, conn, registry, from_node, set(result.shards) | set(record.shards
                                                                                               if record else []))
    return result


def forget(settings: Settings, conn: redis.Redis, node: str, force: bool = False) -> int:
    """Drop a dead node's jobs, claims, leases and record from Redis (its spool is lost, or was
    adopted under another name); returns how many jobs went. AdoptRefused while it lives."""
    if node == settings.node:
        raise AdoptRefused("that is this node")
    registry = Registry.of(settings, conn)
    record = _dead_record(settings, registry, node, force)
    if record is None:
        raise AdoptRefused(f"no node {node!r} in the cluster's registry")
    return _purge(settings, conn, registry, node, set(record.shards))


def _dead_record(settings: Settings, registry: Registry, node: str, force: bool) -> NodeRecord | None:
    record = next((r for r in registry.nodes(time.time()) if r.name == node), None)
    if record is not None and record.alive and not force:
        raise AdoptRefused(f"node {node!r} still has a live heartbeat ({time.time() - record.beat:.0f} s ago, "
                           f"on {record.host}): stop it, wait {settings.nodedeadafter} s, or use --force if it is "
                           f"gone for certain")
    return record


def _purge(settings: Settings, conn: redis.Redis, registry: Registry, node: str, shards: set[int]) -> int:
    """The node's queues and leases in its shard group's deployment, its record in the main one."""
    space = Namespace(settings.redis_prefix, node)
    queues = connect(settings, node=node) if group_url(settings, node) else conn
    dropped = Jobs(queues, space).purge(sorted(shards))
    if shards:
        queues.delete(*(lease_key(space, shard) for shard in shards))
    registry.forget(node)
    return dropped


def _move(settings: Settings, source: Path, progress: Callable[[int], None] | None) -> Adoption:
    result = Adoption()
    mapping: dict[int, int] = {}
    journal = source / JOURNAL
    if journal.exists():
        mapping = {int(k): v for k, v in json.loads(journal.read_text()).items()}
    ours = ShardMap(settings)
    for shard, split in _source_shards(source):
        theirs = Spool(source, shard, split)
        queued, held = list(theirs.ids()), list(theirs.held())
        if not queued and not held:
            continue
        if shard not in mapping:
            mapping[shard] = ours.add()
            _save_journal(source, mapping)
        target = ours.spool(mapping[shard])
        for message_id in queued:
            result.moved += target.take_in(theirs, message_id)
            if progress:
                progress(1)
        for message_id in held:
            result.held += target.take_in(theirs, message_id, held=True)
            if progress:
                progress(1)
    result.shards = mapping
    return result
