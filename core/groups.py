"""Shard groups: which Redis deployment holds which nodes' queues, for a cluster bigger than one
Redis primary.

Interface: ``Group(pattern, url)``; ``parse(entries) -> list[Group]`` (``ValueError`` naming a bad
entry); ``group_url(settings, node) -> str | None`` (the deployment of that node's queues; None:
the cluster's main one, ``redis_url`` or the sentinels').

rq cannot run on Redis Cluster (its multi-key scripts fail with CROSSSLOT, rq#1942), so a cluster
that outgrows one primary gives groups of nodes a Redis deployment each for their queues, leases,
retry sets and tallies: ``redis_group = ["mx1*=redis://10.0.1.5:6379/0", ...]`` (or, in the file,
``[[redis_group]]`` tables with ``nodes`` (or ``shards = "mx1*/*"``) and ``url``). A pattern is a
shell glob on node names (``fnmatch``, case-sensitive); the first group that matches wins, a node
matching none keeps its queues in the main deployment. A group holds whole nodes: a node's shards
are claimed in one round trip and rebalanced among themselves, so they share a deployment, and a
node is the unit that is added, retired or adopted. What is shared by the whole cluster on purpose
(the node registry, rate limits, AUTH throttles, the autoresponder's memory) always lives in the
main deployment (core.redis_conn ``connect_shared``). Every ops view reads each node's figures
from that node's deployment.

Failures: a malformed entry is a configuration error at start. Settings: ``redis_group``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import Settings

SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class Group:
    pattern: str
    url: str

    def holds(self, node: str) -> bool:
        return fnmatch.fnmatchcase(node, self.pattern)


def parse(entries: list[str]) -> list[Group]:
    """``pattern=url`` entries; a pattern written for shards (``mx1*/*``) names its nodes."""
    groups = []
    for entry in entries:
        pattern, sep, url = entry.partition("=")
        pattern = pattern.strip().removesuffix("/*")
        url = url.strip()
        if not sep or not pattern or "/" in pattern or not url.startswith(SCHEMES):
            raise ValueError(f"a list of NODE-PATTERN=URL (URL redis://, rediss:// or unix://; bad entry {entry!r})")
        groups.append(Group(pattern, url))
    return groups


def group_url(settings: Settings, node: str) -> str | None:
    for group in parse(settings.redis_group):
        if group.holds(node):
            return group.url
    return None
