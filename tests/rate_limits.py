"""Measuring nginx's request-rate limit (``limit_req ... burst=B nodelay``) instead of racing it.

nginx keeps, per client address, an "excess" that each accepted request raises by one and that drains at ``rate``
per second; a request is refused (and changes nothing) when it would take the excess over ``burst``. Solved for
the accepted requests' times a_1 < a_2 < … (a fresh address: the first request creates the state at 0), that rule
reads: a request at time t is accepted exactly when, for every accepted request i before it, the accepted
requests in [a_i, t) number at most ``burst + rate × (t − a_i)``.

The client cannot see when nginx handled a request, only that it was between sending it and reading the answer.
So each check takes the bound that the observed timestamps allow in its own favour: a request counted as over the
limit, or a refusal counted as unjustified, is so whenever nginx handled the requests inside those intervals. A
slow client widens the intervals and so only weakens what can be concluded; ``limit_was_reached`` says whether the
requests came fast enough that nginx had to refuse some (without it, accepting everything would pass).
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

# nginx counts time in whole milliseconds from a clock it reads once per event loop turn: each interval is widened
# by this much on both sides.
CLOCK_SLACK_S = 0.002


@dataclass(frozen=True)
class Answer:
    """One request: when it was sent and answered (``time.monotonic()``), its status, and a refusal's details."""

    sent: float
    answered: float
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class LeakyBucket:
    """nginx's ``limit_req``: ``rate`` requests per second, ``burst`` more at once (``nodelay``)."""

    rate: float
    burst: int

    def over_the_limit(self, answers: list[Answer], accepted_status: int) -> list[str]:
        """Accepted requests that surely broke the limit: accepted i and t, and in [i, t) more accepted requests
        than ``burst + rate × (t − i)`` allows, counting only those surely handled in between and taking the
        longest time nginx can have seen from i to t."""
        earliest, latest = handled_between([a for a in answers if a.status == accepted_status])
        surely_before = latest[:, None] <= earliest[None, :]  # [i, t]
        # [i, t]: requests surely handled after i and before t.
        between = (earliest[None, :] >= latest[:, None]).astype(float) @ (latest[:, None] <= earliest[None, :])
        longest = latest[None, :] - earliest[:, None]
        broken = surely_before & (between + 1 > self.burst + self.rate * longest)  # + 1: i itself
        return [
            f"{int(between[i, t]) + 2} requests accepted within {longest[i, t]:.3f} s "
            f"(at most {self.burst + 1 + self.rate * longest[i, t]:.1f} allowed)"
            for i, t in zip(*np.nonzero(broken), strict=True)
        ]

    def unjustified_refusals(self, answers: list[Answer], accepted_status: int, refused_status: int) -> list[str]:
        """Refusals the limit cannot explain: before a refused t there must be an accepted i with more accepted
        requests in [i, t) than ``burst + rate × (t − i)``, counting every accepted request that may have been
        handled there and taking the shortest time nginx can have seen from i to t."""
        earliest, latest = handled_between([a for a in answers if a.status == accepted_status])
        refused_earliest, refused_latest = handled_between([a for a in answers if a.status == refused_status])
        if not len(refused_earliest):
            return []
        may_follow = (latest[None, :] >= earliest[:, None]).astype(float)  # [i, x]: x may come after i
        may_precede = earliest[:, None] <= refused_latest[None, :]  # [x, t]: x may come before t
        at_most = may_follow @ may_precede
        shortest = np.maximum(0.0, refused_earliest[None, :] - latest[:, None])
        justified = (may_precede & (at_most > self.burst + self.rate * shortest)).any(axis=0)
        first = earliest.min() if len(earliest) else refused_earliest.min()
        return [
            f"refused {refused_earliest[t] - first:.3f} s after the first request accepted, with at most "
            f"{int(may_precede[:, t].sum())} accepted before it"
            for t in np.nonzero(~justified)[0]
        ]

    def limit_was_reached(self, answers: list[Answer]) -> bool:
        """Whether the requests came so fast that accepting them all would surely have broken the limit."""
        everything = [Answer(a.sent, a.answered, 0, {}, b"") for a in answers]
        return bool(self.over_the_limit(everything, accepted_status=0))


# POST /train and POST /sweeps, together, per client address: docs/reliability.md (nginx/nginx.conf.template's
# `limit_req zone=train`). Written out, not read from the template: a changed template must fail the tests.
TRAIN_LIMIT = LeakyBucket(rate=2, burst=20)


def handled_between(answers: list[Answer]) -> tuple[np.ndarray, np.ndarray]:
    """The earliest and the latest time at which nginx can have handled each request."""
    sent = np.array([a.sent for a in answers], dtype=float)
    answered = np.array([a.answered for a in answers], dtype=float)
    return sent - CLOCK_SLACK_S, answered + CLOCK_SLACK_S


def fresh_loopback_address() -> str:
    """A loopback address no earlier request came from (Linux routes all of 127/8 to lo): nginx keys its limits by
    client address, so a test starts with none of its state."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def post(url: str, path: str, body: bytes, source: str) -> Answer:
    """One POST on a connection of its own from ``source``."""
    parts = urlsplit(url)
    sent = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answered = time.monotonic()  # the status line: nginx has decided
        return Answer(sent, answered, response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def paced_posts(
    url: str,
    paths: list[str],
    body: bytes,
    per_s: float,
    bucket: LeakyBucket,
    at_least_s: float,
    at_most_s: float,
) -> list[Answer]:
    """POST ``body`` to ``paths`` in turn, ``per_s`` requests a second from one fresh client address, each sent on
    time whatever the earlier ones wait for; for ``at_least_s`` seconds, then on until ``bucket``'s limit was
    surely reached or ``at_most_s`` passed."""
    source = fresh_loopback_address()
    started = time.monotonic()
    checked_at = started + at_least_s
    sending = []
    with ThreadPoolExecutor(max_workers=32) as pool:
        for i in range(int(at_most_s * per_s)):
            time.sleep(max(0.0, started + i / per_s - time.monotonic()))
            if time.monotonic() >= checked_at:  # once a second: the check costs a few ms per hundred requests
                checked_at += 1.0
                if bucket.limit_was_reached([f.result() for f in sending if f.done()]):
                    break
            sending.append(pool.submit(post, url, paths[i % len(paths)], body, source))
    return sorted((f.result() for f in sending), key=lambda a: a.sent)  # a request that raised fails the test


def assert_held_to(limit: LeakyBucket, answers: list[Answer]) -> None:
    """``answers`` (the app's 400 to a bad body, or nginx's 429) are those of ``limit``, which they reached."""
    counts = Counter(a.status for a in answers)
    span = answers[-1].answered - answers[0].sent
    print(f"{len(answers)} requests in {span:.1f} s: {dict(counts)}")
    assert limit.limit_was_reached(answers), f"the client was too slow to reach the limit: {dict(counts)}"
    over = limit.over_the_limit(answers, 400)
    assert not over, f"{len(over)} pairs of accepted requests over the limit, e.g. {over[:3]}"
    unjustified = limit.unjustified_refusals(answers, 400, 429)
    assert not unjustified, f"{len(unjustified)} refusals within the limit, e.g. {unjustified[:3]}"
    assert set(counts) == {400, 429}, counts
    refused = next(a for a in answers if a.status == 429)
    assert refused.headers["Content-Type"] == "application/json" and "Retry-After" in refused.headers
    assert json.loads(refused.body)["error"]["code"] == "too_many_requests"
