"""Named fault points in the processing path, for the chaos campaign and the test harness.

Production code calls :func:`point` at a few places (``mid_handler``, ``before_commit``,
``after_commit``); nothing happens unless a hook is installed. ``CONSUMER_FAULTS`` (a setting,
e.g. ``after_commit=0.01``) makes a worker process kill itself with that probability at that
point: the crash a real deployment gets from the OOM killer or a lost node.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable

Hook = Callable[[str], Awaitable[None]]

POINTS = ("mid_handler", "before_commit", "after_commit", "relay_after_ack")
_hooks: dict[str, Hook] = {}


async def point(name: str) -> None:
    hook = _hooks.get(name)
    if hook is not None:
        await hook(name)


def install(name: str, hook: Hook | None) -> None:
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    if hook is None:
        _hooks.pop(name, None)
    else:
        _hooks[name] = hook


def clear() -> None:
    _hooks.clear()


def configure(spec: str, seed: int | None = None) -> None:
    """Install process-killing hooks from ``point=probability,...``."""
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
