"""Back-off delays stay finite and cheap whatever the attempt or failure count.

``2 ** n`` on Python ints is exact: for an attempt number read from a record
(``x-retry-attempt`` of a retry topic, runtime/retry_topics.py) it is a number of that many
bits, computed on the event loop (``10**30`` never finishes), and multiplied by a float
base it overflows (``OverflowError``) once ``n`` passes ~1024: a supervisor restarting a
crash-looping worker for hours, or a worker waiting hours for Kafka, would then die of its own
back-off. Every exponent is capped (64) before it is raised.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from consumer import Settings, supervisor
from consumer.runtime import invoke
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_the_in_place_backoff_of_a_huge_attempt_is_its_cap_at_once() -> None:
    """In a child process: before the cap, the call never returns (killed after 20 s)."""
    code = (
        "from consumer import Settings\n"
        "from consumer.runtime.invoke import backoff_s\n"
        "print(backoff_s(Settings(retry_backoff_ms=200, retry_backoff_max_ms=10_000), 10**30))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == 10.0


def test_the_in_place_backoff_still_grows_then_caps() -> None:
    s = Settings(retry_backoff_ms=200, retry_backoff_max_ms=10_000)
    assert [invoke.backoff_s(s, n) for n in (0, 1, 2, 3, 6, 7, 65, 10_000)] == [
        0.2,
        0.2,
        0.4,
        0.8,
        6.4,
        10.0,
        10.0,
        10.0,
    ]


def test_the_supervisor_backoff_after_thousands_of_quick_failures_is_its_cap() -> None:
    assert supervisor.backoff_s(2_000, 0.5, 30.0) == 30.0
    assert [supervisor.backoff_s(n, 0.5, 30.0) for n in (1, 2, 3, 8)] == [0.5, 1.0, 2.0, 30.0]


def test_the_wait_for_an_unreachable_kafka_after_thousands_of_looks_is_its_cap() -> None:
    from consumer.topics import kafka_wait_s

    assert [kafka_wait_s(n) for n in (0, 1, 5, 6, 2_000)] == [0.5, 1.0, 16.0, 30.0, 30.0]


def test_the_topic_backoff_of_a_huge_attempt_is_its_cap() -> None:
    from consumer.runtime.retry_topics import topic_backoff_s

    s = Settings(retry_topic_backoff_multiplier=100.0, retry_topic_backoff_max_ms=60_000)
    assert topic_backoff_s(s, 10**30) == 60.0


def test_a_relay_hold_after_thousands_of_refusals_is_its_longest() -> None:
    """A row the broker refuses for good is held again after every hold (60 s at most): after
    ~17 hours that is 1,024 failures, and 1.0 * 2**1024 an OverflowError in the relay."""
    from consumer.outbox.figures import Figures
    from consumer.outbox.holds import HOLD_KEY_S, Holds

    holds = Holds(Figures())
    for _ in range(2_000):
        holds.hold(("t", b"k"), HOLD_KEY_S, "refused")
    assert holds.blocked().keys == [("t", b"k")]
