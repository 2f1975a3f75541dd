"""The exactly-once audit of a ledger: every expected key once, with its effect, nothing else.

A ledger (the payments app's ``ledger``, the benchmark's ``bench_ledger``) has no unique
constraint on purpose, so that a double apply shows as two rows instead of being refused by
the schema. The audit holds its rows against what the ground truth expects to have taken
effect. It reads nothing itself: the callers fetch the rows and the truth, and report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LedgerAudit:
    """What the ledger holds against what was expected to take effect."""

    expected: int  # keys expected to take effect
    rows: int = 0  # ledger rows read
    per_key: Counter[Any] = field(default_factory=Counter)  # rows per key
    missing: set[Any] = field(default_factory=set)  # expected keys without a row
    twice: dict[Any, int] = field(default_factory=dict)  # keys with more than one row
    altered: Counter[Any] = field(default_factory=Counter)  # rows of an expected key, unlike it
    unexpected: Counter[Any] = field(default_factory=Counter)  # rows of keys never expected

    @property
    def ok(self) -> bool:
        return not (self.missing or self.twice or self.altered or self.unexpected)


def audit_ledger(
    expected: Mapping[Hashable, object], rows: Iterable[tuple[Hashable, object]]
) -> LedgerAudit:
    """Hold ``rows`` of ``(key, effect)`` against ``{key: expected effect}``.

    Pass ``None`` as every effect to check the keys alone.
    """
    audit = LedgerAudit(len(expected))
    for key, effect in rows:
        audit.rows += 1
        audit.per_key[key] += 1
        if key not in expected:
            audit.unexpected[key] += 1
        elif effect != expected[key]:
            audit.altered[key] += 1
    audit.missing = set(expected) - set(audit.per_key)
    audit.twice = {k: n for k, n in audit.per_key.items() if n > 1}
    return audit
