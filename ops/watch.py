"""``shardmail status --watch [SECONDS]``: the status table redrawn in place until Ctrl-C.

Interface: ``watch(settings, interval, as_json=False, out=sys.stdout, refreshes=0) -> int`` (exit
status; ``refreshes`` > 0 stops after that many, for tests).

Cost, bounded so that watching never slows what it watches: a refresh is one pipelined Redis round
trip (ops.depth) plus the spool census, directory listings that skip every directory unchanged since
its last listing. Where mail moves in every directory, a census of a big queue is the dear part (about
0.3 s of CPU per million queued messages), so it is taken again only once the time since the last
one is at least ``1 / SPOOL_BUDGET`` times what that one cost; the header says how old the spool
figures are. On a terminal each refresh clears the screen and redraws; elsewhere (a pipe, a log) the
refreshes follow each other, each after its header line; with ``--json`` one JSON document a line.

Failures: Redis unavailable → the spool figures alone and the error in the header; the watcher goes
on and picks Redis up again when it is back. Ctrl-C (SIGINT) or SIGTERM ends it with status 0.

Settings: those of ops.depth.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

import redis

from core.config import Settings
from core.redis_conn import connect
from ops.depth import Census, as_json, gather, render

SPOOL_BUDGET = 0.01  # share of one core the spool listings may take
CLEAR = "\x1b[H\x1b[2J"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def watch(settings: Settings, interval: float, json_lines: bool = False, out: TextIO = sys.stdout,
          refreshes: int = 0) -> int:
    # Ctrl-C and SIGTERM end it cleanly, also where it was started with SIGINT ignored (a shell's
    # background job, a supervisor): a watcher holds nothing that must not be interrupted.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    conn = connect(settings)
    census = Census()
    tty = out.isatty()
    shown = 0
    try:
        while True:
            started = time.monotonic()
            spool = not census.listed_at or time.time() - census.listed_at >= census.cost / SPOOL_BUDGET
            problem = ""
            try:
                status = gather(settings, conn, census, spool=spool)
            except redis.RedisError as exc:
                problem = f"Redis unavailable ({exc}); spool figures only"
                status = gather(settings, None, census, spool=spool)
            if json_lines:
                out.write(as_json(status, indent=None) + "\n")
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.time))
                head = (f"Every {interval:g} s: shardmail status   {stamp}   spool figures "
                        f"{status.spool_age:.0f} s old   (Ctrl-C quits)")
                out.write((CLEAR if tty else "") + head + "\n" + (problem + "\n" if problem else "") + "\n"
                          + render(status) + "\n" + ("" if tty else "\n"))
            out.flush()
            shown += 1
            if refreshes and shown >= refreshes:
                return 0
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader is gone
        return 0
    finally:
        conn.close()
