"""Benchmarks that cannot rot: every ``bench/`` module runs with ``--smoke`` and prints its figures.

Each benchmark runs as a real process (``python -m bench.X --smoke``, from the repository, with a
timeout): a few hundred messages, one round, shardmail alone (no Postfix installed or started), free
ports and private directories, so the file runs beside any other test. It checks the exit status and
that every figure line is printed with a number where the figure goes, never the figure's value.
``bench/postfix_peer.py`` measures Postfix alone (it needs a Postfix install), so only its ``--help``
runs here. A new ``bench/`` module must get an entry in ``FIGURES``.
"""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 150  # s per module; each takes 1-15 s here
N = r"-?[\d,]+(?:\.\d+)?"  # a number as the benchmarks print them

# module -> regexes, each of which must match a line of its output
FIGURES: dict[str, list[str]] = {
    "cluster": [rf"^round 1 1 node: {N} messages in {N} s \({N} msg/s\); Redis CPU {N} us/msg raw, {N} idle-corrected; "
                rf"{N} commands, {N} reads, {N} B in, {N} B out per msg$",
                rf"^round 1 3 nodes idle: Redis CPU {N} us/s \({N} % of a core\), {N} commands/s, {N} reads/s$",
                rf"^Redis CPU us/msg, raw +{N} +{N}$",
                rf"^Redis CPU us/msg, idle-corrected +{N} +{N}$",
                rf"^one Redis core, msg/s \(idle-corrected\) +{N} +{N}$",
                rf"^evalsha +{N} +{N} +{N} +{N}$",
                r"^peer: none ",
                rf"^target raw: Redis CPU per delivered message <= 25 us .*: 1 node {N} us, 3 nodes {N} us: "
                r"(PASS|FAIL)$",
                rf"^target idle-corrected: 3 nodes on one Redis cost no more .*: {N} against {N} us, {N}x: "
                r"(PASS|FAIL)$"],
    "drain": [rf"^enqueue, one pipelined round trip per message : +{N} jobs/s$",
              rf"^rq SimpleWorker \(stock\), \d+ jobs +: +{N} jobs/s$",
              rf"^shardmail Consumer, batch \d+, \d+ jobs +: +{N} jobs/s$",
              rf"^ratio consumer / stock worker +: +{N}x$"],
    "ingress": [rf"^round 1 shardmail \(1 SMTP processes\): +{N} msg/s +peak PSS +{N} MiB +spooled \d+$",
                rf"^median shardmail {N} msg/s$"],
    "local_delivery": [rf"^  shardmail CPU ms/msg: total {N}; .*smtpd {N} ",
                       rf"^  shardmail machine CPU ms/msg .*: {N} ",
                       rf"^round 1 shardmail: +{N} msg/s +peak PSS +{N} MiB$",
                       rf"^median shardmail {N} msg/s$"],
    "metrics_hooks": [rf"^outcomes, delivered +{N} us +{N} us$",
                      rf"^committed, a batch of 32 +{N} us +{N} us$",
                      rf"^Spool\.mark \(append \+ fdatasync\), the peer: {N} us a message$",
                      rf"^hooks a delivered message pays \(multiprocess\): {N} us = {N}% of its checkpoint$"],
    "ops_status": [rf"^queue: {N} messages on 4 shards built in {N} s",
                   rf"^status: {N} s, {N} s CPU \(--json {N} s\).* it saw {N} spooled, {N} ready",
                   rf"^qshape: {N} s, {N} s CPU \({N} us a message\)",
                   rf"^round 1 without a watcher: {N} msg/s$",
                   rf"^round 1 with a watcher: {N} msg/s \(watcher CPU {N} % of a core",
                   rf"^watch cost: {N} % of the local delivery rate",
                   rf"^windows of {N} s \(watcher running = \*\): {N}\*?(?: |$)"],
    "qmqp": [rf"^round 1 shardmail qmqpd *: +{N} msg/s$",
             rf"^median shardmail qmqpd {N} msg/s$",
             rf"^ingress-only hop: (skipped: .+|direct {N} msg/s, via ingress {N} msg/s, cost {N} % .*: (PASS|FAIL))$"],
    "rebalance": [rf"^spool of \d+ messages built in {N} s$",
                  rf"^recover \(doorbells for all\): +{N} msg/s \({N} s\)$",
                  rf"^rebalance 0 -> 1,2: +{N} msg/s \({N} s\), shards now \d+ \+ \d+, none left in 0$"],
    "recover": [rf"^spool: \d+ messages written in {N} s$",
                rf"^recover into an empty Redis: {N} msg/s .*; Redis {N} bytes per queued message$",
                rf"^recover again, every doorbell in place: {N} msg/s "],
    "remote_delivery": [line for s in ("fast", "slow") for line in (
        rf"^{s} round 1 shardmail: {N} msg/s, peak PSS {N} MiB, CPU {N} ms/msg$",
        rf"^{s}: shardmail {N} msg/s, peak PSS {N} MiB, CPU per message {N} ms")],
    "smtp_load": [rf"^300 messages in {N} s: {N} msg/s, 0 failed$"],
}
HELPERS = {"postfix_peer"}  # not a benchmark of shardmail: Postfix alone, needs a Postfix install


def test_every_bench_module_has_a_smoke_entry() -> None:
    modules = {m.name for m in pkgutil.iter_modules(bench.__path__)}
    assert modules - HELPERS == set(FIGURES), "give a new bench module --smoke and an entry in FIGURES"


@pytest.mark.parametrize("module", sorted(FIGURES))
def test_smoke_prints_figures(module: str) -> None:
    if module == "remote_delivery" and not Path("/usr/sbin/smtp-sink").is_file():
        pytest.skip("smtp-sink (Debian's postfix package, scripts/setup.sh installs it) is missing")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT)
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"bench.{module} --smoke exited {result.returncode}:\n{result.stderr[-3000:]}"
    missing = [p for p in FIGURES[module] if not re.search(p, result.stdout, re.MULTILINE)]
    assert not missing, f"bench.{module} --smoke ({seconds:.1f} s) did not print {missing}:\n{result.stdout}"


def test_postfix_peer_helper_loads() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.postfix_peer", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--messages" in result.stdout
