"""What PostgreSQL and Kafka will accept from a message's handling, checked before it is written.

A value that PostgreSQL refuses (text with NUL or a lone surrogate, jsonb with NaN) must fail
while its message's savepoint is open, as that message's error; found later, in a statement the
whole batch shares, it would fail the batch on every redelivery and stall the partition. These
checks are cheap and run on every result, reason and outgoing row.
"""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------ results and replies
#
# A result is stored as jsonb and sent to requesters as msgpack. jsonb does not give back the
# JSON it was given: it orders object keys its own way, turns -0.0 into 0.0, and writes every
# number in plain notation, so a float Python writes with an exponent (1e+20, any |x| >= 1e16)
# comes back an integer, possibly one msgpack cannot encode (>= 2**64). A reply built from the
# handler's value would then differ from (or, for a duplicate, fail unlike) the one built from
# what PostgreSQL gives back. So both are built from the *result form*: the value as JSON, keys
# sorted, numbers in the one representation jsonb round-trips. ``result_form`` of a jsonb
# round trip of ``result_form(v)`` is ``result_form(v)`` again, so every copy's reply is
# byte-identical (tests/integration/test_poison_results.py).

# msgpack's integer range; an int outside it has no msgpack encoding.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Python writes floats from 1e16 up with an exponent; jsonb gives them back as integers.
_PLAIN_FLOAT_LIMIT = 1e16
# Deeper than this, msgpack (511) or the Python stack refuses the value.
MAX_RESULT_DEPTH = 200
# Reasons are stored, sent in dead-letter headers and in replies: bounded.
MAX_REASON_CHARS = 2000


class Unstorable(ValueError):
    """A handler's result cannot be stored and answered identically; the message's own failure."""


def result_form(value: Any) -> Any:
    """The form a result is stored, compared and answered in; raises :class:`Unstorable`."""
    flat = _flat_form(value)
    if flat is not None:
        return flat
    try:
        data = json.loads(json.dumps(value))
    except (TypeError, ValueError, RecursionError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise Unstorable(f"the result is not JSON-serialisable ({detail})") from None
    if found := problem(data):
        raise Unstorable(f"the result contains {found}, which PostgreSQL refuses")
    return _normal(data, strict=True, depth=0)


# The exact types a flat result (the common ``{"id": ..., "cents": ...}``) may hold for
# :func:`_flat_form` to take it: each comes back from a JSON round trip as itself.
_FLAT_TYPES = frozenset({str, int, bool, type(None)})


def _flat_form(value: Any) -> dict[str, Any] | None:
    """:func:`result_form` of a dict of text keys to text, ints in msgpack's range, bools and
    None, without the JSON round trip (the same value, keys sorted); None for anything else."""
    if type(value) is not dict:
        return None
    for k, v in value.items():
        kind = type(v)
        if type(k) is not str or kind not in _FLAT_TYPES or not text_ok(k):
            return None
        if (kind is str and not text_ok(v)) or (kind is int and not _INT_MIN <= v <= _INT_MAX):
            return None
    return {k: value[k] for k in sorted(value)}


def stored_form(value: Any) -> Any:
    """:func:`result_form` of a result read back from the inbox; never raises.

    Records written before results were checked may hold integers beyond msgpack's range:
    they are answered as the nearest float (the value a float result had been)."""
    try:
        return _normal(value, strict=False, depth=0)
    except (Unstorable, RecursionError):
        return value


def _normal(value: Any, *, strict: bool, depth: int) -> Any:
    if depth > MAX_RESULT_DEPTH:
        raise Unstorable(f"the result is nested deeper than {MAX_RESULT_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return _normal_int(value, strict)
    if isinstance(value, float):
        return _normal_float(value)
    if isinstance(value, dict):
        return {
            k: _normal(value[k], strict=strict, depth=depth + 1) for k in sorted(value, key=str)
        }
    if isinstance(value, list):
        return [_normal(v, strict=strict, depth=depth + 1) for v in value]
    if strict:
        raise Unstorable(f"the result contains a {type(value).__name__}")
    return value


def _normal_int(value: int, strict: bool) -> Any:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    if strict:
        raise Unstorable(
            "the result contains an integer outside the 64-bit range a reply can carry "
            f"({str(value)[:40]}); return it as a string"
        )
    try:
        return float(value)
    except OverflowError:
        return str(value)


def _normal_float(value: float) -> Any:
    if value == 0.0:
        return 0.0  # jsonb has no -0
    if value.is_integer() and abs(value) >= _PLAIN_FLOAT_LIMIT:
        whole = int(value)
        return whole if _INT_MIN <= whole <= _INT_MAX else value
    return value


def reason_text(reason: object, limit: int = MAX_REASON_CHARS) -> str:
    """Any reason object (a str, an exception, None, a number) as storable, bounded text.

    Never raises: a reason whose ``str()`` fails is described by its type."""
    if isinstance(reason, str):
        text = reason
    elif isinstance(reason, BaseException):
        text = describe(reason)
    else:
        text = _str_or_type(reason)
    text = safe_text(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


def describe(exc: BaseException) -> str:
    """``<Type>: <message>`` for an exception, even one whose ``__str__`` raises."""
    return f"{type(exc).__name__}: {_str_or_type(exc)}"


def _str_or_type(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        try:
            return repr(obj)
        except Exception:
            return f"<{type(obj).__name__} that cannot be printed>"
