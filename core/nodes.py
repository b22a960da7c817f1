"""The cluster's nodes: each node's hold on its name, its heartbeat, and who is alive.

Interface: ``Identity.of(settings)`` (the spool's node file, made on first start: which node the
spool belongs to, and a random id telling this node's processes from any other); ``Beat``
(what a node announces); ``Registry(conn, space)`` with ``claim(identity, beat, now)`` (at
start, and on every heartbeat), ``nodes()`` (every known node, alive or not, as ``NodeRecord``),
``forget(name)``; ``beat_of(shard_map, listings, address, started, qmqp)`` (this node's heartbeat);
``serve_spool(settings)`` (a serving process's check of its spool and its shared lock on it),
``lock_for_adoption(root)``, ``read_node_file(root)``, ``mark_adopted(root, by)`` (for adopt).

A node's name is its namespace in Redis (core.shards' ``Namespace``), so two live nodes under one
name would claim each other's jobs and find no spool file for them. The spool holds a file
``node`` naming its node and an id; every process of the node (``run``'s children, or roles
started one by one) reads the same file, so they share the id. ``claim`` is one script: it takes
the name unless another id holds it with a heartbeat younger than ``nodedeadafter``, so a second
machine configured with the same name is refused at start with the first one's host and the age
of its heartbeat, while a restarted node (same id) takes its name straight back. A spool whose
file names another node is refused too: a spool is served under one name only (taking in a dead
node's spool is ``shardmail adopt``'s job).

Redis: ``<prefix>:nodes`` (a set of names) and ``<prefix>:node:<name>`` (a hash: id, host,
address, qmqp, version, started, beat, and JSON fields shards, draining and spool: per shard its
spooled and held entries and its oldest id, from directory listings). No expiry: a dead node's
record stays, with its last heartbeat, so that ops tools show it dead rather than forget it.

Failures: ``NodeConflict`` (the name is held by another live node), ``SpoolOwned`` (the spool
belongs to another node); Redis errors propagate (the caller retries: a heartbeat missed is
only a node shown late). The node file is written durably (temporary file, fsync, rename).

Settings: ``node``, ``nodedeadafter``, ``redis_prefix``, the spool root.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import redis

from core.config import Settings
from core.redis_conn import text
from core.shards import Namespace, ShardMap
from core.spool import Listings, fsync_dir

NODE_FILE = "node"  # in the spool root
LOCK_FILE = "node.lock"  # in the spool root: shared by the processes serving it, exclusive for adopt
HEARTBEAT = 5.0  # s between two heartbeats of a node (at most: three fit in ``nodedeadafter``)

# KEYS: the set of names, the node's hash; ARGV: id, now, dead after (s), name, then field/value
# pairs. Refuses (returns the holder's id, host and last beat) while another id beats under the name.
_CLAIM = """
local held = redis.call('HMGET', KEYS[2], 'id', 'host', 'beat')
if held[1] and held[1] ~= ARGV[1] and tonumber(ARGV[2]) - tonumber(held[3] or '0') < tonumber(ARGV[3]) then
  return {held[1], held[2] or '', held[3] or '0'}
end
redis.call('SADD', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'beat', ARGV[2], unpack(ARGV, 5))
return {}
"""


class NodeConflict(Exception):
    """Another live node holds this node's name."""


class SpoolOwned(Exception):
    """The spool belongs to another node."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Which node a spool belongs to: its name and the id its processes share."""

    node: str
    id: str

    @classmethod
    def of(cls, settings: Settings) -> Identity:
        """The spool's node file, written on first start; SpoolOwned if it names another node or
        another node adopted it."""
        root = settings.spool_root
        try:
            found = read_node_file(root)
        except FileNotFoundError:
            root.mkdir(parents=True, exist_ok=True)
            _write_durably(root / NODE_FILE, {"node": settings.node, "id": uuid.uuid4().hex})
            found = read_node_file(root)  # a concurrent first start may have won the rename
        if found.get("adopted_by"):
            raise SpoolOwned(f"the spool {root} of node {found['node']!r} was adopted by node "
                             f"{found['adopted_by']!r}: its mail is served there now; start this node on an "
                             f"empty spool")
        if found["node"] != settings.node:
            raise SpoolOwned(f"the spool {root} belongs to node {found['node']!r}, not {settings.node!r}: set "
                             f"node = \"{found['node']}\", or take it in with `shardmail adopt`")
        return cls(found["node"], found["id"])


def read_node_file(root: Path) -> dict[str, str]:
    """The spool's node file: ``node``, ``id``, and once adopted ``adopted_by``, ``adopted_at``."""
    return json.loads((root / NODE_FILE).read_text())


def mark_adopted(root: Path, by: str) -> None:
    """Record in a spool's node file that another node took it in (durably, before any entry
    moves): the old node refuses to serve it from then on, should it come back."""
    found = read_node_file(root)
    if found.get("adopted_by") != by:
        _write_durably(root / NODE_FILE, {**found, "adopted_by": by, "adopted_at": repr(time.time())}, replace=True)


_held: list[int] = []  # lock files this process keeps open (and locked) until it exits


def serve_spool(settings: Settings) -> Identity:
    """A serving process's claim on its spool: the node file checked (``Identity.of``) and a
    shared lock on ``<spool root>/node.lock`` held until the process exits, so that ``adopt``
    (which takes it exclusively) cannot move a spool that a live process on this machine serves,
    and no process starts on a spool while it is being adopted. SpoolOwned otherwise."""
    identity = Identity.of(settings)
    fd = os.open(settings.spool_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolOwned(f"the spool {settings.spool_root} is being adopted by another node") from None
    _held.append(fd)
    return identity


def lock_for_adoption(root: Path) -> int:
    """The exclusive lock on a spool to be adopted (a file descriptor, kept until the adoption
    ends); SpoolOwned while any process on this machine serves it."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolOwned(f"a process on this machine still serves the spool {root}: stop it first") from None
    return fd


def _write_durably(path: Path, doc: dict[str, str], replace: bool = False) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with open(temporary, "w") as out:
        out.write(json.dumps(doc) + "\n")
        out.flush()
        os.fsync(out.fileno())
    if replace or not path.exists():
        os.rename(temporary, path)
    else:
        temporary.unlink()
    fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class Beat:
    """What a node announces with each heartbeat."""

    address: str = ""
    shards: list[int] = field(default_factory=list)
    draining: list[int] = field(default_factory=list)
    spool: dict[int, tuple[int, int, str | None]] = field(default_factory=dict)  # spooled, held, oldest id
    started: float = 0.0
    qmqp: str = ""  # where the node takes mail by QMQP (host:port), "" = not at all


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as the registry knows it; ``alive`` says whether its heartbeat is recent enough."""

    name: str
    id: str
    host: str
    address: str
    version: str
    started: float
    beat: float
    alive: bool
    shards: list[int]
    draining: list[int]
    spool: dict[int, tuple[int, int, str | None]]
    qmqp: str = ""

    def qmqp_address(self) -> tuple[str, int] | None:
        """The node's QMQP listener to connect to (a wildcard listener: at the node's host name)."""
        if not self.qmqp:
            return None
        host, _, port = self.qmqp.rpartition(":")
        host = host.strip("[]")
        return (self.host if host in ("", "0.0.0.0", "::") else host), int(port)


def version() -> str:
    try:
        return metadata.version("shardmail")
    except metadata.PackageNotFoundError:
        return "unknown"


class Registry:
    def __init__(self, conn: redis.Redis, space: Namespace, dead_after: float) -> None:
        self.conn = conn
        self.space = space
        self.dead_after = dead_after
        self._claim = conn.register_script(_CLAIM)

    @classmethod
    def of(cls, settings: Settings, conn: redis.Redis) -> Registry:
        return cls(conn, Namespace.of(settings), settings.nodedeadafter)

    @property
    def interval(self) -> float:
        """Seconds between two heartbeats: three fit in the time after which a node counts as dead."""
        return min(HEARTBEAT, self.dead_after / 3)

    def names_key(self) -> str:
        return self.space.shared("nodes")

    def key(self, name: str) -> str:
        return self.space.shared(f"node:{name}")

    def claim(self, identity: Identity, beat: Beat, now: float) -> None:
        """Take (or keep) the name and record the heartbeat; NodeConflict if another live node
        holds the name."""
        fields = {"host": socket.gethostname(), "address": beat.address, "version": version(),
                  "started": repr(beat.started), "shards": json.dumps(beat.shards),
                  "draining": json.dumps(beat.draining),
                  "spool": json.dumps({str(k): list(v) for k, v in beat.spool.items()}), "qmqp": beat.qmqp}
        args: list[str] = [identity.id, repr(now), str(self.dead_after), identity.node]
        for name, value in fields.items():
            args += [name, value]
        held = self._claim(keys=[self.names_key(), self.key(identity.node)], args=args)
        if held:
            holder, host, last = (text(x) for x in held)
            raise NodeConflict(f"node name {identity.node!r} is in use by a live node on {host} (heartbeat "
                               f"{max(0.0, now - float(last)):.0f} s ago, id {holder[:8]}): give this node "
                               f"another name, or stop that one")

    def nodes(self, now: float) -> list[NodeRecord]:
        """Every node that ever beat under this prefix (and was not forgotten), by name."""
        names = sorted(text(n) for n in self.conn.smembers(self.names_key()))
        with self.conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.key(name))
            answers = pipe.execute()
        records = []
        for name, raw in zip(names, answers, strict=True):
            doc = {text(k): text(v) for k, v in raw.items()}
            if not doc:
                continue
            beat = float(doc.get("beat", 0))
            spool = {int(k): (v[0], v[1], v[2]) for k, v in json.loads(doc.get("spool", "{}")).items()}
            records.append(NodeRecord(name, doc.get("id", ""), doc.get("host", ""), doc.get("address", ""),
                                      doc.get("version", ""), float(doc.get("started", 0)), beat,
                                      now - beat < self.dead_after, json.loads(doc.get("shards", "[]")),
                                      json.loads(doc.get("draining", "[]")), spool, doc.get("qmqp", "")))
        return records

    def forget(self, name: str) -> None:
        """Drop a node's record (it was retired, or adopted by another)."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.srem(self.names_key(), name)
            pipe.delete(self.key(name))
            pipe.execute()


def beat_of(shard_map: ShardMap, listings: Listings, address: str, started: float, qmqp: str = "") -> Beat:
    """This node's heartbeat: its shards, the draining ones and per shard (spooled, held, oldest
    id) from directory listings (an unchanged directory costs a stat), and its QMQP listener."""
    shards = shard_map.ids(fresh=True)
    counts = {shard: shard_map.spool(shard).census(listings) for shard in shards}
    return Beat(address, shards, sorted(shard_map.draining()),
                {s: (c.spooled, c.held, c.oldest) for s, c in counts.items()}, started, qmqp)
