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


def _oracle(shard_map: ShardMap, which: str, by: str, now: float) -> list[tuple[str, int, list[int]]]:
    """The answer from whole spool entries (Spool.scan reads everything), to hold the fast path to."""
    from ops.qshape import Row, _domain, bucket

    rows: dict[str, Row] = {}
    total = Row("TOTAL")
    for shard in shard_map.ids():
        for entry in shard_map.spool(shard).scan():
            envelope = entry.envelope
            if envelope is None:
                continue
            age = bucket(max(0.0, now - envelope.birth) / 60)
            states = envelope.states()
            for index in envelope.pending():
                mark = states[index]
                ready = mark is None or mark.state == "pending"
                if (which == "ready" and not ready) or (which == "deferred" and ready):
                    continue
                domain = _domain(envelope.sender if by == "sender" else envelope.recipients[index].address)
                rows.setdefault(domain, Row(domain)).add(age)
                total.add(age)
    ordered = [total, *sorted(rows.values(), key=lambda r: (-r.total, r.domain))]
    return [(r.domain, r.total, r.counts) for r in ordered]


def test_marks_after_long_bodies_are_read_without_the_body(node_factory: Callable[..., Node]) -> None:
    """Bodies longer than the first read put the marks behind a pread from the body's end: a
    deferred recipient counts as deferred, a delivered or bounced one not at all."""
    from core.spool import HEAD

    node = node_factory()
    settings = node.settings()
    shard_map = ShardMap(settings)
    now = time.time()
    for size in (HEAD * 3, 100_000):
        body = b"Subject: long\r\n\r\n" + b"x" * size + b"\r\n"
        envelope = Envelope(new_id(1), "s@from.example", (Recipient("a@d1.example", "remote"),
                            Recipient("b@d2.example", "remote"), Recipient("c@d3.example", "remote")),
                            now - 60, 0, len(body))
        spool = shard_map.spool(0)
        spool.write(envelope, body)
        spool.mark(envelope.id, [Mark(0, "deferred", "4.4.1", "timed out", now),
                                 Mark(1, "delivered", "2.0.0", "", now)])
        spool.mark(envelope.id, [Mark(2, "failed", "5.1.1", "no such user", now),
                                 Mark(2, "bounced", "5.1.1", "no such user", now)])
    deferred = shape(settings, [0], "deferred", "recipient", now)
    assert [(r.domain, r.total) for r in deferred] == [("TOTAL", 2), ("d1.example", 2)]
    assert deferred[0].counts[BUCKETS.index(5)] == 2  # one minute old
    assert [(r.domain, r.total) for r in shape(settings, [0], "ready", "recipient", now)] == [("TOTAL", 0)]
    assert [(r.domain, r.total) for r in shape(settings, [0], "all", "sender", now)] == [("TOTAL", 2),
                                                                                        ("from.example", 2)]


def test_fast_path_agrees_with_whole_entries(node_factory: Callable[..., Node]) -> None:
    """A mixed spool (bodies empty, short, at the first read's edge and long; envelopes longer than
    it; marks of every state; a truncated entry; a file recycled under another name) gives the same
    shape in one process and in several as the whole-entry reading of Spool.scan."""
    import os
    import random

    from core.spool import HEAD

    node = node_factory(shards="3")
    settings = node.settings()
    shard_map = ShardMap(settings)
    rng = random.Random(6)
    now = time.time()
    states = ["pending", "delivered", "deferred", "failed", "bounced"]
    sizes = [0, 10, HEAD - 400, HEAD - 300, HEAD, HEAD + 5, 4096 - 300, 4096 * 2, 50_000]
    for i in range(300):
        count = rng.choice([1, 2, 3, 40 if i % 50 == 0 else 1])
        recipients = tuple(Recipient(f"user{j}@D{rng.randrange(7)}.Example.", "remote") for j in range(count))
        body = b"x" * rng.choice(sizes)
        sender = rng.choice(["", "a@s1.example", "b@S2.example", "nolocal"])
        envelope = Envelope(new_id(1), sender, recipients, now - rng.uniform(0, 3000) * 60, i % 3, len(body))
        spool = shard_map.spool(i % 3)
        spool.write(envelope, body)
        marks = [Mark(rng.randrange(count), rng.choice(states), "", "", now) for _ in range(rng.randrange(4))]
        if marks:
            spool.mark(envelope.id, marks)
    victim = next(shard_map.spool(1).ids())
    path = shard_map.spool(1).path(victim)
    os.truncate(path, path.read_bytes().index(b"\n") + 1)  # envelope line, body gone
    other = next(shard_map.spool(2).ids())
    stale = shard_map.spool(2).path(other).parent / new_id(1)
    stale.write_bytes(shard_map.spool(2).path(other).read_bytes())  # a name whose file holds another message
    for which in ("ready", "deferred", "all"):
        for by in ("recipient", "sender"):
            expected = _oracle(shard_map, which, by, now)
            for processes in (1, 3):
                got = [(r.domain, r.total, r.counts) for r in shape(settings, shard_map.ids(), which, by, now,
                                                                    processes)]
                assert got == expected, (which, by, processes)


def test_a_look_at_the_queue_leaves_the_entries_untouched(node_factory: Callable[..., Node]) -> None:
    """qshape reads with O_NOATIME (the files' owner, or root): on a relatime mount the first read
    after a write would otherwise dirty every entry's inode."""
    import os

    node = node_factory()
    settings = node.settings()
    shard_map = ShardMap(settings)
    put(shard_map, 0, "a@b.example", ["x@far.example"], 1)
    path = shard_map.spool(0).path(next(shard_map.spool(0).ids()))
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime before mtime: relatime's next read moves it
    before = os.stat(path)
    assert [(r.domain, r.total) for r in shape(settings, [0], "all", "recipient", time.time(), 1)] == [
        ("TOTAL", 1), ("far.example", 1)]
    after = os.stat(path)
    assert (after.st_atime_ns, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_atime_ns, before.st_mtime_ns, before.st_ctime_ns)
