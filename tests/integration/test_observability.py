"""Observability on real services: exact counts on the scrape endpoint of ``consumer run``,
the producer's trace continued through the outbox to the relayed message, and idempotency
keys kept out of the logs when ``hash_keys_in_logs`` says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from consumer import Settings, logs, tracing
from consumer.exitcodes import RET_OK
from scripts.toolkit import processes
from tests.apps.observed import make_app
from tests.conftest import app_settings, eventually, header_map, read_topic, running

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
DLQ_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def fast(settings: Settings, **overrides: Any) -> Settings:
    # Rows of other tests for a topic that does not exist hold a relay tick for the whole
    # metadata timeout; a short one keeps this test's rows from waiting behind them.
    return app_settings(settings, relay_publish_timeout_ms=2_000, **overrides)


def order(n: int, reject: bool = False) -> bytes:
    return msgpack.packb({"n": n, "reject": reject})


# ---------------------------------------------------------------- traces


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider for this test only, recording into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)
        provider.shutdown()


def _one(spans: list[ReadableSpan], name: str, trace_id: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.context.trace_id == int(trace_id, 16)]
    assert len(found) == 1, [(s.name, s.context) for s in spans]
    return found[0]


def _ids(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


async def test_the_producers_trace_continues_to_the_relayed_message(
    settings, topics, producer, unique, spans
):
    topic = await topics("obs-trace", partitions=1, extra=("obs-trace-out",))
    out = f"obs-trace-out-{unique}"
    app = make_app(f"g-{unique}", topic, out, settings=fast(settings))
    dlq_parent = "b7ad6b7169203331"
    await producer.send_and_wait(
        topic,
        order(1),
        key=b"k1",
        headers=[("idempotency-key", b"k1"), ("traceparent", TRACEPARENT.encode())],
    )
    await producer.send_and_wait(
        topic,
        order(2, reject=True),
        key=b"k2",
        headers=[
            ("idempotency-key", b"k2"),
            ("traceparent", f"00-{DLQ_TRACE_ID}-{dlq_parent}-01".encode()),
        ],
    )
    async with running(app):
        [relayed] = await read_topic(settings, out, 1)
        [dead] = await read_topic(settings, topic + ".dlq", 1)

    recorded = list(spans.get_finished_spans())
    handling = _one(recorded, f"{topic} process", TRACE_ID)
    publish = _one(recorded, f"{out} publish", TRACE_ID)
    # producer's span -> handling span -> relay's publish span -> the message on the wire
    assert handling.parent is not None and handling.parent.span_id == int(PARENT_ID, 16)
    assert handling.attributes["consumer.outcome"] == "applied"
    assert publish.parent is not None and publish.parent.span_id == handling.context.span_id
    trace_id, span_id = _ids(header_map(relayed)["traceparent"])
    assert (trace_id, span_id) == (TRACE_ID, f"{publish.context.span_id:016x}")

    # The dead letter of a rejected message sits in the trace where it was rejected.
    rejected = _one(recorded, f"{topic} process", DLQ_TRACE_ID)
    assert rejected.parent is not None and rejected.parent.span_id == int(dlq_parent, 16)
    assert rejected.status.status_code is StatusCode.ERROR
    assert rejected.attributes["consumer.outcome"] == "rejected"
    dlq_publish = _one(recorded, f"{topic}.dlq publish", DLQ_TRACE_ID)
    assert dlq_publish.parent is not None
    assert dlq_publish.parent.span_id == rejected.context.span_id
    assert _ids(header_map(dead)["traceparent"]) == (
        DLQ_TRACE_ID,
        f"{dlq_publish.context.span_id:016x}",
    )


async def test_without_a_tracer_provider_trace_headers_pass_through(
    settings, topics, producer, unique
):
    assert not tracing.enabled()
    topic = await topics("obs-pass", partitions=1, extra=("obs-pass-out",))
    out = f"obs-pass-out-{unique}"
    app = make_app(f"g-{unique}", topic, out, settings=fast(settings))
    sent = [("idempotency-key", b"k1"), ("traceparent", TRACEPARENT.encode())]
    sent.append(("tracestate", b"vendor=1"))
    await producer.send_and_wait(topic, order(1), key=b"k1", headers=sent)
    async with running(app):
        [relayed] = await read_topic(settings, out, 1)
    h = header_map(relayed)
    assert (h["traceparent"], h["tracestate"]) == (TRACEPARENT, "vendor=1")


# ---------------------------------------------------------------- logs


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "clear"])
async def test_keys_are_not_logged_in_clear_when_hashing_is_on(
    settings, topics, producer, unique, caplog, spans, hashed
):
    topic = await topics("obs-logs", partitions=1, extra=("obs-logs-out",))
    secret = f"card-4111-{unique}"
    app = make_app(
        f"g-{unique}",
        topic,
        f"obs-logs-out-{unique}",
        settings=fast(settings, hash_keys_in_logs=hashed),
    )
    # aiokafka's own DEBUG lines dump raw requests, record keys included: they are not ours to
    # shape, and `consumer` commands hold aiokafka at WARNING (docs/observability.md).
    caplog.set_level(logging.DEBUG, logger="consumer")
    for value in (order(1), order(2), order(3, reject=True)):  # applied, conflict, rejected
        key = secret if value != order(3, reject=True) else secret + "-r"
        await producer.send_and_wait(
            topic, value, key=key.encode(), headers=[("idempotency-key", key.encode())]
        )
    async with running(app) as worker:

        async def consumed() -> bool:
            return worker.stats.consumed >= 3

        await eventually(consumed)

    # Every line as the JSON formatter writes it: message and every field.
    ours = [r for r in caplog.records if r.name.startswith("consumer")]
    lines = [logs.JsonFormatter().format(r) for r in ours]
    outcome_lines = [json.loads(line) for line in lines if '"consumer.outcomes"' in line]
    assert sorted(line["outcome"] for line in outcome_lines) == ["applied", "conflict", "rejected"]
    for line in outcome_lines:
        assert line["topic"] == topic and line["partition"] == 0 and "offset" in line
        assert line["namespace"] == f"g-{unique}.observe"
    shown = logs.key_for_logs(secret, hashed)
    assert {line["key"] for line in outcome_lines} == {
        shown,
        logs.key_for_logs(secret + "-r", hashed),
    }
    attributes = [s.attributes.get("consumer.idempotency_key") for s in spans.get_finished_spans()]
    if hashed:
        assert shown.startswith("b2:") and len(shown) == 3 + 32
        assert not [line for line in lines if secret in line]
        assert secret not in str(attributes) and shown in attributes
    else:
        assert shown == secret and any(secret in line for line in lines)


# ---------------------------------------------------------------- metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def outcomes(samples: dict[Any, float], handler: str) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "consumer_messages_total" and dict(labels).get("handler") == handler
    }


def total(samples: dict[Any, float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = processes.consumer_argv("run", "tests.apps.observed:app", "--workers", "2")
    return processes.spawn(argv, env, log)


@contextlib.asynccontextmanager
async def supervisor(env: dict[str, str], log: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``consumer run tests.apps.observed:app --workers 2``; SIGTERMed and reaped on exit."""
    proc = _start(env, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_scrape_after_a_run_shows_the_exact_counts(
    settings, topics, producer, unique, tmp_path
):
    """Two workers behind one endpoint: outcomes, dead letters and relayed rows, exactly."""
    topic = await topics("obs-metrics", partitions=3, extra=("obs-metrics-out",))
    group = f"g-{unique}"
    handler = f"{group}.observe"
    port = _free_port()
    env = {
        **os.environ,
        "OBSERVED_GROUP": group,
        "OBSERVED_TOPIC": topic,
        "OBSERVED_OUT": f"obs-metrics-out-{unique}",
        "CONSUMER_METRICS_PORT": str(port),
        "CONSUMER_FETCH_TIMEOUT_MS": "50",
        "CONSUMER_RELAY_PUBLISH_TIMEOUT_MS": "2000",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    async def send(key: str, value: bytes) -> None:
        # The record key is the idempotency key: every copy of a key on one partition, after
        # its original, so duplicates and conflicts are exactly that.
        await producer.send_and_wait(
            topic, value, key=key.encode(), headers=[("idempotency-key", key.encode())]
        )

    for i in range(6):
        await send(f"a{i}", order(i))  # 6 applied
    for i in range(2):
        await send(f"r{i}", order(100 + i, reject=True))  # 2 rejected: dead letters
    for i in range(2):
        await send(f"bad{i}", b"\xc1")  # 2 invalid (undecodable): dead letters
    for i in range(3):
        await send(f"a{i}", order(i))  # 3 duplicates
    await send("a4", order(999))  # 2 conflicts: same key, another payload
    await send("r0", order(100, reject=False))
    await send("r1", order(101, reject=True))  # 1 duplicate of a definite failure
    expect = {"applied": 6, "rejected": 2, "invalid": 2, "duplicate": 4, "conflict": 2}
    # Relayed: 6 published by the handler, 4 dead letters, 2 conflict records. The relays
    # publish every pending row of the database, other tests' too: at least these.
    relayed = 12

    async with supervisor(env, tmp_path / "run.log") as proc:

        async def counted() -> bool:
            try:
                s = scrape(port)
            except OSError:
                return False
            seen = {k: v for k, v in outcomes(s, handler).items() if v}
            return seen == expect and total(s, "consumer_relay_published_messages_total") >= relayed

        try:
            await eventually(counted, timeout_s=90, every_s=0.5)
        except AssertionError:
            print((tmp_path / "run.log").read_text()[-5000:])
            raise
        samples = scrape(port)
        assert {k: v for k, v in outcomes(samples, handler).items() if v} == expect
        published = total(samples, "consumer_relay_published_messages_total")
        assert published >= relayed
        calls = ("consumer_handler_duration_seconds_count", (("handler", handler),))
        assert samples[calls] == expect["applied"] + expect["rejected"]
        assert total(samples, "consumer_batch_duration_seconds_count") >= 1
        assert total(samples, "consumer_rebalances_total") >= 2  # each worker joined once
        assert samples[("consumer_redis_degraded", ())] == 0
        assert ("consumer_outbox_backlog_rows", ()) in samples
        lag = [labels for (n, labels), _ in samples.items() if n == "consumer_lag_messages"]
        assert {dict(labels)["topic"] for labels in lag} == {topic}

        # A worker dies: its counters stay in the totals, counted once.
        workers = processes.children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)

        async def restarted() -> bool:
            now = processes.children(proc.pid)
            return len(now) == 2 and workers[0] not in now

        await eventually(restarted, timeout_s=30)
        samples = scrape(port)
        assert {k: v for k, v in outcomes(samples, handler).items() if v} == expect
        assert total(samples, "consumer_relay_published_messages_total") >= published
    assert proc.returncode == RET_OK

    # The figures are the broker's: the published messages, dead letters and conflicts.
    assert len(await read_topic(settings, f"obs-metrics-out-{unique}", 6)) == 6
    assert len(await read_topic(settings, topic + ".dlq", 4)) == 4
    assert len(await read_topic(settings, topic + ".conflicts", 2)) == 2
