"""What PostgreSQL and Kafka will accept from a message's handling, checked before it is written.

A value that PostgreSQL refuses (text with NUL or a lone surrogate, jsonb with NaN) must fail
while its message's savepoint is open, as that message's error; found later, in a statement the
whole batch shares, it would fail the batch on every redelivery and stall the partition. These
checks are cheap and run on every result, reason and outgoing row.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Kafka's rule for topic names (kafka.common.internals.Topic): 1-249 of [a-zA-Z0-9._-].
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def valid_topic(name: str) -> bool:
    return _TOPIC.fullmatch(name) is not None and name not in (".", "..")


def text_ok(text: str) -> bool:
    """True if PostgreSQL can store ``text``: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(text: str) -> str:
    """``text`` made storable for people to read: NUL and lone surrogates escaped."""
    if text_ok(text):
        return text
    escaped = text.replace("\x00", "\\x00")
    return escaped.encode("utf-8", "backslashreplace").decode("utf-8")


def problem(value: Any) -> str | None:
    """Why ``value`` (JSON-compatible data) cannot be stored as jsonb, or None if it can."""
    if isinstance(value, str):
        return None if text_ok(value) else "text with NUL or a lone surrogate"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"a non-finite number ({value})"
    if isinstance(value, dict):
        for k, v in value.items():
            found = problem(k) if isinstance(k, str) else None
            if found := found or problem(v):
                return found
        return None
    if isinstance(value, list | tuple):
        for v in value:
            if found := problem(v):
                return found
    return None
