"""End-to-end local delivery benchmark: SMTP in → Maildir file present, shardmail against Postfix.

20 sessions send ``--messages`` messages of 5 KB, one connection each, to 100 users
(``user000``..``user099@test.example``; bench/smtp_load.py, the same generator for both sides).
shardmail: ``shardmail run`` (embedded Redis) with its users in a private OpenLDAP slapd.
Postfix: a private loopback instance delivering with its ``virtual`` agent to Maildirs, users from a
texthash map (Postfix's LDAP tables need the postfix-ldap package; a hash map is the faster choice
for Postfix, so the comparison does not flatter shardmail). A run ends when every message is a
file in a Maildir. Prints msg/s for each side, the ratio, and peak memory (sum of PSS; slapd is
counted on shardmail's side).

    .venv/bin/python -m bench.local_delivery [--messages 20000] [--rounds 1] [--cpu] [--workdir DIR] [--smoke]

``--smoke`` (for CI): 200 messages, one round, shardmail alone on a free port, with ``--cpu``; seconds.

``--cpu`` adds CPU milliseconds per message for each process role (user + system, from /proc, over
the measured run; Postfix's forked processes are counted through their master's reaped-children
figures) and for the whole machine (/proc/stat: kernel threads and anything else running too).
``--workdir`` keeps the runs instead of deleting them at the end: on a journal-less ext4, deleting
thousands of files makes every file creation in the same block group slower for minutes.
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
from pathlib import Path

from bench.ingress import free_port, wait_banner
from bench.postfix_peer import ensure_postfix_tools, peak_memory_sampler, postfix_instance, with_descendants
from bench.smtp_load import run_load

ROOT = Path(__file__).resolve().parent.parent
USERS = [f"user{i:03d}" for i in range(100)]
DELIVERY_TIMEOUT = 900.0


class Counter:
    """Files in the users' new/ directories; a directory is listed again only when its mtime moved
    (listing 100 growing directories 20 times a second cost the measured machine a share of a core),
    or when it had moved shortly before the last listing: the kernel stamps directories from a
    coarse clock, so a file linked in the same tick as a listing leaves the mtime as it was (a run
    once waited for ever on a count one short)."""

    SETTLED_NS = 100_000_000  # a listing this long after the last change saw every file of that mtime

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[str, tuple[int, int, int]] = {}  # user -> (mtime_ns, count, listed at, ns)

    def count(self) -> int:
        total = 0
        for user in USERS:
            path = self.root / user / "new"
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                continue
            known = self.seen.get(user)
            if known is None or known[0] != mtime or known[2] - mtime < self.SETTLED_NS:
                listed = time.time_ns()
                known = self.seen[user] = (mtime, len(os.listdir(path)), listed)
            total += known[1]
        return total


def delivered(root: Path) -> int:
    return Counter(root).count()


def wait_delivered(root: Path, count: int) -> None:
    counter = Counter(root)
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while counter.count() < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {delivered(root)} of {count} delivered")
        time.sleep(0.05)


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    text = " ".join(words)
    for key, name in (("ops.cli smtpd", "smtpd"), ("ops.cli qmqpd", "qmqpd"), ("worker local", "local pool"),
                      ("worker remote", "remote pool"),
                      ("ops.cli scheduler", "scheduler"), ("ops.cli run", "supervisor"), ("redis-server", "redis"),
                      ("slapd", "slapd")):
        if key in text:
            return name
    return Path(words[0]).name if words else "?"


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process, all its threads and its reaped children together;
    (0, 0) once it is gone (its parent's children figures then hold it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0, 0
    return int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14])


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's live threads: blocking waits
    (fsync, futex, epoll) against preemption (which depends on whatever else runs)."""
    voluntary = involuntary = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


Snapshot = dict[int, tuple[str, int, int, int, int]]  # pid -> (role, user, system, voluntary, involuntary)


def cpu_snapshot(pids: set[int]) -> Snapshot:
    """Per process: role, CPU ticks and context switches; 0 is this process (the load generator),
    -1 the whole machine (no switch counts for either)."""
    snap: Snapshot = {pid: (_role(pid), *cpu_ticks(pid), *switches(pid)) for pid in pids}
    self_usage = os.times()
    tick = os.sysconf("SC_CLK_TCK")
    snap[0] = ("load generator", round(self_usage.user * tick), round(self_usage.system * tick), 0, 0)
    with open("/proc/stat") as stat:  # the whole machine, kernel threads (journal, writeback) included
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in stat.readline().split()[1:8])
    snap[-1] = ("machine", user + nice, system + irq + softirq, 0, 0)
    return snap


def cpu_report(before: Snapshot, after: Snapshot, messages: int, side: str) -> None:
    """CPU ms per message by role (user + sys), and context switches per message, between two snapshots."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    roles: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    machine = [(after[-1][i] - before[-1][i]) * tick_ms / messages for i in (1, 2)]
    for pid in (before.keys() | after.keys()) - {-1}:
        role = (before.get(pid) or after[pid])[0]
        # a process gone by the end reads as zeros: its CPU is in its parent's reaped-children figures
        now, user, system, voluntary, involuntary = after.get(pid) or ("?", 0, 0, 0, 0)
        _, user0, system0, voluntary0, involuntary0 = before.get(pid) or (role, 0, 0, 0, 0)
        entry = roles.setdefault(role, [0.0, 0.0, 0])
        entry[0] += (user - user0) * tick_ms / messages
        entry[1] += (system - system0) * tick_ms / messages
        entry[2] += 1
        if now != "?":  # one that exited meanwhile (Postfix's forked processes) took its count with it
            counts = waits.setdefault(role, [0.0, 0.0])
            counts[0] += (voluntary - voluntary0) / messages
            counts[1] += (involuntary - involuntary0) / messages
    total = sum(u + s for u, s, _ in roles.values())
    parts = [f"{role} {u + s:.3f} ({u:.3f}u+{s:.3f}s, {n}p)" for role, (u, s, n) in sorted(roles.items())]
    print(f"  {side} CPU ms/msg: total {total:.3f}; " + "; ".join(parts), flush=True)
    print(f"  {side} context switches/msg (voluntary+involuntary, live threads): " + "; ".join(
        f"{role} {v:.1f}+{i:.1f}" for role, (v, i) in sorted(waits.items()) if v + i >= 0.05), flush=True)
    print(f"  {side} machine CPU ms/msg (all processes and kernel threads): {sum(machine):.2f} "
          f"({machine[0]:.2f}u+{machine[1]:.2f}s)", flush=True)


def port_free(port: int) -> None:
    """Refuse to start on a port something already answers on: shardmail binds with SO_REUSEPORT,
    so a second instance (another run of a benchmark) would silently share the connections and
    each side would count the other's mail (a run once waited for ever, 601 messages short)."""
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        raise SystemExit(f"127.0.0.1:{port} is in use (another benchmark running?); stop it first")


def users_ldif() -> str:
    return ("dn: dc=example,dc=test\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: bench\n\n"
            "dn: ou=people,dc=example,dc=test\nobjectClass: organizationalUnit\nou: people\n\n") + "\n".join(
        f"dn: uid={u},ou=people,dc=example,dc=test\nobjectClass: inetOrgPerson\nobjectClass: qmailUser\n"
        f"uid: {u}\ncn: {u}\nsn: {u}\nmail: {u}@test.example\nmailMessageStore: {u}/\n" for u in USERS)


def run_shardmail(workdir: Path, args: argparse.Namespace) -> tuple[float, float]:
    sys.path.insert(0, str(ROOT))
    from tests.slapd import Slapd

    ldif = workdir / "users.ldif"
    ldif.write_text(users_ldif())
    slapd = Slapd(workdir / "slapd", users_ldif=ldif)
    slapd.start()
    port = args.port
    port_free(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({"SHARDMAIL_VAR_DIR": str(workdir / "var"), "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{port}",
                "SHARDMAIL_ME": "mx.test.example", "SHARDMAIL_LOCALS": "test.example",
                "SHARDMAIL_LDAPSERVER": slapd.url, "SHARDMAIL_LDAPBASEDN": slapd.base_dn,
                "SHARDMAIL_LDAPMESSAGESTORE": str(workdir / "mail"),
                "SHARDMAIL_INGRESS_PROCESSES": str(args.ingress), "SHARDMAIL_LOCALPROCESSES": str(args.local),
                "SHARDMAIL_CONCURRENCYLOCAL": str(args.concurrency)})
    if args.ingress_threads:
        env["SHARDMAIL_INGRESS_THREADS"] = str(args.ingress_threads)
    with open(workdir / "shardmail.log", "wb") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
    try:
        wait_banner(port)
        pids = [supervisor.pid, slapd.proc.pid] if slapd.proc else [supervisor.pid]
        with peak_memory_sampler(lambda: pids) as sampler:  # the sampler adds the descendants
            measured = with_descendants(pids)
            before = cpu_snapshot(measured)
            started = time.perf_counter()
            _, failed = run_load(port, args.messages, 20, 5120, [f"{u}@test.example" for u in USERS])
            wait_delivered(workdir / "mail", args.messages - failed)
            elapsed = time.perf_counter() - started
            if args.cpu:
                cpu_report(before, cpu_snapshot(with_descendants(pids) | measured), args.messages, "shardmail")
        if failed:
            print(f"shardmail: {failed} messages failed at SMTP time", file=sys.stderr)
        return args.messages / elapsed, sampler.peak_mib
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
        slapd.stop()


def run_postfix(workdir: Path, args: argparse.Namespace) -> tuple[float, float]:
    port_free(2529)
    mail = workdir / "mail"
    mail.mkdir(parents=True)
    shutil.chown(mail, "nobody", "nogroup")
    maps = workdir / "mailboxes"
    maps.write_text("".join(f"{u}@test.example {u}/\n" for u in USERS))
    extra = f"""
virtual_transport = virtual
virtual_mailbox_domains = test.example
virtual_mailbox_base = {mail}
virtual_mailbox_maps = texthash:{maps}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
virtual_destination_concurrency_limit = 20
"""
    with postfix_instance(workdir / "postfix", 2529, extra_main_cf=extra) as instance:
        with peak_memory_sampler(instance.pids) as sampler:
            measured = set(instance.pids())
            before = cpu_snapshot(measured)
            started = time.perf_counter()
            _, failed = run_load(2529, args.messages, 20, 5120, [f"{u}@test.example" for u in USERS])
            wait_delivered(mail, args.messages - failed)
            elapsed = time.perf_counter() - started
            if args.cpu:
                # Postfix forks smtpd, cleanup and virtual as it goes: count what exists at the end too
                after = cpu_snapshot(measured | set(instance.pids()))
                cpu_report(before, after, args.messages, "postfix")
        if failed:
            print(f"postfix: {failed} messages failed at SMTP time", file=sys.stderr)
        return args.messages / elapsed, sampler.peak_mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ingress", type=int, default=0,
                        help="shardmail SMTP processes (0: its default, one per two cores; on two cores, 1 "
                             "against 2 in turn: 872 and 834 against 843 and 797 msg/s, 20 %% less CPU)")
    parser.add_argument("--local", type=int, default=1, help="shardmail local delivery processes")
    parser.add_argument("--concurrency", type=int, default=10, help="shardmail concurrencylocal")
    parser.add_argument("--ingress-threads", type=int, default=1,
                        help="shardmail ingress_threads (0: the configured default); one group-commit thread "
                             "takes bigger batches, made durable with two syncfs each: 1.0 against 1.2 ms of "
                             "smtpd CPU per message here")
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="print CPU ms per message of each process role")
    parser.add_argument("--workdir", type=Path, help="keep the runs under this directory instead of deleting "
                        "them at the end (deleting many files slows file creation here for minutes after)")
    parser.add_argument("--smoke", action="store_true",
                        help="200 messages, one round, shardmail alone, seconds: checks the figures are produced")
    args = parser.parse_args()
    args.port = 2528
    if args.smoke:
        args.messages, args.rounds, args.skip_postfix, args.cpu, args.port = 200, 1, True, True, free_port()
    if not args.skip_postfix:
        ensure_postfix_tools()
    ours: list[float] = []
    theirs: list[float] = []
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="shardmail-bench-", dir=args.workdir))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shardmail-bench-")))
        workdir.chmod(0o755)
        for round_no in range(1, args.rounds + 1):
            os.sync()
            (workdir / f"s{round_no}").mkdir(mode=0o755)
            rate, mem = run_shardmail(workdir / f"s{round_no}", args)
            ours.append(rate)
            print(f"round {round_no} shardmail: {rate:7.0f} msg/s   peak PSS {mem:6.1f} MiB", flush=True)
            if args.skip_postfix:
                continue
            os.sync()
            (workdir / f"p{round_no}").mkdir(mode=0o755)
            rate, mem = run_postfix(workdir / f"p{round_no}", args)
            theirs.append(rate)
            print(f"round {round_no} postfix  : {rate:7.0f} msg/s   peak PSS {mem:6.1f} MiB", flush=True)
    line = f"median shardmail {statistics.median(ours):.0f} msg/s"
    if theirs:
        ratio = statistics.median(ours) / statistics.median(theirs)
        line += f", postfix {statistics.median(theirs):.0f} msg/s, ratio {ratio:.2f}x"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
