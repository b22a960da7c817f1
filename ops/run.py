"""``shardmail run``: the all-in-one supervisor for a node.

Interface: ``Supervisor(settings, config_path).run() -> int``; ``starter_users_ldif(locals)``. It starts an
embedded ``redis-server`` when neither ``redis_url`` nor ``redis_sentinels`` is configured (unix socket under
``var_dir``, persistence off: the spool is the ledger, so Redis may forget everything), then ``ingress_processes`` SMTP
processes, ``localprocesses`` local and ``remoteprocesses`` remote delivery pools and
``schedulerprocesses`` schedulers (and ``shardmail pop3d`` when ``pop3_listen`` or ``pop3s_listen``
is set), restarts any child that dies (with a growing delay, logging
why), and on SIGTERM or Ctrl-C stops the children, Redis last. Without LDAP it creates
``users_ldif`` with a postmaster entry (``starter_users_ldif``: the suffix and ``ou=people`` entries
first, so ``ldapadd`` loads the file unchanged into an empty directory for that suffix).

Failures: a missing ``redis-server`` binary or a Redis that does not come up is fatal at start
(exit 69, a clear message); so is this node's name held by another live node of the cluster, or a
spool that belongs to another node (exit 78; core.nodes). A child that keeps crashing is restarted every 30 s at most.

Settings: ``redis_url``, ``redis_sentinels``, ``var_dir``, ``ingress_processes``, ``localprocesses``,
``remoteprocesses``, ``schedulerprocesses``, ``metrics_listen`` (ops.metrics: the children's counters summed,
served from a thread here), plus everything the children read.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core import sdnotify
from core.config import Settings
from core.nodes import NodeConflict, Registry, SpoolOwned, beat_of, serve_spool
from core.outcome import EX_CONFIG
from core.redis_conn import connect_shared, describe, embedded_socket, url
from core.shards import ShardMap
from core.spool import Listings
from ops.metrics import Exporter, child_env

log = logging.getLogger("shardmail.run")
EX_UNAVAILABLE = 69
MAX_DELAY = 30.0
STABLE = 60.0  # a child up this long has its restart delay reset
STOP_GRACE = 15.0


def starter_users_ldif(locals_: list[str]) -> str:
    """The first users file: the postmaster of every local domain (RFC 5321 4.5.1) as one qmailUser
    entry under ``ou=people,dc=<first domain's labels>``, preceded by the suffix and container
    entries, so that ``ldapadd -x -D <rootdn> -W -f users.ldif`` fills an empty directory whose suffix
    is that ``dc=`` DN (the embedded reader skips those two: they have no address)."""
    domains = list(dict.fromkeys(d.lower().rstrip(".") for d in locals_))
    labels = domains[0].split(".")
    suffix = ",".join(f"dc={label}" for label in labels)
    entries = [
        [f"dn: {suffix}", "objectClass: dcObject", "objectClass: organization", f"dc: {labels[0]}",
         f"o: {domains[0]}"],
        [f"dn: ou=people,{suffix}", "objectClass: organizationalUnit", "ou: people"],
        [f"dn: uid=postmaster,ou=people,{suffix}", "objectClass: inetOrgPerson", "objectClass: qmailUser",
         "cn: postmaster", "sn: postmaster", "uid: postmaster", f"mail: postmaster@{domains[0]}",
         *(f"mailAlternateAddress: postmaster@{d}" for d in domains[1:]), "mailMessageStore: postmaster/"],
    ]
    header = ("# shardmail's embedded directory: qmailUser entries under ou=people, as on an LDAP server.\n"
              f"# Into an empty slapd with suffix {suffix} and the qmailUser schema:\n"
              f"#   ldapadd -x -H ldap://HOST -D <rootdn> -W -f users.ldif\n")
    return header + "\n".join("\n".join(entry) + "\n" for entry in entries)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = 1.0
    restart_at: float = 0.0
    history: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.children: list[Child] = []
        self._stopping = False
        self.metrics: Exporter | None = None  # the Prometheus endpoint (metrics_listen)
        self._metrics_dir: Path | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self.settings.redis_sentinels:  # the embedded server's socket, when it is one
            env["SHARDMAIL_REDIS_URL"] = url(self.settings)
        env["SHARDMAIL_VAR_DIR"] = str(Path(self.settings.var_dir).resolve())
        env["SHARDMAIL_ME"] = self.settings.me
        if self.config_path:
            env["SHARDMAIL_CONFIG"] = str(Path(self.config_path).resolve())
        env.update(child_env(self._metrics_dir))
        return env

    def _redis_child(self) -> Child | None:
        if self.settings.redis_url or self.settings.redis_sentinels:
            return None
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or set redis_url")
        sock = embedded_socket(self.settings)
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        argv = [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(sock.parent), "--loglevel", "warning"]
        return Child("redis", argv, dict(os.environ))

    def _wait_for_redis(self, deadline: float) -> None:
        conn = connect_shared(self.settings, connect_timeout=1)
        while True:
            try:
                conn.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis ({describe(self.settings)}) did not answer: {exc}") from None
                time.sleep(0.05)

    def ensure_users_file(self) -> None:
        """With no LDAP and no users file yet, start one holding the postmaster (RFC 5321 4.5.1:
        every domain we deliver for must take mail for postmaster)."""
        if self.settings.ldapserver:
            return
        path = Path(self.settings.users_file)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(starter_users_ldif(self.settings.locals))
        log.info("created %s with a postmaster entry", path)

    def plan(self) -> list[Child]:
        env = self._env()
        base = [sys.executable, "-m", "ops.cli"]
        children = [Child(f"smtpd-{i}", [*base, "smtpd"], env) for i in range(self.settings.processes)]
        if self.settings.role == "ingress":  # no spool, so nothing to deliver, retry or serve by QMQP
            return children
        if self.settings.qmqp_listen:
            children.append(Child("qmqpd", [*base, "qmqpd"], env))
        if self.settings.pop3_listen or self.settings.pop3s_listen:  # the Maildirs are here
            children.append(Child("pop3d", [*base, "pop3d"], env))
        me = self.settings.me
        children += [Child(f"local-{i}", [*base, "worker", "local", "--name", f"{me}.local-{i}"], env)
                     for i in range(self.settings.localprocesses)]
        children += [Child(f"remote-{i}", [*base, "worker", "remote", "--name", f"{me}.remote-{i}"], env)
                     for i in range(self.settings.remoteprocesses)]
        children += [Child(f"scheduler-{i}", [*base, "scheduler"], env)
                     for i in range(self.settings.schedulerprocesses)]
        return children

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            redis_child = self._redis_child()
            if redis_child:
                redis_child.start()
                self.children.append(redis_child)
            self._wait_for_redis(time.monotonic() + 10)
        except RuntimeError as exc:
            log.error("%s", exc)
            self.shutdown()
            return EX_UNAVAILABLE
        try:
            if self.settings.role == "node":  # an ingress-only node serves no spool and claims no name
                self.claim_name()
        except (NodeConflict, SpoolOwned) as exc:
            log.error("%s", exc)
            self.shutdown()
            return EX_CONFIG
        except redis.RedisError as exc:  # the schedulers claim it again with their first heartbeat
            log.warning("node name not claimed yet (%s)", exc)
        self.ensure_users_file()
        self._metrics_dir = Exporter.prepare(self.settings)  # before any child imports prometheus_client
        self.metrics = Exporter.start(self.settings, self._metrics_dir)
        sdnotify.ready("Redis answers; starting the roles")  # before them: they do not inherit NOTIFY_SOCKET
        for child in self.plan():
            child.start()
            self.children.append(child)
        where = (f"{self.settings.shards} shards, spool {self.settings.spool_root}" if self.settings.role == "node"
                 else "ingress only, handing mail over by QMQP to "
                 + (", ".join(self.settings.qmqpservers) or "the cluster's queue nodes"))
        log.info("shardmail is running: SMTP on %s, %s, Redis %s", ", ".join(self.settings.smtp_listen), where,
                 describe(self.settings))
        while not self._stopping:
            self._tend()
            time.sleep(0.2)
        self.shutdown()
        return 0

    def claim_name(self) -> None:
        """The node's name for this spool, before any role starts: a second live node under the
        same name (or a spool of another node) stops ``run`` here with one clear line."""
        listen = self.settings.smtp_listen[0] if self.settings.smtp_listen else ""
        qmqp = self.settings.qmqp_listen[0] if self.settings.qmqp_listen else ""
        beat = beat_of(ShardMap(self.settings), Listings(), listen, time.time(), qmqp)
        Registry.of(self.settings, connect_shared(self.settings)).claim(serve_spool(self.settings), beat, time.time())

    def _tend(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.restart_at:
                    child.start()
                continue
            status = child.proc.poll()
            if status is None:
                if now - child.started > STABLE:
                    child.delay = 1.0
                continue
            reason = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            log.warning("%s (pid %d) died: %s; restarting in %.0f s", child.name, child.proc.pid, reason,
                        child.delay)
            child.history.append(status)
            if self.metrics:
                self.metrics.child_died(child.proc.pid)
            child.proc = None
            child.restart_at = now + child.delay
            child.delay = min(child.delay * 2, MAX_DELAY)

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def shutdown(self) -> None:
        """Stop the workers and ingress first, Redis last, so no one loses its Redis mid-message."""
        others = [c for c in self.children if c.name != "redis"]
        last = [c for c in self.children if c.name == "redis"]
        for group in (others, last):
            for child in group:
                if child.proc and child.proc.poll() is None:
                    child.proc.terminate()
            deadline = time.monotonic() + STOP_GRACE
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_GRACE)
                    child.proc.kill()
                    child.proc.wait()
        if self.metrics:
            self.metrics.stop()
        log.info("stopped")
