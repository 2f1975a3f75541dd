"""What the demo prints before and after the live view: the plan, the audit and the verdict."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scripts.demo.audit import Report
from scripts.demo.fleet import Fleet
from scripts.demo.probe import Sample
from scripts.demo.setup import Names
from scripts.toolkit.truth import Truth

_KIND_TEXT = {
    "original/credit": "credits",
    "original/debit": "debits the account can cover",
    "original/overdraft": "payouts no account can cover (must be rejected)",
    "duplicate/resend": "resent as they were",
    "duplicate/reencoded": "re-encoded (msgpack <-> JSON), fields reordered, new sent_at",
    "duplicate/other_partition": "re-encoded and sent to another partition",
    "duplicate/later": "resent much later",
    "conflict/amount": "payment id reused with another amount",
    "malformed/undecodable": "undecodable bytes",
    "malformed/invalid_schema": "schema-invalid (unknown currency)",
    "malformed/missing_key": "no payment_id, the idempotency key",
    "malformed/bad_tenant": "tenant header not UTF-8",
}


def intro(console: Console, names: Names, a: argparse.Namespace) -> None:
    console.rule("[bold]dedup-consumer demo")
    console.print(
        "The payments service ([cyan]handlers/app.py[/]) must settle each payment exactly once.\n"
        f"This run sends {a.count:,} records from {a.tenants} tenants to {a.workers} workers: "
        "originals, duplicates (re-encoded, on other partitions, resent later), reused ids "
        "with another amount, malformed records and overdrafts"
        + (", SIGKILLs one worker midway" if a.kill else "")
        + ", then audits the database and the topics against what was sent.\n"
        f"Run [bold]{names.run}[/]: topics [cyan]{names.requested}[/] (+ .dlq, .conflicts), "
        f"[cyan]{names.settled}[/], [cyan]{names.replies}[/]; consumer group "
        f"[cyan]{names.group}[/].",
        highlight=False,
    )


def summary(
    console: Console,
    truth: Truth,
    result: Report,
    final: Sample,
    crash: dict[str, float | int],
    out: Path,
    png: Path,
) -> None:
    sent = Table(title="What was sent", title_justify="left")
    sent.add_column("records", justify="right")
    sent.add_column("kind")
    order = list(_KIND_TEXT)
    kinds = sorted(truth.meta["kinds"].items(), key=lambda kv: order.index(kv[0]))
    for kind, n in kinds:
        sent.add_row(f"{n:,}", f"{kind.split('/')[0]}: {_KIND_TEXT.get(kind, kind)}")
    sent.add_row(f"{sum(r['reply'] for r in truth.records):,}", "of them asked for a reply")
    console.print(sent)

    reasons = Table(title="Dead letters and conflicts, by reason", title_justify="left")
    reasons.add_column("count", justify="right")
    reasons.add_column("topic")
    reasons.add_column("reason: detail")
    for reason, n in sorted(result.dead_letters.items(), key=lambda kv: -kv[1]):
        reasons.add_row(f"{n:,}", ".dlq", reason)
    reasons.add_row(
        f"{result.conflicts:,}", ".conflicts", "conflict: key reused with another payload"
    )
    console.print(reasons)

    audit = Table(
        title="Audit: the database and the topics against the ground truth", title_justify="left"
    )
    audit.add_column("")
    audit.add_column("check")
    audit.add_column("expected", justify="right")
    audit.add_column("found", justify="right")
    for c in result.checks:
        audit.add_row("[green]ok[/]" if c.ok else "[red]FAIL[/]", c.name, c.expected, c.observed)
    console.print(audit)

    elapsed = max(final.t_s, 1e-9)
    if crash:
        restart = (
            f"replaced by pid {crash['new_pid']} {crash['restart_s']:.1f}s later"
            if "new_pid" in crash
            else "no replacement seen"
        )
        console.print(
            f"Crash: worker pid {crash['killed_pid']} SIGKILLed at {crash['at_s']:.0f}s "
            f"({int(crash['at_consumed']):,} consumed), {restart}.",
            highlight=False,
        )
    console.print(
        f"Consumed {final.consumed:,} records in {elapsed:.0f}s "
        f"({final.consumed / elapsed:,.0f}/s on average, set-up and the crash included).",
        highlight=False,
    )
    console.print(f"Chart: {png}   Ground truth, summary and logs: {out}/", highlight=False)
    if result.ok:
        console.print(
            "[bold green]AUDIT PASSED[/]: every payment applied exactly once, balances "
            "reconcile, conflicts and malformed records refused with their reasons."
        )
    else:
        failed = sum(not c.ok for c in result.checks)
        console.print(f"[bold red]AUDIT FAILED[/]: {failed} check(s) above; logs in {out}/")


def stopped(console: Console) -> None:
    console.print(
        "Workers stopped. Kafka, Redis and PostgreSQL keep running; "
        "`make services-down` stops them.",
        highlight=False,
    )


def kept(console: Console, fleet: Fleet) -> None:
    sup = fleet.supervisor.pid if fleet.supervisor else "?"
    console.print(
        f"--keep: workers still running under supervisor pid {sup} (`kill {sup}` drains and "
        "stops them); `make services-down` stops the services.",
        highlight=False,
    )
