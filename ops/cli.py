"""The ``shardmail`` command: one entry point for every role and every admin task.

Interface: ``main(argv=None) -> None`` (exits with the command's status). Sub-commands: ``run``
(supervisor), ``smtpd`` (one ingress process), ``qmqpd`` (the QMQP server), ``pop3d`` (the POP3
server), ``worker local|remote`` (a delivery pool),
``sendmail`` (inject; also used when the program is invoked under the name ``sendmail``),
``scheduler`` (retries, bounces, sweeps), ``recover`` (rebuild Redis from the spool), ``adopt``
(take in a dead node's spool: ops.adopt), ``status`` (depth per shard; ``--cluster``: every node,
ops.cluster), ``qshape`` (domains by age; ``--cluster``: every node's, ops.cluster_spool),
``metrics`` (the Prometheus endpoint, or ``--once`` to print it), ``queue`` (list, show, hold,
release, requeue, delete, flush queued mail: ops.queue; ``list --cluster``: every node's,
ops.cluster_spool; ``queue move``, like ``shards move``, hands it to another node: ops.move),
``config`` (validate and print the effective settings), ``dkim keygen`` (a signing key and its DNS
record) and ``dkim cost`` (µs per signature): ops.dkim_keys.

Failures: a configuration error prints one line naming the key and exits 78 (EX_CONFIG).
Settings: ``-c/--config`` or ``$SHARDMAIL_CONFIG`` names the file; see core.config.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from core.config import ConfigError, Settings, describe, load
from core.outcome import EX_CONFIG, EX_TEMPFAIL, EX_USAGE

if TYPE_CHECKING:
    from redis import Redis


def _settings(path: str | None) -> Settings:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"shardmail: configuration: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)


def _serving(path: str | None) -> Settings:
    """The settings of a process that serves the node's spool (smtpd, a pool, the scheduler):
    the spool must be this node's and not being adopted (core.nodes ``serve_spool``: a shared
    lock held until exit), or exit 78 with one line saying whose it is."""
    from core.nodes import SpoolOwned, serve_spool

    settings = _settings(path)
    from core.dkim import Signer

    try:
        Signer.of(settings)  # the DKIM keys core.submit (or the hand-over) signs with: all readable, or no start
    except ConfigError as exc:
        print(f"shardmail: configuration: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    if settings.role == "ingress":  # an ingress-only node has no spool to serve
        return settings
    try:
        serve_spool(settings)
    except SpoolOwned as exc:
        print(f"shardmail: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    return settings


def _shards(text: str, settings: Settings, option: str) -> list[int]:
    """A shard list option ("0-3,5", "all"), or exit 64 (EX_USAGE) with one line saying why."""
    from core.shards import ShardMap
    from workers.pool import parse_shards

    try:
        return parse_shards(text, max(ShardMap(settings).ids(fresh=True), default=-1) + 1)
    except ValueError as exc:
        print(f"shardmail: {option}: {exc}", file=sys.stderr)
        sys.exit(64)


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ops.run import Supervisor

    _logging(args.verbose)
    settings = _settings(args.config)
    from core.dkim import Signer

    try:
        Signer.of(settings)  # a bad key stops the node here, not each child every 30 s
    except ConfigError as exc:
        print(f"shardmail: configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    return Supervisor(settings, args.config).run()


def cmd_smtpd(args: argparse.Namespace) -> int:
    from ingress.serve import main as serve

    _logging(args.verbose)
    settings = _serving(args.config)
    from ingress.tls import TLSConfigError

    try:
        serve(settings)
    except OSError as exc:
        logging.getLogger("shardmail.ingress").error("cannot listen: %s", exc)
        return EX_CONFIG
    except TLSConfigError as exc:
        logging.getLogger("shardmail.ingress").error("TLS: %s", exc)
        return EX_CONFIG
    return 0


def cmd_qmqpd(args: argparse.Namespace) -> int:
    from ingress.qmqpd import main as serve

    _logging(args.verbose)
    settings = _serving(args.config)
    if not settings.qmqp_listen:
        print("shardmail qmqpd: qmqp_listen is empty", file=sys.stderr)
        return EX_CONFIG
    try:
        serve(settings)
    except OSError as exc:
        logging.getLogger("shardmail.qmqpd").error("cannot listen: %s", exc)
        return EX_CONFIG
    return 0


def cmd_pop3d(args: argparse.Namespace) -> int:
    from ingress.pop3d import main as serve
    from ingress.tls import TLSConfigError

    _logging(args.verbose)
    settings = _settings(args.config)
    if not settings.pop3_listen and not settings.pop3s_listen:
        print("shardmail pop3d: pop3_listen and pop3s_listen are empty", file=sys.stderr)
        return EX_CONFIG
    try:
        serve(settings)
    except OSError as exc:
        logging.getLogger("shardmail.pop3d").error("cannot listen: %s", exc)
        return EX_CONFIG
    except TLSConfigError as exc:
        logging.getLogger("shardmail.pop3d").error("TLS: %s", exc)
        return EX_CONFIG
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import redis

    from core.redis_conn import connect
    from ops.depth import as_json, gather, render

    settings = _settings(args.config)
    if args.cluster or args.node:
        return _cluster_status(settings, args)
    if args.watch is not None:
        from ops.watch import watch

        return watch(settings, max(0.1, args.watch), args.json)
    conn: redis.Redis | None = connect(settings)
    try:
        status = gather(settings, conn)
    except redis.RedisError as exc:
        print(f"shardmail: Redis unavailable ({exc}); showing the spool only", file=sys.stderr)
        conn = None
        status = gather(settings, None)
    print(as_json(status) if args.json else render(status))
    return 0 if conn is not None else EX_TEMPFAIL


def _cluster_status(settings: Settings, args: argparse.Namespace) -> int:
    import redis

    from core.redis_conn import connect_shared
    from ops.cluster import cluster_json, gather_cluster, node_status, render_cluster
    from ops.depth import as_json, render

    try:
        cluster = gather_cluster(settings, connect_shared(settings))
    except redis.RedisError as exc:
        print(f"shardmail: Redis unavailable ({exc}): no cluster view without it", file=sys.stderr)
        return EX_TEMPFAIL
    if not args.node:
        print(cluster_json(cluster) if args.json else render_cluster(cluster))
        return 0
    try:
        status = node_status(cluster, args.node)
    except KeyError:
        print(f"shardmail: no node {args.node!r} in the cluster", file=sys.stderr)
        return EX_USAGE
    print(as_json(status) if args.json else render(status))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import dataclasses

    _logging(args.verbose)
    settings = _serving(args.config)
    shards = None if args.shards == "all" else _shards(args.shards, settings, "--shards")
    if args.processes > 1:
        import subprocess

        from core import sdnotify

        argv = [sys.executable, "-m", "ops.cli", "worker", args.channel, "--shards", args.shards]
        if args.concurrency:
            argv += ["--concurrency", str(args.concurrency)]
        names = [["--name", f"{args.name}.{i}"] if args.name else [] for i in range(args.processes)]
        sdnotify.ready(f"{args.processes} {args.channel} pools")  # before them: they do not inherit NOTIFY_SOCKET
        children = [subprocess.Popen(argv + name) for name in names]
        return max(child.wait() for child in children)
    if args.channel == "remote":
        from workers.remote_pool import run_remote

        if args.concurrency:
            settings = dataclasses.replace(settings, concurrencyremote=args.concurrency)
        run_remote(settings, shards, args.name)
        return 0
    from workers.pool import run_local

    if args.concurrency:
        settings = dataclasses.replace(settings, concurrencylocal=args.concurrency)
    run_local(settings, shards, args.name)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    import threading

    from core.redis_conn import connect, connect_shared
    from core.shards import Namespace
    from ops.ask import start_answerer
    from ops.cluster_spool import handlers
    from scheduler.serve import run_scheduler

    _logging(args.verbose)
    settings = _serving(args.config)

    def answerer(ended: threading.Event) -> threading.Thread:
        """Answers the cluster's questions about this node's spool while the scheduler runs."""
        return start_answerer(connect_shared(settings), Namespace.of(settings), handlers(settings, connect(settings)),
                              ended)

    run_scheduler(settings, answerer)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from scheduler.recover import recover

    _logging(args.verbose)
    return recover(_settings(args.config))


def cmd_adopt(args: argparse.Namespace) -> int:
    from pathlib import Path

    import redis

    from core.redis_conn import connect_shared
    from ops.adopt import AdoptRefused, adopt

    _logging(args.verbose)
    settings = _settings(args.config)
    done = [0]

    def progress(count: int) -> None:
        done[0] += count
        if done[0] % 1000 == 0 and sys.stderr.isatty():
            print(f"\r{done[0]} entries taken in", end="", file=sys.stderr, flush=True)

    try:
        result = adopt(settings, connect_shared(settings), Path(args.spool), getattr(args, "from"), args.force,
                       progress)
    except AdoptRefused as exc:
        print(f"shardmail adopt: {exc}", file=sys.stderr)
        return EX_USAGE
    except redis.RedisError as exc:
        print(f"shardmail adopt: Redis unavailable ({exc}): run the same command again", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:
        print(f"shardmail adopt: {exc}: run the same command again once it is mended", file=sys.stderr)
        return EX_TEMPFAIL
    shards = ", ".join(f"s{theirs} -> s{ours}" for theirs, ours in sorted(result.shards.items())) or "none"
    print(f"adopted node {getattr(args, 'from')}: {result.moved} queued and {result.held} held entries "
          f"(shards {shards}); {result.jobs_dropped} of its jobs dropped from Redis; this node's scheduler "
          f"sweeps the new shards and queues their mail as its own")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    import redis

    from core.redis_conn import connect_shared
    from ops.adopt import AdoptRefused, forget

    settings = _settings(args.config)
    try:
        dropped = forget(settings, connect_shared(settings), args.node, args.force)
    except AdoptRefused as exc:
        print(f"shardmail forget: {exc}", file=sys.stderr)
        return EX_USAGE
    except redis.RedisError as exc:
        print(f"shardmail forget: Redis unavailable ({exc})", file=sys.stderr)
        return EX_TEMPFAIL
    print(f"forgot node {args.node}: {dropped} of its jobs dropped from Redis, its record removed")
    return 0


def cmd_qshape(args: argparse.Namespace) -> int:
    import json
    import time

    from ops.qshape import render, shape

    settings = _settings(args.config)
    if args.cluster:
        return _qshape_cluster(settings, args)
    shards = _shards(args.shard, settings, "--shard")
    rows = shape(settings, shards, args.which, args.by, time.time())
    if args.json:
        from ops.cluster_spool import row_doc

        print(json.dumps({"which": args.which, "by": args.by, "rows": [row_doc(r) for r in rows]}, indent=2))
        return 0
    print(render(rows, args.top))
    return 0


def _qshape_cluster(settings: Settings, args: argparse.Namespace) -> int:
    """Every node's qshape (ops.cluster_spool): each node answers for its own spool."""
    import json

    import redis

    from core.redis_conn import connect_shared
    from ops.cluster_spool import qshape_cluster, qshape_dict, render_qshape

    if args.shard != "all":
        print("shardmail qshape: --shard names one node's shards: not with --cluster", file=sys.stderr)
        return EX_USAGE
    try:
        cluster = qshape_cluster(settings, connect_shared(settings), args.which, args.by, max(0.1, args.timeout))
    except redis.RedisError as exc:
        print(f"shardmail: Redis unavailable ({exc}): no cluster view without it", file=sys.stderr)
        return EX_TEMPFAIL
    print(json.dumps(qshape_dict(cluster), indent=2) if args.json else render_qshape(cluster, args.top))
    return 0


def _queue_cluster(settings: Settings, args: argparse.Namespace) -> int:
    """Every node's queue listing (ops.cluster_spool), at most --limit messages per node."""
    import json

    import redis

    from core.redis_conn import connect_shared
    from ops.cluster_spool import DEFAULT_LIST, MAX_LIST, queue_cluster, queue_dict, render_queue

    if args.shard != "all":
        print("shardmail queue: --shard names one node's shards: not with --cluster", file=sys.stderr)
        return EX_USAGE
    limit = min(args.limit or DEFAULT_LIST, MAX_LIST)
    try:
        gathered = queue_cluster(settings, connect_shared(settings), limit, args.held, args.domain or "",
                                 max(0.1, args.timeout))
    except redis.RedisError as exc:
        print(f"shardmail: Redis unavailable ({exc}): no cluster view without it", file=sys.stderr)
        return EX_TEMPFAIL
    print(json.dumps(queue_dict(gathered, limit), indent=2) if args.json else render_queue(gathered, limit))
    return 0


def cmd_queue(args: argparse.Namespace) -> int:

    from core.redis_conn import connect
    from ops.queue import Filter, QueueAdmin, parse_ids

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(args.config)
    if args.action == "list" and args.cluster:
        return _queue_cluster(settings, args)
    conn = _ping(connect(settings)) if args.action != "move" else None
    admin = QueueAdmin(settings, conn)
    flt = Filter(_shards(getattr(args, "shard", "all"), settings, "--shard"), getattr(args, "held", False),
                 getattr(args, "domain", "") or "")
    if args.action == "list":
        return admin.listing(flt, args.json, max(0, args.limit))
    if args.action == "flush":
        return admin.flush(flt)
    ids = parse_ids(args.ids, sys.stdin)
    if args.action == "delete" and "ALL" in ids:
        if not args.all or ids != ["ALL"]:
            print("shardmail queue: delete ALL takes no other ids, and needs --all to say you mean it", file=sys.stderr)
            return 64
        return admin.delete_all(flt)
    if args.action == "delete" and (args.all or args.shard != "all" or args.domain or args.held):
        print("shardmail queue: --all, --shard, --domain and --held go with delete ALL only", file=sys.stderr)
        return 64
    if not ids:
        print(f"shardmail queue {args.action}: no message ids given", file=sys.stderr)
        return 64
    if args.action == "move":
        return _move(args, settings, ids=ids)
    if args.action == "show":
        return admin.show(ids, args.body)
    if args.action == "hold":
        return admin.hold(ids, args.force, args.wait)
    if args.action == "release":
        return admin.release(ids)
    if args.action == "requeue":
        return admin.requeue(ids)
    return admin.delete(ids)


def cmd_ldaplookup(args: argparse.Namespace) -> int:
    from ops.ldaplookup import describe

    text, status = describe(_settings(args.config), args.mail, args.uid)
    print(text)
    return status


def cmd_shards(args: argparse.Namespace) -> int:

    from core.redis_conn import connect
    from core.shards import ShardMap
    from ops import shards as shard_admin

    settings = _settings(args.config)
    shard_map = ShardMap(settings)
    if args.action == "move":
        return _move(args, settings, shard=args.shard)
    if args.action != "list" and args.shard is not None and not args.shard.isdigit():
        print(f"shardmail: shards {args.action}: {args.shard!r} is not a shard number", file=sys.stderr)
        return 64
    number = None if args.shard is None else int(args.shard)
    if args.action == "list":
        conn = _ping(connect(settings))
        if conn is None:
            print("shardmail: Redis unavailable; showing the spool only", file=sys.stderr)
        print(shard_admin.render(shard_admin.listing(settings, conn)))
        return 0
    if args.action == "add":
        shard = shard_map.add()
        print(f"shard {shard} added ({shard_map.spool(shard).base}); ingress, the scheduler and pools on all "
              "shards take it up within seconds")
        return 0
    if args.action in ("drain", "open"):
        if number is None:
            print(f"shardmail: shards {args.action}: which shard?", file=sys.stderr)
            return 64
        try:
            changed = shard_map.drain(number) if args.action == "drain" else shard_map.reopen(number)
        except KeyError as exc:
            print(f"shardmail: {exc.args[0]}", file=sys.stderr)
            return 64
        state = "draining" if args.action == "drain" else "open"
        print(f"shard {args.shard} {'is now' if changed else 'was already'} {state}")
        if args.action == "drain" and args.wait is not None:
            return 0 if shard_admin.wait_empty(settings, connect(settings), number, args.wait, sys.stdout) else 1
        return 0
    return _rebalance(args, settings)


def _move(args: argparse.Namespace, settings: Settings, ids: list[str] | None = None,
          shard: str | None = None) -> int:
    """``queue move ID... --to NODE`` or ``shards move <node>/s<N> --to NODE`` (ops.move)."""
    import redis

    from core.redis_conn import connect, connect_shared
    from core.shards import ShardMap
    from ops.move import MoveBusy, Mover, MoveRefused, find_target, parse_shard
    from scheduler.recover import Progress

    if not args.to:
        print("shardmail: move: --to NODE names the node to move the mail to", file=sys.stderr)
        return 64
    number = None
    if ids is None:
        try:
            number = parse_shard(shard or "", settings.node)
        except ValueError as exc:
            print(f"shardmail: shards move: {exc}", file=sys.stderr)
            return 64
    conn, shared = connect(settings), connect_shared(settings)
    try:
        conn.ping()
        target = find_target(settings, shared, args.to, args.qmqp)
    except MoveRefused as exc:
        print(f"shardmail: move: {exc}", file=sys.stderr)
        return exc.status
    except redis.RedisError as exc:
        print(f"shardmail: move: Redis unavailable ({exc}): nothing moved", file=sys.stderr)
        return EX_TEMPFAIL
    if number is not None:
        shard_map = ShardMap(settings)
        total = (shard_map.spool(number).count() + sum(1 for _ in shard_map.spool(number).held())
                 if number in shard_map.ids(fresh=True) else 0)
    else:
        total = len(ids or [])
    progress = Progress(total, sys.stderr, "move") if sys.stderr.isatty() and total > 1 else None
    mover = Mover(settings, conn, target, shared=shared, timeout=args.timeout, each=ids is not None,
                  parallel=args.parallel, progress=progress)
    status = None
    try:
        if number is None:
            mover.move_ids(ids or [])
        else:
            mover.move_shard(number)
    except MoveRefused as exc:
        print(f"shardmail: move: {exc}", file=sys.stderr)
        status = exc.status
    except MoveBusy as exc:
        print(f"shardmail: move: {exc}", file=sys.stderr)
        status = EX_TEMPFAIL
    except (redis.RedisError, OSError) as exc:
        print(f"shardmail: move: {exc}: the journal holds what was done; run the same command again",
              file=sys.stderr)
        status = EX_TEMPFAIL
    finally:
        if progress is not None:
            progress.close()
    print(mover.report.summary(target))
    return mover.report.status() if status is None else status


def _rebalance(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from core.redis_conn import connect
    from ops.rebalance import Rebalancer, ShardBusy
    from scheduler.recover import Progress

    if args.source is None or not args.to:
        print("shardmail: shards rebalance needs --from S and --to T[,U]", file=sys.stderr)
        return 64
    targets = _shards(args.to, settings, "--to")
    conn = connect(settings)
    total = min(args.count or 10**12, _spooled(settings, args.source))
    progress = Progress(total, sys.stderr, "rebalance")
    try:
        report = Rebalancer(settings, conn).run(args.source, targets, args.count, progress)
    except (KeyError, ValueError) as exc:
        print(f"shardmail: shards rebalance: {exc.args[0]}", file=sys.stderr)
        return 64
    except ShardBusy as exc:
        print(f"shardmail: shards rebalance: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except redis.RedisError as exc:
        print(f"shardmail: Redis unavailable ({exc}); what was moved is consistent, run again", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        progress.close()
    where = ", ".join(f"{n} to shard {t}" for t, n in report.moved.items())
    print(f"rebalance: moved {report.total} messages from shard {args.source} ({where}) in {report.seconds:.1f} s")
    left = report.in_flight + report.young + report.settling + report.unreadable
    if left:
        print(f"rebalance: left {left} in shard {args.source}: {report.in_flight} being delivered, {report.young} "
              f"just arrived, {report.settling} waiting for their bounce, {report.unreadable} unreadable")
    if report.replayed or report.stale_jobs:
        print(f"rebalance: completed {report.replayed} moves of an interrupted run; took {report.stale_jobs} stale "
              f"jobs out of shard {args.source}'s queues")
    return 0


def _spooled(settings: Settings, shard: int) -> int:
    from core.shards import ShardMap

    shard_map = ShardMap(settings)
    return shard_map.spool(shard).count() if shard in shard_map.ids(fresh=True) else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from ops.metrics import metrics_dir, registry, serve_forever

    _logging(args.verbose)
    settings = _settings(args.config)
    if args.once:
        from prometheus_client import generate_latest

        sys.stdout.write(generate_latest(registry(settings, metrics_dir(settings))).decode())
        return 0
    listen = args.listen or settings.metrics_listen
    if not listen:
        print("shardmail: metrics: metrics_listen is empty; give --listen HOST:PORT", file=sys.stderr)
        return 64
    serve_forever(settings, listen)
    return 0


def cmd_gencert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingress.tls import TLSConfigError, gencert

    settings = _settings(args.config)
    cert = Path(settings.tlscert) if settings.tlscert else Path(settings.var_dir) / "tls" / "cert.pem"
    key = Path(settings.tlskey) if settings.tlskey else cert.with_name("key.pem")
    if (cert.exists() or key.exists()) and not args.force:
        print(f"shardmail: {cert} or {key} exists; --force replaces them", file=sys.stderr)
        return 1
    try:
        gencert(cert, key, args.host or settings.me, args.days)
    except TLSConfigError as exc:
        print(f"shardmail: gencert: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"self-signed certificate for {args.host or settings.me}: {cert} (key {key}); the SMTP processes offer "
          "STARTTLS with it from their next start")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ops.dkim_keys import keygen, signing_cost

    if args.action == "cost":
        for algorithm in ("rsa", "ed25519"):
            print(f"{algorithm}: {signing_cost(algorithm, args.size, args.count):.0f} µs per signature "
                  f"({args.size}-byte message)")
        return 0
    out = Path(args.out) if args.out else Path(_settings(args.config).var_dir) / "dkim"
    try:
        print(keygen(args.domain, args.selector, args.algorithm, args.bits, out), end="")
    except (ValueError, OSError) as exc:
        print(f"shardmail: dkim keygen: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from core.dkim import Signer

    settings = _settings(args.config)
    try:
        Signer.of(settings)  # the DKIM keys too: what smtpd would refuse to start with
    except ConfigError as exc:
        print(f"shardmail: configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    for key, _default, doc in describe():
        print(f"{key} = {getattr(settings, key)!r}    # {doc}")
    return 0


def cmd_sendmail(argv: list[str]) -> int:
    from ingress.inject import main as inject

    return inject(argv)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="shardmail", description="a sharded, crash-safe mail transfer agent")
    top.add_argument("-c", "--config", help="shardmail.toml to read (default: $SHARDMAIL_CONFIG, ./shardmail.toml)")
    top.add_argument("-v", "--verbose", action="store_true")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a whole node: embedded Redis if none configured, SMTP, workers")
    sub.add_parser("smtpd", help="run one SMTP ingress process")
    sub.add_parser("qmqpd", help="run the QMQP server (qmqp_listen, for qmqpclients)")
    sub.add_parser("pop3d", help="run the POP3 server (pop3_listen, pop3s_listen)")
    worker = sub.add_parser("worker", help="run a delivery pool")
    worker.add_argument("channel", choices=["local", "remote"])
    worker.add_argument("--shards", default="all", help="e.g. 0-3,5 (default: all)")
    worker.add_argument("--processes", type=int, default=1)
    worker.add_argument("--concurrency", type=int, default=0,
                        help="deliveries in flight per process (default: concurrencylocal / concurrencyremote)")
    worker.add_argument("--name", help="a name that stays the same across restarts (run gives its slot's): the "
                                       "pool then takes back at start what it held when it was killed")
    lookup = sub.add_parser("ldaplookup", help="show a user's entry and what would happen to mail for it")
    lookup.add_argument("-m", dest="mail", help="address")
    lookup.add_argument("-u", dest="uid", help="uid")
    status = sub.add_parser("status", help="queue depth per shard and channel, rates, workers per pool")
    status.add_argument("--json", action="store_true", help="machine-readable (field names in ops/depth.py)")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--cluster", action="store_true", help="every node of the cluster: alive or dead, depth, "
                        "rates (from their heartbeats and Redis)")
    status.add_argument("--node", metavar="NAME", help="one node's per-shard detail, seen through the cluster")
    sub.add_parser("scheduler", help="run the retry scheduler (retries, bounces, sweeps; one leader per shard)")
    sub.add_parser("recover", help="rebuild every queue in Redis from the spool (after Redis lost its data)")
    adopt = sub.add_parser("adopt", help="take in a dead node's spool as extra shards of this node")
    adopt.add_argument("--spool", required=True, metavar="DIR", help="the dead node's spool root")
    adopt.add_argument("--from", required=True, metavar="NODE", help="the dead node's name")
    adopt.add_argument("--force", action="store_true", help="even if its heartbeat still looks alive")
    forget = sub.add_parser("forget", help="drop a dead node's jobs and record from Redis (its spool is lost)")
    forget.add_argument("node", metavar="NODE")
    forget.add_argument("--force", action="store_true", help="even if its heartbeat still looks alive")
    qshape = sub.add_parser("qshape", help="queued recipients by domain and age (like Postfix's qshape)")
    qshape.add_argument("which", nargs="?", choices=["ready", "deferred", "all"], default="all")
    qshape.add_argument("--shard", default="all", help="e.g. 0-3,5 (default: all)")
    qshape.add_argument("--by", choices=["recipient", "sender"], default="recipient")
    qshape.add_argument("--top", type=int, default=0, help="only the N biggest domains")
    qshape.add_argument("--json", action="store_true", help="machine-readable (fields in ops/cluster_spool.py)")
    qshape.add_argument("--cluster", action="store_true", help="every node of the cluster, each answering for its "
                        "own spool; a dead or silent node's share is marked unknown")
    qshape.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="--cluster: how long to wait for the nodes' answers (default 5)")
    shards = sub.add_parser("shards", help="list, drain, reopen, add and rebalance queue shards, or move one to "
                            "another node")
    shards.add_argument("action", choices=["list", "drain", "open", "add", "rebalance", "move"])
    shards.add_argument("shard", nargs="?", help="the shard to drain or open (a number), or to move "
                        "(<node>/s<N>)")
    shards.add_argument("--wait", nargs="?", type=float, const=86400.0, metavar="SECONDS",
                        help="drain: wait until the shard's spool is empty (exit 1 if not within SECONDS)")
    shards.add_argument("--from", dest="source", type=int, help="rebalance: the shard to move messages from")
    shards.add_argument("--to", help="rebalance: the shards to move them to, e.g. 2,3; move: the node")
    shards.add_argument("--count", type=int, help="rebalance: move at most this many messages")
    _move_options(shards, "move: ")
    metrics = sub.add_parser("metrics", help="serve the Prometheus metrics (what `run` serves on metrics_listen)")
    metrics.add_argument("--listen", help="host:port (default: metrics_listen)")
    metrics.add_argument("--once", action="store_true", help="print the metrics once, in Prometheus' text format")
    _queue_parser(sub)
    cert = sub.add_parser("gencert", help="make a self-signed certificate and key for STARTTLS and smtps (testing)")
    cert.add_argument("--host", help="the name in the certificate (default: me)")
    cert.add_argument("--days", type=int, default=365)
    cert.add_argument("--force", action="store_true", help="replace an existing pair")
    dkim = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="action", required=True)
    keygen = dkim.add_parser("keygen", help="write a new signing key and print the DNS TXT record to publish")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (1024 at least; default 2048)")
    keygen.add_argument("--out", metavar="DIR", help="where the key goes (default: <var_dir>/dkim)")
    cost = dkim.add_parser("cost", help="measure the signing cost: µs per signature, RSA-2048 and Ed25519")
    cost.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    cost.add_argument("--count", type=int, default=500, help="signatures per round (best of five rounds)")
    sub.add_parser("config", help="check the configuration and print the effective settings")
    sub.add_parser("sendmail", help="sendmail-compatible injection (options as sendmail's)", add_help=False)
    return top


def _ping(conn: Redis) -> Redis | None:
    """The connection if Redis answers, else None (the caller shows what the spool alone tells)."""
    import redis

    try:
        conn.ping()
    except redis.RedisError:
        return None
    return conn


def _move_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--qmqp", metavar="HOST:PORT", help=f"{prefix}the target's QMQP listener (default: what its "
                        "heartbeat announces)")
    parser.add_argument("--timeout", type=float, default=30.0, help=f"{prefix}seconds to wait for the target's "
                        "answer to each message")
    parser.add_argument("--parallel", type=int, default=8, metavar="N", help=f"{prefix}messages handed over at once "
                        "(default 8)")


def _queue_parser(sub: argparse._SubParsersAction) -> None:
    queue = sub.add_parser("queue", help="list, show, hold, release, requeue, delete or flush queued mail")
    actions = queue.add_subparsers(dest="action", required=True)
    ids_help = "message ids; - reads them from stdin (the first word of each line, as `queue list` prints)"
    listing = actions.add_parser("list", help="queued messages with their waiting recipients (like mailq)")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--limit", type=int, default=0, metavar="N",
                         help="only the first N messages (default: all; with --cluster 100 per node, at most 1000)")
    listing.add_argument("--cluster", action="store_true", help="every node's messages, each node answering for its "
                         "own spool; a dead or silent node's share is marked unknown")
    listing.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                         help="--cluster: how long to wait for the nodes' answers (default 5)")
    show = actions.add_parser("show", help="a message's envelope, marks and headers (like postcat)")
    show.add_argument("--body", action="store_true", help="the body too")
    hold = actions.add_parser("hold", help="put messages on hold: no delivery, no expiry, until released")
    hold.add_argument("--wait", type=float, default=10.0, help="seconds to wait for an attempt in flight to end")
    hold.add_argument("--force", action="store_true",
                      help="hold even while an attempt is in flight (its outcome is then not recorded)")
    release = actions.add_parser("release", help="take messages off hold and queue them now")
    requeue = actions.add_parser("requeue", help="rebuild messages' jobs from the spool now (after a failed job)")
    delete = actions.add_parser("delete", help="delete messages (ALL --all: every message the filters take)")
    delete.add_argument("--all", action="store_true", help="confirms delete ALL")
    flush = actions.add_parser("flush", help="bring deferred mail forward: due now")
    move = actions.add_parser("move", help="hand messages to another node over QMQP (--to NODE)")
    move.add_argument("--to", required=True, metavar="NODE", help="the node to move them to")
    _move_options(move, "")
    for action in (show, hold, release, requeue, delete, move):
        action.add_argument("ids", nargs="*", metavar="ID", help=ids_help)
    for action in (listing, delete, flush):
        action.add_argument("--shard", default="all", help="e.g. 0-3,5 (default: all)")
        action.add_argument("--domain", default="", help="only messages with a waiting recipient in this domain")
    for action in (listing, delete):
        action.add_argument("--held", action="store_true", help="only messages on hold")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `shardmail status | head` ends quietly
    if os.path.basename(sys.argv[0]) == "sendmail":
        sys.exit(cmd_sendmail(argv))
    if argv and argv[0] == "sendmail":
        sys.exit(cmd_sendmail(argv[1:]))
    args = parser().parse_args(argv)
    commands = {
        "metrics": cmd_metrics, "pop3d": cmd_pop3d,
        "run": cmd_run, "smtpd": cmd_smtpd, "qmqpd": cmd_qmqpd, "worker": cmd_worker, "ldaplookup": cmd_ldaplookup,
        "status": cmd_status, "config": cmd_config, "scheduler": cmd_scheduler, "recover": cmd_recover,
        "adopt": cmd_adopt, "forget": cmd_forget,
        "qshape": cmd_qshape, "queue": cmd_queue, "shards": cmd_shards, "gencert": cmd_gencert,
        "dkim": cmd_dkim,
    }
    sys.exit(commands[args.command](args))


if __name__ == "__main__":
    main()
