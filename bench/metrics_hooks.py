"""What the metrics hooks cost on the mail path, against the per-message checkpoint they sit next to.

Runs each hook of core.metrics many times in a child process with ``PROMETHEUS_MULTIPROC_DIR`` set
(as under ``shardmail run``: values go to memory-mapped files) and in one without (in-process
values), and, as the peer measured in the same run, ``Spool.mark`` (the per-recipient checkpoint:
an append and an fdatasync) on a spool under ``--workdir``. Prints microseconds per call and the
hooks' share of a message's checkpoint.

    .venv/bin/python -m bench.metrics_hooks [--calls 200000] [--marks 2000] [--batch 32] [--workdir /var/tmp] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from core import metrics
from core.envelope import Envelope, Mark, Recipient
calls, batch = int(sys.argv[1]), int(sys.argv[2])
delivered = [Mark(0, "delivered", "2.0.0", "delivered to maildir", 0.0)]
deferred = [Mark(0, "deferred", "4.4.1", "connection refused", 0.0)]
results = [Envelope("0" * 26, "a@b", (Recipient("c@d", "local"),), 0.0, 0, 1)] * batch

def noop(*args):
    pass

def per_call(fn, *args):
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6

base = per_call(noop, "local", delivered)
print(json.dumps({
    "(a plain function call, subtracted)": base,
    "outcomes, delivered": per_call(metrics.outcomes, "local", delivered) - base,
    "outcomes, deferred (labels by class)": per_call(metrics.outcomes, "remote", deferred) - base,
    f"committed, a batch of {batch}": per_call(metrics.committed, results, 0.004) - base,
    "redis_error": per_call(metrics.redis_error, "local") - base,
}))
"""


def hooks(calls: int, batch: int, multiprocess: Path | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiprocess is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiprocess)
    out = subprocess.run([sys.executable, "-c", CHILD, str(calls), str(batch)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def mark_cost(workdir: Path, count: int) -> float:
    """Microseconds of one ``Spool.mark`` (append + fdatasync), the checkpoint every message gets."""
    sys.path.insert(0, str(REPO))
    from core.envelope import Envelope, Mark, Recipient, new_id
    from core.spool import Spool

    spool = Spool(workdir / "spool", 0)
    ids = []
    for _ in range(count):
        envelope = Envelope(new_id(1), "a@b.example", (Recipient("c@d.example", "local"),), time.time(), 0, 20)
        spool.write(envelope, b"Subject: x\r\n\r\nx\r\n")
        ids.append(envelope.id)
    start = time.perf_counter()
    for message_id in ids:
        spool.mark(message_id, [Mark(0, "delivered", "2.0.0", "delivered to maildir", time.time())])
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--marks", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="messages per group commit")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--smoke", action="store_true", help="2,000 calls and 50 marks: seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.marks = 2000, 50
    with tempfile.TemporaryDirectory(prefix="metrics-bench-", dir=args.workdir) as tmp:
        shared = Path(tmp) / "multiproc"
        shared.mkdir()
        mmap = hooks(args.calls, args.batch, shared)
        memory = hooks(args.calls, args.batch, None)
        mark = mark_cost(Path(tmp), args.marks)
    print(f"{'hook (net of a plain call)':<40} {'multiprocess':>13} {'in-process':>11}")
    for name in mmap:
        print(f"{name:<40} {mmap[name]:>10.2f} us {memory[name]:>8.2f} us")
    per_message = mmap["outcomes, delivered"] + mmap[f"committed, a batch of {args.batch}"] / args.batch
    print(f"\nSpool.mark (append + fdatasync), the peer: {mark:.1f} us a message")
    print(f"hooks a delivered message pays (multiprocess): {per_message:.2f} us = {per_message / mark:.2%} of its "
          "checkpoint")


if __name__ == "__main__":
    main()
