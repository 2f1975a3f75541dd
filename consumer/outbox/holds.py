"""Destinations the relay holds back after a refusal: a key (one poison row) or a whole topic.

A refused row holds back its destination key, and a missing topic the whole topic, for a
delay that doubles with each failure up to a bound, so one poison row neither blocks other
keys nor is overtaken by later rows of its own key (the SQL skips held ones:
consumer/outbox/store.py ``Blocked``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from consumer.constants import MAX_BACKOFF_EXPONENT
from consumer.outbox import store
from consumer.outbox.figures import Figures
from consumer.outbox.store import Destination

log = logging.getLogger(__name__)
HOLD_KEY_S = (1.0, 60.0)  # first and longest hold of a key after a refused row
# First and longest hold of a topic the cluster does not have (or not yet: the first is
# short, so a topic created a moment ago waits about a second).
HOLD_TOPIC_S = (1.0, 300.0)
_MAX_KEY_HOLDS = 1_000  # bound on the SQL arrays; beyond it rows are simply retried

Held = Destination | str  # a (topic, key) destination, or a topic


@dataclass(slots=True)
class _Hold:
    until: float
    failures: int


class Holds:
    """The destinations currently held back, and for how long."""

    def __init__(self, figures: Figures) -> None:
        self._figures = figures
        self._holds: dict[Held, _Hold] = {}

    def hold(self, what: Held, delays: tuple[float, float], why: str) -> None:
        """Hold ``what`` back: ``delays[0]`` after the first failure, doubling to ``delays[1]``."""
        prev = self._holds.get(what)
        failures = prev.failures + 1 if prev else 1
        # Capped exponent: a row refused for good is held again and again (1,024 holds of a
        # key are ~17 h), and a float times 2**1024 overflows.
        delay = min(delays[0] * 2 ** min(failures - 1, MAX_BACKOFF_EXPONENT), delays[1])
        self._holds[what] = _Hold(time.monotonic() + delay, failures)
        self._figures.last_error = why
        log.warning("relay: %s; holding it back %.0fs (failure %d)", why, delay, failures)

    def release(self, what: Held) -> None:
        """``what`` worked again (a row acked, a topic resolved): its next failure starts over."""
        self._holds.pop(what, None)

    def blocked(self) -> store.Blocked:
        """What the next tick must not read, as the SQL takes it."""
        now = time.monotonic()
        live = [w for w, h in self._holds.items() if h.until > now]
        keys = [w for w in live if isinstance(w, tuple)][:_MAX_KEY_HOLDS]
        return store.Blocked([w for w in live if isinstance(w, str)], keys)

    def topics(self) -> list[str]:
        """The topics held back as missing (until they resolve), expired holds included."""
        return sorted(w for w in self._holds if isinstance(w, str))

    def count(self) -> int:
        """How many destinations are held back now."""
        now = time.monotonic()
        return sum(1 for h in self._holds.values() if h.until > now)
