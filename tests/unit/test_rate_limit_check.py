"""The rate-limit measurement of the nginx tests (tests/rate_limits.py), against nginx's own arithmetic: requests
judged by a limiter configured as expected pass, by one with another rate or burst (or none) fail, and a client too
slow to reach the limit is told so rather than passed."""

from __future__ import annotations

import random

import pytest

from tests.rate_limits import Answer, LeakyBucket

EXPECTED = LeakyBucket(rate=2, burst=20)


def nginx_limit_req(handled_ms: list[int], rate: float, burst: int) -> list[bool]:
    """Which requests nginx's ``limit_req ... nodelay`` accepts, one client address, times in whole ms: its
    ``ngx_http_limit_req_lookup`` in its own units (a thousandth of a request)."""
    accepted, excess, last = [], None, 0
    for now in handled_ms:
        if excess is None:  # the address's first request creates its state
            excess, last = 0, now
            accepted.append(True)
            continue
        ms = max(0, now - last)
        candidate = max(0, excess - int(rate * 1000) * ms // 1000 + 1000)
        if candidate > burst * 1000:
            accepted.append(False)  # a refusal changes nothing
            continue
        excess = candidate
        last = now if ms else last
        accepted.append(True)
    return accepted


def observed(per_s: float, seconds: float, rate: float | None, burst: int, seed: int = 0) -> list[Answer]:
    """Requests sent at ``per_s`` for ``seconds`` to a limiter of ``rate`` and ``burst`` (None: no limit), as a
    client sees them: each handled some time after it was sent and answered some time after that (accepted ones
    later: they go on to a replica)."""
    rng = random.Random(seed)
    handled = sorted(i / per_s + rng.uniform(0, 0.2) for i in range(int(per_s * seconds)))
    verdicts = [True] * len(handled) if rate is None else nginx_limit_req([int(t * 1000) for t in handled], rate, burst)
    return [
        Answer(t - rng.uniform(0.0005, 0.05), t + rng.uniform(0.001, 0.4 if ok else 0.05), 400 if ok else 429, {}, b"")
        for t, ok in zip(handled, verdicts, strict=True)
    ]


def test_a_limiter_as_configured_passes_whatever_the_latencies():
    for seed in range(5):
        answers = observed(8, 10, rate=2, burst=20, seed=seed)
        assert EXPECTED.limit_was_reached(answers)
        assert EXPECTED.over_the_limit(answers, 400) == []
        assert EXPECTED.unjustified_refusals(answers, 400, 429) == []


@pytest.mark.parametrize(
    ("rate", "burst", "found"),
    [
        (4, 20, "over"),  # twice the rate
        (2, 40, "over"),  # twice the burst
        (None, 20, "over"),  # no limit at all
        (1, 20, "unjustified"),  # half the rate
        (2, 10, "unjustified"),  # half the burst
    ],
)
def test_a_limiter_with_another_rate_or_burst_is_caught(rate, burst, found):
    answers = observed(8, 10, rate=rate, burst=burst)
    assert EXPECTED.limit_was_reached(answers)
    over = EXPECTED.over_the_limit(answers, 400)
    unjustified = EXPECTED.unjustified_refusals(answers, 400, 429)
    assert (over != [], unjustified != []) == (found == "over", found == "unjustified"), (over[:3], unjustified[:3])


def test_a_client_slower_than_the_limit_reaches_nothing_and_is_told_so():
    answers = observed(1.5, 20, rate=2, burst=20)
    assert {a.status for a in answers} == {400}
    assert not EXPECTED.limit_was_reached(answers)
