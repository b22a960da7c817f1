"""The Prometheus endpoint of a running node: real mail through ``shardmail run``, scraped over HTTP
and parsed with prometheus_client's parser; the standalone ``shardmail metrics --once`` against an
SMTP process whose LDAP server is stopped; two nodes of one cluster scraped by a real Prometheus
(every series labelled with its node, the registry's view of a killed node); the Grafana
dashboard's queries run on that Prometheus."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Conversation, Node, RedisServer
from tests.slapd import Slapd
from tests.support import die_with_parent, free_port, read_log, wait_until
from tests.test_ldap import ldap_env
from tests.test_run import RunningNode
from tests.test_smtp import transaction

REPO = Path(__file__).resolve().parent.parent
USERS = """dn: mail=catchall@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: catchall
sn: catchall
mail: catchall@test.example
mailMessageStore: catchall/

dn: mail=quota@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: quota
sn: quota
mail: quota@test.example
mailMessageStore: quota/
mailQuotaCount: 1

dn: mail=small@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: small
sn: small
mail: small@test.example
mailMessageStore: small/
mailSizeMax: 10
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def documented_names() -> set[str]:
    """The metric names in the README's metrics table (first column)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(shardmail_[a-z_]+)", section, re.M))


def missing(names: set[str], samples: Samples) -> set[str]:
    """Names without a sample (a histogram's are its ``_bucket``, ``_sum`` and ``_count``)."""
    present = {n for n, _ in samples}
    return {n for n in names if n not in present and f"{n}_count" not in present}


class MetricsNode(RunningNode):
    """``shardmail run`` with two shards, no remote pool (remote mail stays queued) and known users,
    its metrics endpoint on ``host`` (a loopback address); ``env`` adds to or overrides the settings."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", **env: str) -> None:
        self.metrics_host = host
        self.metrics_port = free_port(host)
        workdir.mkdir(parents=True, exist_ok=True)
        users = workdir / "users.ldif"
        users.write_text(USERS)
        stale = workdir / "var" / "metrics"
        stale.mkdir(parents=True)
        (stale / "counter_1.db").write_bytes(b"not a metrics file")  # the supervisor must wipe it
        settings = {"SHARDMAIL_METRICS_LISTEN": f"{host}:{self.metrics_port}", "SHARDMAIL_INGRESS_PROCESSES": "1",
                    "SHARDMAIL_REMOTEPROCESSES": "0", "SHARDMAIL_SHARDS": "2", "SHARDMAIL_ME": "mx.test.example",
                    "SHARDMAIL_LOCALS": "test.example", "SHARDMAIL_USERS_LDIF": str(users), "SHARDMAIL_NODE": "n1"}
        super().__init__(workdir, **{**settings, **env})

    @property
    def target(self) -> str:
        return f"{self.metrics_host}:{self.metrics_port}"

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=10) as answer:
            return parse(answer.read().decode())

    def send(self, sender: str, recipient: str, body: bytes = b"Subject: m\r\n\r\nhello there\r\n") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail(sender, [recipient], body)

    def settle(self, what: str, check: Callable[[Samples], bool], timeout: float = 30) -> Samples:
        """Scrape until ``check`` holds (deliveries are asynchronous), or fail naming ``what``."""
        last: list[Samples] = []

        def attempt() -> bool:
            last[:] = [self.scrape()]
            return check(last[0])

        try:
            wait_until(attempt, timeout=timeout, what=what, interval=0.1)
        except TimeoutError:
            pytest.fail(f"{what}: last scrape {sorted((n, ls, v) for (n, ls), v in last[0].items() if v)}")
        return last[0]


def wait_running(running: MetricsNode) -> None:
    wait_until(lambda: "shardmail is running" in running.text() or running.proc.poll() is not None, timeout=30)
    assert running.proc.poll() is None, running.text()
    wait_until(lambda: connectable(running.port), timeout=20, what="SMTP listening")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[MetricsNode]:
    running = MetricsNode(tmp_path, SHARDMAIL_NODEDEADAFTER="6")  # a heartbeat every 2 s
    wait_running(running)
    yield running
    running.stop()


def connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def delivered(samples: Samples) -> float:
    return value(samples, "shardmail_deliveries_total", channel="local", outcome="delivered")


def test_a_running_node_counts_what_it_did_and_shows_its_queues(node: MetricsNode) -> None:
    assert not (node.workdir / "var" / "metrics" / "counter_1.db").exists()
    documented = documented_names() - {"shardmail_deferrals_total"}  # (a series appears with its first deferral)
    assert len(documented) >= 12
    first = node.settle("every documented name", lambda s: value(s, "shardmail_redis_up") == 1 and not missing(
        documented, s))
    assert delivered(first) == 0

    for i in range(5):
        node.send("a@example.net", f"user{i}@test.example")
    node.send("a@example.net", "quota@test.example")
    node.settle("6 local deliveries", lambda s: delivered(s) == 6)

    node.send("a@example.net", "quota@test.example")  # over mailQuotaCount: 4.2.2, retried in 100 s
    deferred = node.settle("the over-quota deferral, scheduled for its retry", lambda s: value(
        s, "shardmail_deferrals_total", channel="local", reason="4.2") == 1
        and value(s, "shardmail_queue_deferred") == 1)
    assert value(deferred, "shardmail_deliveries_total", channel="local", outcome="deferred") == 1

    node.send("sender@test.example", "small@test.example")  # over mailSizeMax: 5.2.3, bounced to the sender
    node.settle("the failure, bounced and the bounce delivered", lambda s: value(
        s, "shardmail_deliveries_total", channel="local", outcome="bounced") == 1 and delivered(s) == 7)

    for i in range(3):
        node.send("a@example.net", f"x{i}@remote.example")  # no remote pool: the jobs wait in the queues
    samples = node.settle("3 remote jobs ready", lambda s: value(s, "shardmail_queue_ready", channel="remote") == 3)
    assert value(samples, "shardmail_deliveries_total", channel="local", outcome="failed") == 1
    assert value(samples, "shardmail_deliveries_total", channel="remote") == 0
    assert value(samples, "shardmail_queue_ready", channel="local") == 0
    assert value(samples, "shardmail_queue_in_flight") == 0 and value(samples, "shardmail_queue_failed") == 0
    assert value(samples, "shardmail_queue_deferred") == 1
    assert {ls for n, ls in samples if n == "shardmail_queue_ready"} == {
        (("channel", c), ("node", "n1"), ("shard", s)) for c in ("local", "remote") for s in ("s0", "s1")}
    assert {dict(ls).get("node") for _, ls in samples} == {"n1"}  # every series names its node
    assert value(samples, "shardmail_node_up", node="n1") == 1 and value(samples, "shardmail_shard_draining") == 0
    beat = node.settle("the heartbeat's spool figures: 3 remote, 1 deferred", lambda s: value(
        s, "shardmail_node_spooled", node="n1") == 4, timeout=15)
    assert 0 < value(beat, "shardmail_node_oldest_age_seconds", node="n1") < 60
    assert 0 <= value(beat, "shardmail_node_heartbeat_age_seconds", node="n1") < 6
    assert value(samples, "shardmail_submissions_total", result="queued") == 12  # 11 sent, 1 bounce
    assert value(samples, "shardmail_submissions_total", result="tempfail") == 0
    commits = value(samples, "shardmail_spool_commit_seconds_count")
    assert 1 <= commits <= 12 and value(samples, "shardmail_spool_commit_seconds_sum") > 0
    assert value(samples, "shardmail_spool_commit_seconds_bucket", le="+Inf") == commits
    assert value(samples, "shardmail_redis_errors_total") == 0

    # a killed pool's counts stay in the sums; its successor adds to them
    old = node.pids("local")[-1]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: len(node.pids("local")) == 2, timeout=20, what="local pool restarted")
    assert delivered(node.scrape()) == 7
    node.send("a@example.net", "late@test.example")
    node.settle("a delivery by the restarted pool", lambda s: delivered(s) == 8)

    drain = subprocess.run([sys.executable, "-m", "ops.cli", "shards", "drain", "1"], cwd=node.workdir, env=node.env,
                           capture_output=True, text=True, timeout=30)
    assert drain.returncode == 0, drain.stderr
    draining = node.scrape()
    assert value(draining, "shardmail_shard_draining", node="n1", shard="s1") == 1
    assert value(draining, "shardmail_shard_draining", node="n1", shard="s0") == 0


def test_the_registry_gauges_tell_live_from_dead_nodes_and_age_the_oldest_message() -> None:
    from core.envelope import id_time
    from core.nodes import NodeRecord
    from ops.metrics import cluster_families

    now = 10_000.0
    born = f"{int((now - 90) * 1e6):014X}0001000010AB"  # an id: its arrival time, then node tag, pid, counter
    assert id_time(born) == pytest.approx(now - 90)
    records = [NodeRecord("n1", "a", "h1", "", "", 0.0, now - 1, True, [0, 1], [], {0: (2, 0, born), 1: (1, 1, None)}),
               NodeRecord("n2", "b", "h2", "", "", 0.0, now - 40, False, [0], [], {}),
               NodeRecord("n3", "c", "h3", "", "", 0.0, now - 2, True, [0], [], {0: (0, 0, None)})]
    samples = {(s.name, s.labels["node"]): s.value for family in cluster_families(records, now)
               for s in family.samples}
    assert samples == {
        ("shardmail_node_up", "n1"): 1, ("shardmail_node_up", "n2"): 0, ("shardmail_node_up", "n3"): 1,
        ("shardmail_node_heartbeat_age_seconds", "n1"): 1, ("shardmail_node_heartbeat_age_seconds", "n2"): 40,
        ("shardmail_node_heartbeat_age_seconds", "n3"): 2,
        ("shardmail_node_spooled", "n1"): 3, ("shardmail_node_spooled", "n2"): 0, ("shardmail_node_spooled", "n3"): 0,
        ("shardmail_node_oldest_age_seconds", "n1"): pytest.approx(90),
        ("shardmail_node_oldest_age_seconds", "n2"): 0, ("shardmail_node_oldest_age_seconds", "n3"): 0}


def test_metrics_once_counts_directory_errors_of_a_separate_smtpd(
        slapd_fresh: Slapd, node_factory: Callable[..., Node]) -> None:
    node = node_factory(**{k[len("SHARDMAIL_"):].lower(): v for k, v in ldap_env(slapd_fresh).items()})
    directory = node.var_dir / "metrics"
    directory.mkdir(parents=True)
    node.start_smtpd(PROMETHEUS_MULTIPROC_DIR=str(directory))  # as a unit file would start it

    def scrape() -> Samples:
        result = node.command("metrics", "--once")
        assert result.returncode == 0, result.stderr
        return parse(result.stdout.decode())

    assert value(scrape(), "shardmail_directory_errors_total", backend="ldap") == 0
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.net>")
    assert c.cmd("RCPT TO:<alice@test.example>").startswith("250 2.1.5")
    slapd_fresh.stop()
    assert c.cmd("RCPT TO:<heidi@test.example>").startswith("451 4.4.3")
    c.close()
    samples = scrape()
    assert value(samples, "shardmail_directory_errors_total", backend="ldap") == 1
    assert value(samples, "shardmail_directory_errors_total", backend="ldif") == 0
    assert value(samples, "shardmail_redis_up") == 1


def dashboard() -> dict:
    return json.loads((REPO / "ops" / "grafana" / "shardmail.json").read_text())  # type: ignore[no-any-return]


def targets(board: dict) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query, rows' panels included."""
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target["expr"]


def test_the_grafana_dashboard_uses_exactly_the_documented_names() -> None:
    board = dashboard()
    exprs = [e for _, e in targets(board)]
    exprs.append(board["templating"]["list"][1]["definition"])
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"shardmail_[a-z_]+", e)}
    assert used == documented_names()


def test_every_dashboard_selector_is_filtered_by_the_node_variable_and_the_cluster_row_leads() -> None:
    board = dashboard()
    variable = board["templating"]["list"][1]
    assert (variable["name"], variable["multi"], variable["includeAll"], variable["allValue"]) == ("node", True, True,
                                                                                                   ".*")
    assert re.fullmatch(r"label_values\(shardmail_[a-z_]+, node\)", variable["definition"])
    selectors = 0
    for title, expr in targets(board):
        for name, braces in re.findall(r"(shardmail_[a-z_]+)(\{[^}]*\})?", expr):
            selectors += 1
            assert 'node=~"$node"' in braces, (title, name, expr)
    assert selectors >= 30
    first = board["panels"][0]
    assert (first["type"], first["title"], first["gridPos"]["y"]) == ("row", "Cluster", 0)
    following = list(itertools.takewhile(lambda p: p["type"] != "row", board["panels"][1:]))
    cluster = " ".join(t["expr"] for p in following for t in p["targets"])
    for name in ("shardmail_node_up", "shardmail_node_heartbeat_age_seconds", "shardmail_node_spooled",
                 "shardmail_node_oldest_age_seconds", "shardmail_submissions_total", "shardmail_deliveries_total",
                 "shardmail_queue_ready"):
        assert name in cluster, name
    assert all(p["gridPos"]["y"] >= 1 for p in board["panels"][1:])
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"  # scripts/setup.sh installs Debian's


class Prometheus:
    """A private Prometheus scraping ``targets`` every second: loopback only, its configuration and
    data under ``directory``, never the system one."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shardmail\n"
                          f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as out:
            self.server = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)

    def answer(self, expr: str) -> dict | None:
        """The API's whole answer, or None while the server does not answer yet."""
        assert self.server.poll() is None, f"prometheus exited {self.server.returncode}: {read_log(self.log)[-2000:]}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def series(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant vector as {sorted labels: value} (empty while the server is not up)."""
        answer = self.answer(expr)
        if answer is None:
            return {}
        assert answer["status"] == "success", (expr, answer)
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["data"]["result"]}

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {dict(ls)[label]: v for ls, v in self.series(expr).items()}

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(20)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    servers: list[Prometheus] = []

    def factory(scraped: list[str]) -> Prometheus:
        directory = tmp_path / f"prometheus{len(servers)}"
        directory.mkdir()
        servers.append(Prometheus(directory, scraped))
        return servers[-1]

    yield factory
    for server in servers:
        server.stop()


def test_every_dashboard_query_runs_on_a_real_prometheus_scraping_the_node(
        node: MetricsNode, prometheus_factory: Callable[[list[str]], Prometheus]) -> None:
    node.send("a@example.net", "someone@test.example")
    prometheus = prometheus_factory([node.target])
    wait_until(lambda: prometheus.series("sum(rate(shardmail_submissions_total[30s]))"), timeout=60,
               what="two scrapes in Prometheus")
    for title, expr in targets(dashboard()):
        expr = expr.replace("$node", ".*").replace("$__rate_interval", "30s")  # the selector's All
        answer = prometheus.answer(expr)
        assert answer is not None and answer["status"] == "success", (title, expr, answer)
        if "deferrals" not in expr:  # (no deferral happened here: no series yet)
            assert answer["data"]["result"], (title, expr)


@pytest.fixture
def two_nodes(tmp_path: Path, redis_url: str) -> Iterator[list[MetricsNode]]:
    """n1 and n2 on one Redis and one prefix, their endpoints on 127.0.0.2 and 127.0.0.3; a node is
    dead 3 s after its last heartbeat (they beat every second)."""
    nodes = [MetricsNode(tmp_path / name, host=f"127.0.0.{i + 2}", SHARDMAIL_NODE=name, SHARDMAIL_REDIS_URL=redis_url,
                         SHARDMAIL_NODEDEADAFTER="3") for i, name in enumerate(("n1", "n2"))]
    try:
        for running in nodes:
            wait_running(running)
        yield nodes
    finally:
        for running in nodes:
            running.stop()


def own_figures(node: MetricsNode) -> dict[tuple[str, str], float]:
    """What the node itself says of its queues (``shardmail status --json``): per (shard, figure)."""
    status = json.loads(node.status("--json"))
    figures: dict[tuple[str, str], float] = {}
    for row in status["shards"]:
        shard = f"s{row['shard']}"
        figures[(shard, "deferred")] = row["deferred"]
        for channel, queue in row["channels"].items():
            figures[(shard, f"ready {channel}")] = queue["ready"]
            figures[(shard, f"in_flight {channel}")] = queue["in_flight"]
    figures[("", "spooled")] = status["total"]["spooled"]
    return figures


def prometheus_figures(prometheus: Prometheus, node: str) -> dict[tuple[str, str], float]:
    """The same figures from Prometheus' series labelled ``node``."""
    figures: dict[tuple[str, str], float] = {}
    for name, figure in (("shardmail_queue_ready", "ready"), ("shardmail_queue_in_flight", "in_flight")):
        for labels, v in prometheus.series(f'sum by (shard, channel) ({name}{{node="{node}"}})').items():
            found = dict(labels)
            figures[(found["shard"], f"{figure} {found['channel']}")] = v
    for labels, v in prometheus.series(f'sum by (shard) (shardmail_queue_deferred{{node="{node}"}})').items():
        figures[(dict(labels)["shard"], "deferred")] = v
    for v in prometheus.series(f'max(shardmail_node_spooled{{node="{node}"}})').values():
        figures[("", "spooled")] = v
    return figures


def test_two_nodes_scraped_by_one_prometheus_carry_their_node_and_a_killed_node_shows_dead(
        two_nodes: list[MetricsNode], prometheus_factory: Callable[[list[str]], Prometheus],
        redis_server: RedisServer) -> None:
    n1, n2 = two_nodes
    sent = {"n1": (1, 2), "n2": (2, 3)}  # (local, remote) messages per node; remote mail stays queued
    for running, (local, remote) in zip(two_nodes, sent.values(), strict=True):
        for i in range(local):
            running.send("a@example.net", f"user{i}@test.example")
        for i in range(remote):
            running.send("a@example.net", f"x{i}@remote.example")
    prometheus = prometheus_factory([n1.target, n2.target])
    wanted = {"n1": 2.0, "n2": 3.0}

    def settled() -> bool:
        return (prometheus.by('sum by (node) (shardmail_queue_ready{channel="remote"})', "node") == wanted
                and prometheus.by('max by (node) (shardmail_node_spooled)', "node") == wanted
                and prometheus.by('sum by (node) (shardmail_deliveries_total{outcome="delivered"})', "node")
                == {"n1": 1.0, "n2": 2.0})

    wait_until(settled, timeout=30, what="both nodes' mail in Prometheus", interval=0.2)
    # each endpoint labels its own series with its own node, and only those
    own = prometheus.series('count by (instance, node) ({__name__=~"shardmail_.*", __name__!~"shardmail_node_.*"})')
    assert {(dict(ls)["instance"], dict(ls)["node"]) for ls in own} == {(n1.target, "n1"), (n2.target, "n2")}
    assert prometheus.by('sum by (node) (shardmail_submissions_total{result="queued"})', "node") == {
        "n1": 3.0, "n2": 5.0}
    # the sums per node are each node's own figures
    for running, name in ((n1, "n1"), (n2, "n2")):
        mine = own_figures(running)
        assert prometheus_figures(prometheus, name) == mine, name
        assert mine[("", "spooled")] == wanted[name]
    # every endpoint reports every node alive; the node selector narrows each Cluster query to its node
    assert prometheus.series("shardmail_node_up") == {(("__name__", "shardmail_node_up"), ("instance", i), (
        "job", "shardmail"), ("node", n)): 1.0 for i in (n1.target, n2.target) for n in ("n1", "n2")}
    for title, expr in targets(dashboard()):
        if "shardmail_node_" in expr or " by (node)" in expr:
            answer = prometheus.series(expr.replace("$node", "n2").replace("$__rate_interval", "30s"))
            assert {dict(ls).get("node", "n2") for ls in answer} <= {"n2"}, (title, expr, answer)
            assert answer or "rate(" in expr, (title, expr)  # (a rate needs two scrapes in its window)

    # n2's whole tree is killed: its endpoint goes, and n1's registry gauge shows it dead after nodedeadafter
    os.kill(n2.proc.pid, signal.SIGKILL)
    for pid in [p for role in ("smtpd", "local", "scheduler") for p in n2.pids(role)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    n2.proc.wait(10)
    last_beat = float(redis_server.client().hget("shardmail:node:n2", "beat") or 0)
    seen_by_n1 = f'shardmail_node_up{{instance="{n1.target}"}}'
    wait_until(lambda: prometheus.by(seen_by_n1, "node") == {"n1": 1.0, "n2": 0.0}, timeout=20,
               what="n2 dead in n1's scrape", interval=0.2)
    assert time.time() - last_beat >= 3  # dead no sooner than nodedeadafter after its last heartbeat
    ages = prometheus.by(f'shardmail_node_heartbeat_age_seconds{{instance="{n1.target}"}}', "node")
    assert ages["n2"] >= 3 and ages["n1"] < 3
    assert prometheus.series(f'up{{instance="{n2.target}"}}') == {
        (("__name__", "up"), ("instance", n2.target), ("job", "shardmail")): 0.0}
    dead = prometheus.series(next(e for t, e in targets(dashboard()) if t == "Nodes dead").replace("$node", ".*"))
    assert list(dead.values()) == [1.0]


def test_redis_down_counts_the_tempfail_and_the_scrape_says_so(node_factory: Callable[..., Node],
                                                                own_redis: RedisServer) -> None:
    node = node_factory(redis_url=own_redis.url)
    directory = node.var_dir / "metrics"
    directory.mkdir(parents=True)
    node.start_smtpd(PROMETHEUS_MULTIPROC_DIR=str(directory))
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    assert transaction(c, ["x@test.example"])[-1].startswith("250")
    own_redis.stop()
    assert transaction(c, ["y@test.example"])[-1].startswith("451 4.3.0")
    c.close()
    result = node.command("metrics", "--once")
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout.decode())
    assert value(samples, "shardmail_redis_up") == 0
    assert value(samples, "shardmail_submissions_total", result="queued") == 1
    assert value(samples, "shardmail_submissions_total", result="tempfail") == 1
    assert value(samples, "shardmail_redis_errors_total", role="ingress") == 1
    assert not [n for n, _ in samples if n.startswith(("shardmail_queue_", "shardmail_node_"))]  # none without Redis
    assert {dict(ls).get("node") for _, ls in samples} == {"n1"}  # the counters carry the node's name too


@pytest.mark.parametrize(("status", "reason"), [("4.4.1", "4.4"), ("4.2.2", "4.2"), ("4.7.0", "4.7"), ("4.3", "4.3"),
                                                 ("4.10.1", "other"), ("4.9.1", "other"), ("", "other"),
                                                 ("5.1.1", "other")])
def test_reason_class_is_a_bounded_label(status: str, reason: str) -> None:
    from core.metrics import reason_class

    assert reason_class(status) == reason


def test_a_dns_server_that_never_answers_shows_as_dns_errors_and_remote_deferrals(
        node_factory: Callable[..., Node]) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, read by no one: every query times out
    silent.bind(("127.0.0.1", 0))
    node = node_factory(dnsresolvers=f"127.0.0.1:{silent.getsockname()[1]}", dnstimeout="1")
    directory = node.var_dir / "metrics"
    directory.mkdir(parents=True)
    env = dict(node.env, PROMETHEUS_MULTIPROC_DIR=str(directory))
    node.start_smtpd(PROMETHEUS_MULTIPROC_DIR=str(directory))
    c = Conversation(node.port)
    c.cmd("EHLO client.example")
    assert transaction(c, ["x@far.example", "y@far.example"])[-1].startswith("250")
    c.close()
    pool = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "remote"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node.procs.append(pool)

    def scrape() -> Samples:
        result = node.command("metrics", "--once")
        assert result.returncode == 0, result.stderr
        return parse(result.stdout.decode())

    def both_deferred() -> Samples | None:
        samples = scrape()
        return samples if value(samples, "shardmail_deliveries_total", channel="remote", outcome="deferred") == 2 \
            else None

    try:
        samples: Samples = wait_until(both_deferred, timeout=30, what="both remote recipients deferred",
                                      interval=0.2)  # type: ignore[assignment]
    finally:
        silent.close()
    assert value(samples, "shardmail_dns_errors_total", error="timeout") >= 1
    assert value(samples, "shardmail_deferrals_total", channel="remote", reason="4.4") == 2
    assert value(samples, "shardmail_deliveries_total", channel="remote", outcome="delivered") == 0
