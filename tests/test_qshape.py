"""``shardmail qshape`` on known queue contents: domains by age bucket, ready against deferred."""

from __future__ import annotations

import time
from collections.abc import Callable

from core.envelope import Envelope, Mark, Recipient, new_id
from core.shards import ShardMap
from ops.qshape import BUCKETS, shape
from tests.conftest import Node

BODY = b"Subject: q\r\n\r\nq\r\n"


def put(shard_map: ShardMap, shard: int, sender: str, recipients: list[str], age_minutes: float,
        marks: list[Mark] = ()) -> None:  # type: ignore[assignment]
    envelope = Envelope(new_id(1), sender, tuple(Recipient(r, "remote") for r in recipients),
                        time.time() - age_minutes * 60, shard, len(BODY))
    spool = shard_map.spool(shard)
    spool.write(envelope, BODY)
    if marks:
        spool.mark(envelope.id, list(marks))


def test_domains_by_age_biggest_first(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    settings = node.settings()
    shard_map = ShardMap(settings)
    deferred = [Mark(0, "deferred", "4.4.1", "timed out", time.time())]
    put(shard_map, 0, "a@big.example", ["x@far.example", "y@far.example", "z@near.example"], 1)
    put(shard_map, 1, "a@big.example", ["x@far.example"], 30, deferred)
    put(shard_map, 1, "", ["w@far.example", "v@near.example"], 2000,
        [Mark(1, "delivered", "2.0.0", "250", time.time())])
    rows = shape(settings, shard_map.ids(), "all", "recipient", time.time())
    assert [(r.domain, r.total) for r in rows] == [("TOTAL", 5), ("far.example", 4), ("near.example", 1)]
    far = rows[1].counts
    assert far[0] == 2 and far[BUCKETS.index(40)] == 1 and far[-1] == 1  # 1 min, 30 min, over 1280 min
    ready = shape(settings, shard_map.ids(), "ready", "recipient", time.time())
    assert [(r.domain, r.total) for r in ready] == [("TOTAL", 4), ("far.example", 3), ("near.example", 1)]
    only_deferred = shape(settings, [1], "deferred", "recipient", time.time())
    assert [(r.domain, r.total) for r in only_deferred] == [("TOTAL", 1), ("far.example", 1)]
    senders = shape(settings, shard_map.ids(), "all", "sender", time.time())
    assert [(r.domain, r.total) for r in senders] == [("TOTAL", 5), ("big.example", 4), ("<>", 1)]
    result = node.command("qshape", "--top", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["T", *map(str, BUCKETS), "1280+"]
    assert lines[1].split()[:2] == ["TOTAL", "5"] and lines[2].split()[:2] == ["far.example", "4"]
    assert len(lines) == 3
