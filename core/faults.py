"""Named crash points and injected faults, for the crash and fault tests.

Interface: ``crash_point(name)`` kills this process with SIGKILL when ``SHARDMAIL_CRASH_AT`` names
``name`` (a comma-separated list may name several), and with ``SHARDMAIL_CRASH_ONCE=<file>`` only
the first time any process of a node gets there (the one that creates the file), and with
``SHARDMAIL_CRASH_SKIP=N`` only on the N+1st arrival of this process (mid-way through a run);
``check(name)`` raises the OSError that ``SHARDMAIL_FAULT=name=ERRNO`` asks for (e.g.
``spool.write=ENOSPC``), or a RuntimeError for ``name=BUG`` (an unexpected exception, as a
programming error would raise). Both cost one dict lookup when unset, so they stay in production
code: a test then kills the real process at the real spot, which is more reliable than timing a kill
from outside.

Failures: by design. Settings: the environment variables above (read once at import).
"""

from __future__ import annotations

import errno
import os
import signal

_CRASH = frozenset(filter(None, os.environ.get("SHARDMAIL_CRASH_AT", "").split(",")))
_ONCE = os.environ.get("SHARDMAIL_CRASH_ONCE", "")
_SKIP = int(os.environ.get("SHARDMAIL_CRASH_SKIP", "0") or 0)  # pass a named point this many times first
_FAULTS = dict(
    item.split("=", 1) for item in os.environ.get("SHARDMAIL_FAULT", "").split(",") if "=" in item
)


def crash_point(name: str) -> None:
    if name in _CRASH:
        global _SKIP
        if _SKIP > 0:
            _SKIP -= 1
            return
        if _ONCE:
            try:
                os.close(os.open(_ONCE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def check(name: str) -> None:
    code = _FAULTS.get(name)
    if code == "BUG":
        raise RuntimeError(f"injected bug at {name}")
    if code:
        number = getattr(errno, code, errno.EIO)
        raise OSError(number, f"{os.strerror(number)} (injected at {name})")
