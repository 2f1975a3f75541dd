"""Metrics fed from batch results and relays, merged across processes; spans and the trace
headers of outbox rows, with and without a tracer provider."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from consumer import App, ConfigError, Context, metrics, tracing
from consumer.context import Outgoing
from consumer.dedup.identity import Identity
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.runtime.outcomes import BatchCounts, BatchResult, Handled, Outcome
from consumer.runtime.stats import Stats

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
MSG = Message(
    "pay", 0, 7, b"k", b"v", (("idempotency-key", b"k1"), ("traceparent", TRACEPARENT.encode()))
)


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class P(BaseModel):
    n: int


class FakeRelay:
    """The figures a Relay exposes (metrics keep a weak reference to each relay)."""

    def __init__(self, published: int, failed: int, errors: int, backlog: int) -> None:
        self.published, self.failed, self.errors = published, failed, errors
        self.backlog, self.oldest_age_s = backlog, 2.5


# ---------------------------------------------------------------- metrics, in-process


@pytest.mark.unit
def test_a_tick_counts_outcomes_per_handler_and_the_batch_figures():
    tag = uuid.uuid4().hex[:8]
    app = App(f"g{tag}")

    @app.handler(f"t{tag}", schema=P)
    async def settle(p: P, ctx: Context) -> None:
        return None

    handled = [Handled(MSG, o) for o in (Outcome.APPLIED,) * 3 + (Outcome.DUPLICATE,)]
    first = BatchResult(
        handled=[*handled, Handled(MSG, Outcome.CONFLICT)],
        retry_offset=12,  # the batch stopped on a record that is read again: one "retried"
        counts=BatchCounts(3, 1, 2, fast_path=1, pg_path=4, handler_s=[(f"g{tag}.settle", 0.02)]),
        duration_s=0.05,
    )
    orphan = BatchResult(handled=[Handled(MSG, Outcome.INVALID)])
    stats = Stats(lag={f"t{tag}/0": 17})
    partitions = [
        SimpleNamespace(topic=f"t{tag}", partition=0),
        SimpleNamespace(topic="x", partition=1),
    ]
    metrics.record_tick(app, partitions, [first, orphan], stats)

    s = samples(metrics.render())
    by = {
        dict(labels)["outcome"]: v
        for (name, labels), v in s.items()
        if name == "consumer_messages_total" and ("handler", f"g{tag}.settle") in labels
    }
    assert by == {"applied": 3, "duplicate": 1, "conflict": 1, "retried": 1}
    assert (
        s[("consumer_messages_total", frozenset({("handler", "none"), ("outcome", "invalid")}))]
        >= 1
    )
    h = frozenset({("handler", f"g{tag}.settle")})
    assert s[("consumer_handler_duration_seconds_count", h)] == 1
    assert s[("consumer_handler_duration_seconds_sum", h)] == pytest.approx(0.02)
    lag = frozenset({("topic", f"t{tag}"), ("partition", "0")})
    assert s[("consumer_lag_messages", lag)] == 17

    metrics.record_revoked([partitions[0]])
    assert samples(metrics.render())[("consumer_lag_messages", lag)] == 0


@pytest.mark.unit
def test_relay_counters_grow_by_what_the_relay_did_since_last_time():
    before = samples(metrics.render())
    relay = FakeRelay(published=5, failed=1, errors=0, backlog=40)
    metrics.record_relay(relay)
    relay.published, relay.errors = 8, 2
    metrics.record_relay(relay)
    metrics.record_relay(relay)  # nothing new: nothing added
    after = samples(metrics.render())

    def grew(name: str, labels: frozenset[tuple[str, str]] = frozenset()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("consumer_relay_published_messages_total") == 8
    assert grew("consumer_relay_errors_total", frozenset({("kind", "send")})) == 1
    assert grew("consumer_relay_errors_total", frozenset({("kind", "tick")})) == 2
    assert after[("consumer_outbox_backlog_rows", frozenset())] == 40
    assert after[("consumer_outbox_oldest_row_age_seconds", frozenset())] == 2.5


# ---------------------------------------------------------------- metrics, multiprocess

_CHILD = """
import sys
from consumer import metrics
class Relay:
    published, failed, errors = int(sys.argv[1]), 0, 0
    backlog, oldest_age_s = int(sys.argv[2]), 1.0
metrics.record_relay(Relay())
metrics.record_revoked([])
print(__import__("os").getpid())
"""


def test_one_endpoint_sums_the_workers_counters_and_forgets_a_dead_ones_gauges(
    tmp_path, monkeypatch
):
    """Real processes writing to one directory, merged by the supervisor's registry."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)  # restored after the test
    path, temporary = metrics.prepare_multiprocess(str(tmp_path / "m"))
    assert not temporary and os.environ[metrics.MULTIPROC_ENV] == path
    pids = {}
    for published, backlog in ((3, 10), (4, 30)):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(published), str(backlog)],
            env={**os.environ},
            check=True,
            timeout=60,
            capture_output=True,
        )
        pids[backlog] = int(child.stdout)
    files = sorted(f for f in os.listdir(path) if f.startswith("gauge"))
    assert files == sorted(f"gauge_livemax_{pid}.db" for pid in pids.values())

    s = samples(metrics.render())
    assert s[("consumer_relay_published_messages_total", frozenset())] == 7
    assert s[("consumer_rebalances_total", frozenset())] == 2
    # Every relay reads the same table: the largest figure, not the sum.
    assert s[("consumer_outbox_backlog_rows", frozenset())] == 30

    metrics.mark_dead(pids[30])
    s = samples(metrics.render())
    assert s[("consumer_outbox_backlog_rows", frozenset())] == 10
    assert s[("consumer_relay_published_messages_total", frozenset())] == 7

    # A new run in the same directory starts from nothing.
    metrics.prepare_multiprocess(path)
    assert not os.listdir(path)


# ---------------------------------------------------------------- traces


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.use_provider(provider)
    try:
        yield exp
    finally:
        tracing.use_provider(None)
        provider.shutdown()


def _handler() -> object:
    return SimpleNamespace(name="g.settle")


IDENT = Identity("g.settle", "card-4111", "hash", P(n=1))


@pytest.mark.unit
def test_without_a_provider_nothing_is_recorded_and_headers_pass_through():
    assert not tracing.enabled()
    with tracing.handling(MSG, "g", _handler(), IDENT, hash_key=True) as span:  # type: ignore[arg-type]
        rows = envelopes.published(MSG, "g.settle", "k1", [Outgoing("out", None, b"", ())])
        assert span.headers() is None  # rows written later keep the message's own
    assert dict(rows[0].headers)["traceparent"] == TRACEPARENT
    headers = [("traceparent", TRACEPARENT.encode())]
    assert tracing.publishing("out", headers)[0] is headers


@pytest.mark.unit
def test_rows_written_in_the_handling_span_carry_it_and_the_relay_continues_it(exporter):
    own = (("traceparent", "00-11111111111111111111111111111111-2222222222222222-01"),)
    with tracing.handling(MSG, "g", _handler(), IDENT, hash_key=True) as span:  # type: ignore[arg-type]
        [row] = envelopes.published(MSG, "g.settle", "k1", [Outgoing("out", None, b"", own)])
        span.finish("done", "")
        later = span.headers()
    [handling] = exporter.get_finished_spans()
    assert handling.kind is SpanKind.CONSUMER and handling.name == "pay process"
    assert handling.parent is not None and handling.parent.span_id == 0x00F067AA0BA902B7
    assert handling.attributes["consumer.idempotency_key"].startswith("b2:")
    assert handling.attributes["consumer.outcome"] == "applied"
    mine = f"00-{TRACE_ID}-{handling.context.span_id:016x}-01"
    # The handler's own traceparent is replaced, not duplicated.
    assert [v for n, v in row.headers if n == "traceparent"] == [mine]
    assert later is not None and dict(later)["traceparent"] == mine
    dead = envelopes.dead_letter(MSG, "rejected", "no", "g.settle", "k1", later)
    assert [v for n, v in dead.headers if n == "traceparent"] == [mine]

    wire, publish = tracing.publishing("out", [(n, v.encode()) for n, v in row.headers])
    publish.done(SimpleNamespace(cancelled=lambda: False, exception=lambda: None))
    sent = exporter.get_finished_spans()[-1]
    assert sent.kind is SpanKind.PRODUCER and sent.parent.span_id == handling.context.span_id
    assert [v for n, v in wire if n == "traceparent"] == [
        f"00-{TRACE_ID}-{sent.context.span_id:016x}-01".encode()
    ]


def test_a_metrics_dir_holding_other_db_files_is_refused_and_left_alone(tmp_path, monkeypatch):
    """CONSUMER_METRICS_DIR is the user's choice: their own app.db there must survive."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    (tmp_path / "app.db").write_bytes(b"SQLite format 3\0")
    (tmp_path / "counter_123.db").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"app\.db"):
        metrics.prepare_multiprocess(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["app.db", "counter_123.db"]
    (tmp_path / "app.db").unlink()
    metrics.prepare_multiprocess(str(tmp_path))  # prometheus_client's own files only
    assert not os.listdir(tmp_path)
