"""A TCP proxy in the campaign process that every PostgreSQL DSN of the run points at.

A failover moves the database to another port; the workers' DSN cannot change under them,
so it names this proxy (loopback only), and the failover fault switches the proxy to the
promoted standby and cuts every connection it carried, as a virtual IP or PgBouncer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("chaos.pg_proxy")


class PgProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``; :meth:`switch` moves the target."""

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._cut()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def switch(self, target: int) -> int:
        """New connections go to ``target``; the open ones are cut. How many were cut."""
        self.target = target
        return self._cut()

    def _cut(self) -> int:
        n = len(self._writers)
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        return n

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()  # the database is down: the client sees a refused session
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.transport.abort()
