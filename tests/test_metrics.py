"""The Prometheus endpoint of a running node: real mail through ``shardmail run``, scraped over HTTP
and parsed with prometheus_client's parser; the standalone ``shardmail metrics --once`` against an
SMTP process whose LDAP server is stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
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
    """``shardmail run`` with two shards, no remote pool (remote mail stays queued) and known users."""

    def __init__(self, workdir: Path) -> None:
        self.metrics_port = free_port()
        users = workdir / "users.ldif"
        users.write_text(USERS)
        stale = workdir / "var" / "metrics"
        stale.mkdir(parents=True)
        (stale / "counter_1.db").write_bytes(b"not a metrics file")  # the supervisor must wipe it
        super().__init__(workdir, SHARDMAIL_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}",
                         SHARDMAIL_INGRESS_PROCESSES="1", SHARDMAIL_REMOTEPROCESSES="0", SHARDMAIL_SHARDS="2",
                         SHARDMAIL_ME="mx.test.example", SHARDMAIL_LOCALS="test.example",
                         SHARDMAIL_USERS_LDIF=str(users))

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
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


@pytest.fixture
def node(tmp_path: Path) -> Iterator[MetricsNode]:
    running = MetricsNode(tmp_path)
    wait_until(lambda: "shardmail is running" in running.text() or running.proc.poll() is not None, timeout=30)
    assert running.proc.poll() is None, running.text()
    wait_until(lambda: connectable(running.port), timeout=20, what="SMTP listening")
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
        (("channel", c), ("shard", s)) for c in ("local", "remote") for s in ("0", "1")}
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


def test_the_grafana_dashboard_uses_exactly_the_documented_names() -> None:
    import json

    dashboard = json.loads((REPO / "ops" / "grafana" / "shardmail.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"shardmail_[a-z_]+", e)}
    assert used == documented_names()


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"  # scripts/setup.sh installs Debian's


def test_every_dashboard_query_runs_on_a_real_prometheus_scraping_the_node(node: MetricsNode, tmp_path: Path) -> None:
    import json

    node.send("a@example.net", "someone@test.example")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shardmail\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{node.metrics_port}']\n")
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:  # a private server: loopback only, its own config and data, not the system one
        server = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=die_with_parent)

    def query(expr: str) -> dict[str, object] | None:
        assert server.poll() is None, f"prometheus exited {server.returncode}: {read_log(log)[-2000:]}"
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    try:
        rate = "sum(rate(shardmail_submissions_total[30s]))"
        wait_until(lambda: (query(rate) or {}).get("data", {}).get("result"), timeout=60,  # type: ignore[union-attr]
                   what="two scrapes in Prometheus")
        dashboard = json.loads((REPO / "ops" / "grafana" / "shardmail.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "30s")
                answer = query(expr)
                assert answer is not None and answer["status"] == "success", (panel["title"], expr, answer)
                if "deferrals" not in expr:  # (no deferral happened here: no series yet)
                    assert answer["data"]["result"], (panel["title"], expr)  # type: ignore[index]
    finally:
        server.terminate()
        server.wait(20)


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
    assert not [n for n, _ in samples if n.startswith("shardmail_queue_")]  # no depth without Redis


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
