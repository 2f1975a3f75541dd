"""The topics an app reads and writes, whether they exist, and creating the ones it may create.

An app needs its **source** topics (never created here: their partition count and retention
are the producers' decision), ``<source>.dlq``, ``<source>.conflicts`` and, for handlers with
``retry="topics"``, ``<source>.retry`` (the framework's own: a dead letter or conflict
written to a topic that does not exist waits in the outbox forever on a broker with
auto-creation off, the norm), and the **publish** targets its handlers declare
(``@app.handler(..., publishes=[...])``). Reply topics are named by each request's
``reply-to`` header, so they cannot be listed: a reply to a missing one is given up after
CONSUMER_REPLY_TOPIC_MISSING_S (docs/outbox.md).

The framework's topics are created with the source's partition count and replication factor
(CONSUMER_TOPICS_REPLICATION_FACTOR overrides the latter). Plain functions returning data;
the ``consumer topics`` command and the worker's start (:func:`prepare_for_worker`) print
and decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from consumer.app import App
from consumer.constants import CONFLICT_SUFFIX, DLQ_SUFFIX, MAX_BACKOFF_EXPONENT, RETRY_SUFFIX
from consumer.errors import TopicsMissing
from consumer.exitcodes import RET_OK, RET_TOPICS
from consumer.kafka_config import client_options, connection_errors, describe_failure
from consumer.settings import Settings

log = logging.getLogger("consumer.topics")

Role = Literal["source", "dlq", "conflicts", "retry", "publish"]
# Roles the framework creates at worker start (CONSUMER_TOPICS_CREATE) and with --create.
OWNED: frozenset[Role] = frozenset({"dlq", "conflicts", "retry"})
_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


@dataclass(frozen=True)
class Need:
    """One topic the app uses: its name, why, the handler, and the source it derives from."""

    topic: str
    role: Role
    handler: str
    source: str


@dataclass(frozen=True)
class State:
    """A needed topic as found on the broker: partitions None when it does not exist."""

    need: Need
    partitions: int | None
    created: bool = False

    @property
    def exists(self) -> bool:
        return self.partitions is not None

    def row(self) -> dict[str, Any]:
        """The JSON/table form: topic, role, handler, exists, partitions, created."""
        return {
            "topic": self.need.topic,
            "role": self.need.role,
            "handler": self.need.handler,
            "exists": self.exists,
            "partitions": self.partitions,
            "created": self.created,
        }


def needed(app: App) -> list[Need]:
    """Every topic ``app`` reads or writes, once each, sources first (the order of the app)."""
    out: dict[str, Need] = {}
    for h in app.handlers:
        for src in h.topics:
            out.setdefault(src, Need(src, "source", h.name, src))
    for h in app.handlers:
        for src in h.topics:
            out.setdefault(src + DLQ_SUFFIX, Need(src + DLQ_SUFFIX, "dlq", h.name, src))
            out.setdefault(
                src + CONFLICT_SUFFIX, Need(src + CONFLICT_SUFFIX, "conflicts", h.name, src)
            )
            if h.retry == "topics":
                out.setdefault(src + RETRY_SUFFIX, Need(src + RETRY_SUFFIX, "retry", h.name, src))
        for target in h.publishes:
            out.setdefault(target, Need(target, "publish", h.name, h.topics[0]))
    return list(out.values())


async def _admin(s: Settings) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_options(s), request_timeout_ms=s.kafka_request_timeout_ms)
    with connection_errors() as seen:
        try:
            await admin.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                await admin.close()
            from aiokafka.errors import KafkaConnectionError

            named = describe_failure(exc, s, seen)
            if named is None and seen and isinstance(exc, KafkaConnectionError):
                named = KafkaConnectionError(f"cannot connect: {seen[-1]}")  # the cause, once
            raise named or exc from None
    return admin


async def _layout(admin: Any, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    # All topics, not a Metadata request naming them: on a broker with auto-creation on,
    # naming a missing topic in a Metadata request would create it with broker defaults.
    present = set(await admin.list_topics()) & set(names)
    if not present:
        return {}
    described = await admin.describe_topics(sorted(present))
    return {
        t["topic"]: (len(t["partitions"]), max(len(p["replicas"]) for p in t["partitions"]))
        for t in described
        if t["error_code"] == 0 and t["partitions"]
    }


async def inspect(app: App, s: Settings) -> list[State]:
    """Each needed topic and whether (with how many partitions) it exists."""
    admin = await _admin(s)
    try:
        found = await _layout(admin, [n.topic for n in needed(app)])
    finally:
        await admin.close()
    return [State(n, found[n.topic][0] if n.topic in found else None) for n in needed(app)]


async def create(
    app: App, s: Settings, roles: frozenset[Role] = OWNED | {"publish"}
) -> list[State]:
    """Create the missing topics of ``roles`` (never sources) with their source's partition
    count and replication; a topic another worker created meanwhile counts as there.
    Returns the new states."""
    from aiokafka.admin import NewTopic

    roles = frozenset(roles) - {"source"}
    admin = await _admin(s)
    try:
        needs = needed(app)
        found = await _layout(admin, [n.topic for n in needs])
        todo = [n for n in needs if n.role in roles and n.topic not in found]
        # A target whose source is missing gets no partition count to copy: left missing.
        todo = [n for n in todo if n.source in found]
        if todo:
            topics = [
                NewTopic(n.topic, *_shape(found[n.source], s.topics_replication_factor))
                for n in todo
            ]
            response = await admin.create_topics(topics)
            failed = [
                f"{name}: error {code} {message or ''}".strip()
                for name, code, *rest in response.topic_errors
                for message in [rest[0] if rest else None]
                if code not in (0, _TOPIC_ALREADY_EXISTS)
            ]
            if failed:
                raise TopicsMissing("cannot create " + "; ".join(failed), [n.topic for n in todo])
            found.update({n.topic: found[n.source] for n in todo})
        made = {n.topic for n in todo}
    finally:
        await admin.close()
    return [
        State(n, found[n.topic][0] if n.topic in found else None, n.topic in made) for n in needs
    ]


def _shape(source: tuple[int, int], replication: int) -> tuple[int, int]:
    """(partitions, replication factor) of a topic derived from ``source``."""
    return source[0], replication or source[1]


def check_code(states: Sequence[State]) -> int:
    """The exit code of ``topics --check``: RET_TOPICS when any needed topic is missing."""
    return RET_OK if all(st.exists for st in states) else RET_TOPICS


def missing_sources(states: Sequence[State]) -> list[str]:
    return [st.need.topic for st in states if st.need.role == "source" and not st.exists]


def kafka_wait_s(attempt: int) -> float:
    """The wait before looking for Kafka again after ``attempt`` failed looks (0.5 s doubling,
    at most 30 s). The exponent is capped: 0.5 * 2**1024 overflows, which after ~9 hours
    of an unreachable broker would end the worker instead of waiting on."""
    return float(min(0.5 * 2 ** min(attempt, MAX_BACKOFF_EXPONENT), 30.0))


async def prepare_for_worker(
    app: App, s: Settings, stop: asyncio.Event, *, retry_s: Callable[[int], float] | None = None
) -> bool:
    """Before a worker subscribes: create the framework's topics (CONSUMER_TOPICS_CREATE),
    refuse to start when a source is missing (TopicsMissing, one line), and wait, one line per
    attempt, while the broker is unreachable. False when ``stop`` was set meanwhile: the
    worker then returns at once (it drains on SIGTERM in every state)."""
    backoff = retry_s or kafka_wait_s
    attempt = looks = 0
    while not stop.is_set():
        work = create(app, s, OWNED) if s.topics_create else inspect(app, s)
        job = asyncio.ensure_future(work)
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({job, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
            return False
        try:
            states = job.result()
        except TopicsMissing:
            raise
        except Exception as exc:
            from aiokafka.errors import KafkaError

            from consumer.errors import ConfigError

            if isinstance(exc, ConfigError) or not isinstance(exc, KafkaError | OSError):
                raise
            delay = backoff(attempt)
            attempt += 1
            log.warning(
                "Kafka at %s unreachable (%s); trying again in %.1fs",
                s.kafka_bootstrap,
                str(exc) or type(exc).__name__,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        if missing_sources(states) and looks < _MISSING_LOOKS:
            # A topic created a moment ago may not be in the broker's metadata yet (KRaft
            # propagates it asynchronously; a deploy job that creates topics then starts the
            # workers, or a test, meets it): look again briefly before refusing to start.
            looks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _MISSING_LOOK_S)
            continue
        _report(states, s)
        return True
    return False


# How often, and how far apart, a missing source topic is looked for again before the start
# is refused: ~2 s in all, beyond the metadata lag of a topic just created.
_MISSING_LOOKS = 4
_MISSING_LOOK_S = 0.5


def _report(states: Sequence[State], s: Settings) -> None:
    missing = missing_sources(states)
    if missing:
        raise TopicsMissing(
            f"source topic(s) missing on {s.kafka_bootstrap}: {', '.join(missing)}; "
            "they are never created by the framework: create them, then start again",
            missing,
        )
    made = [st.need.topic for st in states if st.created]
    if made:
        log.info("created the framework's topics: %s", ", ".join(made))
    absent = [st.need.topic for st in states if not st.exists]
    if absent:
        # Rows to them wait in the outbox until they exist: say so once, here.
        log.warning(
            "topics missing (rows to them wait in the outbox): %s; "
            "`consumer topics MODULE:APP --create` creates them",
            ", ".join(absent),
        )
