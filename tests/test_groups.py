"""Shard groups: a node's queues in the Redis deployment of its group, what the cluster shares in
the main one, and every view reading each node where its queues are."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.config import ConfigError, load
from core.groups import Group, group_url, parse
from core.nodes import Registry
from core.redis_conn import connect, connect_shared
from tests.conftest import Node, RedisServer
from tests.support import wait_until
from tests.test_nodes import maildir, queue_local
from tests.test_recovery import queue as queue_remote
from tests.test_recovery import start


def test_patterns_pick_the_first_matching_group() -> None:
    groups = parse(["mx1*=redis://10.0.0.5:6379/0", "mx*/*=unix:///run/redis-b.sock"])
    assert groups == [Group("mx1*", "redis://10.0.0.5:6379/0"), Group("mx*", "unix:///run/redis-b.sock")]
    settings = load(env={"SHARDMAIL_REDIS_GROUP": "mx1*=redis://a:1/0,mx*/*=redis://b:2/0"})
    assert group_url(settings, "mx12") == "redis://a:1/0"
    assert group_url(settings, "mx2") == "redis://b:2/0"
    assert group_url(settings, "edge1") is None  # the main deployment
    for bad in ("mx1", "=redis://a:1", "mx1=http://a", "a/b=redis://a:1"):
        with pytest.raises(ConfigError, match="redis_group"):
            load(env={"SHARDMAIL_REDIS_GROUP": bad})


def test_group_tables_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "shardmail.toml"
    config.write_text('[[redis_group]]\nnodes = "mx1*"\nurl = "redis://10.0.0.5:6379/0"\n\n'
                      '[[redis_group]]\nshards = "mx2/*"\nurl = "redis://10.0.0.6:6379/0"\n')
    assert load(config, env={}).redis_group == ["mx1*=redis://10.0.0.5:6379/0", "mx2/*=redis://10.0.0.6:6379/0"]
    config.write_text('[[redis_group]]\nnodes = "mx1*"\n')
    with pytest.raises(ConfigError, match="redis_group: expected tables with nodes"):
        load(config, env={})


def test_a_grouped_nodes_queues_live_in_its_groups_redis(node_factory: Callable[..., Node],
                                                         own_redis: RedisServer) -> None:
    groups = f"beta*={own_redis.url}"
    alpha = node_factory(node="alpha", redis_group=groups, nodedeadafter="3")
    beta = node_factory(node="beta", redis_group=groups, nodedeadafter="3")
    main = connect_shared(alpha.settings())
    group = own_redis.client()
    assert connect(beta.settings()).connection_pool.connection_kwargs["path"] == str(own_redis.socket_path)
    start(beta, "worker", "local")
    start(beta, "scheduler")
    start(alpha, "scheduler")
    queue_local(beta, 10)
    queue_remote(beta, 3, "nowhere.test")  # no remote pool: these stay ready in beta's group
    wait_until(lambda: len(maildir(beta)) == 10, timeout=30, what="beta delivering through its group's Redis")
    # the pool needs no lease, so the scheduler's may come after the deliveries
    wait_until(lambda: group.exists("shardmail:lease:beta/s0"), timeout=20, what="beta leading its shard 0")
    assert not main.exists("shardmail:lease:beta/s0")
    assert group.llen("rq:queue:shardmail.beta.s0.remote") + group.llen("rq:queue:shardmail.beta.s1.remote") == 3
    assert not [k for k in main.scan_iter("*beta.s*")]  # beta's queues are nowhere in the main deployment
    wait_until(lambda: main.exists("shardmail:lease:alpha/s0"), timeout=20, what="alpha leading its shard 0")
    assert not group.exists("shardmail:lease:alpha/s0")
    assert {r.name for r in Registry.of(alpha.settings(), main).nodes(time.time())} == {"alpha", "beta"}
    assert not group.exists("shardmail:nodes")  # the registry is the cluster's: in the main deployment

    def beta_seen() -> dict | None:
        done = subprocess.run([sys.executable, "-m", "ops.cli", "status", "--cluster", "--json"], env=alpha.env,
                              capture_output=True, text=True, timeout=60)
        nodes = {n["node"]: n for n in json.loads(done.stdout)["nodes"]}
        beta_doc = nodes.get("beta")
        ready = beta_doc["status"]["total"]["channels"]["remote"]["ready"] if beta_doc else 0
        return nodes if ready == 3 and beta_doc and beta_doc["status"]["total"]["spooled"] == 3 else None

    nodes = wait_until(beta_seen, timeout=20, what="status --cluster reading beta in its group")
    assert nodes["alpha"]["alive"] and nodes["beta"]["alive"]
