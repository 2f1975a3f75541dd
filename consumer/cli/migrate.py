"""``consumer migrate``: apply pending migrations (the framework's, then the app's) and exit.

``run`` applies them too, through :func:`apply`, before it starts any worker.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer

from consumer import logs
from consumer.cli.common import APP_ARG, dsn_host, fail, load, log_level, unreachable
from consumer.errors import ConfigError, MigrationMismatch
from consumer.exitcodes import RET_CONFIG, RET_MIGRATION

if TYPE_CHECKING:
    from consumer.app import App


def apply(app: App) -> list[str]:
    """Apply the app's pending migrations; the names applied, or one line and a named code."""
    import asyncpg

    from consumer.db.migrate import migrate_dsn

    try:
        return asyncio.run(migrate_dsn(app.settings.postgres_dsn, app.migrations))
    except MigrationMismatch as exc:
        fail(str(exc), RET_MIGRATION)
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    except asyncpg.ClientConfigurationError as exc:  # a DSN option asyncpg refuses
        fail(f"CONSUMER_POSTGRES_DSN: {exc}", RET_CONFIG)
    except (
        OSError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.CannotConnectNowError,
    ) as exc:
        # Refused, unreachable, unknown host (OSError), bad role or database, server starting.
        unreachable(f"PostgreSQL at {dsn_host(app.settings.postgres_dsn)}", exc)


def migrate(app_spec: str = APP_ARG) -> None:
    """Apply pending migrations (the framework's, then the app's) and exit."""
    app = load(app_spec)
    logs.setup(level=log_level(app.settings))
    applied = apply(app)
    typer.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {a}" for a in applied))
