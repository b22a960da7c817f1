"""Recovery benchmark: ``shardmail recover`` over a spool of queued messages, into an empty Redis.

Builds a spool of ``--messages`` (200,000) messages of 5 KB on ``--shards`` (4) shards with the
spool's own batch writer (fsync'd as ingress writes them), a tenth of them with a deferred
recipient, starts a private empty redis-server, and times ``shardmail recover`` (a real process):
messages per second, and Redis memory per queued message afterwards (``used_memory`` growth over
the empty server, divided by the messages). Targets: >= 20,000 msg/s, <= 300 bytes per message
(a stock rq job hash takes about 540). A second pass shows what a recover costs when every message
still has its doorbell.

    .venv/bin/python -m bench.recover [--messages 200000] [--shards 4] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.envelope import Envelope, Mark, Recipient  # noqa: E402
from core.spool import Spool  # noqa: E402


def build(root: Path, messages: int, shards: int) -> float:
    body = b"From: <bench@example.net>\r\nSubject: queued\r\n\r\n" + (b"x" * 76 + b"\r\n") * 64
    spools = [Spool(root, s) for s in range(shards)]
    started = time.perf_counter()
    now = time.time()
    born = int((now - 600) * 1e6)  # ids in arrival-time order, ten minutes ago: a queue that has been waiting
    for first in range(0, messages, 500):
        batch: dict[int, list[tuple[Envelope, bytes]]] = {}
        for i in range(first, min(first + 500, messages)):
            shard = i % shards
            message_id = f"{born + i:014X}0001{os.getpid() & 0xFFFFF:05X}000"
            envelope = Envelope(message_id, "bench@example.net", (Recipient(f"user{i}@d{i % 50}.bench", "remote"),),
                                now - 600, shard, len(body))
            batch.setdefault(shard, []).append((envelope, body))
        for shard, items in batch.items():
            errors = spools[shard].write_batch(items)
            assert not any(errors), errors
            deferred = [e for e, _ in items if int(e.id[:14], 16) % 10 == 0]
            for envelope in deferred:
                spools[shard].mark(envelope.id, [Mark(0, "deferred", "4.4.1", "connection timed out", now - 300)])
    return time.perf_counter() - started


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    """A private, empty redis-server on ``work/redis.sock`` (no persistence), answering."""
    sock = work / "redis.sock"
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    conn = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + 10
    while True:
        try:
            conn.ping()
            return proc, conn
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="300 messages: seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.messages = 300
    work = Path(tempfile.mkdtemp(prefix="bench-recover-", dir="/var/tmp"))
    redis_proc = None
    try:
        seconds = build(work / "spool", args.messages, args.shards)
        print(f"spool: {args.messages} messages written in {seconds:.1f} s", flush=True)
        sock = work / "redis.sock"
        redis_proc, conn = start_redis(work)
        empty = conn.info("memory")["used_memory"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
        env.update({"SHARDMAIL_SPOOL_DIR": str(work / "spool"), "SHARDMAIL_VAR_DIR": str(work / "var"),
                    "SHARDMAIL_REDIS_URL": f"unix://{sock}", "SHARDMAIL_SHARDS": str(args.shards),
                    "SHARDMAIL_ME": "bench.shardmail.test"})
        subprocess.run(["sync"], check=False)
        for label in ("into an empty Redis", "again, every doorbell in place"):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "ops.cli", "recover"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=1800)
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            used = conn.info("memory")["used_memory"] - empty
            print(f"recover {label}: {args.messages / seconds:,.0f} msg/s ({seconds:.1f} s for {args.messages}, "
                  f"process start included); Redis {used / args.messages:.0f} bytes per queued message", flush=True)
            print("  " + result.stderr.strip().splitlines()[-1], flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
