"""The error tree. Classification lives with the error (``retriable``), not in ``except`` lists.

::

    ConsumerError                      root of everything this package raises
    ├── ConfigError                    bad settings or options (at start; unknown in a handler)
    │   ├── MigrationMismatch          an applied migration's file changed or is gone
    │   ├── KafkaAuthError             the broker refused the login or its certificate is untrusted
    │   └── TopicsMissing              a topic the app reads does not exist (never auto-created)
    ├── LifespanError                  an app's lifespan hook failed (docs/lifespan.md)
    │   ├── StartupFailed              an on_startup hook raised: the worker consumed nothing
    │   └── ShutdownFailed             an on_shutdown hook raised (after the drain)
    ├── InvalidMessage                 definite: the message never reached the handler
    │   ├── DecodeError                undecodable bytes (reason "undecodable")
    │   ├── SchemaError                payload fails validation (reason "invalid_schema")
    │   ├── MissingKey                 no or empty idempotency key (reason "missing_key")
    │   └── BadKey                     over-long, non-UTF-8 or NUL-bearing key (reason "bad_key")
    ├── TransientError                 indefinite (retriable = True): nothing is recorded
    │   ├── StoreUnavailable           PostgreSQL or Redis unreachable, commit outcome unknown
    │   ├── LeaseBusy                  another worker holds the key's lease past the wait bound
    │   ├── TransactionEnded           a handler ended the batch transaction behind ctx.db
    │   └── RequestTimeout             a requester's reply did not come in time (requester.py)
    └── HandlerSignal                  control flow raised by handlers
        ├── Reject(reason)             definite failure: recorded, dead-lettered, same answer again
        └── Retry(delay_s)             indefinite: roll back, retry after delay_s (bounded)

Exceptions that are not ours are classified by :func:`is_retriable`: timeouts and network
failures (of the standard library and, by class name, of common client libraries) and
PostgreSQL's "not now" SQLSTATEs (connection, rollback, resources, operator intervention such
as a statement timeout, lock timeout, system and internal errors) are indefinite; a handler may
add classes with ``retry_on=``; everything else follows the handler's ``on_error`` policy.
"""

from __future__ import annotations

import asyncio


class ConsumerError(Exception):
    """Root of every error this package raises.

    ``retriable``: True indefinite, False definite, None unknown (the handler's ``on_error``
    decides). Only a message's own fault (:class:`InvalidMessage`) and the handler's
    :class:`Reject` are definite; the others, raised inside a handler (a ConfigError from a
    codec that cannot map the model of ``ctx.publish``, an OutboxError), are a bug of the
    app's code or configuration: a fixed app must still be able to apply the key, so they
    must not burn it."""

    retriable: bool | None = None


class ConfigError(ConsumerError):
    """Settings or handler options are wrong; raised at start-up, saying how to fix them."""


class MigrationMismatch(ConfigError):
    """An applied migration's file was edited or deleted: the folder no longer describes the
    database. ``migrate`` and workers refuse to start (exit code RET_MIGRATION)."""


class KafkaAuthError(ConfigError):
    """The broker refused the SASL login, or its TLS certificate is not trusted. A restart
    cannot fix it (exit code RET_KAFKA_AUTH)."""


class TopicsMissing(ConfigError):
    """Source topics do not exist: the worker refuses to start rather than wait on the
    client's retries (exit code RET_TOPICS). ``topics`` names them."""

    def __init__(self, message: str, topics: list[str]) -> None:
        super().__init__(message)
        self.topics = topics


class LifespanError(ConsumerError):
    """An ``on_startup`` or ``on_shutdown`` hook of the app raised (docs/lifespan.md)."""


class StartupFailed(LifespanError):
    """A startup hook raised: the worker did not consume (exit code RET_STARTUP). Restarted
    with back-off, as a service that was not reachable yet may be next time."""


class ShutdownFailed(LifespanError):
    """A shutdown hook raised, after the drain; the other hooks still ran (exit code
    RET_WORKER_FAILED)."""


class InvalidMessage(ConsumerError):
    """The message cannot reach a handler. Dead-lettered; nothing recorded under its key."""

    reason = "invalid"
    retriable = False

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


class RequestTimeout(TransientError):
    """No reply to a request within its ``timeout_s`` (consumer/requester.py). The request
    may still be applied: sending it again with the same idempotency key is safe, a copy
    gets the stored answer."""


class LeaseBusy(TransientError):
    """Another worker holds the lease for a key longer than this worker is willing to wait."""


class TransactionEnded(TransientError):
    """The batch transaction ended while a handler ran (a COMMIT or ROLLBACK sent past
    ``ctx.db``'s guard, on the raw connection): the batch fails as a whole and is retried."""


class HandlerSignal(ConsumerError):
    """Control flow raised from a handler."""


class Reject(HandlerSignal):
    """A definite failure: the message is recorded as rejected and dead-lettered.

    A duplicate of a rejected message gets the same answer; it is never retried. ``reason``
    may be any object (an exception, a number, None): it is stored as text, with NUL and lone
    surrogates escaped and cut at ``storable.MAX_REASON_CHARS`` characters.
    """

    retriable = False

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


# The classification rule (docs/handlers.md#classification has it as a table, and
# tests/unit/test_errors.py runs over it). Indefinite means the outcome is unknown or may change
# on retry: nothing is recorded, the key is never burned.
#
# SQLSTATEs, by class or exact code: the database could not do it *now*, whatever the message.
_RETRIABLE_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock, statement completion unknown
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: query_canceled (statement_timeout), admin/crash shutdown
        "58",  # system error: I/O error, undefined file
        "XX",  # internal error, data corrupted, index corrupted
    }
)
_RETRIABLE_SQLSTATES = frozenset(
    {
        "55P03",  # lock_not_available: lock_timeout, NOWAIT
        "25P03",  # idle_in_transaction_session_timeout: the session was ended
        "25P04",  # transaction_timeout (PostgreSQL 17)
    }
)
# Client libraries' timeouts and network failures that are not OSError/TimeoutError
# subclasses, recognised by class name anywhere in the exception's MRO so that none of them is
# a dependency: redis-py (TimeoutError, ConnectionError, BusyLoadingError), httpx
# (TimeoutException, NetworkError, RemoteProtocolError), aiohttp (ClientConnectionError,
# ServerDisconnectedError, ServerTimeoutError), urllib3 (TimeoutError, ProtocolError), asyncpg
# (InterfaceError, ConnectionDoesNotExistError), and other clients' *Timeout classes.
_RETRIABLE_NAMES = frozenset(
    {
        "TimeoutError",
        "TimeoutException",
        "ConnectionError",
        "ConnectionDoesNotExistError",
        "InterfaceError",
        "NetworkError",
        "RemoteProtocolError",
        "ProtocolError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ClusterDownError",
        "TryAgainError",
        "MasterDownError",
        "BusyLoadingError",
        "KafkaTimeoutError",  # aiokafka's (a Requester's send): a timeout it does not flag
    }
)
# The Kafka client's own errors (aiokafka, so a handler asking through consumer.Requester)
# say themselves whether they are worth retrying: ``retriable = True`` on KafkaConnectionError,
# RequestTimedOutError, NodeNotReadyError, NotLeaderForPartitionError, ...
_KAFKA_CLIENTS = frozenset({"aiokafka", "kafka"})


def _retriable_sqlstate(sqlstate: object) -> bool:
    return isinstance(sqlstate, str) and (
        sqlstate in _RETRIABLE_SQLSTATES or sqlstate[:2] in _RETRIABLE_SQLSTATE_CLASSES
    )


def _retriable_class(exc: BaseException) -> bool:
    if isinstance(exc, ValueError | TypeError):
        # A refused argument (asyncpg's client-side DataError is an InterfaceError too, and
        # ctx.db's UnsafeStatement): the handler's bug, never a glitch.
        return False
    if (
        type(exc).__module__.partition(".")[0] in _KAFKA_CLIENTS
        and getattr(exc, "retriable", 0) is True
    ):
        return True
    return any(
        c.__name__ in _RETRIABLE_NAMES or c.__name__.endswith("Timeout") for c in type(exc).__mro__
    )


def is_retriable(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool | None:
    """True if ``exc`` is indefinite, False if definite, None if unknown (policy decides).

    An exception group (``asyncio.TaskGroup``) is indefinite if any of its exceptions is, and
    definite only if all of them are.
    """
    if isinstance(exc, ConsumerError) and exc.retriable is not None:
        return exc.retriable
    if extra and isinstance(exc, extra):
        return True
    if isinstance(exc, BaseExceptionGroup):
        kinds = [is_retriable(e, extra) for e in exc.exceptions]
        if any(k is True for k in kinds):
            return True
        return False if kinds and all(k is False for k in kinds) else None
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionError | OSError):
        return True
    if _retriable_sqlstate(getattr(exc, "sqlstate", None)):
        return True
    if _retriable_class(exc):
        return True
    return None
