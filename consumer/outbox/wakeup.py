"""What wakes the relay: a NOTIFY after a commit that wrote outbox rows, else its poll interval.

A dedicated connection LISTENs on the outbox channel (consumer/constants.py
``NOTIFY_CHANNEL``); a listener dropped by a database restart is replaced on the next pass,
and until then the polling interval is the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from consumer.constants import NOTIFY_CHANNEL


class Wakeup:
    """The relay's wake-up event and the connection that sets it."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.event = asyncio.Event()
        self._listener: Any = None

    async def listen(self) -> None:
        """Make sure a live connection is listening (replacing a dropped one)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        import asyncpg

        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.event.set())
        self._listener = conn

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def sleep(self, stop: asyncio.Event, seconds: float, wake: bool = True) -> None:
        """Up to ``seconds``, ended early by ``stop`` or (if ``wake``) by a NOTIFY."""
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake:
            waiters.append(asyncio.ensure_future(self.event.wait()))
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
