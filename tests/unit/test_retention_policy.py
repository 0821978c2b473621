"""The retention policy's rule for finished runs: forever by default, the newest N always, the rest by age."""

from __future__ import annotations

from app.service.retention import DAY_S, Policy

NOW = 1_000 * DAY_S


def expired(policy: Policy, ages_days: list[float]) -> list[bool]:
    """Which of runs that ended ``ages_days`` ago (newest first) the policy lets go."""
    return [policy.expired(NOW - age * DAY_S, rank, NOW) for rank, age in enumerate(ages_days)]


def test_zero_days_keeps_every_finished_run_forever():
    assert expired(Policy(older_than_days=0, keep_last=0), [1, 100, 10_000]) == [False, False, False]


def test_the_newest_n_stay_whatever_their_age_and_older_ones_go_past_the_days():
    policy = Policy(older_than_days=30, keep_last=2)
    assert expired(policy, [40, 50, 60]) == [False, False, True]
    assert expired(policy, [1, 2, 20, 31]) == [False, False, False, True]
