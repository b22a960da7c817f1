"""Ops views on a big queue: ``shardmail status`` and ``qshape`` on ``--messages`` (1,000,000) queued
messages, and what ``status --watch 1`` costs the delivery it watches.

Build: spool entries written directly with the spool's own codec (envelope line, body, a deferred
mark for a tenth of them) but without fsync (the benchmark needs a full queue, not durability), on
``--shards`` (4) shards, their arrival times spread over the last two days; the jobs of the rest,
and the retry-set entries of the deferred ones, through core.jobs' pipelines into a private
redis-server on a unix socket; ``--inflight`` of them claimed (a tenth of those failed). Every
message has 1-3 remote recipients over 500 domains, so no pool here delivers them.

Timing: ``shardmail status``, ``status --json`` and ``qshape`` as real processes (start-up included),
median of ``--runs`` (3), the page cache warm (the build just wrote the files; this machine is shared,
so nothing drops caches). Targets: < 2 s and < 10 s.

Watch cost, two ways. Rounds: ``--deliveries`` (20,000) local messages queued through the front door
(core.submit, fsync'd) beside the big queue, then delivered to a Maildir by the real local pool
(``shardmail worker local``), with and without a running ``shardmail status --watch 1`` (its output
read by a thread, as a terminal would), ``--rounds`` (3) pairs in alternating order; the median ratio
of the rates (first claim to last job finished), and the watcher's CPU as a share of a core and of
all the CPU the delivery took (pool, Redis, watcher). Windows: one delivery of ``--window-messages``
(150,000) with the watcher running and stopped (SIGCONT/SIGSTOP) in alternate ``--window`` (5 s)
windows, ABBA order; the median ratio of adjacent windows. Target: < 2 %.

    .venv/bin/python -m bench.ops_status [--messages 1000000] [--deliveries 20000] [--rounds 3]
        [--window-messages 150000] [--window 5] [--workdir DIR] [--smoke]

``--smoke`` (for CI): 2,000 messages, one run of each command, one delivery round of 200 and windows of
0.2 s over 2,500 messages; seconds, every figure printed.

Disk: about 8 KiB per message (two blocks); the build checks free space first and refuses to start
without it. Everything (spool, Redis, Maildirs) lives under one private directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import redis
from rq.registry import StartedJobRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.envelope import Envelope, Mark, Recipient, encode, encode_mark  # noqa: E402
from core.jobs import Item, Jobs  # noqa: E402
from core.shards import Namespace  # noqa: E402
from core.spool import Spool  # noqa: E402

PREFIX = "shardmail"
SPACE = Namespace(PREFIX, "n1")
BODY = b"From: <bench@example.net>\r\nSubject: queued\r\n\r\n" + (b"y" * 76 + b"\r\n") * 40  # 3.2 KB
BATCH = 1000
SPAN = 2 * 86400  # s of arrival times the queue covers
DOMAINS = [f"d{i}.bench" for i in range(500)]
LDIF = """dn: mail=catchall@test.example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
cn: catchall
sn: catchall
mail: catchall@test.example
mailMessageStore: catchall/
"""


def _build_part(root: str, sock: str, shards: list[int], count: int, total_shards: int, now: float) -> int:
    """In a child process: the messages of some shards (every ``total_shards``-th from its own)."""
    conn = redis.Redis(unix_socket_path=sock)
    jobs = Jobs(conn, SPACE)
    spools = {s: Spool(root, s) for s in shards}
    rng = random.Random(shards[0])
    weights = [1 / (i + 1) for i in range(len(DOMAINS))]  # a few big destinations, a long tail
    pending: list[Item] = []
    deferred: dict[int, list[tuple[str, str, float]]] = {}
    written = 0
    pid = os.getpid() & 0xFFFFF
    start = now - SPAN
    for i in range(count):
        if i % total_shards not in shards:
            continue
        shard = i % total_shards
        born = start + SPAN * i / count
        message_id = f"{int(born * 1e6):014X}0B0B{pid:05X}{i & 0xFFF:03X}"
        recipients = tuple(Recipient(f"u{i}.{j}@{d}", "remote")
                           for j, d in enumerate(rng.choices(DOMAINS, weights, k=rng.choice((1, 1, 2, 3)))))
        envelope = Envelope(message_id, f"s{i % 97}@sender{i % 13}.example", recipients, born, shard, len(BODY))
        data = encode(envelope) + BODY
        if (i // total_shards) % 10 == 0:  # a tenth of every shard
            data += encode_mark(Mark(0, "deferred", "4.4.1", "connection timed out", born + 300))
            deferred.setdefault(shard, []).append((message_id, "remote", now + rng.uniform(60, 3600)))
        else:
            pending.append(Item(shard, message_id, "remote", len(recipients)))
        fd = os.open(spools[shard].path(message_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        written += 1
        if len(pending) >= BATCH:
            jobs.enqueue(pending)
            pending = []
        for shard_of, entries in list(deferred.items()):
            if len(entries) >= BATCH:
                jobs.schedule(shard_of, entries)
                deferred[shard_of] = []
    jobs.enqueue(pending)
    for shard_of, entries in deferred.items():
        jobs.schedule(shard_of, entries)
    return written


def build(root: Path, sock: Path, messages: int, shards: int, inflight: int) -> float:
    started = time.perf_counter()
    now = time.time()
    for shard in range(shards):
        Spool(root, shard)  # the directories, once, before the children race to make them
    workers = min(os.cpu_count() or 1, shards)
    parts = [[s for s in range(shards) if s % workers == w] for w in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        written = sum(pool.starmap(_build_part, [(str(root), str(sock), p, messages, shards, now) for p in parts]))
    assert written == messages, written
    jobs = Jobs(redis.Redis(unix_socket_path=str(sock)), SPACE)
    claims = jobs.claim_many(range(shards), "remote", max(1, inflight // shards), "bench.remote-9")
    for claim in claims[: len(claims) // 10]:
        jobs.fail(claim, "bench: a failed job")
    return time.perf_counter() - started


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = work / "redis.sock"
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(work), "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL)
    conn = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + 10
    while True:
        try:
            conn.ping()
            return proc, sock
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def timed(env: dict[str, str], *args: str, runs: int) -> tuple[float, float, str]:
    """Median wall seconds and median CPU seconds (user + system, the command's worker processes
    included: the machine may be busy with other work, CPU says what the command itself costs)."""
    times, cpus = [], []
    out = ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise RuntimeError(f"{args}: {result.stderr}")
        out = result.stdout
    return statistics.median(times), statistics.median(cpus), out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _redis_cpu(conn: redis.Redis) -> float:
    info = conn.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _queue_local(env: dict[str, str], sock: Path, count: int) -> tuple[redis.Redis, Callable[[], int]]:
    """``count`` local messages through the front door (fsync'd, enqueued); a Redis connection, and a
    function counting the local jobs not finished yet (ready + in flight)."""
    from core.config import load
    from core.redis_conn import connect
    from core.submit import Draft, Submitter

    settings = load(env=env)
    submitter = Submitter(settings, connect(settings))
    body = b"From: <bench@example.net>\r\nSubject: local\r\n\r\n" + (b"z" * 76 + b"\r\n") * 60
    for first in range(0, count, 500):
        drafts = [Draft(submitter.new_id(), "bench@example.net", ["catchall@test.example"], body)
                  for _ in range(first, min(first + 500, count))]
        results = submitter.accept_batch(drafts)
        assert all(isinstance(r, Envelope) for r in results), results[:3]
    conn = redis.Redis(unix_socket_path=str(sock))
    jobs = Jobs(conn, SPACE)
    shards = list(range(settings.shards))

    def waiting() -> int:
        with conn.pipeline(transaction=False) as pipe:
            for shard in shards:
                queue = jobs.queue(shard, "local")
                pipe.llen(queue.key)
                pipe.zcard(StartedJobRegistry(queue=queue).key)
            return sum(pipe.execute())

    return conn, waiting


def watch_windows(env: dict[str, str], sock: Path, count: int, window: float, work: Path) -> list[tuple[bool, float]]:
    """One long delivery of ``count`` local messages, the watcher running (SIGCONT) and stopped (SIGSTOP)
    in alternate windows of ``window`` seconds, in ABBA order (off on on off off on ...): slow drifts of
    the machine's other load fall on both alike. Per window: (watcher running, msg/s)."""
    _, waiting = _queue_local(env, sock, count)
    windows: list[tuple[bool, float]] = []
    with contextlib.ExitStack() as stack:
        watcher, screen = _watcher(stack, env)
        stack.callback(lambda: watcher.poll() is None and watcher.send_signal(signal.SIGCONT))
        screen.wait_drawn(watcher)
        watcher.send_signal(signal.SIGSTOP)
        _, deadline = _start_pool(stack, env, waiting, count)
        time.sleep(2 * window)  # the pool's warm-up (directory cache, first batches) is no window's
        left = waiting()
        rate = 0.0
        index = 0
        while left > rate * window * 1.5 + 100 and time.monotonic() < deadline:
            running = index % 4 in (1, 2)
            watcher.send_signal(signal.SIGCONT if running else signal.SIGSTOP)
            started = time.perf_counter()
            time.sleep(window)
            now_left = waiting()
            rate = (left - now_left) / (time.perf_counter() - started)
            windows.append((running, rate))
            left = now_left
            index += 1
    return windows


def _start_pool(stack: contextlib.ExitStack, env: dict[str, str], waiting: Callable[[], int],
                count: int) -> tuple[subprocess.Popen[bytes], float]:
    """A local pool, once it has taken its first jobs; and the deadline (900 s) of the round."""
    pool = stack.enter_context(_child(["worker", "local", "--name", "bench.local-0"], env, subprocess.DEVNULL,
                                      signal.SIGTERM))
    deadline = time.monotonic() + 900
    while waiting() >= count:
        if time.monotonic() > deadline or pool.poll() is not None:
            raise RuntimeError("the local pool did not start")
        time.sleep(0.005)
    return pool, deadline


def deliver_round(env: dict[str, str], sock: Path, count: int, watched: bool, work: Path, round_no: int) -> tuple[
        float, float, float]:
    """Queue ``count`` local messages, then time the local pool delivering them: (msg/s, the watcher's CPU
    seconds a second, the watcher's CPU as a share of all the CPU the delivery took: pool, Redis, watcher)."""
    conn, waiting = _queue_local(env, sock, count)

    with contextlib.ExitStack() as stack:
        watcher = None
        if watched:
            watcher, screen = _watcher(stack, env)
            screen.wait_drawn(watcher)  # its first refresh (a full census) is done
        pool, deadline = _start_pool(stack, env, waiting, count)
        started = time.perf_counter()
        cpu0 = _cpu_seconds(watcher.pid) if watcher else 0.0
        pool0, redis0 = _cpu_seconds(pool.pid), _redis_cpu(conn)
        while waiting():
            if time.monotonic() > deadline:
                raise TimeoutError("local delivery did not finish")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        watcher_cpu = _cpu_seconds(watcher.pid) - cpu0 if watcher else 0.0
        work_cpu = _cpu_seconds(pool.pid) - pool0 + _redis_cpu(conn) - redis0 + watcher_cpu
    return count / elapsed, watcher_cpu / elapsed, watcher_cpu / work_cpu


class _Screen:
    """What a terminal does with the watcher's output: read it (in a thread) and keep the last refresh.
    Not a file on the spool's file system: the pools' syncfs calls would write it back with their own."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.received = 0
        self.last = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self.pipe.read1(65536):
            self.received += len(chunk)
            self.last = (self.last + chunk)[-8192:]

    def wait_drawn(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 120
        while not self.received:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the watcher did not draw")
            time.sleep(0.05)


def _watcher(stack: contextlib.ExitStack, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], _Screen]:
    watcher = stack.enter_context(_child(["status", "--watch", "1"], env, subprocess.PIPE, signal.SIGINT))
    assert watcher.stdout is not None
    return watcher, _Screen(watcher.stdout)  # type: ignore[arg-type]


@contextlib.contextmanager
def _child(args: list[str], env: dict[str, str], out: object, stop: int) -> Iterator[subprocess.Popen[bytes]]:
    """A shardmail process, stopped with ``stop`` at the end (killed if it does not go within 30 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=2000, help="jobs claimed (a tenth of them failed)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each command timed")
    parser.add_argument("--deliveries", type=int, default=20_000, help="local messages per delivery round (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="delivery rounds with and without a watcher")
    parser.add_argument("--window-messages", type=int, default=150_000,
                        help="local messages for the alternate-window measurement (0: skip)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the private directory goes")
    parser.add_argument("--smoke", action="store_true", help="a small queue and short rounds, seconds: checks the "
                        "figures are produced")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.inflight, args.runs, args.deliveries, args.rounds = 2000, 200, 1, 200, 1
        args.window_messages, args.window = 2500, 0.2
    need = args.messages * 8192 + (args.deliveries * args.rounds * 2 + args.window_messages) * 12288 + (1 << 30)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        print(f"not enough space under {args.workdir}: {free >> 20} MiB free, about {need >> 20} MiB needed "
              "(try --workdir /dev/shm, a tmpfs, or fewer --messages)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-ops-status-", dir=args.workdir))
    redis_proc = None
    try:
        redis_proc, sock = start_redis(work)
        seconds = build(work / "spool", sock, args.messages, args.shards, args.inflight)
        used = redis.Redis(unix_socket_path=str(sock)).info("memory")["used_memory"]
        print(f"queue: {args.messages:,} messages on {args.shards} shards built in {seconds:.1f} s "
              f"(Redis {used >> 20} MiB)", flush=True)
        (work / "users.ldif").write_text(LDIF)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
        env.update({"SHARDMAIL_SPOOL_DIR": str(work / "spool"), "SHARDMAIL_VAR_DIR": str(work / "var"),
                    "SHARDMAIL_REDIS_URL": f"unix://{sock}", "SHARDMAIL_SHARDS": str(args.shards),
                    "SHARDMAIL_ME": "bench.shardmail.test", "SHARDMAIL_LOCALS": "test.example",
                    "SHARDMAIL_USERS_LDIF": str(work / "users.ldif"), "SHARDMAIL_LDAPMESSAGESTORE": str(work / "mail"),
                    "SHARDMAIL_REDIS_PREFIX": PREFIX, "SHARDMAIL_NODE": SPACE.node})
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before timing", flush=True)
        status_s, status_cpu, _ = timed(env, "status", runs=args.runs)
        json_s, _, text = timed(env, "status", "--json", runs=args.runs)
        total = json.loads(text)["total"]
        print(f"status: {status_s:.2f} s, {status_cpu:.2f} s CPU (--json {json_s:.2f} s), median of {args.runs}, "
              "process start included; "
              f"it saw {total['spooled']:,} spooled, {total['channels']['remote']['ready']:,} ready, "
              f"{total['channels']['remote']['in_flight']:,} in flight, {total['channels']['remote']['failed']:,} "
              f"failed, {total['deferred']:,} deferred (target < 2 s)", flush=True)
        qshape_s, qshape_cpu, text = timed(env, "qshape", "--top", "5", runs=args.runs)
        per_message = qshape_cpu / args.messages * 1e6
        print(f"qshape: {qshape_s:.2f} s, {qshape_cpu:.2f} s CPU ({per_message:.1f} us a message), "
              f"median of {args.runs} ({os.cpu_count()} cores; target < 10 s); "
              f"its total line: {' '.join(text.splitlines()[1].split()[:2])}", flush=True)
        if args.deliveries:
            plain: list[float] = []
            watched: list[float] = []
            shares: list[float] = []
            parts: list[float] = []
            deliver_round(env, sock, min(args.deliveries, 2000), True, work, 0)  # warm-up: Maildir, imports, caches
            for round_no in range(1, args.rounds + 1):
                for watch in ((False, True) if round_no % 2 else (True, False)):
                    rate, share, part = deliver_round(env, sock, args.deliveries, watch, work, round_no)
                    (watched if watch else plain).append(rate)
                    if watch:
                        shares.append(share)
                        parts.append(part)
                    print(f"round {round_no} {'with' if watch else 'without'} a watcher: {rate:,.0f} msg/s"
                          + (f" (watcher CPU {share * 100:.2f} % of a core, {part * 100:.2f} % of the CPU the "
                             "delivery took)" if watch else ""), flush=True)
            ratios = [w / p for w, p in zip(watched, plain, strict=True)]
            print(f"watch cost: {(1 - statistics.median(ratios)) * 100:.1f} % of the local delivery rate (median "
                  f"ratio {statistics.median(ratios):.3f}; medians {statistics.median(plain):,.0f} against "
                  f"{statistics.median(watched):,.0f} msg/s; watcher CPU median {statistics.median(shares) * 100:.2f} "
                  f"% of a core, {statistics.median(parts) * 100:.2f} % of the delivery's CPU; target < 2 %)",
                  flush=True)
        if args.window_messages:
            windows = watch_windows(env, sock, args.window_messages, args.window, work)
            pairs = [(windows[i], windows[i + 1]) for i in range(0, len(windows) - 1, 2)]
            ratios = [(a[1] / b[1]) if a[0] else (b[1] / a[1]) for a, b in pairs if a[1] > 0 and b[1] > 0]
            print("windows of {:g} s (watcher running = *): {}".format(
                args.window, " ".join(f"{r:,.0f}{'*' if on else ''}" for on, r in windows)), flush=True)
            if ratios:
                print(f"watch cost, alternate windows of one delivery: {(1 - statistics.median(ratios)) * 100:.1f} % "
                      f"(median of {len(ratios)} adjacent pairs' ratios {statistics.median(ratios):.3f}; "
                      "target < 2 %)", flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
