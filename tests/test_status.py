"""``shardmail status`` on a running node with real queued mail: exact counts in the JSON and the table
(ready, in flight, failed, deferred and due, settling, spooled, held, oldest), rates after traffic,
workers per pool from a real local pool, ``--watch`` refreshing until SIGINT, and Redis down.
Real redis-server, real shardmail processes; queue states made through core.jobs as workers and the
scheduler make them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from core.envelope import Envelope, Mark, id_time
from core.jobs import TALLY_TTL, Item, Jobs
from core.redis_conn import connect
from core.shards import Namespace, ShardMap
from core.submit import Draft, Submitter
from ops.depth import COLUMNS
from tests.conftest import Node
from tests.support import wait_until

BODY = b"From: <a@example.net>\r\nSubject: status\r\n\r\n" + b"queued for the status test\r\n" * 20


def queue(node: Node, recipients: list[list[str]]) -> list[Envelope]:
    """Messages through the front door ingress uses (spool write, fsync, enqueue)."""
    settings = node.settings()
    submitter = Submitter(settings, connect(settings))
    results = submitter.accept_batch([Draft(submitter.new_id(), "a@example.net", r, BODY) for r in recipients])
    assert all(isinstance(r, Envelope) for r in results), results
    return results  # type: ignore[return-value]


def status(node: Node, *args: str) -> dict:
    result = node.command("status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def table(node: Node) -> dict[tuple[str, str], dict[str, str]]:
    """The table's cells by (shard, channel), columns found by their headers' right edges."""
    result = node.command("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == list(COLUMNS)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    shard = ""
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        if cells[0].isdigit() or cells[0] == "all":
            shard = cells[0]
            names = [c for c in COLUMNS if c != "state" or shard != "all"]
        else:
            names = list(COLUMNS[2:10])  # a shard's second channel: no shard, state or spool figures
        rows[shard, cells[names.index("channel")]] = dict(zip(names, cells, strict=True))
    return rows


def test_exact_counts_of_a_known_queue(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    node.start_smtpd()
    settings = node.settings()
    conn = connect(settings)
    jobs = Jobs(conn, Namespace.of(settings))
    local = queue(node, [["catchall@test.example"]] * 5)
    remote = queue(node, [[f"u{i}@far.example"] for i in range(8)])
    both = queue(node, [["catchall@test.example", "x@far.example"]])
    everything = local + remote + both
    spooled = {s: sum(1 for e in everything if e.shard == s) for s in (0, 1)}
    ready = {(s, c): 0 for s in (0, 1) for c in ("local", "remote")}
    for envelope in everything:
        for channel in envelope.channels():
            ready[envelope.shard, channel] += 1

    # what a pool and the scheduler do: claim, fail one (a bug), finish and defer some
    claims = jobs.claim_many([0, 1], "remote", 3, "tester")
    assert len(claims) == 6
    failed, later, due = claims[0], claims[1], claims[2]
    jobs.fail(failed, "Traceback: a bug")
    jobs.finish([later, due])
    now = time.time()
    for claim, when in ((later, now + 3600), (due, now - 5)):
        node_spool = ShardMap(settings).spool(claim.shard)
        node_spool.mark(claim.message_id, [Mark(0, "deferred", "4.4.1", "timed out", now)])
        jobs.schedule(claim.shard, [(claim.message_id, "remote", when)])
    held = local[0]
    spool = ShardMap(settings).spool(held.shard)
    hold = getattr(spool, "hold", None)
    if callable(hold):
        hold(held.id)
    else:  # the layout queue admin uses: the same file under <shard>/hold/
        (spool.base / "hold").mkdir(exist_ok=True)
        os.rename(spool.path(held.id), spool.base / "hold" / held.id)
    spooled[held.shard] -= 1

    doc = status(node)
    assert doc["version"] == 1 and doc["redis"] is True
    by_shard = {row["shard"]: row for row in doc["shards"]}
    assert set(by_shard) == {0, 1}
    for shard in (0, 1):
        row = by_shard[shard]
        mine = [c for c in claims if c.shard == shard]
        assert row["state"] == "open" and row["spooled"] == spooled[shard], row
        assert row["held"] == (1 if shard == held.shard else 0)
        assert row["deferred"] == sum(c in (later, due) for c in mine)
        assert row["due"] == sum(c == due for c in mine)
        assert row["settling"] == sum(c in (later, due) for c in mine)
        oldest = min(e.id for e in everything if e.shard == shard and e.id != held.id)
        assert abs(row["oldest_age"] - (doc["time"] - id_time(oldest))) < 0.01
        for channel in ("local", "remote"):
            figures = row["channels"][channel]
            taken = mine if channel == "remote" else []
            assert figures["ready"] == ready[shard, channel] - len(taken), (shard, channel, figures)
            assert figures["in_flight"] == len(taken) - sum(c in (failed, later, due) for c in taken)
            assert figures["failed"] == (sum(c == failed for c in mine) if channel == "remote" else 0)
            assert figures["workers"] == 0
            assert figures["head_age"] is None or figures["head_age"] >= 0
    total = doc["total"]
    assert total["spooled"] == len(everything) - 1 and total["held"] == 1
    assert total["deferred"] == 2 and total["due"] == 1 and total["settling"] == 2
    assert total["channels"]["remote"]["failed"] == 1 and total["channels"]["remote"]["in_flight"] == 3
    assert total["channels"]["local"]["ready"] == 6 and total["channels"]["remote"]["ready"] == 9 - 6
    # rates: 14 local and remote jobs came in within the last minute or so, two went out
    assert 0 < sum(total["channels"][c]["in_per_s"] for c in ("local", "remote")) * 60 <= 15 + 1e-6
    assert 0 < total["channels"]["remote"]["out_per_s"] * 60 <= 2 + 1e-6
    assert doc["pools"] == []

    cells = table(node)
    for shard in (0, 1):
        row = by_shard[shard]
        first = cells[str(shard), "local"]
        assert (first["spooled"], first["held"], first["deferred"], first["due"]) == (
            str(row["spooled"]), str(row["held"]), str(row["deferred"]), str(row["due"]))
        for channel in ("local", "remote"):
            figures = row["channels"][channel]
            cell = cells[str(shard), channel]
            assert (cell["ready"], cell["in-flight"], cell["failed"], cell["workers"]) == (
                str(figures["ready"]), str(figures["in_flight"]), str(figures["failed"]), "0")
    assert cells["all", "local"]["spooled"] == str(len(everything) - 1)
    assert cells["all", "remote"]["ready"] == "3" and cells["all", "remote"]["in-flight"] == "3"


def test_a_running_pool_shows_with_its_workers_and_rates(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    queue(node, [["catchall@test.example"]] * 20)
    log = open(node.var_dir.parent / "pool.log", "wb")  # noqa: SIM115 - the pool's output, kept for a failure
    node.procs.append(subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "local", "--name",
                                        "mx.test.example.local-0"], env=node.env, stdout=log, stderr=log))

    def delivered() -> dict | None:
        doc = status(node)
        done = doc["total"]["spooled"] == 0 and doc["total"]["channels"]["local"]["ready"] == 0
        return doc if done and doc["pools"] else None

    doc = wait_until(delivered, timeout=30, what="the local pool delivers the queue")
    assert isinstance(doc, dict)
    assert doc["pools"] == [{"pool": "mx.test.example.local", "channel": "local", "workers": 1,
                             "names": ["mx.test.example.local-0"], "shards": [0, 1]}]
    local = doc["total"]["channels"]["local"]
    assert local["workers"] == 1 and all(row["channels"]["local"]["workers"] == 1 for row in doc["shards"])
    assert 0 < local["in_per_s"] * 60 <= 20 + 1e-6 and 0 < local["out_per_s"] * 60 <= 20 + 1e-6
    lines = node.command("status").stdout.decode().splitlines()
    assert lines[lines.index("") + 1].split() == ["pool", "channel", "workers", "shards"]
    assert lines[lines.index("") + 2].split() == ["mx.test.example.local", "local", "1", "0-1"]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts it


def test_watch_redraws_until_sigint(node_factory: Callable[..., Node]) -> None:
    """Two refreshes at least, then SIGINT (also when started with SIGINT ignored) or SIGTERM: status 0."""
    node = node_factory()
    queue(node, [["catchall@test.example"]] * 3)
    for extra, signum, ignored in (([], signal.SIGINT, False), (["--json"], signal.SIGINT, True),
                                   ([], signal.SIGTERM, False)):
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "status", "--watch", "0.2", *extra], env=node.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_ignore_sigint if ignored else None)
        seen = b""
        deadline = time.monotonic() + 20
        marker = b'"version": 1' if extra else b"shardmail status"
        while seen.count(marker) < 2 and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        assert seen.count(marker) >= 2, (seen, proc.poll())
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert b"Traceback" not in err
        if extra:
            docs = [json.loads(line) for line in (seen + out).decode().splitlines() if line.strip()]
            assert docs and all(d["total"]["spooled"] == 3 for d in docs)
        else:
            assert b"Every 0.2 s" in seen and b"spooled" in seen


def test_redis_down_shows_the_spool_and_exits_75(node_factory: Callable[..., Node], tmp_path: os.PathLike) -> None:
    node = node_factory()
    queue(node, [["catchall@test.example"]] * 4)
    node.env["SHARDMAIL_REDIS_URL"] = f"unix://{tmp_path}/no-redis.sock"
    result = node.command("status", "--json")
    assert result.returncode == 75
    assert b"Redis unavailable" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["redis"] is False and doc["total"]["spooled"] == 4


def test_tallies_count_per_shard_and_channel_once_per_pipeline(redis_url: str) -> None:
    import redis

    conn = redis.Redis.from_url(redis_url)
    jobs = Jobs(conn, Namespace("tallytest", "n1"))
    before = int(time.time()) // 60
    jobs.enqueue([Item(0, f"{i:026X}", "local") for i in range(3)] + [Item(1, f"{9:026X}", "remote")])
    claims = jobs.claim(0, "local", 2, "w")
    jobs.finish(claims)
    after = int(time.time()) // 60
    merged: dict[str, int] = {}
    for minute in range(before, after + 1):
        key = jobs.tally_key(minute)
        for field, value in conn.hgetall(key).items():
            merged[field.decode()] = merged.get(field.decode(), 0) + int(value)
        assert 0 < conn.ttl(key) <= TALLY_TTL
    assert merged == {"in:n1/s0:local": 3, "in:n1/s1:remote": 1, "out:n1/s0:local": 2}
