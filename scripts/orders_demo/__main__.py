"""``make orders-demo``: the HTTP + outbox example under concurrent orders and a relay crash.

One run: migrate, create the run's topic, start the ledger worker (no relay of its own), the
uvicorn server (handlers/orders/web.py) and a relay that dies right after the broker acked its
first batch (fault point ``relay_after_ack``: exit 137, no clean-up, as under SIGKILL); post
orders concurrently (some twice) while the relay is down, then restart it; wait until the
outbox is empty and every order is shipped; audit (scripts/orders_demo/audit.py). Exits 0
only when every order's event was applied exactly once and no event lacks its order.

    python -m scripts.orders_demo [--count 400] [--concurrency 16] [--ports 8000-8099]

Names are the run's own (``orders-<run>.order.created``, group ``orders-<run>.orders-ledger``,
order ids ``<run>-<n>``), so runs never share topics, offsets or keys. Logs go to
``out/orders-<run>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from consumer import ConsumerError, load_settings
from consumer.constants import CONFLICT_SUFFIX, DLQ_SUFFIX
from consumer.db.migrate import migrate_dsn
from handlers.orders.ledger import MIGRATIONS, created_topic
from scripts.demo.setup import unreachable
from scripts.orders_demo.audit import audit_orders
from scripts.orders_demo.processes import free_port, healthy, relay_argv, web_argv, worker_argv
from scripts.toolkit import processes, topics

RET_OK, RET_AUDIT, RET_SETUP, RET_STALLED = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.orders_demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--count", type=int, default=400, help="orders to post")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--ports", default="8000-8099", help="the HTTP server takes a free one")
    p.add_argument("--timeout-s", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=Path("out"))
    return p.parse_args(argv)


class Run:
    def __init__(self, a: argparse.Namespace, console: Console) -> None:
        self.a, self.console = a, console
        self.settings = load_settings()
        self.run = secrets.token_hex(3)
        self.prefix = f"orders-{self.run}."
        self.topic = created_topic(self.prefix)
        self.out = a.out / f"orders-{self.run}"
        self.started = time.monotonic()
        self.statuses: dict[int, int] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def say(self, text: str) -> None:
        t = time.monotonic() - self.started
        self.console.print(f"{int(t) // 60}:{int(t) % 60:02d}  {text}", highlight=False)

    def spawn(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        proc = processes.spawn(argv, env, self.out / f"{name}.log", header=True)
        self.procs.append(proc)
        return proc

    async def main(self) -> int:
        down = unreachable(self.settings)
        if down:
            self.console.print(f"[red]{', '.join(down)} not answering: run `make services`.")
            return RET_SETUP
        self.out.mkdir(parents=True, exist_ok=True)
        await migrate_dsn(self.settings.postgres_dsn, {"orders": MIGRATIONS})
        spec = {self.topic: 3, self.topic + DLQ_SUFFIX: 3, self.topic + CONFLICT_SUFFIX: 3}
        await topics.create_topics(self.settings.kafka_bootstrap, spec, visible_within_s=10)
        env = dict(os.environ, ORDERS_TOPIC_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        first, _, last = self.a.ports.partition("-")
        port = free_port(int(first), int(last or first))
        url = f"http://127.0.0.1:{port}"
        try:
            self.spawn(worker_argv(), env, "worker")
            self.spawn(web_argv(port), env, "web")
            if not await healthy(url, 30):
                self.say(f"[red]the HTTP server did not come up; see {self.out}/web.log")
                return RET_SETUP
            self.say(f"run {self.run}: ledger worker, uvicorn on {url}, topic {self.topic}")
            code = await self._traffic(url, env)
            if code != RET_OK:
                return code
            return await self._audit()
        finally:
            for proc in reversed(self.procs):
                await processes.stop(proc, 20)

    async def _traffic(self, url: str, env: dict[str, str]) -> int:
        a = self.a
        gate = asyncio.Semaphore(a.concurrency)
        third = asyncio.Event()

        async def post(client: httpx.AsyncClient, i: int) -> None:
            body = {"order_id": f"{self.run}-{i}", "customer": f"c{i % 7}", "cents": 100 + i}
            async with gate:
                for _ in range(2 if i % 10 == 0 else 1):  # every tenth resent: 200, no event
                    status = (await client.post("/orders", json=body)).status_code
                    self.statuses[status] = self.statuses.get(status, 0) + 1
            if sum(self.statuses.values()) >= a.count // 3:
                third.set()

        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            self.say(f"posting {a.count:,} orders, {a.concurrency} at a time; no relay yet")
            posting = asyncio.gather(*(post(client, i) for i in range(a.count)))
            await third.wait()
            doomed = self.spawn(
                relay_argv(faulty=True), {**env, "DEDUP_TEST_FAULTS": "relay_after_ack=1"}, "relay"
            )
            code = await processes.wait_exit(doomed, 60)
            if code != 137:
                self.say(f"[red]the relay exited {code}, not at its fault point; see relay.log")
                await posting
                return RET_SETUP
            acked = len(
                await topics.read_topic(
                    self.settings.kafka_bootstrap, self.topic, None, timeout_s=30
                )
            )
            self.say(
                f"[bold red]relay killed[/] (exit {code}) right after the broker acked "
                f"{acked:,} events, before marking them sent: they stay pending"
            )
            self.spawn(relay_argv(), env, "relay")
            self.say("relay restarted: it sends the pending rows again, same idempotency keys")
            await posting
        self.say(f"orders posted: {dict(sorted(self.statuses.items()))} (201 created, 200 resend)")
        return await self._settle()

    async def _settle(self) -> int:
        conn = await asyncpg.connect(self.settings.postgres_dsn)
        like = f"{self.run}-%"
        try:
            deadline = time.monotonic() + self.a.timeout_s
            while time.monotonic() < deadline:
                left = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"
                    " AND idempotency_key LIKE $2) + (SELECT count(*) FROM orders o"
                    " WHERE order_id LIKE $1 AND NOT EXISTS"
                    " (SELECT 1 FROM shipments s WHERE s.order_id = o.order_id))",
                    like,
                    f"orders-api:{like}",
                )
                if left == 0:
                    self.say("every event published and every order shipped")
                    return RET_OK
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        self.say(f"[red]gave up after {self.a.timeout_s:.0f}s; see {self.out}/*.log")
        return RET_STALLED

    async def _audit(self) -> int:
        # The worker has shipped every order; it may still be consuming the relay's resends,
        # which are duplicates by then. Stopping it first (a drain) makes the audit final.
        for proc in self.procs:
            await processes.stop(proc, 20)
        records = await topics.read_topic(
            self.settings.kafka_bootstrap, self.topic, None, timeout_s=30
        )
        conn = await asyncpg.connect(self.settings.postgres_dsn)
        try:
            audit = await audit_orders(conn, records, f"{self.run}-")
        finally:
            await conn.close()
        summary = Table(title=f"orders demo · run {self.run}", show_header=False)
        summary.add_row("orders posted (requests)", f"{sum(self.statuses.values()):,}")
        summary.add_row(
            "answers", ", ".join(f"{k}: {v:,}" for k, v in sorted(self.statuses.items()))
        )
        summary.add_row("relay resends dropped downstream", f"{audit.copies - audit.events:,}")
        self.console.print(summary)
        self.console.print(audit.table(f"audit · {self.out}"))
        resends = len(range(0, self.a.count, 10))
        answers_ok = self.statuses == {201: self.a.count, 200: resends}
        if not answers_ok:
            self.console.print(
                f"[bold red]expected {self.a.count} answers 201 and {resends} answers 200"
            )
        if audit.ok and answers_ok:
            self.console.print("[bold green]PASS[/]: every order's event applied exactly once")
            return RET_OK
        self.console.print("[bold red]FAIL")
        return RET_AUDIT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        return asyncio.run(Run(args, console).main())
    except ConsumerError as exc:  # a migration mismatch, settings: one line, not a traceback
        console.print(f"[red]orders demo: {type(exc).__name__}: {exc}", highlight=False)
        return RET_SETUP
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; processes stopped")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
