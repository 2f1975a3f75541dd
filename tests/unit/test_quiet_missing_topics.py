"""aiokafka's "Topic X not found in cluster metadata": once per topic per interval (issue 16)."""

from __future__ import annotations

import logging

import pytest

from consumer.kafka_config import _NOT_FOUND, _MissingTopicLines

pytestmark = pytest.mark.unit


def _line(topic: str, at_s: float, msg: str = _NOT_FOUND) -> logging.LogRecord:
    rec = logging.LogRecord("aiokafka.cluster", logging.ERROR, __file__, 1, msg, (topic,), None)
    rec.created = at_s
    return rec


def test_one_line_per_topic_per_interval_then_the_count_held_back():
    quiet = _MissingTopicLines(interval_s=300)
    passed = [
        rec.getMessage()
        for at, topic in [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (299, "a"), (300, "a")]
        for rec in [_line(topic, at)]
        if quiet.filter(rec)
    ]
    assert passed == [
        "Topic a not found in cluster metadata",
        "Topic b not found in cluster metadata",
        "Topic a not found in cluster metadata (and 3 more such lines held back)",
    ]


def test_other_aiokafka_lines_pass():
    quiet = _MissingTopicLines()
    assert quiet.filter(_line("a", 0, "Topic %s is not authorized for this client"))
    assert quiet.filter(_line("a", 0, "Topic %s is not authorized for this client"))
