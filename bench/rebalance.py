"""Rebalance benchmark: ``shardmail shards rebalance`` moving a queued shard onto two others.

Builds ``--messages`` (50,000) queued messages of 5 KB on shard 0 with the spool's own batch writer
(a tenth deferred), gives them their doorbells with ``shardmail recover`` (a private redis-server),
adds two shards with ``shardmail shards add``, then times ``shardmail shards rebalance --from 0 --to
1,2`` (a real process): messages per second, and checks that every message is in exactly one shard
and none is left in shard 0. Postfix has no counterpart (its queue is not sharded), so there is no
ratio; the recover rate of the same spool is printed beside it, as the other whole-spool pass.

    .venv/bin/python -m bench.rebalance [--messages 50000] [--smoke]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recover import build, start_redis  # noqa: E402


def shardmail(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--smoke", action="store_true", help="300 messages: seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.messages = 300
    work = Path(tempfile.mkdtemp(prefix="shardmail-rebalance-", dir="/var/tmp"))
    sock = work / "redis.sock"
    server, _ = start_redis(work)
    try:
        built = build(work / "spool", args.messages, 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
        env.update({"SHARDMAIL_VAR_DIR": str(work), "SHARDMAIL_SPOOL_DIR": str(work / "spool"),
                    "SHARDMAIL_REDIS_URL": f"unix://{sock}", "SHARDMAIL_SHARDS": "1", "SHARDMAIL_ME": "bench.test"})
        recovered = shardmail(env, "recover")
        shardmail(env, "shards", "add")
        shardmail(env, "shards", "add")
        moved = shardmail(env, "shards", "rebalance", "--from", "0", "--to", "1,2")
        counts = {s: len([n for d in (work / "spool" / f"s{s}" / "queue").iterdir() for n in os.listdir(d)])
                  for s in (0, 1, 2)}
        assert counts[0] == 0 and sum(counts.values()) == args.messages, counts
        print(f"spool of {args.messages} messages built in {built:.1f} s")
        print(f"recover (doorbells for all):  {args.messages / recovered:8.0f} msg/s ({recovered:.1f} s)")
        print(f"rebalance 0 -> 1,2:           {args.messages / moved:8.0f} msg/s ({moved:.1f} s), "
              f"shards now {counts[1]} + {counts[2]}, none left in 0")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
