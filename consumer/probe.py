"""The test seam of the processing path: named fault points and the deliberately broken build.

Production code holds a :class:`Probe` and calls ``await probe.point(name)`` at a few places
(``before_fetch``, ``before_transaction``, ``mid_handler``, ``before_commit``, ``after_commit``,
``after_transaction``, ``relay_after_ack``); the default probe does nothing. Tests and the
chaos campaign pass their own (consumer/testing/faults.py): the harness raises a simulated
crash, a chaos worker kills its process, the bench times commits. Nothing here is a setting:
a probe reaches a worker process only through code (``Worker(probe=...)``, or
:func:`install` by a test entry point, ``python -m consumer.testing.faulty``).

``markers_before_commit`` and ``trust_markers`` exist for one purpose: the chaos campaign's
broken build (scripts/chaos), which must be caught by the checker. Never set them otherwise.
"""

from __future__ import annotations

POINTS = (
    "before_fetch",
    "before_transaction",
    "mid_handler",
    "before_commit",
    "after_commit",
    "after_transaction",
    "relay_after_ack",
)


class Probe:
    """Does nothing: the production probe. Subclass to observe or break the path."""

    markers_before_commit: bool = False  # BROKEN BUILD: done markers written before COMMIT
    trust_markers: bool = False  # BROKEN BUILD: a Redis done marker decides without the inbox

    async def point(self, name: str) -> None:
        """Called at the fault point ``name`` (one of :data:`POINTS`)."""


_installed = Probe()


def installed() -> Probe:
    """The process-wide probe: what a worker or relay built without one uses."""
    return _installed


def install(probe: Probe | None) -> None:
    """Make ``probe`` the process-wide one (None: the production probe again)."""
    global _installed
    _installed = probe if probe is not None else Probe()
