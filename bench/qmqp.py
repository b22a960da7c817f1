"""QMQP benchmark: shardmail's QMQP intake against Postfix's qmqpd, and the cost of an ingress-only hop.

(a) QMQP message rate into one shardmail queue node (``shardmail run`` with ``qmqp_listen``: the
real spool, fsync'd, enqueued in Redis before K; its delivery pools idle) against Postfix's
``qmqpd`` on the same machine, in the same run, the sides alternating round by round (ABBA), with
the same requests: ``--sessions`` client connections in parallel, one message per connection as
QMQP has it. Postfix holds every message (``header_checks`` HOLD: cleanup's fsync'd queue file,
no delivery, as shardmail's idle pools) unless ``--postfix-delivery discard``. Target: shardmail
≥ 1.5x Postfix.

(b) The ingress-only hop: SMTP accept rate of an ingress-only node (``role = "ingress"``,
``qmqpservers`` = the queue node: 250 only after the queue node's K) in front of one queue node,
against the queue node taking the same SMTP load directly (smtp-source, else bench/smtp_load.py).
Skipped with a line saying why when this shardmail has no ``role`` setting. Target: the hop costs
≤ 15 % of the direct rate.

    python -m bench.qmqp [--messages 10000] [--sessions 20] [--size 5120] [--recipients 1] [--rounds 3]
        [--part a|b|both] [--postfix-delivery hold|discard] [--cpu] [--root DIR] [--workdir DIR] [--smoke]

``--smoke`` (for CI): 300 messages, 10 sessions, one round, shardmail alone, free ports. Everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.ingress import free_port, settle, wait_banner
from bench.local_delivery import Snapshot, cpu_report, cpu_snapshot
from bench.postfix_peer import SBIN, ensure_postfix_tools, postfix_instance, run_smtp_source, with_descendants
from bench.smtp_load import message, run_load
from core.qmqp import Reply, pack, reply_complete

ROOT = Path(__file__).resolve().parent.parent
SENDER = "bench@example.net"
QMQP_TARGET = 1.5  # shardmail's QMQP intake against Postfix's qmqpd
HOP_TARGET = 15.0  # % of the direct SMTP accept rate an ingress-only hop may cost


# --------------------------------------------------------------------------- QMQP load


class _Exchange(asyncio.Protocol):
    """One QMQP conversation as a protocol (the generator shares the machine with both sides, so
    it spends little per message): the request and EOF at once, the reply read up to its end."""

    def __init__(self, request: bytes, done: asyncio.Future[Reply]) -> None:
        self.request = request
        self.done = done
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)
        self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if reply_complete(self.buffer):
            self._finish(Reply.decode(self.buffer))

    def eof_received(self) -> bool:
        self._finish(Reply.decode(self.buffer) if self.buffer else Reply("Z", "closed without a reply"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(Reply("Z", f"connection lost ({exc})"))

    def _finish(self, reply: Reply) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(reply)


async def _qmqp_load(port: int, requests: list[bytes], sessions: int) -> Counter[str]:
    loop = asyncio.get_running_loop()
    todo = iter(requests)
    codes: Counter[str] = Counter()

    async def session() -> None:
        for request in todo:
            done: asyncio.Future[Reply] = loop.create_future()
            try:
                await loop.create_connection(functools.partial(_Exchange, request, done), "127.0.0.1", port)
                reply = await done
            except OSError as exc:
                reply = Reply("Z", str(exc))
            codes[reply.code] += 1
            if reply.code != "K" and codes[reply.code] == 1:
                print(f"  first {reply.code}: {reply.text}", file=sys.stderr)

    await asyncio.gather(*(session() for _ in range(sessions)))
    return codes


def run_qmqp_load(port: int, requests: list[bytes], sessions: int) -> tuple[float, Counter[str]]:
    """(seconds, replies by code) for every request, each on its own connection."""
    started = time.perf_counter()
    try:
        import uvloop

        codes = uvloop.run(_qmqp_load(port, requests, sessions))
    except ImportError:
        codes = asyncio.run(_qmqp_load(port, requests, sessions))
    return time.perf_counter() - started, codes


def requests_for(count: int, size: int, recipients: int) -> list[bytes]:
    """The same requests for both sides: ``size`` bytes of message, ``recipients`` remote ones each."""
    out = []
    for number in range(count):
        to = [f"rcpt{number}-{i}@example.org" for i in range(recipients)]
        out.append(pack(message(size, number, to[0]), SENDER, to))
    return out


# --------------------------------------------------------------------------- shardmail nodes


def listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@dataclass
class Node:
    """A ``shardmail run`` of the benchmark, its ports and its supervisor process."""

    var_dir: Path
    env: dict[str, str]
    smtp_port: int
    qmqp_port: int | None
    proc: subprocess.Popen[bytes]

    def pids(self) -> set[int]:
        return with_descendants([self.proc.pid])

    def spooled(self, root: Path) -> int:
        status = subprocess.run([sys.executable, "-m", "ops.cli", "status", "--json"], cwd=root, env=self.env,
                                capture_output=True, text=True, timeout=120, check=True)
        return int(json.loads(status.stdout)["total"]["spooled"])  # versioned JSON (ops/depth.py)


def node_env(var_dir: Path, name: str, smtp_port: int, processes: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({"SHARDMAIL_VAR_DIR": str(var_dir), "SHARDMAIL_NODE": name, "SHARDMAIL_ME": f"{name}.bench.test",
                "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{smtp_port}", "SHARDMAIL_INGRESS_PROCESSES": str(processes),
                "SHARDMAIL_SHARDS": "4", "SHARDMAIL_REMOTEPROCESSES": "0", "SHARDMAIL_SCHEDULERPROCESSES": "0",
                "SHARDMAIL_METRICS_LISTEN": ""})
    env.update({f"SHARDMAIL_{key.upper()}": value for key, value in settings.items()})
    return env


@contextlib.contextmanager
def shardmail_node(workdir: Path, name: str, root: Path, processes: int, qmqp: bool = True,
                   **settings: str) -> Iterator[Node]:
    """A node whose remote pool and scheduler are off (the mail stays queued: intake is measured),
    SMTP on a free port, QMQP too when ``qmqp`` (open to 127.0.0.1)."""
    workdir.mkdir(parents=True, mode=0o755)
    smtp_port = free_port()
    qmqp_port = free_port() if qmqp else None
    if qmqp_port:
        settings = {"qmqp_listen": f"127.0.0.1:{qmqp_port}", "qmqpclients": "127.0.0.1/32", **settings}
    env = node_env(workdir / "var", name, smtp_port, processes, **settings)
    if root != ROOT:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave another checkout as it was
    with open(workdir / "shardmail.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_banner(smtp_port)
        if qmqp_port:
            deadline = time.monotonic() + 30
            while not listening(qmqp_port):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name}: no QMQP on 127.0.0.1:{qmqp_port}; see {workdir}/shardmail.log")
                time.sleep(0.05)
        yield Node(workdir / "var", env, smtp_port, qmqp_port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    rate: float
    failed: int


def measured(pids: Callable[[], set[int]], messages: int, side: str, cpu: bool) -> Callable[[], None]:
    """Start a CPU account of ``pids()`` (with those that appear meanwhile); the returned function
    prints it (``--cpu``)."""
    if not cpu:
        return lambda: None
    first = pids()
    before: Snapshot = cpu_snapshot(first)
    return lambda: cpu_report(before, cpu_snapshot(first | pids()), messages, side)


def qmqp_shardmail(workdir: Path, requests: list[bytes], args: argparse.Namespace) -> Run:
    with shardmail_node(workdir, "bench-queue", args.root, args.processes) as node:
        assert node.qmqp_port is not None
        report = measured(node.pids, len(requests), "shardmail", args.cpu)
        seconds, codes = run_qmqp_load(node.qmqp_port, requests, args.sessions)
        report()
        spooled = node.spooled(args.root)
    failed = len(requests) - codes["K"]
    if spooled != codes["K"]:
        print(f"shardmail: {codes['K']} K but {spooled} spooled", file=sys.stderr)
        failed = max(failed, 1)
    return Run(len(requests) / seconds, failed)


POSTFIX_HOLD = "header_checks = regexp:{{/^/ HOLD}}\n"  # cleanup puts each message on hold: no delivery


def qmqp_postfix(workdir: Path, requests: list[bytes], args: argparse.Namespace) -> Run:
    extra = POSTFIX_HOLD if args.postfix_delivery == "hold" else ""
    with postfix_instance(workdir, free_port(), qmqp_port=(port := free_port()), extra_main_cf=extra) as instance:
        report = measured(instance.pids, len(requests), "postfix", args.cpu)
        seconds, codes = run_qmqp_load(port, requests, args.sessions)
        report()
        if args.postfix_delivery == "hold":
            kept = instance.queued()
        else:
            instance.wait_queue_empty(timeout=300)
            kept = codes["K"]
    failed = len(requests) - codes["K"]
    if kept != codes["K"]:
        print(f"postfix: {codes['K']} K but {kept} held", file=sys.stderr)
        failed = max(failed, 1)
    return Run(len(requests) / seconds, failed)


def smtp_load(port: int, args: argparse.Namespace) -> tuple[float, int]:
    """(msg/s, failed) of the SMTP load: smtp-source when Postfix's tools are there, else ours."""
    if (SBIN / "smtp-source").is_file():
        result = run_smtp_source("127.0.0.1", port, sessions=args.sessions, messages=args.messages, size=args.size)
        if not result.errors:
            return result.msg_per_s, 0
        print(f"  smtp-source: {result.stderr[-300:]}", file=sys.stderr)
        return result.msg_per_s, args.messages - (result.completed or 0) or 1
    seconds, failed = run_load(port, args.messages, args.sessions, args.size, ["rcpt@example.org"])
    return args.messages / seconds, failed


def smtp_direct(workdir: Path, args: argparse.Namespace) -> Run:
    with shardmail_node(workdir, "bench-queue", args.root, args.processes) as queue:
        report = measured(queue.pids, args.messages, "direct", args.cpu)
        rate, failed = smtp_load(queue.smtp_port, args)
        report()
        spooled = queue.spooled(args.root)
    return Run(rate, failed or int(spooled != args.messages))


def smtp_via_ingress(workdir: Path, args: argparse.Namespace) -> Run:
    with shardmail_node(workdir / "queue", "bench-queue", args.root, args.processes) as queue:
        redis = f"unix://{queue.var_dir.resolve()}/redis/redis.sock"  # the cluster's Redis: the queue node's
        with shardmail_node(workdir / "ingress", "bench-ingress", args.root, args.processes, qmqp=False,
                            role="ingress", qmqpservers=f"127.0.0.1:{queue.qmqp_port}", redis_url=redis) as front:
            report = measured(lambda: queue.pids() | front.pids(), args.messages, "via ingress", args.cpu)
            rate, failed = smtp_load(front.smtp_port, args)
            report()
        spooled = queue.spooled(args.root)
    return Run(rate, failed or int(spooled != args.messages))


def role_support(root: Path) -> str:
    """'' when this shardmail knows ``role = "ingress"``, else why not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({"SHARDMAIL_ROLE": "ingress", "PYTHONDONTWRITEBYTECODE": "1"})
    result = subprocess.run([sys.executable, "-m", "ops.cli", "config"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0:
        return f"`SHARDMAIL_ROLE=ingress shardmail config` exited {result.returncode}: {result.stderr.strip()[-200:]}"
    if not any(line.startswith("role = 'ingress'") for line in result.stdout.splitlines()):
        return "this shardmail has no `role` setting (`shardmail config` does not list it)"
    return ""


# --------------------------------------------------------------------------- rounds


def alternate(rounds: int, first: Callable[[int], Run], second: Callable[[int], Run], names: tuple[str, str],
              pause: float) -> tuple[list[float], list[float], int]:
    """Run both sides ``rounds`` times, ABBA; print each round; (rates of first, of second, failures)."""
    rates: tuple[list[float], list[float]] = ([], [])
    failures = 0
    width = max(map(len, names))
    for number in range(1, rounds + 1):
        order = [0, 1] if number % 2 else [1, 0]
        for side in order:
            settle(pause)
            run = (first, second)[side](number)
            rates[side].append(run.rate)
            failures += run.failed
            note = f"   {run.failed} not accepted" if run.failed else ""
            print(f"round {number} {names[side]:<{width}}: {run.rate:7.0f} msg/s{note}", flush=True)
    return rates[0], rates[1], failures


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def part_a(base: Path, args: argparse.Namespace) -> int:
    requests = requests_for(args.messages, args.size, args.recipients)
    held = "held" if args.postfix_delivery == "hold" else "delivered to discard"
    print(f"(a) QMQP intake: {args.messages} messages of {args.size} bytes for {args.recipients} recipient(s), "
          f"{args.sessions} connections in parallel, one message each; Postfix's mail {held}", flush=True)
    names = ("shardmail qmqpd", "postfix qmqpd")
    if args.skip_postfix:
        ours = []
        for number in range(1, args.rounds + 1):
            settle(args.pause)
            ours.append(qmqp_shardmail(base / f"a-s{number}", requests, args))
            print(f"round {number} {names[0]}: {ours[-1].rate:7.0f} msg/s", flush=True)
        print(f"median shardmail qmqpd {statistics.median(r.rate for r in ours):.0f} msg/s")
        return sum(r.failed for r in ours)
    ensure_postfix_tools()
    mine, theirs, failures = alternate(
        args.rounds, lambda n: qmqp_shardmail(base / f"a-s{n}", requests, args),
        lambda n: qmqp_postfix(base / f"a-p{n}", requests, args), names, args.pause)
    ratios = " ".join(f"{m / t:.2f}" for m, t in zip(mine, theirs, strict=True))
    ratio = statistics.median(mine) / statistics.median(theirs)
    print(f"per-round ratios {ratios}")
    print(f"QMQP intake: shardmail {statistics.median(mine):.0f} msg/s, postfix {statistics.median(theirs):.0f} "
          f"msg/s, ratio {ratio:.2f}x (target >= {QMQP_TARGET}x): {verdict(ratio >= QMQP_TARGET)}")
    return failures


def part_b(base: Path, args: argparse.Namespace) -> int:
    why = role_support(args.root)
    if why:
        print(f"ingress-only hop: skipped: {why}")
        return 0
    generator = "smtp-source" if (SBIN / "smtp-source").is_file() else "bench.smtp_load"
    print(f"(b) ingress-only hop: {generator}, {args.sessions} sessions, {args.messages} messages of {args.size} "
          "bytes, one connection per message", flush=True)
    direct, via, failures = alternate(
        args.rounds, lambda n: smtp_direct(base / f"b-d{n}", args), lambda n: smtp_via_ingress(base / f"b-i{n}", args),
        ("direct to the queue node", "through an ingress-only node"), args.pause)
    cost = 100 * (1 - statistics.median(via) / statistics.median(direct))
    print(f"ingress-only hop: direct {statistics.median(direct):.0f} msg/s, via ingress {statistics.median(via):.0f} "
          f"msg/s, cost {cost:.1f} % (target <= {HOP_TARGET:.0f} %): {verdict(cost <= HOP_TARGET)}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="per side and round")
    parser.add_argument("--sessions", type=int, default=20, help="client connections in parallel")
    parser.add_argument("--size", type=int, default=5120, help="message bytes")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per QMQP message")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating; medians")
    parser.add_argument("--part", choices=("a", "b", "both"), default="both",
                        help="a: QMQP intake against Postfix; b: the ingress-only hop (needs `role`)")
    parser.add_argument("--processes", type=int, default=0, help="SMTP processes per node (0: shardmail's default)")
    parser.add_argument("--postfix-delivery", choices=("hold", "discard"), default="hold",
                        help="hold: Postfix keeps the mail, like shardmail with its pools idle; discard: its "
                             "queue manager and discard agent run meanwhile")
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="CPU ms per message of each process role")
    parser.add_argument("--root", type=Path, default=ROOT, help="the shardmail checkout to run (default: this one)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory, deleted)")
    parser.add_argument("--smoke", action="store_true",
                        help="300 messages, one round, shardmail alone, seconds: checks the figures are produced")
    args = parser.parse_args()
    args.root = args.root.resolve()
    args.pause = 5.0
    if args.smoke:
        args.messages, args.sessions, args.rounds, args.processes = 300, 10, 1, 1
        args.skip_postfix, args.pause = True, 0.0
    with contextlib.ExitStack() as stack:
        if args.workdir:
            base = args.workdir.resolve()
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shardmail-bench-qmqp-")))
        base.chmod(0o755)  # Postfix's daemons run as the postfix user and must traverse it
        failures = 0
        if args.part in ("a", "both"):
            failures += part_a(base, args)
        if args.part in ("b", "both"):
            failures += part_b(base, args)
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    if failures:
        print(f"{failures} messages were not accepted or not found queued", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
