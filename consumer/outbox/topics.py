"""Topics the relay cannot send to: found missing, held back, and replies to them given up.

A row to a topic the cluster does not have holds the whole topic back (consumer/outbox/
holds.py). A reply whose topic is still missing ``reply_topic_missing_s`` after it was
written is given up (the requester chose the topic); events and dead letters to a missing
topic stay pending, held and in the backlog figures, until the topic exists: giving them up
would lose data.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from consumer import keys
from consumer.outbox import store
from consumer.outbox.figures import Figures
from consumer.outbox.holds import HOLD_TOPIC_S, Holds
from consumer.outbox.producer import BrokerUnavailable, Sender
from consumer.settings import Settings

log = logging.getLogger(__name__)
LOCK_BASE = 0x6F7574  # "out": advisory lock class of the outbox shards
GIVE_UP_REPLY_TOPIC_MISSING = "reply_topic_missing"  # given_up / metric reason
_REPLY_PREFIX = keys.KEY_TAG_REPLY + keys.PART_SEPARATOR  # every reply's idempotency key
_MAX_LOGGED_TOPICS = 10_000  # bound on the topics whose given-up replies were logged
# How often the rows waiting for missing topics are counted, and each such topic warned about.
MISSING_TOPIC_REPORT_S = 60.0
MISSING_TOPIC_COUNT_CAP = 1_000_000  # a count stops here (the gauge then reads the cap)


async def missing(
    producer: Sender, topics: list[str], holds: Holds, timeout_s: float
) -> tuple[set[str], set[str]]:
    """Topics whose rows cannot be sent this tick: (absent from the cluster, not resolved).

    Topics the producer has not seen yet are looked up in ONE fresh metadata request
    first: a topic the cluster does not have is held at once, instead of costing a
    metadata timeout (``relay_publish_timeout_ms``) and delaying every other row of the
    shards taken this tick. A topic that merely failed to resolve while the broker is
    unreachable is not held (that would delay recovery): the tick fails as a whole instead.
    """
    unseen = [t for t in topics if producer.client.cluster.partitions_for_topic(t) is None]
    absent = await _absent(producer, unseen, timeout_s) if unseen else set()
    for topic in sorted(absent):
        holds.hold(topic, HOLD_TOPIC_S, f"topic {topic!r} does not exist")
    present = [t for t in topics if t not in absent]
    meta = await asyncio.gather(
        *(producer.partitions_for(t) for t in present), return_exceptions=True
    )
    failed = {t for t, m in zip(present, meta, strict=True) if isinstance(m, BaseException)}
    for topic in present:
        if topic not in failed:
            holds.release(topic)
    return absent, failed


async def _absent(producer: Sender, unseen: list[str], timeout_s: float) -> set[str]:
    """Of topics the producer has not seen, those the cluster does not have."""
    try:
        cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout_s)
    except Exception as exc:
        raise BrokerUnavailable(f"no cluster metadata: {type(exc).__name__}: {exc}") from exc
    # A topic created a moment ago may not be in that answer yet: it is held like a missing
    # one, whose first hold is short (HOLD_TOPIC_S), rather than waited for here. A wait in
    # the tick (10 s each, until this change) held back every other topic's rows with it,
    # at each relay start and each time a missing topic's hold lapsed.
    listed = cluster.topics()
    return {t for t in unseen if t not in listed}


async def report_missing(conn: Any, holds: Holds, figures: Figures) -> None:
    """Count the rows waiting for each topic held back as missing, and warn about each, in
    the framework's own words: once per MISSING_TOPIC_REPORT_S per topic (the caller's
    timer), instead of the Kafka client's line per metadata refresh (kafka_config.py
    quiets those). The counts go to ``figures.missing_topic_rows`` (the metric
    ``consumer_outbox_missing_topic_rows``). A held topic with no row left (its replies
    given up) is released: nothing waits for it."""
    held = holds.topics()
    counts: dict[str, int] = {}
    if held:
        text, args = store.pending_to(held, MISSING_TOPIC_COUNT_CAP)
        counts = {str(r[0]): int(r[1]) for r in await conn.fetch(text, *args)}
    for topic in held:
        if not counts.get(topic):
            holds.release(topic)
            counts.pop(topic, None)
    figures.missing_topic_rows = counts
    for topic, n in sorted(counts.items()):
        log.warning(
            "relay: %s%d outbox row(s) wait for topic %r, which does not exist; create it "
            "(`consumer topics MODULE:APP --create` makes the dlq, conflicts and declared ones)",
            "at least " if n >= MISSING_TOPIC_COUNT_CAP else "",
            n,
            topic,
            extra={"topic": topic, "rows": n},
        )


class ReplyGiveUp:
    """Gives up the replies to missing topics once they are older than the bound."""

    def __init__(self, settings: Settings, figures: Figures) -> None:
        self._settings = settings
        self._figures = figures
        self._logged_topics: set[str] = set()

    async def __call__(self, conn: Any, topics: list[str]) -> None:
        """Give up the replies to ``topics`` (missing from the cluster) older than the bound.

        Any requester chooses its ``reply-to``; a reply to a topic nobody creates would stay
        pending forever (retention deletes only rows that left the outbox) and be re-checked
        after every hold. A requester has long stopped waiting (Spring Kafka's reply timeout
        is seconds), so the reply is given up: counted, logged once per topic, and deleted by
        retention. Events and dead letters are never given up: that would lose data.
        """
        reason = GIVE_UP_REPLY_TOPIC_MISSING
        bound_s = self._settings.reply_topic_missing_s
        text, args = store.give_up_replies(LOCK_BASE, topics, bound_s, _REPLY_PREFIX, reason)
        gone = [r[0] for r in await conn.fetch(text, *args)]
        if not gone:
            return
        given_up = self._figures.given_up
        given_up[reason] = given_up.get(reason, 0) + len(gone)
        if len(self._logged_topics) > _MAX_LOGGED_TOPICS:
            self._logged_topics.clear()
        for topic in sorted(set(gone) - self._logged_topics):
            self._logged_topics.add(topic)
            log.error(
                "relay: topic %r does not exist; gave up %d reply row(s) to it written more "
                "than %ds ago (given_up=%s); later ones are given up without logging again",
                topic,
                gone.count(topic),
                bound_s,
                reason,
            )
