"""Asking the nodes of a cluster about their spools (ops.ask, ops.cluster_spool): the request/reply
codec, an answerer on a real Redis, and ``qshape --cluster`` / ``queue list --cluster`` across three
real nodes, one of them stopped (no answer) and one killed (dead), neither left out."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from core.config import load
from core.envelope import Mark
from core.nodes import Beat, Identity, Registry
from core.redis_conn import connect_shared
from core.shards import Namespace, ShardMap
from ops.ask import (
    MAX_REQUEST,
    Answerer,
    BadRequest,
    Reply,
    Request,
    ask,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_key,
    start_answerer,
)
from ops.cluster_spool import answer_qshape, qshape_cluster, qshape_dict, render_qshape
from tests.conftest import Node
from tests.support import free_port, wait_until
from tests.test_qshape import put
from tests.test_recovery import start

SPACE = Namespace("t", "n1")


def request(**changes: Any) -> Request:
    fields: dict[str, Any] = {"id": "r1", "node": "n1", "what": "echo", "args": {"x": 1},
                              "reply_key": "t:ask:reply:r1", "deadline": time.time() + 10}
    fields.update(changes)
    return Request(**fields)


def test_the_codec_round_trips_and_refuses_what_is_not_a_request() -> None:
    original = request()
    assert decode_request(encode_request(original), SPACE) == original
    reply = Reply("r1", "n1", True, {"rows": [1, 2]})
    assert decode_reply(encode_reply(reply)) == reply
    with pytest.raises(BadRequest, match="at most"):
        encode_request(request(args={"pad": "x" * MAX_REQUEST}))
    cases = {b"\xff not json": "not JSON", b"[1]": "not a JSON object", b'{"id": "r1"}': "no reply_key",
             json.dumps({"id": "r1", "reply_key": "t:rq:queue:x"}).encode(): "is not under 't:ask:reply:'",
             json.dumps({"id": "r1", "reply_key": "t:ask:reply:r1", "node": "n1", "what": 3}).encode(): "strings",
             json.dumps({"id": "r1", "reply_key": "t:ask:reply:r1", "node": "n1", "what": "echo",
                         "deadline": True}).encode(): "deadline"}
    for raw, problem in cases.items():
        with pytest.raises(BadRequest, match=re.escape(problem)) as refused:
            decode_request(raw, SPACE)
        partial = refused.value.args[1]
        assert bool(partial.reply_key) == (b"t:ask:reply:r1" in raw)  # only a key of ours is written to
    with pytest.raises(ValueError):
        decode_reply(b'{"node": "n1"}')


def test_an_answerer_answers_its_own_requests_and_errors_never_crash_it(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)

    def boom(args: dict[str, Any]) -> None:
        raise OSError("disk gone")

    answerer = Answerer(conn, SPACE, {"echo": lambda args: args, "boom": boom})
    key = request_key(SPACE, "n1")

    def answer(raw: bytes, reply_key: str = "t:ask:reply:r1") -> Reply | None:
        conn.rpush(key, raw)
        assert answerer.once(wait=1)
        if not conn.exists(reply_key):
            return None
        assert 0 < conn.ttl(reply_key) <= 30  # a reply nobody reads goes by itself
        got = conn.lpop(reply_key)
        assert got is not None and conn.exists(reply_key) == 0  # one reply per request
        return decode_reply(got)

    assert answer(encode_request(request())) == Reply("r1", "n1", True, {"x": 1})
    failed = answer(encode_request(request(what="boom")))
    assert failed is not None and not failed.ok and failed.error == "OSError: disk gone"
    unknown = answer(encode_request(request(what="reboot")))
    assert unknown is not None and not unknown.ok and "unknown request 'reboot'" in unknown.error
    malformed = answer(json.dumps({"id": "r1", "reply_key": "t:ask:reply:r1", "what": "echo"}).encode())
    assert malformed is not None and not malformed.ok and malformed.error.startswith("malformed request")
    assert answer(b"garbage") is None  # nowhere to answer: dropped, the answerer goes on
    assert answer(encode_request(request(node="n2"))) is None  # addressed to another node: not answered
    assert answer(encode_request(request(deadline=time.time() - 5))) is None  # its asker gave up
    conn.rpush(key, encode_request(request(reply_key="t:queue")).replace(b"t:ask:reply:r1", b"t:queue"))
    assert answerer.once(wait=1) and conn.exists("t:queue") == 0  # never pushes outside the reply keys
    assert answerer.once(wait=0.1) is False and conn.llen(key) == 0


def test_ask_gathers_with_one_deadline_and_names_the_silent(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    stop = threading.Event()
    thread = start_answerer(conn, SPACE, {"echo": lambda args: {"node": "n1", **args}}, stop)
    try:
        began = time.monotonic()
        answers = ask(conn, SPACE, ["n1", "ghost"], "echo", {"q": 2}, timeout=0.8)
        took = time.monotonic() - began
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()  # stopped within its poll
    assert answers["n1"] == Reply(answers["n1"].id, "n1", True, {"node": "n1", "q": 2})  # type: ignore[union-attr]
    assert answers["ghost"] is None and 0.8 <= took < 4
    assert conn.keys("t:ask:reply:*") == []  # the asker cleans its reply key
    assert conn.llen(request_key(SPACE, "ghost")) == 1 and 0 < conn.ttl(request_key(SPACE, "ghost")) <= 61


def test_gather_shows_every_node_ok_dead_silent_or_unreadable(redis_url: str, tmp_path: Path) -> None:
    settings = load(env={"SHARDMAIL_REDIS_URL": redis_url, "SHARDMAIL_VAR_DIR": str(tmp_path), "SHARDMAIL_NODE": "ok",
                         "SHARDMAIL_NODEDEADAFTER": "30"})
    conn = redis.Redis.from_url(redis_url)
    registry = Registry.of(settings, conn)
    now = time.time()
    for name, beat in (("ok", now), ("gone", now - 3600), ("mute", now), ("odd", now)):
        registry.claim(Identity(name, name * 8), Beat(), beat)
    total = {"domain": "TOTAL", "total": 2, "counts": [2] + [0] * 9}
    rows = {"rows": [total, {**total, "domain": "x.example"}], "omitted": 0}
    stop = threading.Event()
    space = Namespace.of(settings)
    threads = [start_answerer(conn, replace(space, node="ok"), {"qshape": lambda args: rows}, stop),
               start_answerer(conn, replace(space, node="odd"), {"qshape": lambda args: {"rows": "?"}}, stop)]
    try:
        began = time.monotonic()
        cluster = qshape_cluster(settings, conn, timeout=0.5)
        took = time.monotonic() - began
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert {a.node: a.state for a in cluster.gathered.nodes} == {"gone": "dead", "mute": "no answer", "odd": "error",
                                                                 "ok": "ok"}
    assert 0.5 <= took < 4
    doc = qshape_dict(cluster)
    assert [n["data"] for n in doc["nodes"]] == [None, None, None, rows]
    assert doc["total"]["unknown"] == ["gone", "mute", "odd"] and doc["total"]["rows"] == rows["rows"]
    text = render_qshape(cluster)
    since = time.strftime("%H:%M:%S", time.localtime(now - 3600))
    for line in (f"gone: dead since {since}, share unknown", "mute: no answer within 0.5 s, share unknown",
                 "odd: error (an answer of an unknown form), share unknown",
                 "-- TOTAL: 1 of 4 nodes; unknown: gone, mute, odd (their mail is not in the TOTAL)"):
        assert line in text.splitlines(), text


def test_a_big_spool_is_counted_by_processes_from_a_fork_server(node_factory: Callable[..., Node],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The answerer is a thread of the scheduler: its processes come from a fork server, never a
    fork of the threaded process, and count what one thread counts."""
    settings = node_factory(node="n1").settings()
    shard_map = ShardMap(settings)
    for i in range(6):
        put(shard_map, i % 2, "a@sender.example", [f"u{i}@d{i % 3}.example"], 10 * i)
    alone = answer_qshape(settings, {"which": "all"}, parallel_from=10**9)
    found: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: found.append(answer_qshape(settings, {"which": "all"}, parallel_from=1)))
    thread.start()
    thread.join(60)
    assert found == [alone] and (alone["rows"][0]["domain"], alone["rows"][0]["total"]) == ("TOTAL", 6)
    assert "counting in one thread" not in caplog.text  # the processes did it, not the fallback
    assert [r["domain"] for r in alone["rows"]] == ["TOTAL", "d0.example", "d1.example", "d2.example"]


# -- three real nodes ---------------------------------------------------------------------------------
HOSTS = {"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}
PATIENT = ("--timeout", "15")  # where every live node should answer: returns as soon as they all did


def cli(node: Node, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """A shardmail command with the node's configuration, ``settings`` overriding some of it."""
    env = dict(node.env, **{f"SHARDMAIL_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def fill(node: Node, index: int) -> set[str]:
    """Mail that stays queued (no pools run): remote mail of several ages, some deferred, one held,
    and one local message through the node's own SMTP listener. Returns every id."""
    shard_map = ShardMap(node.settings())
    deferred = [Mark(0, "deferred", "4.4.1", "timed out", time.time())]
    for i in range(2 + index):
        put(shard_map, i % 2, "a@sender.example", [f"u{i}@far.example", f"v{i}@{node.settings().node}.example"],
            3 + 30 * i, deferred if i % 2 else [])
    before = set(shard_map.spool(1).ids())
    put(shard_map, 1, "b@sender.example", ["w@held.example"], 1)
    (held,) = set(shard_map.spool(1).ids()) - before
    shard_map.spool(1).hold(held)
    host, port = node.settings().smtp_listen[0].rsplit(":", 1)
    with smtplib.SMTP(host, int(port), timeout=10) as client:
        client.sendmail("c@sender.example", ["catchall@test.example"], b"Subject: hi\r\n\r\nhi\r\n")
    return {m for s in shard_map.ids() for m in [*shard_map.spool(s).ids(), *shard_map.spool(s).held()]}


def listed(text: str, message_id: str, node: str) -> bool:
    """A ``queue list`` message line: the id (flagged or not), then its shard named with its node."""
    return re.search(rf"^{message_id}[ !*] {node}/s[01] ", text, re.M) is not None


def own_qshape(node: Node) -> dict[str, list[int]]:
    return {r["domain"]: r["counts"] for r in as_json(cli(node, "qshape", "--json"))["rows"]}


def summed(*shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """qshape rows added up, domain by domain and bucket by bucket."""
    total: dict[str, list[int]] = {}
    for shape in shapes:
        for domain, counts in shape.items():
            total[domain] = [a + b for a, b in zip(total.get(domain, [0] * len(counts)), counts, strict=True)]
    return total


def cluster_rows(doc: dict[str, Any]) -> dict[str, list[int]]:
    return {r["domain"]: r["counts"] for r in doc["total"]["rows"]}


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {n["node"]: n["state"] for n in doc["nodes"]}


def test_cluster_qshape_and_queue_list_over_three_nodes_one_silent_one_dead(
        node_factory: Callable[..., Node]) -> None:
    nodes = {name: node_factory(node=name, shards="2", nodedeadafter="3",
                                smtp_listen=f"{host}:{free_port(host)}") for name, host in HOSTS.items()}
    for node in nodes.values():
        start(node, "scheduler")
        start(node, "smtpd")
    for node in nodes.values():
        host, port = node.settings().smtp_listen[0].rsplit(":", 1)
        wait_until(lambda h=host, p=int(port): listening(h, p), timeout=20, what=f"SMTP on {host}")
    first = nodes["n1"]
    registry = Registry.of(first.settings(), connect_shared(first.settings()))
    wait_until(lambda: {r.name: r.address for r in registry.nodes(time.time()) if r.alive} ==
               {n: node.settings().smtp_listen[0] for n, node in nodes.items()}, timeout=20, what="three heartbeats")
    ids = {name: fill(node, i) for i, (name, node) in enumerate(nodes.items())}

    # every node answers: the cluster's TOTAL is the sum of the nodes' own qshape
    own = {name: own_qshape(node) for name, node in nodes.items()}
    doc = as_json(cli(first, "qshape", "--cluster", "--json", *PATIENT))
    assert states(doc) == {"n1": "ok", "n2": "ok", "n3": "ok"}
    assert doc["total"]["unknown"] == [] and doc["total"]["answered"] == 3
    assert cluster_rows(doc) == summed(*own.values())
    assert cluster_rows(doc)["TOTAL"] == [sum(c) for c in zip(*(o["TOTAL"] for o in own.values()), strict=True)]
    assert sum(cluster_rows(doc)["TOTAL"]) == sum(2 * (2 + i) + 1 for i in range(3))  # see fill: held not counted
    text = cli(first, "qshape", "--cluster", *PATIENT).stdout
    assert "-- TOTAL: all 3 node(s)" in text
    assert [line.split()[0] for line in text.split("per node:")[1].splitlines()[2:5]] == ["n1", "n2", "n3"]

    listing = as_json(cli(first, "queue", "list", "--cluster", "--json", *PATIENT))
    assert {n["node"]: {m["id"] for m in n["data"]["messages"]} for n in listing["nodes"]} == ids
    assert listing["total"]["messages"] == sum(map(len, ids.values())) and listing["total"]["held"] == 3
    text = cli(first, "queue", "list", "--cluster", *PATIENT).stdout
    for name, node_ids in ids.items():
        assert all(listed(text, message_id, name) for message_id in node_ids), text
        assert f"-- {name}: {len(node_ids)} message(s)" in text
    short = as_json(cli(first, "queue", "list", "--cluster", "--json", "--limit", "2", *PATIENT))
    assert [len(n["data"]["messages"]) for n in short["nodes"]] == [2, 2, 2] and short["total"]["truncated"]

    # n3's scheduler stopped: its heartbeat still counts as alive (here, for 60 s), its share "no answer"
    scheduler3 = nodes["n3"].procs[0]
    os.kill(scheduler3.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        doc = as_json(cli(first, "qshape", "--cluster", "--json", "--timeout", "2.5", nodedeadafter="60"))
        took = time.monotonic() - began
        text = cli(first, "queue", "list", "--cluster", "--timeout", "2.5", nodedeadafter="60").stdout
    finally:
        os.kill(scheduler3.pid, signal.SIGCONT)
    assert states(doc) == {"n1": "ok", "n2": "ok", "n3": "no answer"} and took < 2.5 + 10
    (silent,) = [n for n in doc["nodes"] if n["node"] == "n3"]
    assert silent["data"] is None and doc["total"]["unknown"] == ["n3"]
    assert cluster_rows(doc) == summed(own["n1"], own["n2"])
    assert "-- n3: no answer within 2.5 s, share unknown" in text and "-- cluster:" in text
    assert "on 2 of 3 node(s); unknown: n3" in text

    # n2's whole tree killed: once its heartbeat is older than nodedeadafter, it is shown dead
    for proc in nodes["n2"].procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    host, port = nodes["n2"].settings().smtp_listen[0].rsplit(":", 1)
    assert not listening(host, int(port))  # nothing of n2 is left
    wait_until(lambda: {r.name: r.alive for r in registry.nodes(time.time())} == {"n1": True, "n2": False,
                                                                                   "n3": True},
               timeout=20, what="n2 dead, n3 beating again")
    beat = next(r.beat for r in registry.nodes(time.time()) if r.name == "n2")
    doc = as_json(cli(first, "qshape", "--cluster", "--json", *PATIENT))
    assert states(doc) == {"n1": "ok", "n2": "dead", "n3": "ok"}
    (dead,) = [n for n in doc["nodes"] if n["node"] == "n2"]
    assert dead["data"] is None and dead["heartbeat"] == beat
    assert cluster_rows(doc) == summed(own["n1"], own["n3"])
    since = time.strftime("%H:%M:%S", time.localtime(beat))
    text = cli(first, "qshape", "--cluster", *PATIENT).stdout
    assert f"n2: dead since {since}, share unknown" in text and "unknown: n2" in text
    text = cli(first, "queue", "list", "--cluster", *PATIENT).stdout
    assert f"-- n2: dead since {since}, share unknown" in text
    assert all(listed(text, m, "n1") for m in ids["n1"]) and all(listed(text, m, "n3") for m in ids["n3"])
    assert not any(listed(text, m, "n2") for m in ids["n2"])
