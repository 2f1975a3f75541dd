"""A source topic created a moment before the worker starts may not be in the broker's
metadata yet: the start looks again briefly before refusing (consumer/topics.py). Seen as a
flaky start in tests/integration/test_topics.py, where the topic is created just before."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer import App, Settings
from consumer import topics as topics_mod
from consumer.errors import TopicsMissing

pytestmark = pytest.mark.unit


def _states(exists: bool) -> list[topics_mod.State]:
    need = topics_mod.Need("src", "source", "h", "src")
    return [topics_mod.State(need, 2 if exists else None)]


async def test_a_source_that_appears_a_moment_later_is_found(monkeypatch: Any) -> None:
    calls: list[int] = []

    async def create(app: Any, s: Any, owned: Any) -> list[topics_mod.State]:
        calls.append(1)
        return _states(exists=len(calls) >= 2)  # missing at the first look only

    monkeypatch.setattr(topics_mod, "create", create)
    monkeypatch.setattr(topics_mod, "_MISSING_LOOK_S", 0.01)
    ok = await topics_mod.prepare_for_worker(App("g"), Settings(), asyncio.Event())
    assert ok and len(calls) == 2


async def test_a_source_still_missing_after_the_looks_refuses_the_start(monkeypatch: Any) -> None:
    calls: list[int] = []

    async def create(app: Any, s: Any, owned: Any) -> list[topics_mod.State]:
        calls.append(1)
        return _states(exists=False)

    monkeypatch.setattr(topics_mod, "create", create)
    monkeypatch.setattr(topics_mod, "_MISSING_LOOK_S", 0.01)
    with pytest.raises(TopicsMissing):
        await topics_mod.prepare_for_worker(App("g"), Settings(), asyncio.Event())
    assert len(calls) == 1 + topics_mod._MISSING_LOOKS
