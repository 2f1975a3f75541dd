"""Fixtures shared by the integration tests that run against a database of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from consumer.settings import Settings


@pytest.fixture
async def conn(db: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's own database (its ``db`` fixture: orders_support's
    ``own_database``)."""
    c = await asyncpg.connect(db.postgres_dsn)
    try:
        yield c
    finally:
        await c.close()
