"""The test hook passed into the runtime and the relay: named points, and switches for tests.

Production code awaits ``probe.point(name)`` at a few places (``relay_after_ack`` in the
relay, ...); the default :class:`Probe` does nothing there. A test, the chaos campaign or the
bench passes its own subclass (crash at a point, count, delay) instead of patching private
methods or setting test-only settings. :func:`installed` is the process-wide default for
components built without one.
"""

from __future__ import annotations


class Probe:
    """Does nothing; override :meth:`point` (and set the switches) in a test's subclass."""

    markers_before_commit: bool = False
    trust_markers: bool = False

    async def point(self, name: str) -> None:
        """Reached the named point; the default returns at once."""


_installed = Probe()


def installed() -> Probe:
    """The process-wide probe: what a component built without one uses."""
    return _installed


def install(p: Probe | None) -> None:
    """Make ``p`` the process-wide probe; None restores the one that does nothing."""
    global _installed
    _installed = p if p is not None else Probe()
