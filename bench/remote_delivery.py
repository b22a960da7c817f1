"""Remote delivery benchmark: a queue of messages drained to SMTP sinks, shardmail against Postfix.

Two scenarios, each side loaded first over SMTP (bench/smtp_load.py, the same generator) with its
delivery held, then released; the clock runs from the release until the queue is empty (every
message answered 250 by a sink and removed):

* ``fast``: ``--messages`` (20,000) messages of 5 KB to one Postfix ``smtp-sink`` without delay;
* ``slow``: ``--slow-messages`` (5,000) spread over 50 destination domains, each its own
  ``smtp-sink -w 1`` (one second before answering DATA) on 127.0.2.1..50; a per-destination limit
  of 20 on both sides, Postfix otherwise at its defaults (``default_process_limit`` 100),
  shardmail with ``concurrencyremote`` = ``--sessions`` (default 1000).

Routing is static on both sides (shardmail's ``smtproutes``, Postfix's ``transport_maps``), so no
DNS is involved. shardmail: ``shardmail run`` with ``remoteprocesses = 0`` while loading, then one
``shardmail worker remote``; Postfix: a private instance (bench/postfix_peer.py) loading with
``defer_transports = smtp``, released by ``postfix reload`` + ``postqueue -f``. Peak memory is
the sum of PSS: shardmail's remote pool and Redis, every Postfix process; CPU per message is theirs
too, over the drain (a figure the machine's noise moves less than the rate). Sides alternate for
``--rounds`` rounds and the medians give the ratio. Loopback only; everything stops by itself.

    .venv/bin/python -m bench.remote_delivery [--scenario fast|slow|both] [--rounds 1] [--smoke]

``--smoke`` (for CI): both scenarios with 200 and 100 messages, one round, shardmail alone, free ports,
no pause; it needs Postfix's ``smtp-sink`` already installed (scripts/setup.sh does) and never
installs or starts Postfix.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.ingress import free_port, wait_banner
from bench.local_delivery import cpu_ticks
from bench.postfix_peer import SBIN, ensure_postfix_tools, peak_memory_sampler, postfix_instance, with_descendants
from bench.smtp_load import run_load

ROOT = Path(__file__).resolve().parent.parent
SINK_PORT = 2600
DRAIN_TIMEOUT = 900.0


def destinations(scenario: str) -> list[tuple[str, str]]:
    """(domain, sink address) for each destination of a scenario."""
    count = 1 if scenario == "fast" else 50
    return [(f"sink{n}.bench", f"127.0.2.{n}") for n in range(1, count + 1)]


@contextlib.contextmanager
def sinks(scenario: str, smoke: bool = False) -> Iterator[None]:
    if smoke and not (SBIN / "smtp-sink").is_file():
        raise SystemExit("--smoke needs Postfix's smtp-sink installed (scripts/setup.sh installs it)")
    binary = str((SBIN if smoke else ensure_postfix_tools()) / "smtp-sink")
    delay = ["-w", "1"] if scenario == "slow" else []
    procs = [subprocess.Popen([binary, "-u", "nobody", "-m", "1024", *delay, f"{address}:{SINK_PORT}", "1024"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _, address in destinations(scenario)]
    try:
        for _, address in destinations(scenario):
            deadline = time.monotonic() + 10
            while not _connectable(address, SINK_PORT):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink on {address} did not start")
                time.sleep(0.05)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _connectable(address: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def recipients(scenario: str) -> list[str]:
    return [f"user{i}@{domain}" for i in range(20) for domain, _ in destinations(scenario)]


def wait_until_empty(count: callable, timeout: float = DRAIN_TIMEOUT) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while True:
        left = count()
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left} messages still queued")
        time.sleep(0.05)


def spooled(root: Path) -> int:
    total = 0
    for shard in root.glob("s*"):
        for split in (shard / "queue").iterdir():
            total += len(os.listdir(split))
    return total


def cpu_ms(pids: set[int]) -> float:
    """User + system CPU of these processes, their threads and reaped children, in ms."""
    return sum(sum(cpu_ticks(pid)) for pid in pids) * 1000 / os.sysconf("SC_CLK_TCK")


def run_shardmail(workdir: Path, scenario: str, messages: int, args: argparse.Namespace
                  ) -> tuple[float, float, float]:
    port = args.port
    routes = ",".join(f"{domain}:{address}:{SINK_PORT}" for domain, address in destinations(scenario))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({"SHARDMAIL_VAR_DIR": str(workdir / "var"), "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{port}",
                "SHARDMAIL_ME": "bench.shardmail.test", "SHARDMAIL_REMOTEPROCESSES": "0",
                "SHARDMAIL_SMTPROUTES": routes, "SHARDMAIL_CONCURRENCYDESTINATION": "20",
                "SHARDMAIL_CONCURRENCYREMOTE": str(args.sessions if scenario == "slow" else 200),
                "SHARDMAIL_TLSREMOTE": "none"})
    log = open(workdir / "shardmail.log", "wb")  # noqa: SIM115 - closed in finally
    supervisor = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    pool = None
    try:
        wait_banner(port)
        _, failed = run_load(port, messages, 20, 5120, recipients(scenario))
        if failed:
            raise RuntimeError(f"{failed} messages refused while loading shardmail")
        spool = workdir / "var" / "spool"
        wait_until_empty(lambda: messages - spooled(spool), 60)
        env["SHARDMAIL_REDIS_URL"] = f"unix://{workdir / 'var' / 'redis' / 'redis.sock'}"
        redis_pid = [p for p in with_descendants([supervisor.pid]) if "redis-server" in _cmdline(p)]
        started = time.perf_counter()
        pool = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "remote"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        cpu_before = cpu_ms(set(redis_pid))
        with peak_memory_sampler(lambda: {pool.pid, *redis_pid}) as sampler:
            wait_until_empty(lambda: spooled(spool))
            seconds = time.perf_counter() - started
            cpu = cpu_ms({pool.pid, *redis_pid}) - cpu_before  # the pool's start-up included
        return messages / seconds, sampler.peak_mib, cpu / messages
    finally:
        for proc in (pool, supervisor):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        log.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_postfix(workdir: Path, scenario: str, messages: int) -> tuple[float, float, float]:
    port = 2530
    transport = workdir / "transport"
    transport.parent.mkdir(parents=True, exist_ok=True)
    transport.write_text("".join(f"{domain} smtp:[{address}]:{SINK_PORT}\n"
                                 for domain, address in destinations(scenario)))
    # deliver by SMTP through the transport map (postfix_peer's defaults route everything to discard);
    # mail for the sinks is held (defer_transports) while the queue is loaded
    extra = (f"default_transport = smtp\nrelay_transport = smtp\ntransport_maps = texthash:{transport}\n"
             "defer_transports = smtp\ndefault_destination_concurrency_limit = 20\n")
    with postfix_instance(workdir / "postfix", port, extra_main_cf=extra) as inst:
        _, failed = run_load(port, messages, 20, 5120, recipients(scenario))
        if failed:
            raise RuntimeError(f"{failed} messages refused while loading Postfix")
        main_cf = inst.config_dir / "main.cf"
        main_cf.write_text(main_cf.read_text().replace("defer_transports = smtp\n", ""))
        deadline = time.monotonic() + 120
        while _incoming(inst.queue_dir) and time.monotonic() < deadline:  # every message through cleanup/qmgr
            time.sleep(0.1)
        master = inst.master_pid()
        cpu_before = cpu_ms({master}) if master else 0.0  # smtp and qmgr are its children, reaped by it
        started = time.perf_counter()
        inst.postfix("reload")
        subprocess.run([str(ensure_postfix_tools() / "postqueue"), "-c", str(inst.config_dir), "-f"], check=True,
                       timeout=60, capture_output=True)
        with peak_memory_sampler(inst.pids) as sampler:
            inst.wait_queue_empty(DRAIN_TIMEOUT)
            seconds = time.perf_counter() - started
            cpu = cpu_ms(inst.pids()) - cpu_before  # master, its reaped children, and those still running
        return messages / seconds, sampler.peak_mib, cpu / messages


def _incoming(queue_dir: Path) -> int:
    return sum(len(files) for sub in ("maildrop", "incoming") for _, _, files in os.walk(queue_dir / sub))


def scenario_run(scenario: str, messages: int, args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[float, float, float]]] = {"shardmail": [], "postfix": []}
    with sinks(scenario, args.smoke):
        for round_no in range(args.rounds):
            order = ["shardmail", "postfix"] if round_no % 2 == 0 else ["postfix", "shardmail"]
            for side in order:
                if side == "postfix" and args.skip_postfix:
                    continue
                workdir = Path(tempfile.mkdtemp(prefix=f"bench-remote-{side}-", dir="/var/tmp"))
                workdir.chmod(0o755)
                try:
                    subprocess.run(["sync"], check=False)
                    time.sleep(args.pause)
                    run = run_shardmail if side == "shardmail" else run_postfix
                    rate, peak, cpu = (run(workdir, scenario, messages, args) if side == "shardmail"
                                       else run(workdir, scenario, messages))  # type: ignore[call-arg]
                    results[side].append((rate, peak, cpu))
                    print(f"{scenario} round {round_no + 1} {side}: {rate:.1f} msg/s, peak PSS {peak:.0f} MiB, "
                          f"CPU {cpu:.2f} ms/msg", flush=True)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
    ours = statistics.median(r for r, _, _ in results["shardmail"])
    cpu_ours = statistics.median(c for _, _, c in results["shardmail"])
    if not results["postfix"]:
        print(f"{scenario}: shardmail {ours:.1f} msg/s, peak PSS {max(p for _, p, _ in results['shardmail']):.0f} "
              f"MiB, CPU per message {cpu_ours:.2f} ms (Postfix skipped)", flush=True)
        return
    theirs = statistics.median(r for r, _, _ in results["postfix"])
    cpu_theirs = statistics.median(c for _, _, c in results["postfix"])
    print(f"{scenario}: shardmail {ours:.1f} msg/s, Postfix {theirs:.1f} msg/s, ratio {ours / theirs:.2f}x; "
          f"peak PSS shardmail {max(p for _, p, _ in results['shardmail']):.0f} MiB, "
          f"Postfix {max(p for _, p, _ in results['postfix']):.0f} MiB; CPU per message shardmail "
          f"{cpu_ours:.2f} ms, Postfix {cpu_theirs:.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["fast", "slow", "both"], default="both")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--slow-messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=1000, help="shardmail's concurrencyremote in 'slow'")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="200 + 100 messages, one round, shardmail alone, seconds: checks the figures are produced")
    args = parser.parse_args()
    global SINK_PORT
    args.port, args.pause = 2529, 2.0
    if args.smoke:
        args.messages, args.slow_messages, args.rounds, args.skip_postfix, args.pause = 200, 100, 1, True, 0.0
        args.scenario, args.port, SINK_PORT = "both", free_port(), free_port()
    if os.geteuid() != 0:
        sys.exit("run as root: it starts Postfix and binds loopback addresses")
    for scenario in (["fast", "slow"] if args.scenario == "both" else [args.scenario]):
        scenario_run(scenario, args.messages if scenario == "fast" else args.slow_messages, args)


if __name__ == "__main__":
    main()
