"""Trace headers on the way through: what an outgoing row carries from the message it came from.

Responsible for the W3C trace-context headers only (``traceparent``, ``tracestate``, or what
the global propagator writes): which headers an outbox row gets when it is written on behalf
of a consumed message, and whether a tracer provider is installed at all. It starts no span
and ends none: spans are consumer/tracing.py's, which sits above and uses this module. Kept
apart so the outbox (consumer/outbox/envelopes.py) can write trace headers without depending
on the tracing layer (docs/design.md, "Layers").

Until the application installs a tracer provider nothing is rewritten: the consumed message's
own trace headers pass through unchanged.
"""

from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER

from consumer.constants import TRACEPARENT
from consumer.message import Message

TRACE_HEADERS = (TRACEPARENT, "tracestate")  # what passes through when nothing is recorded
_NOT_INSTALLED = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_provider: trace.TracerProvider | None = None


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Record with ``provider`` instead of the global one (tests, embedding); None to undo."""
    global _provider
    _provider = provider


def provider() -> trace.TracerProvider | None:
    """The provider given to :func:`use_provider`, or None for the global one."""
    return _provider


# Asked for every message (twice): ``trace.get_tracer_provider()`` reads os.environ each time
# until a provider is set, which was a visible part of the batch path's profile (issue 15).
# So the global is read directly, and the environment once; an OpenTelemetry without that
# global (a future release) takes the public call.
_MISSING = object()
_PROVIDER_FROM_ENV = OTEL_PYTHON_TRACER_PROVIDER in os.environ


def enabled() -> bool:
    """True once a real tracer provider is installed: spans are then recorded."""
    current: object = _provider
    if current is None:
        current = getattr(trace, "_TRACER_PROVIDER", _MISSING)
        if current is None and not _PROVIDER_FROM_ENV:
            return False
        if current is None or current is _MISSING:
            current = trace.get_tracer_provider()
    return not isinstance(current, _NOT_INSTALLED)


def passthrough(msg: Message) -> list[tuple[str, str]]:
    """The consumed message's own trace headers (what an outgoing row carries without a span)."""
    out = []
    for name in TRACE_HEADERS:
        value = msg.header_str(name)
        # W3C trace headers are printable ASCII. Anything else (a NUL, say) is dropped: it is
        # the producer's, and copied into outbox rows it would fail the batch's insert.
        if value and value.isascii() and value.isprintable() and len(value) <= 8192:
            out.append((name, value))
    return out


def current() -> list[tuple[str, str]]:
    """Trace headers of the current span, for a row written outside a handling (an HTTP
    request's span, say); none when nothing is recorded."""
    if enabled() and trace.get_current_span().get_span_context().is_valid:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return list(carrier.items())
    return []


def outgoing(msg: Message) -> list[tuple[str, str]]:
    """Trace headers for a row written now on behalf of ``msg``.

    The current span's context when one is recorded (the handling span), else ``msg``'s own.
    """
    return current() or passthrough(msg)
