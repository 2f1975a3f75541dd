"""Fault injection for the test suite and the chaos campaign, through the probe seam.

:class:`Points` is a :class:`~consumer.probe.Probe` whose fault points run hooks installed by
name; :func:`install`/:func:`clear` edit the process-wide one (what a worker or relay built
without a probe uses). :func:`configure` installs process-killing hooks from a spec such as
``after_commit=0.01``: the crash a real deployment gets from the OOM killer or a lost node.
A worker *process* gets them through the test entry point ``python -m consumer.testing.faulty``
(``DEDUP_TEST_FAULTS``, ``DEDUP_TEST_BROKEN``), never through the framework's settings.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable

from consumer import probe as probes
from consumer.probe import POINTS, Probe

Hook = Callable[[str], Awaitable[None]]

BROKEN_BUILDS = ("done_before_commit",)


class Points(Probe):
    """A probe running, at each fault point, the hook installed under its name."""

    def __init__(self, broken: str = "") -> None:
        if broken and broken not in BROKEN_BUILDS:
            raise ValueError(f"unknown broken build {broken!r}; known: {', '.join(BROKEN_BUILDS)}")
        # The broken build (scripts/chaos): done markers before the commit, and trusted as
        # the fence; the chaos checker must catch it.
        self.markers_before_commit = self.trust_markers = broken == "done_before_commit"
        self.hooks: dict[str, Hook] = {}

    async def point(self, name: str) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            await hook(name)


def _points() -> Points:
    current = probes.installed()
    if not isinstance(current, Points):
        current = Points()
        probes.install(current)
    return current


def install(name: str, hook: Hook | None) -> None:
    """Run ``hook`` at the process-wide fault point ``name`` (None: remove it)."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    hooks = _points().hooks
    if hook is None:
        hooks.pop(name, None)
    else:
        hooks[name] = hook


def clear() -> None:
    """The production probe again, process-wide."""
    probes.install(None)


def configure(spec: str, seed: int | None = None, broken: str = "") -> None:
    """Install process-killing hooks from ``point=probability,...``, and the broken build."""
    probes.install(Points(broken))
    rng = random.Random(seed)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, prob = part.partition("=")
        probability = float(prob or "1")

        async def crash(point: str, p: float = probability) -> None:
            if rng.random() < p:
                # One line on stderr first: an injected crash must be countable in the logs
                # and never mistaken for a real one.
                os.write(2, f"consumer fault point {point}: exiting with 137\n".encode())
                os._exit(137)

        install(name.strip(), crash)


class Calling(Probe):
    """A probe that calls ``hook(name)`` at every fault point (a test's own fault logic)."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    async def point(self, name: str) -> None:
        await self.hook(name)
