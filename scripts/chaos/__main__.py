"""``python -m scripts.chaos``: the exactly-once audit under injected faults (``make chaos``).

Runs the main campaign (the payments app and a downstream app under faults, then the
checker), then a short run of a deliberately broken build with the fault that exposes it, to
show the checker bites. Prints tables, then one JSON line. Exit status 0 only if every
invariant held in the main run, everything drained, and the broken build was caught.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from scripts.chaos import campaign, report
from scripts.chaos.faults import KINDS
from scripts.chaos.services import ROOT, Instance

# Random crashes at the fault points, per batch (mid_handler: per message; relay: per tick).
DEFAULT_RANDOM_FAULTS = (
    "after_commit=0.002,before_commit=0.002,mid_handler=0.0002,relay_after_ack=0.004"
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__)
    p.add_argument("--records", type=int, default=20_000, help="records on the input topic")
    p.add_argument("--faults", type=int, default=20, help="scheduled faults in the main run")
    p.add_argument(
        "--kinds", default="", help="comma-separated scheduled faults (overrides --faults)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=3, help="payments worker processes")
    p.add_argument("--duration", type=float, default=None, help="seconds to spread production over")
    p.add_argument("--random-faults", default=DEFAULT_RANDOM_FAULTS, help="DEDUP_TEST_FAULTS")
    p.add_argument("--broken-records", type=int, default=None)
    p.add_argument("--no-broken", action="store_true", help="skip the broken-build run")
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the services up at the end (holding the last run's data)",
    )
    p.add_argument("--instance", default="chaos", help="services instance name (.services/X)")
    p.add_argument("--port-base", type=int, default=20_000, help="ports: base+9092, +6379...")
    p.add_argument("--lock-wait", type=float, default=900, help="seconds to wait for the instance")
    p.add_argument("--out", type=Path, default=None, help="run folder (truth, logs, summary)")
    return p.parse_args(argv)


def _kinds(spec: str) -> list[str] | None:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
    return kinds or None


async def main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    inst = Instance(args.instance, args.port_base)
    if clash := inst.ephemeral_ports():
        logging.getLogger("chaos").warning(
            "ports %s are in net.ipv4.ip_local_port_range: any outgoing connection may hold "
            "one, and a service restart then fails to bind; pick a --port-base whose ports "
            "are outside it (the default 20000 is)",
            clash,
        )
    out = args.out or ROOT / "out" / "chaos" / f"seed-{args.seed}"
    duration = args.duration or max(20.0, args.records / 20_000 * 150)
    main_cfg = campaign.RunConfig(
        "main",
        args.records,
        args.faults,
        args.seed,
        args.workers,
        duration,
        out / "main",
        random_faults=args.random_faults,
        kinds=_kinds(args.kinds),
    )
    broken_records = args.broken_records or max(1000, args.records // 10)
    broken_cfg = campaign.RunConfig(
        "broken",
        broken_records,
        1,
        args.seed,
        2,
        max(10.0, broken_records / 20_000 * 150),
        out / "broken",
        random_faults="before_commit=0.3",
        broken="done_before_commit",
        drain_timeout_s=60,  # it crash-loops by design; draining it fully is not the point
        kinds=["point_before_commit"],
    )
    with inst.lock(wait_s=args.lock_wait):
        try:
            main_run = await campaign.run(inst, main_cfg)
            broken_run = None if args.no_broken else await campaign.run(inst, broken_cfg)
        finally:
            await campaign.teardown(inst, args.keep)
    s = report.summary(main_run, broken_run, time.monotonic() - t0)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    report.render(main_run, broken_run, s)
    print(report.json_line(s), flush=True)
    return 0 if s["ok"] or (args.no_broken and main_run.check.ok and main_run.drained) else 1


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(parse())))
