"""``consumer run``, ``worker`` and ``relay``: the commands that consume.

``run`` applies migrations and supervises N ``worker`` processes (consumer/supervisor.py);
``worker`` is one of them, drained on SIGTERM/SIGINT or when its supervisor disappears;
``relay`` runs the outbox relay alone. A worker that fails says so in its log and returns a
named exit code for the supervisor to act on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg
import typer

from consumer import logs
from consumer.cli.common import APP_ARG, fail, load, log_level
from consumer.cli.migrate import apply as apply_migrations
from consumer.errors import ConfigError, LifespanError
from consumer.exitcodes import RET_CONFIG, RET_ERROR, RET_OK, of_error

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.settings import Settings

# The name the worker's lines have always been logged under (log filters rely on it).
log = logging.getLogger("consumer.cli")


_CREATE_TOPICS_HELP = "create the dlq/conflicts topics at start (or CONSUMER_TOPICS_CREATE)"


def _without_topic_creation(app: App) -> None:
    """``--no-create-topics``: this process and the workers it starts create no topic."""
    # Workers are child processes that read CONSUMER_* themselves: the environment is how
    # the option reaches them.
    os.environ["CONSUMER_TOPICS_CREATE"] = "false"
    app.settings = app.settings.model_copy(update={"topics_create": False})


def run(
    app_spec: str = APP_ARG,
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=64, help="worker processes"),
    relay: bool = typer.Option(True, "--relay/--no-relay", help="run the outbox relay in workers"),
    log_json: bool = typer.Option(
        False, "--log-json", help="log JSON lines (or CONSUMER_LOG_JSON)"
    ),
    create_topics: bool = typer.Option(
        True, "--create-topics/--no-create-topics", help=_CREATE_TOPICS_HELP
    ),
) -> None:
    """Apply migrations, then consume with N supervised worker processes until SIGTERM."""
    app = load(app_spec)
    if not create_topics:
        _without_topic_creation(app)
    json_lines = log_json or app.settings.log_json
    logs.setup(json_lines, level=log_level(app.settings))
    apply_migrations(app)
    from consumer.supervisor import supervise

    code = supervise(
        app_spec, workers=workers, relay=relay, log_json=json_lines, settings=app.settings
    )
    raise typer.Exit(code)


def worker(
    app_spec: str = APP_ARG,
    worker_id: int = typer.Option(0, "--id", min=0),
    relay: bool = typer.Option(True, "--relay/--no-relay"),
    log_json: bool = typer.Option(False, "--log-json"),
    supervisor_pid: int = typer.Option(0, "--supervisor-pid", help="stop when this pid is gone"),
    create_topics: bool = typer.Option(
        True, "--create-topics/--no-create-topics", help=_CREATE_TOPICS_HELP
    ),
) -> None:
    """Run one worker in this process (what ``run`` starts N of)."""
    # A stop requested while still importing is kept and honoured once the loop runs.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    app = load(app_spec)
    if not create_topics:
        _without_topic_creation(app)
    logs.setup(log_json or app.settings.log_json, worker=worker_id, level=log_level(app.settings))
    raise typer.Exit(run_worker(app, worker_id, relay, supervisor_pid, early))


def run_worker(
    app: App, worker_id: int, relay: bool, supervisor_pid: int = 0, early: Sequence[int] = ()
) -> int:
    """Run a Worker until SIGTERM/SIGINT (or its supervisor disappears), drained; an exit code."""
    settings = app.settings.model_copy(
        update={"relay_enabled": relay and app.settings.relay_enabled}
    )
    try:
        asyncio.run(_drive(app, settings, worker_id, supervisor_pid, early))
    except ConfigError as exc:  # one line (auth, topics, migrations ...): a traceback would
        # not help fixing it; the code names the family (consumer/exitcodes.py)
        log.error("worker %d refused to start: %s", worker_id, exc)
        return of_error(exc)
    except asyncpg.ClientConfigurationError as exc:  # a DSN option asyncpg refuses
        log.error("worker %d refused to start: CONSUMER_POSTGRES_DSN: %s", worker_id, exc)
        return RET_CONFIG
    except LifespanError as exc:  # the app's own hook: one line, RET_STARTUP or RET_WORKER_FAILED
        log.error("worker %d: %s", worker_id, exc)
        return of_error(exc)
    except Exception:
        log.exception("worker %d failed", worker_id)
        return RET_ERROR
    return RET_OK


async def _drive(
    app: App, settings: Settings, worker_id: int, supervisor_pid: int, early: Sequence[int]
) -> None:
    """One Worker in this event loop, stopped by a signal, an early stop or its supervisor."""
    from consumer.runtime.worker import Worker, tune_gc
    from consumer.telemetry import standard_observers

    worker = Worker(
        app, settings, worker_id, observer=standard_observers(settings.hash_keys_in_logs)
    )
    loop = asyncio.get_running_loop()

    def stop(reason: str) -> None:
        if not worker.stop.is_set():
            log.info("worker %d stopping (%s): finishing the batch in flight", worker_id, reason)
            worker.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    if early:
        stop(signal.Signals(early[0]).name)
    watch = asyncio.create_task(_watch_parent(supervisor_pid, stop))
    try:
        tune_gc()
        await worker.run()
    finally:
        watch.cancel()
    if worker.processor is None:  # stopped before it consumed (its start not finished)
        log.info("worker %d stopped before it began consuming", worker_id)
    else:
        log.info("worker %d stopped: batch finished, leases released, left the group", worker_id)


async def _watch_parent(supervisor_pid: int, stop: Callable[[str], None]) -> None:
    # A supervisor killed with SIGKILL cannot forward anything: its orphans notice the
    # re-parenting and drain by themselves rather than run on unsupervised.
    if not supervisor_pid:
        return
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != supervisor_pid:
            stop("supervisor gone")
            return


def relay(
    app_spec: str = APP_ARG,
    log_json: bool = typer.Option(False, "--log-json", help="log JSON lines"),
) -> None:
    """Run the outbox relay alone in this process, until SIGTERM."""
    app = load(app_spec)
    logs.setup(log_json or app.settings.log_json, level=log_level(app.settings))
    from consumer.outbox.relay import Relay

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        from consumer import tracing
        from consumer.metrics import MetricsObserver

        relay = Relay(app.settings, observers=MetricsObserver(), publish_span=tracing.publishing)
        await relay.run(stop)

    endpoint = None
    if app.settings.metrics_port:  # its own endpoint: this process is nobody's worker
        from consumer import metrics

        try:
            endpoint = metrics.Server(app.settings.metrics_port)
        except OSError as exc:
            fail(f"CONSUMER_METRICS_PORT={app.settings.metrics_port}: {exc}", RET_CONFIG)
    try:
        asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.close()
