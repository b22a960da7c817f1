"""qmail's retry schedule, as a pure function of a message's birth and its last attempt.

Interface: ``SKIP`` (per channel), ``next_attempt(birth, attempted, channel) -> float``,
``expired(birth, attempted, lifetime) -> bool``, ``next_time(envelope, channel, now)`` (when a
spool entry's channel is next due: what the scheduler schedules and the rebalancer re-rings).

``next = birth + (isqrt(attempted - birth) + skip)²`` with skip 10 for local and 20 for remote
delivery: remote attempts at birth, +400 s, +1600 s, +3600 s, +6400 s ... (the gaps grow linearly,
so the number of attempts grows with the square root of the age). No attempt counter is kept
anywhere: the schedule follows from the birth time alone, so it comes back the same after Redis is
lost and rebuilt from the spool. A last attempt before the birth (the clock stepped back) gives
"now again" (the attempt time itself), never a time in the far future.

A message is ``expired`` once an attempt was made at or after ``birth + lifetime``: qmail's rule
that after the lifetime one more attempt is made, and only a temporary failure of *that* attempt
becomes permanent (so a clock that jumps ahead never bounces mail without trying it once more).

Failures: none (pure). Settings: none (``queuelifetime`` is passed in).
"""

from __future__ import annotations

from math import isqrt

from core.envelope import Channel, Envelope

SKIP = {"local": 10, "remote": 20}


def next_attempt(birth: float, attempted: float, channel: str) -> float:
    age = round(attempted - birth)  # whole seconds, as qmail counts (marks keep milliseconds)
    if age < 0:
        return attempted
    root = isqrt(age) + SKIP[channel]
    return birth + root * root


def expired(birth: float, attempted: float, lifetime: float) -> bool:
    return attempted - birth >= lifetime


def next_time(envelope: Envelope, channel: Channel, now: float) -> float | None:
    """When the channel's pending recipients are next due: ``now`` if one was never tried, else the
    earliest ``next_attempt`` after their deferrals; None if the channel has none pending."""
    states = envelope.states()
    pending = envelope.pending(channel)
    if not pending:
        return None
    if any(states[i] is None or states[i].state == "pending" for i in pending):  # type: ignore[union-attr]
        return now
    return min(next_attempt(envelope.birth, states[i].at, channel) for i in pending)  # type: ignore[union-attr]
