"""Batch handlers without services: the decorator's checks, how a call's return value is read,
which records a call gets, and the harness running them (consumer/batch_handler.py,
consumer/runtime/batch_run.py). The outcome scenarios on every backend are in tests/contract.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from consumer import App, BatchContext, ConfigError, Item, Outcome, Reject, Retry, Settings
from consumer.batch_handler import BatchHandler, verdicts
from consumer.dedup.identity import Identity
from consumer.message import Message
from consumer.runtime import items as rt
from consumer.runtime.batch_run import runnable
from consumer.runtime.decide import Known, View
from consumer.testing import TestApp

pytestmark = pytest.mark.unit


class Pay(BaseModel):
    id: str
    cents: int


def test_the_decorator_returns_a_batch_handler_and_checks_its_options() -> None:
    app = App("ledger", settings=Settings())

    @app.batch_handler("pays", schema=Pay, key=lambda p: p.id, timeout_s=5)
    async def settle(batch: list[Item[Pay]], ctx: BatchContext) -> None:
        return None

    assert isinstance(settle, BatchHandler) and app.handler_for("pays") is settle
    assert (settle.name, settle.timeout_s, settle.key_from) == ("ledger.settle", 5, "payload")

    with pytest.raises(ConfigError, match="@batch_handler on sync_one: the function must be async"):

        @app.batch_handler("other", schema=Pay)
        def sync_one(batch: list[Item[Pay]], ctx: BatchContext) -> None:  # type: ignore[arg-type]
            return None

    with pytest.raises(ConfigError, match=r"must take \(batch, ctx\)"):

        @app.batch_handler("other", schema=Pay)
        async def one_arg(batch: list[Item[Pay]]) -> None:  # type: ignore[arg-type]
            return None

    with pytest.raises(ConfigError, match=r"already has handler .ledger\.settle."):

        @app.handler("pays", schema=Pay)
        async def again(p: Pay, ctx: Any) -> None:
            return None


def _items(n: int) -> tuple[BatchContext, list[Item[Pay]]]:
    msg = Message("t", 0, 0, None, b"", ())
    batch = [Item(Pay(id=f"k{i}", cents=i), f"k{i}", "ns", msg, 1, "h", i) for i in range(n)]
    return BatchContext(db=None, items=list(batch)), batch  # type: ignore[arg-type]


def test_verdicts_read_lists_dicts_none_and_marks() -> None:
    ctx, batch = _items(3)
    assert verdicts(ctx, None) == [None, None, None]
    assert verdicts(ctx, {"k2": 2, "k0": 0, "k1": 1}) == [0, 1, 2]
    refused = Reject("no")
    ctx.reject(batch[0], "marked")
    later = Retry(reason="busy")
    got = verdicts(ctx, [1, refused, later])
    assert isinstance(got[0], Reject) and got[0].reason == "marked"  # a mark wins
    assert got[1] is refused and got[2] is later
    ctx.retry(batch[1])
    assert isinstance(verdicts(ctx, [1, refused, later])[1], Retry)  # Retry wins over Reject
    for bad in ([1, 2], {"k0": 0}, 7):
        with pytest.raises(TypeError):
            verdicts(ctx, bad)
    _, other = _items(3)
    with pytest.raises(ValueError, match="not one of this batch"):
        ctx.publish(other[0], "out", {"a": 1})


def _live(*specs: tuple[str, str]) -> list[rt.Item]:
    out = []
    for offset, (key, h) in enumerate(specs):
        ident = Identity("ns", key, h, Pay(id=key, cents=0))
        out.append(rt.Item(Message("t", 0, offset, None, b"", ()), None, ident))
    return out


def test_a_call_gets_first_copies_of_claimed_keys_up_to_the_first_stop() -> None:
    live = _live(("a", "h1"), ("a", "h1"), ("k", "h9"), ("b", "h2"), ("w", "h3"), ("c", "h4"))
    view = View(known={("ns", "k"): Known("done", "h9")}, claimed={("ns", i) for i in "abc"})
    # "w" is neither claimed nor known: it waits, so "c" after it must not be called.
    assert [it.ident.key for it in runnable(live, view, None)] == ["a", "b"]  # type: ignore[arg-type,union-attr]


def ledger_app() -> tuple[App, list[list[str]]]:
    calls: list[list[str]] = []
    app = App("ledger", settings=Settings())

    @app.batch_handler("pays", schema=Pay, key=lambda p: p.id)
    async def settle(batch: list[Item[Pay]], ctx: BatchContext) -> dict[str, Any]:
        calls.append([it.key for it in batch])
        ctx.publish_many("settled", batch, lambda it: {"id": it.key}, key=lambda it: it.key)
        out: dict[str, Any] = {}
        for it in batch:
            if it.payload.cents < 0:
                out[it.key] = Reject("negative")
            elif it.payload.cents > 10**6:
                out[it.key] = {"cents": 2**70}  # no reply can carry it: this item fails alone
            else:
                out[it.key] = {"cents": it.payload.cents}
        return out

    return app, calls


async def test_the_harness_runs_one_call_per_batch() -> None:
    app, calls = ledger_app()
    async with TestApp(app) as t:
        seen = await t.send_batch("pays", [Pay(id="a", cents=1), Pay(id="n", cents=-1)])
        assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.REJECTED]
        assert seen[0].result == {"cents": 1} and seen[1].reason == "negative"
        assert calls == [["a", "n"]]
        assert [m.key for m in t.published("settled")] == [b"a"]  # n's publish was dropped
        assert [m.header_str("x-reason") for m in t.dead_letters("pays")] == ["rejected"]


async def test_an_unstorable_result_falls_back_and_fails_that_item_alone() -> None:
    app, calls = ledger_app()
    async with TestApp(app) as t:
        seen = await t.send_batch("pays", [Pay(id="a", cents=1), Pay(id="big", cents=10**7)])
        assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.FAILED]
        assert calls == [["a", "big"], ["a"], ["big"]]
        assert [m.header_str("x-reason") for m in t.dead_letters("pays")] == ["unstorable"]
        assert await t.inbox("pays", "big") is None  # nothing recorded: the key stays free
        assert [m.key for m in t.published("settled")] == [b"a"]
