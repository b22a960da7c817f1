"""deliveryProgramPath: hand the message to a program, as qmail-local does for ``|command`` lines.

Interface: ``run_program(command, message, envelope, address, settings) -> (Outcome, stop)``.

Off unless ``deliveryprograms = true``. The command is split like a shell would split words but
run without a shell (no expansion, no redirection, no pipes), as ``deliveryprogramuser``, with the
message on standard input and SENDER, RECIPIENT, LOCAL, HOST and the queue id in the environment,
for at most ``deliveryprogramtimeout`` seconds. Exit codes as qmail-command: 0 delivered, 99
delivered and no further delivery for this recipient, 100 permanent failure, 111 and anything else
(a signal, the time limit) temporary.

Failures: as above; a program that cannot be started (missing, not executable, unknown user) is
temporary (4.3.0): the entry or the host needs fixing, the message waits.

Settings: ``deliveryprograms``, ``deliveryprogramuser``, ``deliveryprogramtimeout``.
"""

from __future__ import annotations

import logging
import shlex
import subprocess

from core.config import Settings
from core.envelope import Envelope
from core.outcome import Deferred, Delivered, Failed, Outcome

log = logging.getLogger("shardmail.program")


def run_program(command: str, message: bytes, envelope: Envelope, address: str, settings: Settings
                ) -> tuple[Outcome, bool]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return Deferred("4.3.0", f"deliveryProgramPath unparsable: {exc}"), False
    if not argv:
        return Deferred("4.3.0", "deliveryProgramPath empty"), False
    local, _, host = address.rpartition("@")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SENDER": envelope.sender, "RECIPIENT": address,
           "LOCAL": local, "HOST": host, "SHARDMAIL_QUEUE_ID": envelope.id}
    try:
        done = subprocess.run(argv, input=message, env=env, capture_output=True, cwd="/", check=False,
                              timeout=settings.deliveryprogramtimeout, user=settings.deliveryprogramuser)
    except subprocess.TimeoutExpired:
        return Deferred("4.3.0", f"{argv[0]}: no answer within {settings.deliveryprogramtimeout} s"), False
    except (OSError, KeyError, ValueError) as exc:
        log.error("cannot run %s for %s: %s", argv[0], address, exc)
        return Deferred("4.3.0", f"{argv[0]}: cannot run ({exc})"), False
    said = (done.stdout or done.stderr).decode("utf-8", "replace").strip().replace("\n", " ")[:300]
    if done.returncode in (0, 99):
        return Delivered(f"program {argv[0]}: {said or 'ok'}"), done.returncode == 99
    if done.returncode == 100:
        return Failed("5.3.0", f"program {argv[0]}: {said or 'permanent failure'}"), False
    return Deferred("4.3.0", f"program {argv[0]} (exit {done.returncode}): {said or 'temporary failure'}"), False
