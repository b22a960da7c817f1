"""rq jobs as shardmail creates, claims and finishes them: rq's own view must stay truthful."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from core.jobs import DELIVER_FUNC, Item, Jobs, job_id, pause_key, queue_name
from core.shards import Namespace, Picker, ShardMap
from tests.conftest import Node


def test_enqueue_creates_readable_rq_jobs(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("t", "n1"))
    jobs.enqueue([Item(0, "A" * 26, "local", 3), Item(1, "B" * 26, "remote", 1)])
    queue = Queue(queue_name(Namespace("t", "n1"), 0, "local"), connection=conn, serializer=JSONSerializer)
    assert queue.count == 1
    job = Job.fetch(job_id(Namespace("t", "n1"), "A" * 26, "local"), connection=conn, serializer=JSONSerializer)
    assert job.func_name == DELIVER_FUNC
    assert job.args == [0, "A" * 26, "local"]
    assert job.description == f"deliver {'A' * 26} (3 rcpt) via local"
    assert job.result_ttl == 0
    assert b"rq:queue:t.n1.s1.remote" in conn.smembers("rq:queues")


def test_claim_records_started_and_finish_forgets(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("t", "n1"))
    jobs.enqueue([Item(0, f"{i:026X}", "local") for i in range(10)])
    claims = jobs.claim(0, "local", 4, "worker-1")
    assert [c.message_id for c in claims] == [f"{i:026X}" for i in range(4)]
    queue = jobs.queue(0, "local")
    started = StartedJobRegistry(queue=queue)
    assert queue.count == 6
    assert sorted(started.get_job_ids(cleanup=False)) == sorted(c.job_id for c in claims)
    job = Job.fetch(claims[0].job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "started"
    assert job.worker_name == "worker-1"
    jobs.finish(claims[:3])
    assert started.get_job_ids(cleanup=False) == [claims[3].job_id]
    assert not conn.exists(f"rq:job:{claims[0].job_id}")
    jobs.fail(claims[3], "Traceback: boom")
    assert started.count == 0
    assert FailedJobRegistry(queue=queue).get_job_ids(cleanup=False) == [claims[3].job_id]
    assert jobs.claim(0, "local", 100, "worker-1").__len__() == 6
    assert jobs.claim(0, "local", 100, "worker-1") == []


def test_finish_rings_the_doorbell_only_for_claims_left_to_settle(redis_url: str) -> None:
    """A consumer that removed an entry itself finishes its claim with settle=False: the job is
    gone from rq as usual, and the scheduler's settle list only gets the others."""
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("t", "n1"))
    jobs.enqueue([Item(0, f"{i:026X}", "local") for i in range(3)])
    claims = jobs.claim(0, "local", 3, "worker-1")
    jobs.finish([replace(claims[0], settle=False), *claims[1:]])
    assert StartedJobRegistry(queue=jobs.queue(0, "local")).count == 0
    assert not conn.exists(f"rq:job:{claims[0].job_id}")
    assert jobs.settled(0, 10) == [(c.message_id, "local") for c in claims[1:]]


def test_claim_many_finishes_the_previous_batch_in_the_same_round_trip(redis_url: str) -> None:
    """A consumer's finished batch rides on its next claim (one pipeline): those jobs are gone from
    rq and the settle list has theirs; the claim takes from every shard asked, a paused one
    excepted; a Redis that lost its scripts is given the claim script again."""
    conn = redis.Redis.from_url(redis_url)
    space = Namespace("t", "n1")
    jobs = Jobs(conn, space)
    jobs.enqueue([Item(shard, f"{shard}{i:025X}", "local") for shard in range(3) for i in range(4)])
    first = jobs.claim_many([0, 1, 2], "local", 2, "worker-1")
    assert sorted((c.shard, c.message_id) for c in first) == [(s, f"{s}{i:025X}") for s in range(3) for i in range(2)]
    conn.set(pause_key(space, 2), "1")
    second = jobs.claim_many([0, 1, 2], "local", 2, "worker-1", finished=first)
    assert sorted((c.shard, c.message_id) for c in second) == [(s, f"{s}{i:025X}") for s in range(2) for i in (2, 3)]
    for shard in (0, 1):
        started = StartedJobRegistry(queue=jobs.queue(shard, "local")).get_job_ids(cleanup=False)
        assert sorted(started) == sorted(c.job_id for c in second if c.shard == shard)
        assert jobs.settled(shard, 10) == [(f"{shard}{i:025X}", "local") for i in range(2)]
    assert not any(conn.exists(f"rq:job:{c.job_id}") for c in first)
    conn.delete(pause_key(space, 2))
    conn.script_flush()
    third = jobs.claim_many([0, 1, 2], "local", 2, "worker-1", finished=second)
    assert sorted(c.message_id for c in third) == [f"2{i:025X}" for i in (2, 3)]
    assert not any(conn.exists(f"rq:job:{c.job_id}") for c in second)
    assert jobs.claim_many([], "local", 2, "worker-1", finished=third) == []
    assert StartedJobRegistry(queue=jobs.queue(2, "local")).count == 0


def test_depths_count_ready_jobs_per_shard(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("t", "n1"))
    jobs.enqueue([Item(1, f"{i:026X}", "remote") for i in range(3)] + [Item(1, "F" * 26, "local")])
    assert jobs.depths(range(3)) == {0: 0, 1: 4, 2: 0}


def test_picker_round_robin_skips_draining_shards(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="4")
    settings = node.settings()
    conn = redis.Redis.from_url(settings.redis_url)
    shard_map = ShardMap(settings)
    assert shard_map.drain(2)
    picker = Picker(shard_map, Jobs(conn, Namespace.of(settings)), "roundrobin")
    picks = [picker.pick() for _ in range(30)]
    assert 2 not in picks
    assert set(picks) == {0, 1, 3}


def test_picker_least_loaded_prefers_short_queues(node_factory: Callable[..., Node]) -> None:
    node = node_factory(shards="3")
    settings = node.settings()
    conn = redis.Redis.from_url(settings.redis_url)
    jobs = Jobs(conn, Namespace.of(settings))
    jobs.enqueue([Item(0, f"{i:026X}", "local") for i in range(50)] + [Item(2, f"{i:026X}", "local")
                                                                       for i in range(100, 150)])
    picker = Picker(ShardMap(settings), jobs, "leastloaded")
    picks = [picker.pick() for _ in range(40)]
    assert picks.count(1) == 40


def test_picker_refuses_when_all_shards_drain(node_factory: Callable[..., Node]) -> None:
    import pytest

    from core.shards import NoShardAvailable

    node = node_factory(shards="2")
    settings = node.settings()
    conn = redis.Redis.from_url(settings.redis_url)
    shard_map = ShardMap(settings)
    assert shard_map.drain(0) and shard_map.drain(1)
    with pytest.raises(NoShardAvailable):
        Picker(shard_map, Jobs(conn, Namespace.of(settings))).pick()


def test_extend_renews_leases_and_release_gives_jobs_back(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("t", "n1"))
    jobs.enqueue([Item(0, f"{i:026X}", "remote") for i in range(5)])
    claims = jobs.claim(0, "remote", 3, "worker-1")
    started = StartedJobRegistry(queue=jobs.queue(0, "remote"))
    key = f"{claims[0].job_id}:{claims[0].execution}"
    conn.zadd(started.key, {key: 1})  # as if the lease had nearly run out
    jobs.extend(claims)
    assert conn.zscore(started.key, key) > 1000
    jobs.release(claims)
    assert started.count == 0
    assert jobs.queue(0, "remote").get_job_ids() == [c.job_id for c in reversed(claims)] + [
        f"n1-{i:026X}-remote" for i in (3, 4)]
    job = Job.fetch(claims[0].job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "queued"
