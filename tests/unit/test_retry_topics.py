"""The pure parts of retries that do not block (consumer/runtime/retry_topics.py), the
handler option and the topics an app with ``retry="topics"`` needs."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import BaseModel

from consumer import App, ConfigError, Context, Settings
from consumer.errors import MAX_RETRY_DELAY_S
from consumer.message import Message
from consumer.outbox.envelopes import unpack_headers
from consumer.runtime import retry_topics
from consumer.topics import needed


class Pay(BaseModel):
    id: str


pytestmark = pytest.mark.unit


def _app() -> App:
    app = App("g")

    @app.handler("orders", schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> None: ...

    @app.handler("other", schema=Pay, key=lambda p: p.id)
    async def plain(p: Pay, ctx: Context) -> None: ...

    return app


def test_retry_topics_are_subscribed_created_but_not_sources() -> None:
    app = _app()
    assert app.topics == ["orders", "other"]
    assert app.subscribed == ["orders", "other", "orders.retry"]
    assert app.handler_for("orders.retry") is app.handler_for("orders")
    assert app.handler_for("other.retry") is None
    roles = {n.topic: n.role for n in needed(app)}
    assert roles["orders.retry"] == "retry" and "other.retry" not in roles


def test_bad_retry_mode_and_a_source_named_like_a_retry_topic_are_refused() -> None:
    app = _app()
    with pytest.raises(ConfigError, match="retry must be"):
        app.handler("x", schema=Pay, retry="later")(lambda p, ctx: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="retry topic"):
        app.handler("orders.retry", schema=Pay)(lambda p, ctx: None)


def test_attempts_count_from_the_header_only_on_a_retry_topic() -> None:
    src = Message("orders", 0, 5, b"k", b"v", (("x-retry-attempt", b"4"),))
    assert retry_topics.attempt_of(src, 0) == 1  # a source record's header is not read
    assert (
        retry_topics.attempt_of(
            Message(
                "orders.retry",
                0,
                1,
                None,
                b"",
                retry_of="orders",
                headers=(("x-retry-attempt", b"4"),),
            ),
            0,
        )
        == 4
    )
    junk = Message("orders.retry", 0, 1, None, b"", (("x-retry-attempt", b"?"),), retry_of="orders")
    assert retry_topics.attempt_of(junk, 1) == 3


def test_backoff_grows_and_is_capped() -> None:
    s = Settings(
        retry_topic_backoff_ms=1000,
        retry_topic_backoff_multiplier=2.0,
        retry_topic_backoff_max_ms=5000,
    )
    assert [retry_topics.topic_backoff_s(s, n) for n in (1, 2, 3, 4, 100)] == [1, 2, 4, 5, 5]


def test_the_retry_row_is_the_original_and_restores_exactly_on_arrival() -> None:
    headers = (("idempotency-key", b"p-1"), ("bin", b"\xff\x00"), ("x-retry-attempt", b"9"))
    first = Message("orders", 2, 7, b"rk", b"\x81\xa1a\x01", headers)
    row = retry_topics.retry_row(first, 2, 1234, "down")
    h = dict(row.headers)
    assert (row.topic, row.key, row.value) == ("orders.retry", b"rk", first.value)
    assert h["idempotency-key"] == "p-1" and "bin" not in h
    assert (h["x-retry-attempt"], h["x-retry-due-ms"], h["x-retry-origin"]) == (
        "2",
        "1234",
        "orders/2/7",
    )
    assert ("bin", b"\xff\x00") in unpack_headers(h["x-original-headers"])
    # As read back from the retry topic: the original headers exactly, plus this hop's.
    wire = tuple((n, v.encode()) for n, v in row.headers)
    back = retry_topics.arrived(_app(), [Message("orders.retry", 0, 3, b"rk", row.value, wire)])[0]
    assert back.retry_of == "orders"
    assert back.header("bin") == b"\xff\x00" and back.header("x-retry-attempt") == b"2"
    assert back.header("x-original-headers") is None
    # A second hop keeps the first origin.
    again = dict(retry_topics.retry_row(back, 3, 99, "down").headers)
    assert again["x-retry-origin"] == "orders/2/7" and again["x-retry-attempt"] == "3"


def _rec(offset: int, due: bytes, written_ms: int | None = None) -> SimpleNamespace:
    """A fetched record as aiokafka gives it: ``timestamp`` in ms (written now by default)."""
    ts = int(time.time() * 1000) if written_ms is None else written_ms
    return SimpleNamespace(offset=offset, headers=[("x-retry-due-ms", due)], timestamp=ts)


def test_hold_back_pauses_a_retry_partition_at_its_first_record_not_due() -> None:
    rec = _rec

    tp_retry, tp_src = TopicPartition("orders.retry", 0), TopicPartition("orders", 0)
    later: list[tuple[object, int]] = []
    work = {
        tp_retry: [rec(0, b"0"), rec(1, b"bad"), rec(2, b"99999999999999"), rec(3, b"0")],
        tp_src: [rec(0, b"99999999999999")],  # never held: not a retry topic
    }
    out = retry_topics.hold_back(
        _app(), Settings(), work, lambda tp, off, delay_s, why: later.append((tp, off))
    )
    assert [r.offset for r in out[tp_retry]] == [0, 1]
    assert [r.offset for r in out[tp_src]] == [0]
    assert later == [(tp_retry, 2)]


def _held(recs: list[SimpleNamespace], settings: Settings | None = None) -> list[float]:
    """The pauses ``hold_back`` asks for on one retry partition holding ``recs``."""
    later: list[float] = []
    retry_topics.hold_back(
        _app(),
        settings or Settings(),
        {TopicPartition("orders.retry", 0): recs},
        lambda tp, off, delay_s, why: later.append(delay_s),
    )
    return later


@pytest.mark.parametrize("due", [b"inf", b"1e999", b"nan", b"-inf", b"Infinity"])
def test_a_due_time_that_is_not_a_finite_number_is_due_now(due: bytes) -> None:
    assert _held([_rec(0, due)]) == []


def test_a_due_time_far_ahead_is_bounded_by_the_record_timestamp() -> None:
    """Due in a year: written longer than the cap ago, due now; written now, paused at most
    the cap; written (by its timestamp) further ahead than the cap, or not at all, due now."""
    s = Settings(retry_topic_backoff_max_ms=1_000)
    cap_ms = max(1_000, MAX_RETRY_DELAY_S * 1000)  # the furthest the framework writes
    now_ms = int(time.time() * 1000)
    year = str(now_ms + 365 * 86_400_000).encode()
    assert _held([_rec(0, year, now_ms - int(cap_ms) - 1_000)], s) == []
    [paused] = _held([_rec(0, year, now_ms)], s)
    assert cap_ms / 1000 - 5 < paused <= cap_ms / 1000
    assert _held([_rec(0, year, now_ms + int(cap_ms) + 60_000)], s) == []
    assert _held([_rec(0, year, -1)], s) == []
    # What the framework writes is never cut short: due in 10 s, written now, waits 10 s.
    [waits] = _held([_rec(0, str(now_ms + 10_000).encode(), now_ms)], s)
    assert 9 < waits <= 10


def test_a_bound_app_routes_its_retry_topic_to_the_bound_handler() -> None:
    """A worker runs App.bound(deps): a record from ``<topic>.retry`` must reach the copy
    that carries the dependencies and the middleware chain, not the registered original."""
    app = _app()
    deps = object()
    run = app.bound(deps)
    handler = run.handler_for("orders")
    assert handler is not None and handler.deps is deps
    assert run.handler_for("orders.retry") is handler
    assert run.subscribed == ["orders", "other", "orders.retry"]


def test_a_handler_on_a_retry_topic_of_a_handler_with_retry_topics_is_refused() -> None:
    """``<topic>.retry`` belongs to the framework once ``topic``'s handler has
    ``retry="topics"``: another handler on it, before or after, per-message or batch, or the
    same handler on both, is refused at registration, one line naming the topic."""

    async def fn(p: Pay, ctx: Context) -> None: ...

    async def batch_fn(batch: list[Any], ctx: Any) -> None: ...

    def after() -> None:
        app = App("g")
        app.handler("x", schema=Pay, retry="topics")(fn)
        app.handler("x.retry", schema=Pay, name="other")(fn)

    def before() -> None:
        app = App("g")
        app.handler("x.retry", schema=Pay, name="other")(fn)
        app.handler("x", schema=Pay, retry="topics")(fn)

    def batch_after() -> None:
        app = App("g")
        app.handler("x", schema=Pay, retry="topics")(fn)
        app.batch_handler("x.retry", schema=Pay, name="other")(batch_fn)

    def both() -> None:
        App("g").handler("x", "x.retry", schema=Pay, retry="topics")(fn)

    def both_reversed() -> None:
        App("g").handler("x.retry", "x", schema=Pay, retry="topics")(fn)

    for register in (after, before, batch_after, both, both_reversed):
        with pytest.raises(ConfigError, match=r"'x\.retry'") as err:
            register()
        assert "\n" not in str(err.value), register.__name__
