"""The error tree. Classification lives with the error (``retriable``), not in ``except`` lists.

::

    ConsumerError                      root of everything this package raises
    ├── ConfigError                    bad settings or handler options (at start, never mid-run)
    ├── InvalidMessage                 definite: the message never reached the handler
    │   ├── DecodeError                undecodable bytes (reason "undecodable")
    │   ├── SchemaError                payload fails validation (reason "invalid_schema")
    │   ├── MissingKey                 no or empty idempotency key (reason "missing_key")
    │   └── BadKey                     over-long, non-UTF-8 or NUL-bearing key (reason "bad_key")
    ├── TransientError                 indefinite (retriable = True): nothing is recorded
    │   ├── StoreUnavailable           PostgreSQL or Redis unreachable, commit outcome unknown
    │   └── LeaseBusy                  another worker holds the key's lease past the wait bound
    └── HandlerSignal                  control flow raised by handlers
        ├── Reject(reason)             definite failure: recorded, dead-lettered, same answer again
        └── Retry(delay_s)             indefinite: roll back, retry after delay_s (bounded)

Exceptions that are not ours are classified by :func:`is_retriable`: timeouts, connection
errors, PostgreSQL serialization failures and deadlocks are indefinite; a handler may add
classes with ``retry_on=``; everything else follows the handler's ``on_error`` policy.
"""

from __future__ import annotations

import asyncio


class ConsumerError(Exception):
    """Root of every error this package raises."""

    retriable: bool = False


class ConfigError(ConsumerError):
    """Settings or handler options are wrong; raised at start-up, saying how to fix them."""


class InvalidMessage(ConsumerError):
    """The message cannot reach a handler. Dead-lettered; nothing recorded under its key."""

    reason = "invalid"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class DecodeError(InvalidMessage):
    reason = "undecodable"


class SchemaError(InvalidMessage):
    reason = "invalid_schema"


class MissingKey(InvalidMessage):
    reason = "missing_key"


class BadKey(InvalidMessage):
    reason = "bad_key"


class UnknownTopic(InvalidMessage):
    reason = "no_handler"


class TransientError(ConsumerError):
    """Indefinite failure: the outcome is unknown or may change on retry. Never recorded."""

    retriable = True


class StoreUnavailable(TransientError):
    """PostgreSQL or Redis could not be reached, or a commit's outcome is unknown."""


class LeaseBusy(TransientError):
    """Another worker holds the lease for a key longer than this worker is willing to wait."""


class HandlerSignal(ConsumerError):
    """Control flow raised from a handler."""


class Reject(HandlerSignal):
    """A definite failure: the message is recorded as rejected and dead-lettered.

    A duplicate of a rejected message gets the same answer; it is never retried. ``reason``
    may be any object (an exception, a number, None): it is stored as text, with NUL and lone
    surrogates escaped and cut at ``storable.MAX_REASON_CHARS`` characters.
    """

    def __init__(self, reason: object = "rejected") -> None:
        # Imported here: storable is a leaf module, but errors is imported by nearly everything.
        from consumer.storable import reason_text

        text = "rejected" if reason is None else reason_text(reason)
        super().__init__(text)
        self.reason: str = text


# A Retry delay beyond this would hold the message's partition for that long (an infinite
# one, forever); longer waits belong to max_attempts and a replay of the dead letter.
MAX_RETRY_DELAY_S = 900.0


class Retry(HandlerSignal):
    """Ask for the message to be retried after ``delay_s`` seconds. Counts as an attempt.

    ``delay_s`` is clamped to ``[0, MAX_RETRY_DELAY_S]``; one that is not a number (or NaN)
    means the handler's usual back-off (``delay_s`` None).
    """

    retriable = True

    def __init__(self, delay_s: float | None = 0.0, reason: object = "retry requested") -> None:
        from consumer.storable import reason_text

        text = reason_text(reason)
        super().__init__(text)
        self.delay_s: float | None = retry_delay(delay_s)
        self.reason: str = text


def retry_delay(delay_s: object) -> float | None:
    """A ``Retry`` delay made safe to wait for: None for NaN or a non-number, else clamped."""
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        return None
    if isinstance(delay_s, int):  # float() of a huge int overflows
        return float(min(max(delay_s, 0), MAX_RETRY_DELAY_S))
    if delay_s != delay_s:  # NaN
        return None
    return min(max(delay_s, 0.0), MAX_RETRY_DELAY_S)


# SQLSTATE classes that mean "try again": serialization_failure, deadlock_detected,
# connection exceptions (08xxx), admin shutdown / crash shutdown / cannot connect now (57P0x),
# lock_not_available.
_RETRIABLE_SQLSTATES = ("40001", "40P01", "55P03", "57P01", "57P02", "57P03")
_RETRIABLE_SQLSTATE_CLASSES = ("08",)


def is_retriable(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool | None:
    """True if ``exc`` is indefinite, False if definite, None if unknown (policy decides)."""
    if isinstance(exc, ConsumerError):
        return exc.retriable
    if extra and isinstance(exc, extra):
        return True
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionError | OSError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate in _RETRIABLE_SQLSTATES or sqlstate[:2] in _RETRIABLE_SQLSTATE_CLASSES:
            return True
    name = type(exc).__name__
    if name in {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionError"}:
        return True
    return None
