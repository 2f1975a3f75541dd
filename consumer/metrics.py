"""Prometheus metrics: what operators watch (outcomes, leases, lag, outbox) as ``consumer_*``.

Responsible for defining the metrics, feeding them from the runtime's own figures
(:class:`~consumer.runtime.outcomes.BatchResult`, the rebalance listener, the relay's
counters) as an observer (:class:`MetricsObserver`, consumer/observers.py), and exposing
them. It never decides anything and is never read back by the runtime.

Two modes, chosen by prometheus_client when it is first imported:

* **in-process** (no ``PROMETHEUS_MULTIPROC_DIR``): the default registry of this process, so
  an application's own metrics are exposed alongside;
* **multiprocess** (``consumer run`` with ``CONSUMER_METRICS_PORT``): the supervisor sets
  ``PROMETHEUS_MULTIPROC_DIR`` before starting the workers, every worker writes its values to
  memory-mapped files there, and the supervisor serves one endpoint that merges them.

The metric objects are created on first use, so importing this module costs nothing and a
process that records nothing (the supervisor) leaves no files behind.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consumer.errors import ConfigError
from consumer.observers import Observer, Partition, RelayFigures, Tick

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from consumer.app import App
    from consumer.runtime.outcomes import BatchResult
    from consumer.runtime.stats import Stats

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RETRIED = "retried"  # an outcome label that is not an Outcome: the record is read again
NO_HANDLER = "none"  # handler label of a record on a topic no handler consumes

# Seconds: a handler touching one row is ~1 ms; a payment gateway call is ~1 s; 30 s is the
# default handler timeout.
_DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _Metrics:
    """Every metric of the package; one instance per process (see :func:`_m`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.messages = Counter(
            "consumer_messages_total",
            "Consumed records by handler and outcome "
            "(applied, duplicate, conflict, rejected, failed, invalid, skipped, retried).",
            ["handler", "outcome"],
        )
        self.handler_duration = Histogram(
            "consumer_handler_duration_seconds",
            "Time in a handler call, inside its savepoint (failed calls included).",
            ["handler"],
            buckets=_DURATION_BUCKETS_S,
        )
        self.batch_duration = Histogram(
            "consumer_batch_duration_seconds",
            "Time to process one partition batch: Redis round trips, transaction, commit.",
            buckets=_DURATION_BUCKETS_S,
        )
        self.lease_acquisitions = Counter(
            "consumer_lease_acquisitions_total", "Redis leases acquired (or re-acquired)."
        )
        self.lease_contention = Counter(
            "consumer_lease_contention_total",
            "Keys found leased by another worker on the first try of a batch.",
        )
        self.lease_renewals = Counter(
            "consumer_lease_renewals_total", "Leases renewed while a batch was running."
        )
        self.dedup_path = Counter(
            "consumer_dedup_lookups_total",
            "Keys decided by a Redis done marker (path=redis, the fast path) or sent to "
            "the PostgreSQL inbox (path=postgres).",
            ["path"],
        )
        # live*: a dead worker's gauges are dropped (mark_process_dead), not kept forever.
        self.redis_degraded = Gauge(
            "consumer_redis_degraded",
            "1 while a worker runs on PostgreSQL alone because Redis failed.",
            multiprocess_mode="livemax",
        )
        # Every relay reads the same table: the max of equal figures, not their sum.
        self.outbox_backlog = Gauge(
            "consumer_outbox_backlog_rows",
            "Outbox rows not yet published.",
            multiprocess_mode="livemax",
        )
        self.outbox_oldest_age = Gauge(
            "consumer_outbox_oldest_row_age_seconds",
            "Age of the oldest unpublished outbox row.",
            multiprocess_mode="livemax",
        )
        self.outbox_missing_topic = Gauge(
            "consumer_outbox_missing_topic_rows",
            "Unpublished outbox rows per destination topic the cluster does not have "
            "(counted every minute, capped at 1e6; 0 once the topic exists).",
            ["topic"],
            multiprocess_mode="livemax",
        )
        self.relay_published = Counter(
            "consumer_relay_published_messages_total", "Outbox rows published and acked."
        )
        self.outbox_given_up = Counter(
            "consumer_outbox_abandoned_total",
            "Outbox rows given up unpublished, by reason (reply_topic_missing: a reply whose "
            "reply-to topic stayed missing past CONSUMER_REPLY_TOPIC_MISSING_S).",
            ["reason"],
        )
        self.relay_errors = Counter(
            "consumer_relay_errors_total",
            "Relay failures: kind=send (a row refused or not acked), kind=tick (a whole "
            "tick failed, e.g. broker or database down).",
            ["kind"],
        )
        # The owner of a partition reports its lag; a worker that gives a partition up
        # reports 0 for it, so the max over live workers is the owner's figure.
        self.lag = Gauge(
            "consumer_lag_messages",
            "Records between the stored position and the partition's high watermark.",
            ["topic", "partition"],
            multiprocess_mode="livemax",
        )
        self.partition_halted = Gauge(
            "consumer_partition_halted",
            "1 while a partition is stopped at a stored position the broker does not have "
            "(reason=beyond_log_end: topic re-created; before_log_start: records deleted "
            "unconsumed). See `consumer reset-positions`.",
            ["topic", "partition", "reason"],
            multiprocess_mode="livemax",
        )
        self.rebalances = Counter(
            "consumer_rebalances_total", "Rebalances this worker took part in (revocations)."
        )


class _Health:
    """The probes' gauges (read back by consumer/probes.py only), one sample per live worker
    (liveall: a dead worker's samples go with mark_process_dead). Apart from _Metrics so a
    process that never runs a worker (a relay) writes no file for them."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        self.heartbeat = Gauge(
            "consumer_worker_heartbeat_timestamp_seconds",
            "Unix time of the worker event loop's last heartbeat (/healthz).",
            multiprocess_mode="liveall",
        )
        self.check = Gauge(
            "consumer_worker_check",
            "1 while a readiness check passes: check=started (joined the group), "
            "postgres, kafka (reachable); /readyz needs all three from every worker.",
            ["check"],
            multiprocess_mode="liveall",
        )


_metrics: _Metrics | None = None
_health: _Health | None = None


def _m() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# ---------------------------------------------------------------- feeding


def handler_name(app: App, topic: str) -> str:
    handler = app.handler_for(topic)
    return handler.name if handler is not None else NO_HANDLER


def record_tick(
    app: App, partitions: Sequence[Partition], results: Sequence[BatchResult], stats: Stats
) -> None:
    """Everything one fetch loop iteration tells: one result per partition batch, in order."""
    _record_tick(lambda topic: handler_name(app, topic), partitions, results, stats)


def _record_tick(
    name_of: Callable[[str], str],
    partitions: Sequence[Partition],
    results: Sequence[BatchResult],
    stats: Stats,
) -> None:
    m = _m()
    for tp, result in zip(partitions, results, strict=True):
        name = name_of(tp.topic)
        tally = Tally(h.outcome.value for h in result.handled)
        if result.retry_offset is not None:
            tally[RETRIED] += 1
        for outcome, n in tally.items():
            m.messages.labels(name, outcome).inc(n)
        c = result.counts
        for handler, seconds in c.handler_s:
            m.handler_duration.labels(handler).observe(seconds)
        m.batch_duration.observe(result.duration_s)
        _inc(m.lease_acquisitions, c.lease_acquired)
        _inc(m.lease_contention, c.lease_contended)
        _inc(m.lease_renewals, c.lease_renewed)
        _inc(m.dedup_path.labels("redis"), c.fast_path)
        _inc(m.dedup_path.labels("postgres"), c.pg_path)
        lag = stats.lag.get(f"{tp.topic}/{tp.partition}")
        if lag is not None:
            m.lag.labels(tp.topic, str(tp.partition)).set(lag)
    if results:
        m.redis_degraded.set(1 if results[-1].redis_degraded else 0)


def record_revoked(partitions: Iterable[Partition]) -> None:
    """A rebalance took these partitions away: count it, stop reporting their lag."""
    m = _m()
    m.rebalances.inc()
    for tp in partitions:
        m.lag.labels(tp.topic, str(tp.partition)).set(0)


def record_halted(topic: str, partition: int, reason: str, halted: bool) -> None:
    """A partition halted at a position the broker lacks (1), or resumed/given up (0)."""
    _m().partition_halted.labels(topic, str(partition), reason).set(1 if halted else 0)


@dataclass
class _Seen:
    published: int = 0
    failed: int = 0
    errors: int = 0
    given_up: dict[str, int] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)


_relays: weakref.WeakKeyDictionary[Any, _Seen] = weakref.WeakKeyDictionary()


def record_relay(relay: Any) -> None:
    """Bring the relay's figures over; its counters are cumulative, so only the growth counts."""
    m = _m()
    seen = _relays.setdefault(relay, _Seen())
    _inc(m.relay_published, relay.published - seen.published)
    _inc(m.relay_errors.labels("send"), relay.failed - seen.failed)
    _inc(m.relay_errors.labels("tick"), relay.errors - seen.errors)
    seen.published, seen.failed, seen.errors = relay.published, relay.failed, relay.errors
    for reason, n in getattr(relay, "given_up", {}).items():
        _inc(m.outbox_given_up.labels(reason), n - seen.given_up.get(reason, 0))
        seen.given_up[reason] = n
    m.outbox_backlog.set(relay.backlog)
    m.outbox_oldest_age.set(relay.oldest_age_s)
    missing: dict[str, int] = getattr(relay, "missing_topic_rows", {})
    for topic in seen.missing - missing.keys():  # created since: nothing waits any more
        m.outbox_missing_topic.labels(topic).set(0)
    for topic, n in missing.items():
        m.outbox_missing_topic.labels(topic).set(n)
    seen.missing = set(missing)


def record_health(beat_s: float, checks: dict[str, bool]) -> None:
    """The worker's heartbeat (unix time) and its readiness checks, for the probes."""
    global _health
    if _health is None:
        _health = _Health()
    _health.heartbeat.set(beat_s)
    for check, ok in checks.items():
        _health.check.labels(check).set(1 if ok else 0)


def _inc(counter: Any, n: int) -> None:
    if n > 0:
        counter.inc(n)


class MetricsObserver(Observer):
    """The metrics as an observer of the worker and the relay (consumer/observers.py).

    The ``record_*`` functions above are its bodies; they stay callable directly until every
    emitter goes through observers.
    """

    def tick(self, tick: Tick) -> None:
        names = tick.handler_names
        _record_tick(
            lambda topic: names.get(topic, NO_HANDLER), tick.partitions, tick.results, tick.stats
        )

    def revoked(self, partitions: Sequence[Partition]) -> None:
        record_revoked(partitions)

    def halted(self, topic: str, partition: int, reason: str, halted: bool) -> None:
        record_halted(topic, partition, reason, halted)

    def relay_pass(self, relay: RelayFigures) -> None:
        record_relay(relay)


# ---------------------------------------------------------------- exposing


def multiprocess_dir() -> str | None:
    """The shared directory of multiprocess mode, or None in in-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


# The files prometheus_client's multiprocess mode writes: <type>_<pid>.db.
_METRIC_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_\d+\.db$")


def prepare_multiprocess(path: str = "") -> tuple[str, bool]:
    """Set up multiprocess mode for this process and its children; returns (dir, temporary).

    Must run before any child imports prometheus_client. An existing directory is emptied of
    metric files: values left by another run would otherwise be added to this one's. Only
    prometheus_client's own file names are removed; any other ``*.db`` there (a user's
    SQLite file in a directory named by ``CONSUMER_METRICS_DIR``) is left alone and refused
    with ConfigError, since the collector would try to read it as metrics.
    """
    temporary = not path
    if temporary:
        path = tempfile.mkdtemp(prefix="consumer-metrics-")
    else:
        os.makedirs(path, exist_ok=True)
        names = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.db"))]
        foreign = sorted(n for n in names if not _METRIC_FILE.match(n))
        if foreign:
            raise ConfigError(
                f"CONSUMER_METRICS_DIR={path} holds files that are not metrics "
                f"({', '.join(foreign[:3])}); give the metrics a directory of their own"
            )
        for name in names:
            os.remove(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    return path, temporary


def mark_dead(pid: int) -> None:
    """A worker is gone: drop its live gauges (its counters still count in the totals)."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def registry() -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else this process."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
    return merged


def render() -> bytes:
    """The exposition text, as a scrape would get it."""
    from prometheus_client import generate_latest

    return generate_latest(registry())


class Server:
    """``/metrics``, ``/healthz`` and ``/readyz`` (consumer/probes.py), 404 elsewhere, served
    from a daemon thread until :meth:`close`.

    ``cleanup``: a temporary multiprocess directory to remove on close. ``stale_s``: a worker
    whose loop has not beaten for this long fails ``/healthz``.
    """

    def __init__(
        self, port: int, addr: str = "0.0.0.0", cleanup: str = "", stale_s: float = 30.0
    ) -> None:
        from consumer.probes import serve

        self._httpd, self._thread = serve(port, addr, registry(), stale_s)
        self.port = int(self._httpd.server_port)
        self._cleanup = cleanup

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        if self._cleanup:
            shutil.rmtree(self._cleanup, ignore_errors=True)


def serve_workers(port: int, path: str = "", stale_s: float = 30.0) -> Server:
    """The supervisor's endpoint: multiprocess mode for the workers it is about to start.

    Call before starting any worker (they inherit ``PROMETHEUS_MULTIPROC_DIR``). ``path``:
    the directory to share (``CONSUMER_METRICS_DIR``), else a temporary one. Raises OSError
    when the port cannot be bound, ConfigError when the directory holds foreign files.
    """
    path, temporary = prepare_multiprocess(path)
    try:
        return Server(port, cleanup=path if temporary else "", stale_s=stale_s)
    except BaseException:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
        raise
