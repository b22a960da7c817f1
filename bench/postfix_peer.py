"""Postfix as the reference peer for shardmail's SMTP accept-rate benchmark.

Postfix is the yardstick: a mature MTA that fsyncs every queue file before it
answers 250 to DATA. Running it on the same machine, against the same load
generator (Postfix's own ``smtp-source``), tells us what a durable accept path
costs here, so shardmail's figures can be read against it.

Everything runs on loopback only: the system Postfix is installed without a
configuration (so nothing listens on port 25), and the benchmark runs a
private instance with its own config, queue and data directories.

Run ``python -m bench.postfix_peer`` (as root) to measure the Postfix side alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SBIN = Path("/usr/sbin")
_TOOLS = ("smtp-source", "smtp-sink", "postfix", "postconf", "postqueue", "postsuper")
_MASTER = Path("/usr/lib/postfix/sbin/master")
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Directories that hold a message until it has been handled; empty means done.
_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")

DEFAULT_SENDER = "bench@example.net"
DEFAULT_RECIPIENT = "rcpt@example.org"
DEFAULT_HELO = "bench-client.example.net"


def _run(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command with a hard timeout, capturing text output, raising on failure."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def _tools_present() -> bool:
    return all((SBIN / t).is_file() for t in _TOOLS) and _MASTER.is_file()


# --------------------------------------------------------------------------- install


def ensure_postfix_tools(timeout: float = 600.0) -> Path:
    """Make smtp-source, smtp-sink and the Postfix daemons available; return their sbin dir.

    Installs Debian's ``postfix`` package with debconf's "No configuration", which
    leaves /etc/postfix/main.cf absent: the init script and the systemd unit both
    refuse to start without it, so no system Postfix listens anywhere. A temporary
    policy-rc.d (only if none exists) also forbids service starts during the install,
    and a system master that is nonetheless running after *our* install is stopped.
    Returns at once when the tools are already there.
    """
    if _tools_present():
        return SBIN
    if os.geteuid() != 0:
        raise PermissionError("installing postfix needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(
        ["debconf-set-selections"],
        timeout=60,
        input="postfix postfix/main_mailer_type select No configuration\n",
    )
    own_policy = not _POLICY_RC_D.exists()
    if own_policy:
        _POLICY_RC_D.write_text("#!/bin/sh\n# temporary: shardmail bench installing postfix\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
        try:
            _run(install, timeout=timeout, env=env)
        except subprocess.CalledProcessError:
            # Usually stale or missing package lists on a fresh machine.
            _run(["apt-get", "update", "-q"], timeout=timeout, env=env)
            _run(install, timeout=timeout, env=env)
    finally:
        if own_policy:
            _POLICY_RC_D.unlink(missing_ok=True)
    _stop_system_postfix()
    if not _tools_present():
        raise RuntimeError("postfix installed but smtp-source/smtp-sink/master not found")
    return SBIN


def _stop_system_postfix() -> None:
    """Stop a default-instance master if the package install left one running."""
    pid_file = Path("/var/spool/postfix/pid/master.pid")
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        if _alive(pid):
            subprocess.run([str(SBIN / "postfix"), "stop"], capture_output=True, timeout=60, check=False)


# --------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it holds no memory and is as good as gone.
    with contextlib.suppress(OSError):
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
        return proc_stat.rpartition(")")[2].split()[0] != "Z"
    return False


def _children_map() -> dict[int, list[int]]:
    """Map ppid -> child pids from /proc (one pass)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            proc_stat = Path(entry.path, "stat").read_text()
            # The command name may contain spaces or ')': split after the last ')'.
            ppid = int(proc_stat.rpartition(")")[2].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def with_descendants(pids: Iterable[int]) -> set[int]:
    """Return ``pids`` plus all their live descendants."""
    kids = _children_map()
    out: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(kids.get(pid, ()))
    return {p for p in out if Path(f"/proc/{p}").exists()}


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process, 0 if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --------------------------------------------------------------------------- memory sampler


class PeakMemorySampler(threading.Thread):
    """Background thread recording the peak summed PSS of a changing set of processes.

    PSS (not RSS) so that shared libraries mapped by many Postfix daemons are
    counted once overall, which makes a multi-process MTA comparable with a
    single-process one.
    """

    def __init__(self, pids_fn: Callable[[], Iterable[int]], interval: float = 1.0) -> None:
        super().__init__(name="peak-pss-sampler", daemon=True)
        self._pids_fn = pids_fn
        self._interval = interval
        self._stop_evt = threading.Event()
        self.peak_bytes = 0
        self.peak_processes = 0
        self.samples = 0

    def sample(self) -> int:
        """Take one sample now; returns the summed PSS in bytes."""
        try:
            pids = with_descendants(self._pids_fn())
        except Exception:  # the watched side may be starting or stopping
            return 0
        total = sum(pss_bytes(p) for p in pids)
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
        self.peak_processes = max(self.peak_processes, len(pids))
        return total

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self._interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)
        self.sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / (1024 * 1024)


@contextlib.contextmanager
def peak_memory_sampler(pids_fn: Callable[[], Iterable[int]], interval: float = 1.0) -> Iterator[PeakMemorySampler]:
    """Sample summed PSS of ``pids_fn()`` (and children) every ``interval`` s while in the block.

    Once a second: a sample scans /proc and walks each process's page tables (smaps_rollup), in
    the load generator's own process; five a second cost about 6 % of a core here (measured with
    17 processes), taken from whichever side was being measured, more from the one with more
    processes."""
    sampler = PeakMemorySampler(pids_fn, interval)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


# --------------------------------------------------------------------------- private instance


def _main_cf(inst: PostfixInstance) -> str:
    ip = ipaddress.ip_address(inst.address)
    v6 = ip.version == 6
    workdir = inst.workdir
    # Settings changed from Postfix's defaults, and why:
    #   queue_directory, data_directory   private dirs under workdir: no shared state with
    #                                     a system Postfix, removed with the workdir.
    #   maillog_file(+_prefixes)          log to a file under workdir via postlogd, not syslog
    #                                     (no syslog daemon needed; the log is kept with the run).
    #   inet_interfaces = loopback-only   never reachable from outside; the only listener is
    #   inet_protocols                    the master.cf service on address:port.
    #   mynetworks = 127.0.0.0/8 (+::1)   the load generator is a trusted local client.
    #   mydestination, relay_domains = "" no local domains, so nothing is looked up in aliases
    #                                     or local users...
    #   smtpd_relay_restrictions          ...and permit_mynetworks accepts any recipient domain.
    #   *_transport = discard             every message is routed to discard: after the durable
    #                                     accept (cleanup fsyncs the queue file) and the queue
    #                                     manager pass, delivery is free, so the run measures
    #                                     Postfix's accept + queue path, not a delivery agent.
    #   smtp/lmtp_dns_support_level,      no DNS at all: results must not depend on a resolver,
    #   smtpd_peername_lookup = no        and no traffic may leave loopback.
    #   myhostname, mydomain              fixed names, independent of this machine's hostname.
    #   alias_maps, alias_database = ""   no /etc/aliases dependency (local delivery is unused).
    #   biff = no                         no comsat notifications.
    #   compatibility_level = 3.6         current defaults, without backwards-compat warnings.
    # mail_owner and setgid_group are the Debian defaults, spelled out for clarity.
    #   qmqpd_authorized_clients          only with qmqp_port: the load generator's address may
    #                                     hand mail to qmqpd (its default trusts no one).
    # All durability settings (fsync of queue files) are left at their defaults.
    qmqp = f"qmqpd_authorized_clients = {inst.address}\n" if inst.qmqp_port else ""
    return f"""\
compatibility_level = 3.6
queue_directory = {inst.queue_dir}
data_directory = {inst.data_dir}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {inst.log_file}
maillog_file_prefixes = {workdir}
inet_interfaces = loopback-only
inet_protocols = {"ipv6" if v6 else "ipv4"}
mynetworks = {"[::1]/128" if v6 else "127.0.0.0/8"}
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
smtpd_reject_unlisted_recipient = no
default_transport = discard
relay_transport = discard
local_transport = discard
virtual_transport = discard
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
biff = no
{qmqp}"""


def _master_cf(inst: PostfixInstance, extra: str = "") -> str:
    host = f"[{inst.address}]" if ipaddress.ip_address(inst.address).version == 6 else inst.address
    # Only the services this setup can reach; no chroot (n) so paths are plain; and
    # the inet listeners asked for: smtpd on address:port (nothing on port 25), Postfix's
    # QMQP server qmqpd on address:qmqp_port when that is set, and the caller's ``extra``.
    qmqpd = f"{host}:{inst.qmqp_port} inet n - n - - qmqpd\n" if inst.qmqp_port else ""
    return f"""\
# service type  private unpriv  chroot  wakeup  maxproc command
{host}:{inst.port} inet n - n - - smtpd
{qmqpd}{extra}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """A private Postfix instance: where it lives, how to find its processes and queue."""

    workdir: Path
    port: int
    address: str = "127.0.0.1"
    qmqp_port: int | None = None  # Postfix's qmqpd listens here too when set
    config_dir: Path = field(init=False)
    queue_dir: Path = field(init=False)
    data_dir: Path = field(init=False)
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "maillog"

    def postfix(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c <config_dir> ARGS`` for this instance."""
        return _run([str(SBIN / "postfix"), "-c", str(self.config_dir), *args], timeout=timeout)

    def master_pid(self) -> int | None:
        """PID of this instance's master daemon, or None when it is not running."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            if _alive(pid):
                return pid
        return None

    def pids(self) -> set[int]:
        """PIDs of the master and every process it spawned (smtpd, cleanup, qmgr, ...)."""
        master = self.master_pid()
        return with_descendants([master]) if master else set()

    def queued(self) -> int:
        """Number of messages Postfix still holds (maildrop/incoming/active/deferred/hold).

        Counts the queue files directly rather than calling ``postqueue -j``: polling
        every 0.1 s that way would spawn a process and load showq during the run.
        """
        n = 0
        for sub in _QUEUE_SUBDIRS:
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                n += len(files)
        return n

    def wait_queue_empty(self, timeout: float = 300.0, poll: float = 0.1) -> float:
        """Block until every accepted message has left the queue; return seconds waited.

        Raises TimeoutError (with the remaining count) at the deadline, e.g. when
        messages are deferred because of a configuration problem.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = self.queued()
            if left == 0:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{left} messages still queued after {timeout:.0f}s; see {self.log_file}")
            time.sleep(poll)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _check_loopback(address: str, what: str = "listen on") -> None:
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"refusing to {what} non-loopback address {address!r}")


def _check_traversable(path: Path) -> None:
    """Fail early if the postfix user cannot reach ``path``.

    Postfix daemons drop to the postfix user and open the data directory by absolute
    path, so every ancestor of the work directory must be searchable by "other"
    (a 0700 tempfile.mkdtemp() parent is not; master then dies on master.lock).
    """
    for d in [path, *path.parents]:
        if not d.stat().st_mode & stat.S_IXOTH:
            raise PermissionError(f"{d} is not searchable by the postfix user (chmod o+x, or use another workdir)")


def _port_free(address: str, port: int) -> bool:
    fam = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _wait_banner(address: str, port: int, timeout: float) -> bool:
    """True once the listener answers with a 220 greeting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _stop(inst: PostfixInstance, timeout: float = 30.0) -> None:
    """Stop the master and make sure no process of the instance survives."""
    pids = inst.pids()
    if not pids:
        return
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        inst.postfix("stop", timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:  # last resort: these pids were ours a moment ago
        with contextlib.suppress(ProcessLookupError):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    # Give the exited master's zombie a moment to be reaped, so /proc is clean on return.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)


@contextlib.contextmanager
def postfix_instance(workdir: Path, port: int, address: str = "127.0.0.1", extra_main_cf: str = "",
                     qmqp_port: int | None = None, extra_master_cf: str = "") -> Iterator[PostfixInstance]:
    """Run a private Postfix on ``address:port`` (loopback only) for the duration of the block.

    Config, queue, data directories and the log live under ``workdir``. On exit the
    instance is stopped and every one of its processes is gone. ``extra_main_cf`` is appended
    to main.cf (a later setting overrides an earlier one), e.g. to deliver to Maildirs.
    ``qmqp_port`` adds Postfix's QMQP server on ``address:qmqp_port``, open to ``address``
    (``qmqpd_authorized_clients``); ``extra_master_cf`` adds master.cf lines (e.g. a second
    qmqpd with ``-o`` overrides). Every listener must be on a loopback address.
    """
    _check_loopback(address)
    if os.geteuid() != 0:
        raise PermissionError("postfix start needs root")
    ensure_postfix_tools()
    for busy in (port, qmqp_port):
        if busy is not None and not _port_free(address, busy):
            raise OSError(f"{address}:{busy} is already in use")
    for line in extra_master_cf.splitlines():
        fields = line.split()
        if not line[:1].isspace() and len(fields) > 1 and fields[1] == "inet":
            _check_loopback(fields[0].rpartition(":")[0].strip("[]"))
    inst = PostfixInstance(Path(workdir), port, address, qmqp_port)
    inst.workdir.mkdir(parents=True, exist_ok=True)
    inst.workdir.chmod(0o755)
    _check_traversable(inst.workdir)
    for d in (inst.config_dir, inst.queue_dir):
        d.mkdir(exist_ok=True)
        d.chmod(0o755)
    (inst.config_dir / "main.cf").write_text(_main_cf(inst) + extra_main_cf)  # later lines win
    (inst.config_dir / "master.cf").write_text(_master_cf(inst, extra_master_cf))
    inst.log_file.touch()
    try:
        # "postfix check" (run by start) creates the queue subdirectories and the data
        # dir with the owners and modes Postfix wants.
        inst.postfix("start")
        if not _wait_banner(address, port, timeout=20):
            raise RuntimeError(f"private postfix did not answer on {address}:{port}\n{inst.log_tail()}")
        yield inst
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"postfix start failed: {e.stderr}\n{inst.log_tail()}") from e
    finally:
        _stop(inst)


# --------------------------------------------------------------------------- load generator


@dataclass
class SourceResult:
    """Outcome of one smtp-source run."""

    messages: int  # requested
    completed: int | None  # DATA completions counted by smtp-source (-c), None if unparsable
    seconds: float
    msg_per_s: float
    reuse_connections: bool
    sessions: int
    size: int
    returncode: int
    errors: bool
    stderr: str
    command: list[str]


_COUNT = re.compile(rb"(\d+)")


def run_smtp_source(
    host: str,
    port: int,
    sessions: int = 20,
    messages: int = 20000,
    size: int = 5120,
    reuse_connections: bool = False,
    *,
    sender: str = DEFAULT_SENDER,
    recipient: str = DEFAULT_RECIPIENT,
    helo: str = DEFAULT_HELO,
    sequence_recipients: bool = True,
    timeout: float = 900.0,
) -> SourceResult:
    """Send ``messages`` messages of ``size`` payload bytes over ``sessions`` parallel sessions.

    ``messages`` is the total across sessions. Without ``reuse_connections`` every
    message gets its own TCP connection (the harsher, connection-setup-bound case);
    with it, smtp-source's ``-d`` keeps each session's connection for all its messages.
    ``sequence_recipients`` (``-N``) numbers each recipient so servers can't benefit
    from a 100% address-cache hit rate. Wall time covers the whole smtp-source run.
    """
    _check_loopback(host, "connect to")
    target = f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"
    cmd = [
        str(ensure_postfix_tools() / "smtp-source"),
        "-c",
        "-C", "5",  # retry a connect that gets RST when the listen queue is full
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-f", sender,
        "-t", recipient,
        "-M", helo,
    ]  # fmt: skip
    if sequence_recipients:
        cmd.append("-N")
    if reuse_connections:
        cmd.append("-d")
    cmd.append(target)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    seconds = time.perf_counter() - start
    counts = _COUNT.findall(out)
    completed = int(counts[-1]) if counts else None
    stderr = err.decode(errors="replace").strip()
    if timed_out:
        stderr = f"timed out after {timeout:.0f}s\n{stderr}".strip()
    done = completed if completed is not None else messages
    errors = timed_out or proc.returncode != 0 or bool(stderr) or done != messages
    return SourceResult(
        messages=messages,
        completed=completed,
        seconds=seconds,
        msg_per_s=done / seconds if seconds > 0 else 0.0,
        reuse_connections=reuse_connections,
        sessions=sessions,
        size=size,
        returncode=proc.returncode,
        errors=errors,
        stderr=stderr[-2000:],
        command=cmd,
    )


# --------------------------------------------------------------------------- CLI


def _bench_once(
    workdir: Path, port: int, sessions: int, messages: int, size: int, reuse: bool
) -> tuple[SourceResult, float, float]:
    """One fresh instance, one load: (smtp-source result, drain seconds, peak PSS MiB)."""
    with postfix_instance(workdir, port) as pf, peak_memory_sampler(pf.pids) as mem:
        res = run_smtp_source("127.0.0.1", port, sessions, messages, size, reuse_connections=reuse)
        drain = pf.wait_queue_empty(timeout=600)
    return res, drain, mem.peak_mib


def main(argv: list[str] | None = None) -> int:
    """Measure Postfix alone: accept rate and peak PSS for each connection mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=2526)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=20000, help="total messages per run")
    ap.add_argument("--size", type=int, default=5120, help="payload bytes per message")
    ap.add_argument("--mode", choices=("per-message", "reuse", "both"), default="both")
    ap.add_argument("--workdir", type=Path, help="kept after the run if given")
    args = ap.parse_args(argv)
    ensure_postfix_tools()
    modes = {"per-message": [False], "reuse": [True], "both": [False, True]}[args.mode]
    failed = False
    with contextlib.ExitStack() as stack:
        base = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-bench-")))
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # Postfix daemons (user postfix) must traverse it
        for reuse in modes:
            label = "reuse" if reuse else "per-message"
            res, drain, peak = _bench_once(base / label, args.port, args.sessions, args.messages, args.size, reuse)
            failed |= res.errors
            print(
                f"postfix {label:<11} sessions={res.sessions} messages={res.completed}/{res.messages} "
                f"size={res.size}B  {res.msg_per_s:8.1f} msg/s ({res.seconds:.2f}s)  "
                f"queue drained +{drain:.2f}s  peak PSS {peak:.1f} MiB"
                + (f"  ERRORS: {res.stderr or res.returncode}" if res.errors else "")
            )
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
