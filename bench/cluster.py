"""Redis cost per delivered message: one node against three on the same Redis.

A private redis-server on loopback TCP (as a cluster reaches it; ``--unix`` for a socket) serves
one node, then three (``n1``..``n3``, one ``redis_prefix``, their own directories, SMTP on free
ports of 127.0.0.1), each a ``shardmail run`` with its defaults: one SMTP process, one local and
one (idle) remote pool, one scheduler, four shards. ``--messages`` messages of 5 KB go in over
SMTP (bench/smtp_load.py, 20 sessions in all, spread evenly over the nodes) to 100 local users and
are delivered into Maildirs; the window ends when every message is a file, every spool is empty
and every local queue and claim registry in Redis is empty. Before it, the nodes run for
``--idle`` seconds without mail: heartbeats, leases, the schedulers' and the pools' polls.

From Redis's own INFO at the edges of each window (stats, cpu, commandstats): Redis CPU (user +
system of the server process), commands (as Redis counts them: those a script runs included),
reads (one per request batch a client sends: round trips), bytes in and out; per delivered
message raw, and idle-corrected (the idle rate times the window's length taken off first), and
the projected messages per second one Redis core carries (1e6 / us per message). The benchmark's
own requests (INFO, the end-of-window check) go over one raw connection whose bytes and commands
are counted and taken off. Configurations alternate round by round (1, 3, then 3, 1, ...); the
Redis server is the same for all (flushed between runs). There is no Postfix peer: this is a
Redis-cost figure, and Postfix has no Redis.

    .venv/bin/python -m bench.cluster [--messages 5000] [--rounds 3] [--idle 10] [--nodes 3] [--unix] [--smoke]

``--smoke`` (for CI): 150 messages, one round, a short idle window; every figure line printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.ingress import free_port, wait_banner
from bench.local_delivery import USERS, Counter, users_ldif
from bench.smtp_load import run_spread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PREFIX = "bench"
SHARDS = 4
SESSIONS = 20
SIZE = 5120
TARGET_US = 25.0  # Redis CPU per delivered message (DESIGN §4: one Redis core >= 40,000 msg/s)
MARGIN = 0.10  # three nodes may cost this much more per message than one and still count as "no more" (noise)
DELIVERY_TIMEOUT = 900.0


class Probe:
    """One raw RESP connection to the server, counting its own traffic (bytes each way, commands by
    name, reads and writes as Redis counts them) so that a window's figures can be cleared of it."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.buffer = b""
        self.bytes_in = self.bytes_out = self.reads = self.writes = 0  # as the server sees them
        self.calls: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def _encode(args: tuple[str, ...]) -> bytes:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _reply(self) -> tuple[object, int]:
        """One reply (integer, simple string or bulk string) and its length on the wire."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            while len(self.buffer) < size + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                self.buffer += chunk
            data, self.buffer = self.buffer[:size], self.buffer[size + 2:]
            return data, len(line) + 2 + size + 2
        if kind == b"-":
            raise RuntimeError(rest.decode())
        return (int(rest) if kind == b":" else rest), len(line) + 2

    def pipeline(self, *commands: tuple[str, ...]) -> list[object]:
        """Commands in one write, their replies read back; all counted."""
        request = b"".join(self._encode(c) for c in commands)
        self.sock.sendall(request)
        self.bytes_in += len(request)
        self.reads += 1
        answers = []
        for command in commands:
            answer, size = self._reply()
            answers.append(answer)
            self.bytes_out += size
            self.calls[command[0].lower()] = self.calls.get(command[0].lower(), 0) + 1
        self.writes += 1
        return answers

    def snapshot(self) -> Stats:
        """The server's counters, with what this connection had sent until the moment INFO ran:
        its request read (bytes in, a read), its reply not yet written, INFO not yet counted."""
        request = self._encode(("INFO", "stats", "cpu", "commandstats"))
        own = Own(self.bytes_in + len(request), self.bytes_out, self.reads + 1, self.writes, dict(self.calls))
        self.sock.sendall(request)
        raw, size = self._reply()
        self.bytes_in += len(request)
        self.bytes_out += size
        self.reads += 1
        self.writes += 1
        self.calls["info"] = self.calls.get("info", 0) + 1
        assert isinstance(raw, bytes)
        fields: dict[str, str] = {}
        for line in raw.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key] = value
        commands = {}
        for key, value in fields.items():
            if key.startswith("cmdstat_"):
                parts = dict(p.split("=") for p in value.split(","))
                commands[key.removeprefix("cmdstat_")] = (int(parts["calls"]), int(parts["usec"]))
        return Stats(time.perf_counter(), float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"]),
                     int(fields["total_commands_processed"]), int(fields["total_net_input_bytes"]),
                     int(fields["total_net_output_bytes"]), int(fields["total_reads_processed"]),
                     int(fields["total_writes_processed"]), commands, own)


@dataclass(frozen=True)
class Own:
    """The probe's own traffic, as far as the server had counted it at a snapshot."""

    bytes_in: int
    bytes_out: int
    reads: int
    writes: int
    calls: dict[str, int]


@dataclass(frozen=True)
class Stats:
    at: float
    cpu: float  # s, user + system of the server process
    commands: int
    bytes_in: int
    bytes_out: int
    reads: int
    writes: int
    per_command: dict[str, tuple[int, int]]  # name -> (calls, usec)
    own: Own


@dataclass
class Window:
    """What the nodes cost Redis between two snapshots, the probe's own traffic taken off."""

    seconds: float
    cpu_us: float
    commands: int
    bytes_in: int
    bytes_out: int
    reads: int
    per_command: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def between(cls, a: Stats, b: Stats) -> Window:
        own_calls = {k: b.own.calls.get(k, 0) - a.own.calls.get(k, 0) for k in b.own.calls}
        per_command = {}
        for name, (calls, usec) in b.per_command.items():
            calls0, usec0 = a.per_command.get(name, (0, 0))
            mine = own_calls.get(name, 0)
            if calls - calls0 - mine > 0:  # the probe's own commands' time goes with them (a few us)
                per_command[name] = (calls - calls0 - mine, usec - usec0 if not mine else
                                     round((usec - usec0) * (calls - calls0 - mine) / (calls - calls0)))
        return cls(b.at - a.at, (b.cpu - a.cpu) * 1e6, b.commands - a.commands - sum(own_calls.values()),
                   b.bytes_in - a.bytes_in - (b.own.bytes_in - a.own.bytes_in),
                   b.bytes_out - a.bytes_out - (b.own.bytes_out - a.own.bytes_out),
                   b.reads - a.reads - (b.own.reads - a.own.reads), per_command)


@dataclass
class Run:
    nodes: int
    messages: int
    idle: Window
    load: Window

    def rate(self) -> float:
        return self.messages / self.load.seconds

    def cpu_raw(self) -> float:
        return self.load.cpu_us / self.messages

    def cpu_corrected(self) -> float:
        return (self.load.cpu_us - self.idle.cpu_us / self.idle.seconds * self.load.seconds) / self.messages

    def per_message(self, value: float, idle_value: float, corrected: bool = False) -> float:
        if corrected:
            value -= idle_value / self.idle.seconds * self.load.seconds
        return value / self.messages


def start_redis(directory: Path, unix: bool) -> tuple[subprocess.Popen[bytes], str | tuple[str, int], str]:
    """A private redis-server (no persistence); its address for the probe and its URL for the nodes."""
    binary = shutil.which("redis-server") or "redis-server"
    address: str | tuple[str, int]
    if unix:
        sock = str(directory / "redis.sock")
        argv, address, url = ["--port", "0", "--unixsocket", sock], sock, f"unix://{sock}"
    else:
        port = free_port()
        argv, address, url = (["--port", str(port), "--bind", "127.0.0.1"], ("127.0.0.1", port),
                              f"redis://127.0.0.1:{port}/0")
    proc = subprocess.Popen([binary, *argv, "--save", "", "--appendonly", "no", "--dir", str(directory),
                             "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe = Probe(address)
            probe.pipeline(("PING",))
            probe.close()
            return proc, address, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


@dataclass
class Node:
    name: str
    env: dict[str, str]
    port: int
    mail: Path
    proc: subprocess.Popen[bytes] | None = None


def node_env(workdir: Path, name: str, port: int, url: str) -> dict[str, str]:
    workdir.mkdir(parents=True, mode=0o755)
    (workdir / "users.ldif").write_text(users_ldif())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMAIL_")}
    env.update({"SHARDMAIL_VAR_DIR": str(workdir / "var"), "SHARDMAIL_SMTP_LISTEN": f"127.0.0.1:{port}",
                "SHARDMAIL_REDIS_URL": url, "SHARDMAIL_REDIS_PREFIX": PREFIX, "SHARDMAIL_NODE": name,
                "SHARDMAIL_ME": f"{name}.test.example", "SHARDMAIL_LOCALS": "test.example",
                "SHARDMAIL_USERS_LDIF": str(workdir / "users.ldif"),
                "SHARDMAIL_LDAPMESSAGESTORE": str(workdir / "mail"), "SHARDMAIL_SHARDS": str(SHARDS),
                "SHARDMAIL_INGRESS_PROCESSES": "1", "SHARDMAIL_METRICS_LISTEN": ""})
    return env


@contextlib.contextmanager
def cluster(workdir: Path, count: int, url: str) -> Iterator[list[Node]]:
    """``count`` nodes n1.. running ``shardmail run`` against one Redis, stopped at the end."""
    nodes = []
    for i in range(1, count + 1):
        port = free_port()
        nodes.append(Node(f"n{i}", node_env(workdir / f"n{i}", f"n{i}", port, url), port, workdir / f"n{i}" / "mail"))
    try:
        for node in nodes:
            with open(workdir / node.name / "shardmail.log", "wb") as log:
                node.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], cwd=ROOT, env=node.env,
                                             stdout=log, stderr=subprocess.STDOUT)
        for node in nodes:
            wait_banner(node.port, timeout=60)
        yield nodes
    finally:
        for node in nodes:
            if node.proc and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes:
            if node.proc:
                try:
                    node.proc.wait(60)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()


def redis_keys(nodes: list[Node]) -> list[str]:
    """Every local queue list and its claim registry (rq's StartedJobRegistry) of these nodes."""
    import redis
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from core.jobs import queue_name
    from core.shards import Namespace

    keys = []
    for node in nodes:
        space = Namespace(PREFIX, node.name)
        for shard in range(SHARDS):
            queue = Queue(queue_name(space, shard, "local"), connection=redis.Redis())  # never connects
            keys += [queue.key, StartedJobRegistry(queue=queue).key]
    return keys


def wait_ready(probe: Probe, count: int) -> None:
    """Until every node's schedulers and pools are up: the node registry and rq's worker registry
    list them all (two pools a node)."""
    deadline = time.monotonic() + 120
    while True:
        nodes, workers = probe.pipeline(("SCARD", f"{PREFIX}:nodes"), ("SCARD", "rq:workers"))
        if nodes == count and workers == 2 * count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{nodes} nodes and {workers} pools registered, {count} and {2 * count} expected")
        time.sleep(0.1)


def spooled(nodes: list[Node]) -> int:
    from core.config import load
    from core.shards import ShardMap

    return sum(len(list(ShardMap(load(env=n.env)).spool(s).ids())) for n in nodes for s in range(SHARDS))


def wait_delivered(nodes: list[Node], messages: int, probe: Probe, keys: list[str]) -> None:
    """Every message a file in a Maildir, every spool empty, and then (one Redis check per poll,
    counted by the probe) every local queue and claim registry empty: the last finish is in."""
    counters = [Counter(n.mail) for n in nodes]
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while sum(c.count() for c in counters) < messages or spooled(nodes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(c.count() for c in counters)} of {messages} delivered, "
                               f"{spooled(nodes)} still spooled")
        time.sleep(0.05)
    while any(probe.pipeline(*((("LLEN" if i % 2 == 0 else "ZCARD"), k) for i, k in enumerate(keys)))):
        if time.monotonic() > deadline:
            raise TimeoutError("the queues did not empty")
        time.sleep(0.02)


def run_once(workdir: Path, count: int, args: argparse.Namespace, probe: Probe, url: str) -> Run:
    probe.pipeline(("FLUSHALL",))
    with cluster(workdir, count, url) as nodes:
        wait_ready(probe, count)
        time.sleep(args.settle)  # start-up work (first sweeps, first heartbeats) is no window's
        before = probe.snapshot()
        time.sleep(args.idle)
        idle = Window.between(before, probe.snapshot())
        keys = redis_keys(nodes)
        per_node = [args.messages // count + (1 if i < args.messages % count else 0) for i in range(count)]
        sessions = [SESSIONS // count + (1 if i < SESSIONS % count else 0) for i in range(count)]
        before = probe.snapshot()
        _, failed = run_spread([(n.port, m, s) for n, m, s in zip(nodes, per_node, sessions, strict=True)], SIZE,
                               [f"{u}@test.example" for u in USERS])
        if failed:
            raise RuntimeError(f"{failed} messages failed at SMTP time")
        wait_delivered(nodes, args.messages, probe, keys)
        load = Window.between(before, probe.snapshot())
    return Run(count, args.messages, idle, load)


def _node_label(count: int) -> str:
    return f"{count} node" + ("s" if count > 1 else "")


def report_round(round_no: int, run: Run) -> None:
    load, idle, n = run.load, run.idle, run.messages
    label = _node_label(run.nodes)
    print(f"round {round_no} {label}: {n} messages in {load.seconds:.1f} s ({run.rate():.0f} msg/s); Redis CPU "
          f"{run.cpu_raw():.1f} us/msg raw, {run.cpu_corrected():.1f} idle-corrected; {load.commands / n:.1f} "
          f"commands, {load.reads / n:.2f} reads, {load.bytes_in / n:.0f} B in, {load.bytes_out / n:.0f} B out "
          f"per msg", flush=True)
    print(f"round {round_no} {label} idle: Redis CPU {idle.cpu_us / idle.seconds:.0f} us/s "
          f"({idle.cpu_us / idle.seconds / 1e4:.2f} % of a core), {idle.commands / idle.seconds:.1f} commands/s, "
          f"{idle.reads / idle.seconds:.1f} reads/s", flush=True)


def _row(title: str, values: list[float], fmt: str) -> str:
    return f"{title:<40}" + "".join(f"{format(v, fmt):>14}" for v in values)


def summary(runs: dict[int, list[Run]], margin: float) -> None:
    counts = sorted(runs)
    med = {c: {
        "rate": statistics.median(r.rate() for r in runs[c]),
        "raw": statistics.median(r.cpu_raw() for r in runs[c]),
        "corrected": statistics.median(r.cpu_corrected() for r in runs[c]),
        "commands": statistics.median(r.load.commands / r.messages for r in runs[c]),
        "commands_corrected": statistics.median(r.per_message(r.load.commands, r.idle.commands, True)
                                                for r in runs[c]),
        "reads": statistics.median(r.load.reads / r.messages for r in runs[c]),
        "reads_corrected": statistics.median(r.per_message(r.load.reads, r.idle.reads, True) for r in runs[c]),
        "in": statistics.median(r.load.bytes_in / r.messages for r in runs[c]),
        "out": statistics.median(r.load.bytes_out / r.messages for r in runs[c]),
        "idle_cpu": statistics.median(r.idle.cpu_us / r.idle.seconds for r in runs[c]),
        "idle_commands": statistics.median(r.idle.commands / r.idle.seconds for r in runs[c]),
        "idle_reads": statistics.median(r.idle.reads / r.idle.seconds for r in runs[c]),
    } for c in counts}
    rounds = len(runs[counts[0]])
    print(f"\nmedians of {rounds} round(s), {runs[counts[0]][0].messages} messages each "
          f"(per delivered message unless marked /s)")
    print(f"{'':<40}" + "".join(f"{_node_label(c):>14}" for c in counts))
    rows = [("delivered msg/s", "rate", ",.0f"), ("Redis CPU us/msg, raw", "raw", ".1f"),
            ("Redis CPU us/msg, idle-corrected", "corrected", ".1f"), ("commands/msg, raw", "commands", ".1f"),
            ("commands/msg, idle-corrected", "commands_corrected", ".1f"), ("reads/msg, raw", "reads", ".2f"),
            ("reads/msg, idle-corrected", "reads_corrected", ".2f"), ("bytes in/msg", "in", ",.0f"),
            ("bytes out/msg", "out", ",.0f"), ("idle Redis CPU us/s", "idle_cpu", ",.0f"),
            ("idle commands/s", "idle_commands", ",.1f"), ("idle reads/s", "idle_reads", ",.1f")]
    for title, key, fmt in rows:
        print(_row(title, [med[c][key] for c in counts], fmt))
    print(_row("one Redis core, msg/s (raw)", [1e6 / med[c]["raw"] for c in counts], ",.0f"))
    print(_row("one Redis core, msg/s (idle-corrected)", [1e6 / max(med[c]["corrected"], 1e-9) for c in counts],
               ",.0f"))
    breakdown(runs)
    print("\npeer: none (a Redis-cost figure: Postfix has no Redis)")
    one, many = counts[0], counts[-1]
    for kind in ("raw", "corrected"):
        name = "raw" if kind == "raw" else "idle-corrected"
        worst = max(med[c][kind] for c in counts)
        verdict = "PASS" if worst <= TARGET_US else "FAIL"
        print(f"target {name}: Redis CPU per delivered message <= {TARGET_US:.0f} us (one Redis core >= "
              f"{1e6 / TARGET_US:,.0f} msg/s): " + ", ".join(f"{_node_label(c)} {med[c][kind]:.1f} us" for c in counts)
              + f": {verdict}")
        ratio = med[many][kind] / med[one][kind]
        verdict = "PASS" if ratio <= 1 + margin else "FAIL"
        print(f"target {name}: {_node_label(many)} on one Redis cost no more Redis CPU per message than "
              f"{_node_label(one)} ({margin:.0%} noise margin): {med[many][kind]:.1f} against {med[one][kind]:.1f} "
              f"us, {ratio:.2f}x: {verdict}")


def breakdown(runs: dict[int, list[Run]], top: int = 14) -> None:
    """INFO commandstats summed over every round's load (per message) and idle (per second)
    windows; a script's usec include the commands it runs, which are counted again on their own."""
    counts = sorted(runs)
    load: dict[int, dict[str, list[int]]] = {}
    idle: dict[int, dict[str, list[float]]] = {}
    for c in counts:
        load[c], idle[c] = {}, {}
        messages = sum(r.messages for r in runs[c])
        seconds = sum(r.idle.seconds for r in runs[c])
        for r in runs[c]:
            for name, (calls, usec) in r.load.per_command.items():
                entry = load[c].setdefault(name, [0, 0])
                entry[0] += calls
                entry[1] += usec
            for name, (calls, usec) in r.idle.per_command.items():
                idle_entry = idle[c].setdefault(name, [0.0, 0.0])
                idle_entry[0] += calls / seconds
                idle_entry[1] += usec / seconds
        for entry in load[c].values():
            entry[:] = [entry[0] / messages, entry[1] / messages]  # type: ignore[list-item]
    last = counts[-1]
    names = sorted(load[last], key=lambda n: -load[last][n][1])[:top]
    print("\ncommandstats per delivered message (calls, usec in the command), load windows, all rounds:")
    print(f"{'':<24}" + "".join(f"{_node_label(c) + ' calls':>16}{'usec':>8}" for c in counts))
    for name in names:
        print(f"{name:<24}" + "".join(f"{load[c].get(name, [0, 0])[0]:>16.3f}{load[c].get(name, [0, 0])[1]:>8.2f}"
                                      for c in counts))
    names = sorted(idle[last], key=lambda n: -idle[last][n][1])[:8]
    print("commandstats per second, idle windows:")
    for name in names:
        print(f"{name:<24}" + "".join(f"{idle[c].get(name, [0, 0])[0]:>16.1f}{idle[c].get(name, [0, 0])[1]:>8.0f}"
                                      for c in counts))
    print("(evalsha's usec include the commands its script runs; those are also counted under their own names)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3, help="the bigger configuration (against one node)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window before each load")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after start-up before the idle window")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help="noise margin of the N-against-one comparison (default 0.10)")
    parser.add_argument("--unix", action="store_true", help="Redis on a unix socket instead of loopback TCP")
    parser.add_argument("--workdir", type=Path, help="keep the runs under this directory")
    parser.add_argument("--smoke", action="store_true", help="150 messages, one round, a 1 s idle window: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds, args.idle, args.settle = 150, 1, 1.0, 0.5
    print(f"Redis cost per delivered message: 1 node against {args.nodes}, {args.messages} messages of {SIZE} B, "
          f"{SESSIONS} SMTP sessions, {SHARDS} shards a node, Redis over {'a unix socket' if args.unix else 'TCP'}",
          flush=True)
    runs: dict[int, list[Run]] = {1: [], args.nodes: []}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="shardmail-cluster-", dir=args.workdir))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shardmail-cluster-")))
        workdir.chmod(0o755)
        (workdir / "redis").mkdir()
        redis_proc, address, url = start_redis(workdir / "redis", args.unix)
        stack.callback(redis_proc.wait, 10)
        stack.callback(redis_proc.terminate)
        probe = Probe(address)
        stack.callback(probe.close)
        for round_no in range(1, args.rounds + 1):
            order = [1, args.nodes] if round_no % 2 else [args.nodes, 1]
            for count in order:
                os.sync()
                run = run_once(workdir / f"r{round_no}-{count}", count, args, probe, url)
                runs[count].append(run)
                report_round(round_no, run)
    summary(runs, args.margin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
