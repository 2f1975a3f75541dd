"""The relay's figures: what operators and metrics read, and the parts of a relay write.

A plain record, so that each part of the relay (consumer/outbox/sending.py, holds.py,
topics.py) gets the counters it updates and nothing else of the relay. Every counter is
cumulative; an observer (consumer/metrics.py) turns growth into increments.
"""

from __future__ import annotations


class Figures:
    """``backlog`` (unpublished rows) and ``oldest_age_s`` (age of the oldest one), refreshed
    every ``backlog_interval_s`` even while the broker is down; ``published``, ``failed``
    (sends refused or not acked), ``out_of_order`` (a later row of a key acked while an
    earlier one failed), ``errors`` (passes that failed as a whole), ``truncated`` (dead
    letters sent without their value), ``given_up`` (rows given up, by reason),
    ``missing_topic_rows`` (rows waiting per destination topic the cluster does not have,
    counted every MISSING_TOPIC_REPORT_S, capped), ``loops``
    (completed passes: lets a caller see the relay is idle), ``last_error`` (the latest one).
    """

    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.out_of_order = 0
        self.errors = 0
        self.truncated = 0
        self.backlog = 0
        self.oldest_age_s = 0.0
        self.given_up: dict[str, int] = {}
        self.missing_topic_rows: dict[str, int] = {}
        self.loops = 0
        self.last_error = ""
