"""Logging for every ``consumer`` command: readable lines for people, JSON lines for machines.

The one place where handlers and formats are installed. structlog renders every line, both
the standard library's records (the framework logs through ``logging``, with structured fields
passed as ``extra=``) and those of applications that log through ``structlog.get_logger()``:

* JSON lines (``--log-json`` or ``CONSUMER_LOG_JSON``): ts, level, logger, msg, pid, worker,
  then every field;
* otherwise structlog's console renderer when stderr is a terminal, and plain
  ``time LEVEL [pid wN] logger: message key=value`` lines when it is not (a file, a pipe).

Also responsible for the per-message outcome lines (namespace, key, topic, partition, offset,
outcome) and for never writing an idempotency key in clear when ``hash_keys_in_logs`` is set.
Importing this module configures nothing; :func:`setup` does, once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from consumer.runtime.outcomes import BatchResult

PLAIN_FORMAT = "%(asctime)s %(levelname)s [%(process)d%(slot)s] %(name)s: %(message)s"

# Per-message lines: failures an operator must see at WARNING, the routine ones at DEBUG.
_OUTCOME_LEVEL = {
    "applied": logging.DEBUG,
    "duplicate": logging.DEBUG,
    "skipped": logging.DEBUG,
    "conflict": logging.WARNING,
    "rejected": logging.WARNING,
    "failed": logging.WARNING,
    "deferred": logging.INFO,  # retry="topics": sent to <topic>.retry, nothing recorded
    "invalid": logging.WARNING,
}
outcome_log = logging.getLogger("consumer.outcomes")

EventDict = MutableMapping[str, Any]


def key_for_logs(key: str, hashed: bool) -> str:
    """``key`` itself, or ``b2:`` + its BLAKE2b-128 hex digest when keys are sensitive.

    The digest is unkeyed, so an operator can find a known key's lines by hashing it:
    ``python -c "import hashlib; print(hashlib.blake2b(b'KEY', digest_size=16).hexdigest())"``.
    """
    if not hashed or not key:
        return key
    return "b2:" + hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=16).hexdigest()


def log_outcomes(results: Iterable[BatchResult], hash_keys: bool) -> None:
    """One line per handled message, at the level its outcome deserves (see _OUTCOME_LEVEL)."""
    if not outcome_log.isEnabledFor(logging.DEBUG):
        wanted = {o for o, lvl in _OUTCOME_LEVEL.items() if outcome_log.isEnabledFor(lvl)}
        if not wanted:
            return
    else:
        wanted = set(_OUTCOME_LEVEL)
    for result in results:
        for h in result.handled:
            outcome = h.outcome.value
            if outcome not in wanted:
                continue
            m = h.message
            outcome_log.log(
                _OUTCOME_LEVEL[outcome],
                "%s %s",
                outcome,
                m.source,
                extra={
                    "namespace": h.namespace,
                    "key": key_for_logs(h.key, hash_keys),
                    "topic": m.topic,
                    "partition": m.partition,
                    "offset": m.offset,
                    "outcome": outcome,
                    "reason": h.reason[:500] if outcome != "duplicate" else "",
                },
            )


# ---------------------------------------------------------------- rendering


class _SlotFilter(logging.Filter):
    """Tags each record with the worker slot of this process (None in the supervisor)."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker
        self.slot = "" if worker is None else f" w{worker}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.slot = self.slot
        record.worker = self.worker
        return True


def _process(_: Any, __: str, ed: EventDict) -> EventDict:
    record = ed.get("_record")
    if record is not None:
        ed["pid"] = record.process
        worker = getattr(record, "worker", None)
        if worker is not None:
            ed["worker"] = worker
    if ed.get("worker", 0) is None:
        del ed["worker"]
    ed.pop("slot", None)
    return ed


def _json_order(_: Any, __: str, ed: EventDict) -> EventDict:
    # The fixed fields first, so lines read alike; the traceback last.
    head = {k: ed.pop(k) for k in ("ts", "level", "logger", "msg", "pid", "worker") if k in ed}
    if "exception" in ed:
        ed["exc"] = ed.pop("exception")
    return {**head, **ed}


def _drop_formatted(_: Any, __: str, ed: EventDict) -> EventDict:
    # Set on a record by any handler that formatted it first; they are not ``extra=`` fields.
    ed.pop("message", None)
    ed.pop("asctime", None)
    return ed


_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
# Applied to the standard library's records before the shared chain: their ``extra=`` fields
# become event fields, like a structlog call's keywords.
# merge_contextvars first: fields bound with structlog.contextvars (consumer/middlewares/
# log_context.py binds the message's) join every line logged while they are bound, through
# logging or structlog alike; a line's own fields win.
_FOREIGN: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    _drop_formatted,
    _TIMESTAMP,
]


def _json_chain() -> list[Any]:
    return [
        _process,
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.EventRenamer("msg"),
        structlog.processors.format_exc_info,
        _json_order,
        structlog.processors.JSONRenderer(default=str),
    ]


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """One JSON object per line: ts, level, logger, msg, pid, worker, then the event's fields."""

    def __init__(self) -> None:
        super().__init__(processors=_json_chain(), foreign_pre_chain=_FOREIGN)


def _plain_renderer(_: Any, __: str, ed: EventDict) -> str:
    record: logging.LogRecord = ed.pop("_record")
    ed.pop("_from_structlog", None)
    head = "{} {} [{}{}] {}: {}".format(
        ed.pop("ts", ""),
        str(ed.pop("level", record.levelname)).upper(),
        record.process,
        getattr(record, "slot", ""),
        ed.pop("logger", record.name),
        ed.pop("event", ""),
    )
    for name in ("slot", "worker", "status", "pid"):  # the status line says it in words
        ed.pop(name, None)
    exc = ed.pop("exception", None)
    fields = "".join(f" {k}={_plain_value(v)}" for k, v in ed.items())
    return head + fields + (f"\n{exc}" if exc else "")


def _plain_value(value: Any) -> str:
    """A field value for ``key=value`` lines; quoted (JSON string) when it holds a space,
    ``=``, a quote or a control character. Keys, tenants and reasons come from messages: raw,
    a key ``k1 outcome=applied`` or one with a newline would forge fields or whole lines."""
    text = str(value)
    if text and not any(c.isspace() or c in '="' or ord(c) < 0x20 or c == "\x7f" for c in text):
        return text
    return json.dumps(text)


class PlainFormatter(structlog.stdlib.ProcessorFormatter):
    """``time LEVEL [pid wN] logger: message key=value``, for files and pipes."""

    def __init__(self) -> None:
        super().__init__(
            processors=[structlog.processors.format_exc_info, _plain_renderer],
            foreign_pre_chain=_FOREIGN,
        )


def _drop_for_console(_: Any, __: str, ed: EventDict) -> EventDict:
    for name in ("slot", "status", "pid"):
        ed.pop(name, None)
    return ed


class ConsoleFormatter(structlog.stdlib.ProcessorFormatter):
    """structlog's coloured console lines, for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__(
            processors=[
                _process,
                _drop_for_console,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Plain tracebacks: a rich one shows local variables, idempotency keys included.
                structlog.dev.ConsoleRenderer(
                    timestamp_key="ts", exception_formatter=structlog.dev.plain_traceback
                ),
            ],
            foreign_pre_chain=_FOREIGN,
        )


def formatter(json_lines: bool, stream: Any = None) -> logging.Formatter:
    """The formatter for ``stream`` (stderr by default): JSON, console (a TTY) or plain."""
    if json_lines:
        return JsonFormatter()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return ConsoleFormatter() if isatty is not None and isatty() else PlainFormatter()


def _configure_structlog() -> None:
    """Route ``structlog.get_logger()`` calls through the standard library's handler."""
    chain: Sequence[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.filter_by_level,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _TIMESTAMP,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=list(chain),
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def setup(json_lines: bool = False, worker: int | None = None, level: int = logging.INFO) -> None:
    """Send logs to stderr, as JSON lines or readable ones, tagged with the worker slot if any."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_SlotFilter(worker))
    handler.setFormatter(formatter(json_lines, sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _configure_structlog()
    # aiokafka reports every rebalance step at INFO; our own lines say what matters.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    from consumer.kafka_config import quiet_missing_topic_lines

    quiet_missing_topic_lines()  # one line per missing topic per 5 min, not per refresh
