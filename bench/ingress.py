"""Accept-rate benchmark: shardmail's SMTP ingress against a loopback Postfix, in one run.

Both receive the same load from Postfix's ``smtp-source`` (default: 20 sessions, 20,000 messages of
5 KB in total) with full durability: Postfix at its default fsync behaviour, delivering to
``discard:``; shardmail answering 250 only after spool fsync + directory fsync + Redis enqueue.
Prints msg/s for each, the ratio, and the peak memory (sum of PSS over each side's processes,
shardmail's embedded redis-server included).

    python -m bench.ingress [--messages 20000] [--sessions 20] [--size 5120] [--reuse] [--processes N] [--smoke]

``--smoke`` (for CI): 200 messages, 10 sessions, one round, one SMTP process, shardmail alone on a free
port, no pause between runs; smtp-source if Postfix's tools are installed (never installs them),
else bench/smtp_load.py.

Everything listens on 127.0.0.1 only; the runs are bounded by smtp-source's own count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.postfix_peer import (
    SBIN,
    PeakMemorySampler,
    ensure_postfix_tools,
    peak_memory_sampler,
    postfix_instance,
    run_smtp_source,
    with_descendants,
)
from bench.smtp_load import run_load

ROOT = Path(__file__).resolve().parent.parent


def wait_banner(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(512).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port}")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), for runs beside others (CI, tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settle(seconds: float = 5.0) -> None:
    """Flush and pause, so one side's writeback and discards do not land on the other's run."""
    os.sync()
    time.sleep(seconds)


def run_shardmail(workdir: Path, port: int, args: argparse.Namespace) -> tuple[float, float, int]:
    """msg/s, peak MiB, and the number of messages found in the spool afterwards."""
    workdir.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({
        "SHARDMAIL_VAR_DIR": str(workdir / "var"),
        "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{port}",
        "SHARDMAIL_INGRESS_PROCESSES": str(args.processes),
        "SHARDMAIL_SHARDS": "4",
        "SHARDMAIL_ME": "bench.shardmail.test",
    })
    with open(workdir / "shardmail.log", "wb") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
    try:
        wait_banner(port)
        sampler: PeakMemorySampler
        with peak_memory_sampler(lambda: with_descendants([supervisor.pid])) as sampler:
            if (SBIN / "smtp-source").is_file() or not args.smoke:
                result = run_smtp_source("127.0.0.1", port, sessions=args.sessions, messages=args.messages,
                                         size=args.size, reuse_connections=args.reuse)
                rate, problems = result.msg_per_s, result.errors or result.completed != args.messages
                detail = result.stderr[-500:]
            else:  # a smoke run without Postfix's tools: the project's own generator
                seconds, failed = run_load(port, args.messages, args.sessions, args.size, ["rcpt@example.org"])
                rate, problems, detail = args.messages / seconds, failed > 0, f"{failed} messages failed"
        status = subprocess.run([sys.executable, "-m", "ops.cli", "status", "--json"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=True)
        # the JSON is versioned (ops/depth.py): an object whose "total" sums the shards
        spooled = int(json.loads(status.stdout)["total"]["spooled"])
        if problems:
            print(f"shardmail: the load generator reported problems: {detail}", file=sys.stderr)
        return rate, sampler.peak_mib, spooled
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)


def run_postfix(workdir: Path, port: int, args: argparse.Namespace) -> tuple[float, float]:
    workdir.mkdir(mode=0o755)
    with postfix_instance(workdir / "postfix", port) as instance:
        with peak_memory_sampler(instance.pids) as sampler:
            result = run_smtp_source("127.0.0.1", port, sessions=args.sessions, messages=args.messages,
                                     size=args.size, reuse_connections=args.reuse)
            instance.wait_queue_empty(timeout=300)
        if result.errors or result.completed != args.messages:
            print(f"postfix: smtp-source reported problems: {result.stderr[-500:]}", file=sys.stderr)
        return result.msg_per_s, sampler.peak_mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--reuse", action="store_true", help="several messages per connection (smtp-source -d)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="shardmail SMTP processes")
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two sides this many times; medians")
    parser.add_argument("--smoke", action="store_true",
                        help="200 messages, one round, shardmail alone, seconds: checks the figures are produced")
    args = parser.parse_args()
    port, pause = 2527, 5.0
    if args.smoke:
        args.messages, args.sessions, args.rounds, args.processes = 200, 10, 1, 1
        args.skip_postfix, port, pause = True, free_port(), 0.0
    if not args.skip_postfix:
        ensure_postfix_tools()
    with tempfile.TemporaryDirectory(prefix="shardmail-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # Postfix's daemons run as the postfix user and must traverse it
        mode = "connection reuse" if args.reuse else "one connection per message"
        generator = "smtp-source" if (SBIN / "smtp-source").is_file() or not args.smoke else "bench.smtp_load"
        print(f"load: {generator}, {args.sessions} sessions, {args.messages} messages of {args.size} bytes, {mode}")
        ours: list[float] = []
        theirs: list[float] = []
        for round_no in range(1, args.rounds + 1):
            settle(pause)
            rate, mem, spooled = run_shardmail(workdir / f"s{round_no}", port, args)
            ours.append(rate)
            print(f"round {round_no} shardmail ({args.processes} SMTP processes): {rate:7.0f} msg/s"
                  f"   peak PSS {mem:6.1f} MiB   spooled {spooled}", flush=True)
            shutil.rmtree(workdir / f"s{round_no}", ignore_errors=True)
            if args.skip_postfix:
                continue
            settle()
            rate, mem = run_postfix(workdir / f"p{round_no}", 2526, args)
            theirs.append(rate)
            print(f"round {round_no} postfix                       : {rate:7.0f} msg/s   peak PSS {mem:6.1f} MiB",
                  flush=True)
            shutil.rmtree(workdir / f"p{round_no}", ignore_errors=True)
        print(f"median shardmail {statistics.median(ours):.0f} msg/s", end="")
        if theirs:
            ratio = statistics.median(ours) / statistics.median(theirs)
            print(f", postfix {statistics.median(theirs):.0f} msg/s, ratio {ratio:.2f}x")
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
