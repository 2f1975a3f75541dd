"""Connection strings checked before any client sees them.

asyncpg and redis-py parse a DSN or URL when they first connect, and a malformed one raises
deep inside them (``ClientConfigurationError``, ``ValueError`` from ``int()``): a traceback
and a worker restarted forever. Checked here once, in ``Settings.require_connections``, each
problem is one line (ConfigError, exit code RET_CONFIG) that never repeats the string itself,
which may hold a password.

The PostgreSQL rules are asyncpg's (``connect_utils._parse_connect_dsn_and_args``: a URI
with scheme ``postgresql`` or ``postgres``, hosts separated by commas, each port a number);
the Redis ones are redis-py's own parser, ``redis.connection.parse_url``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from consumer.errors import ConfigError

POSTGRES_SCHEMES = ("postgresql", "postgres")


def check_postgres_dsn(dsn: str, variable: str) -> None:
    """Raise ConfigError when asyncpg would refuse ``dsn``."""
    scheme, sep, _ = dsn.partition("://")
    if not sep or scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"{variable} is not a PostgreSQL URI: it must start with postgresql:// or "
            "postgres:// (e.g. postgresql://user@host:5432/db)"
        )
    netloc = urlsplit(dsn).netloc.rpartition("@")[2]
    for spec in filter(None, netloc.split(",")):
        port = spec.rpartition("]")[2] if spec.startswith("[") else spec
        _, colon, number = port.rpartition(":") if ":" in port else ("", "", "")
        if colon and number and not unquote(number).isdigit():
            raise ConfigError(f"{variable}: the port of a host is not a number")


def check_redis_url(url: str, variable: str) -> None:
    """Raise ConfigError when redis-py would refuse ``url``."""
    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    except ValueError as exc:
        raise ConfigError(f"{variable}: {exc}") from None
