"""qmail's retry schedule (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from core.backoff import expired, next_attempt


def test_remote_and_local_schedules_are_qmails() -> None:
    birth, times = 1_000_000.0, []
    attempted = birth
    for _ in range(5):
        attempted = next_attempt(birth, attempted, "remote")
        times.append(attempted - birth)
    assert times == [400, 1600, 3600, 6400, 10000]
    assert [next_attempt(0, t, "local") for t in (0, 100, 400, 900)] == [100, 400, 900, 1600]


def test_clock_stepped_back_means_now() -> None:
    assert next_attempt(5000.0, 4000.0, "remote") == 4000.0


@given(st.floats(0, 1e9), st.floats(0, 1e8), st.sampled_from(["local", "remote"]))
def test_always_later_than_the_attempt(birth: float, age: float, channel: str) -> None:
    assert next_attempt(birth, birth + age, channel) > birth + age


def test_expiry_needs_an_attempt_after_the_lifetime() -> None:
    assert not expired(0, 604799, 604800)
    assert expired(0, 604800, 604800)
