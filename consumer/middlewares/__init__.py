"""Middlewares shipped with the framework, built only on its public API (docs/middleware.md).

* :class:`RateLimit`: a token bucket (and an optional concurrency bound) per handler name;
* :class:`LogContext`: the message's key, topic, partition and offset on every line a
  handler logs while it runs.
"""

from consumer.middlewares.log_context import LogContext
from consumer.middlewares.rate_limit import RateLimit

__all__ = ["LogContext", "RateLimit"]
