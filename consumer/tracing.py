"""OpenTelemetry through ``opentelemetry-api`` only: the SDK and exporter are the app's choice.

Responsible for three things:

* a span per handler call (kind CONSUMER, ``<topic> process``), a child of the producer's
  context taken from the message headers (W3C ``traceparent`` by default; whatever the global
  propagator reads);
* the trace headers of every outbox row written while that span is current, so the message
  the relay publishes belongs to the same trace (the header part is consumer/propagation.py,
  which the outbox uses without depending on this module);
* a span per relayed row (kind PRODUCER, ``<topic> publish``), a child of the row's context,
  whose own context replaces the row's trace headers on the wire.

Until the application installs a tracer provider (``trace.set_tracer_provider``) nothing is
recorded and nothing is rewritten: trace headers pass through from the consumed message to
what it causes, unchanged, as if this module did not exist. It never decides an outcome and
never raises into the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from consumer import propagation
from consumer.logs import key_for_logs
from consumer.message import Message

# The header-only half lives below the layers that write rows (consumer/propagation.py);
# re-exported for callers that know it as tracing's.
from consumer.propagation import TRACE_HEADERS as TRACE_HEADERS
from consumer.propagation import enabled as enabled
from consumer.propagation import outgoing as outgoing
from consumer.propagation import passthrough as passthrough
from consumer.propagation import use_provider as use_provider

if TYPE_CHECKING:
    from consumer.dedup.identity import Identity
    from consumer.handler import Handler

_SCOPE = "consumer"


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_SCOPE, tracer_provider=propagation.provider())


class _MessageHeaders(Getter[Message]):
    def get(self, carrier: Message, key: str) -> list[str] | None:
        value = carrier.header_str(key)
        return None if value is None else [value]

    def keys(self, carrier: Message) -> list[str]:
        return [name for name, _ in carrier.headers]


class _ByteHeaders(Getter[Sequence[tuple[str, bytes]]]):
    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        key = key.lower()
        found = [v.decode(errors="replace") for n, v in carrier if n.lower() == key]
        return found[-1:] or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [name for name, _ in carrier]


_MESSAGE_HEADERS = _MessageHeaders()
_BYTE_HEADERS = _ByteHeaders()


# ---------------------------------------------------------------- handling


class Handling:
    """The span of one handler call, as the batch sees it (a no-op when nothing is recorded)."""

    def __init__(self, msg: Message | None, span: trace.Span | None) -> None:
        self._msg = msg
        self._span = span

    def __enter__(self) -> Handling:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def finish(self, status: str, reason: str) -> None:
        """Record how the call ended: ``done``, ``rejected`` or ``stop`` (read again later)."""
        if self._span is None:
            return
        outcome = {"done": "applied", "stop": "retried"}.get(status, status)
        self._span.set_attribute("consumer.outcome", outcome)
        if status != "done":
            self._span.set_status(Status(StatusCode.ERROR, reason[:500]))

    def headers(self) -> tuple[tuple[str, str], ...] | None:
        """Trace headers naming this span, for rows written after it ended (dead letter,
        reply); None when nothing is recorded, so those rows keep the message's own."""
        if self._span is None or self._msg is None:
            return None
        return tuple(outgoing(self._msg))


_NOT_HANDLED = Handling(None, None)


def handling(
    msg: Message, group: str, handler: Handler[Any, Any], ident: Identity, hash_key: bool
) -> AbstractContextManager[Handling]:
    """The current span while a handler runs. The key is hashed as in logs (``hash_key``)."""
    if not enabled():
        return _NOT_HANDLED  # the hot path without a provider: no generator, no span
    return _recorded(msg, group, handler, ident, hash_key)


@contextmanager
def _recorded(
    msg: Message, group: str, handler: Handler[Any, Any], ident: Identity, hash_key: bool
) -> Iterator[Handling]:
    parent = propagate.extract(msg, getter=_MESSAGE_HEADERS)
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": msg.topic,
        "messaging.destination.partition.id": str(msg.partition),
        "messaging.kafka.offset": msg.offset,
        "messaging.consumer.group.name": group,
        "consumer.handler": handler.name,
        "consumer.namespace": ident.namespace,
        "consumer.idempotency_key": key_for_logs(ident.key, hash_key),
    }
    with _tracer().start_as_current_span(
        f"{msg.topic} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield Handling(msg, span)


# ---------------------------------------------------------------- relaying


class Publishing:
    """The span of one relayed row, ended when the broker answers."""

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span

    def done(self, fut: Any) -> None:
        """A send future's callback: ends the span with the broker's answer."""
        if self._span is None:
            return
        if fut.cancelled():
            self.failed(TimeoutError("send cancelled"))
            return
        exc = fut.exception()
        if exc is not None:
            self.failed(exc)
        else:
            self._span.end()

    def failed(self, exc: BaseException) -> None:
        if self._span is None:
            return
        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        self._span.end()


_NOT_RECORDED = Publishing(None)


def publishing(
    topic: str, headers: list[tuple[str, bytes]]
) -> tuple[list[tuple[str, bytes]], Publishing]:
    """A span for sending one row, and the row's headers now naming that span."""
    if not enabled():
        return headers, _NOT_RECORDED
    parent = propagate.extract(headers, getter=_BYTE_HEADERS)
    span = _tracer().start_span(
        f"{topic} publish",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
    names = {n.lower() for n in carrier}
    kept = [(n, v) for n, v in headers if n.lower() not in names]
    return kept + [(n, v.encode()) for n, v in carrier.items()], Publishing(span)
