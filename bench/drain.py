"""Drain benchmark: how fast can a pool take shardmail's jobs off a shard queue?

Compares, in one run against one private redis-server on a unix socket:
  (a) enqueue: ``Jobs.enqueue`` one message per pipelined round trip, as ingress does it;
  (b) rq's stock ``SimpleWorker`` (burst mode) running the same kind of job, one at a time;
  (c) shardmail's ``Consumer`` claiming batches of jobs (one process, batch size configurable).
The job body is a no-op in (b) and (c), so the figures are the per-job cost of the queue machinery
alone: the ceiling it puts on any delivery pool.

    python -m bench.drain [--jobs 20000] [--stock-jobs 3000] [--batch 100] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.jobs import Item, Jobs
from core.shards import Namespace
from workers.consumer import Consumer


def noop(shard: int, message_id: str, channel: str) -> None:
    """The stock worker's job: nothing, so only queue overhead is measured."""


# by its importable name: run as ``-m bench.drain`` the function's own module is ``__main__``, which rq's
# worker cannot import it from (every stock job then failed, and the rate measured failures)
STOCK_JOB = "bench.drain.noop"


def start_redis(directory: Path) -> subprocess.Popen[bytes]:
    sock = directory / "redis.sock"
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(unix_socket_path=str(sock)).ping():
                return proc
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ids(count: int, offset: int = 0) -> list[str]:
    return [f"{i + offset:026X}" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--stock-jobs", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="300 jobs, 50 for the stock worker: seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.stock_jobs = 300, 50
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(Path(tmp))
        try:
            conn = redis.Redis(unix_socket_path=str(Path(tmp) / "redis.sock"))
            jobs = Jobs(conn, Namespace("bench", "n1"))

            start = time.perf_counter()
            for message_id in ids(args.jobs):
                jobs.enqueue([Item(0, message_id, "local")])
            enqueue_rate = args.jobs / (time.perf_counter() - start)

            consumer = Consumer(jobs, [(0, "local")], lambda claims: claims, batch=args.batch, name="bench")
            start = time.perf_counter()
            drained = consumer.drain()
            own_rate = drained / (time.perf_counter() - start)
            assert drained == args.jobs, drained

            stock_queue = Queue("bench-stock", connection=conn, serializer=JSONSerializer)
            for message_id in ids(args.stock_jobs):
                stock_queue.enqueue_many([Queue.prepare_data(
                    STOCK_JOB, args=[0, message_id, "local"], job_id=f"{message_id}-local", result_ttl=0,
                    description=f"deliver {message_id} (1 rcpt) via local")])
            worker = SimpleWorker([stock_queue], connection=conn, serializer=JSONSerializer)
            start = time.perf_counter()
            worker.work(burst=True, logging_level="WARNING")
            stock_rate = args.stock_jobs / (time.perf_counter() - start)
            assert stock_queue.count == 0
            assert stock_queue.failed_job_registry.count == 0, "the stock worker's jobs failed"
        finally:
            proc.terminate()
            proc.wait()
    print(f"enqueue, one pipelined round trip per message : {enqueue_rate:9.0f} jobs/s")
    print(f"rq SimpleWorker (stock), {args.stock_jobs} jobs           : {stock_rate:9.0f} jobs/s")
    print(f"shardmail Consumer, batch {args.batch}, {args.jobs} jobs    : {own_rate:9.0f} jobs/s")
    print(f"ratio consumer / stock worker                  : {own_rate / stock_rate:9.1f}x")


if __name__ == "__main__":
    main()
