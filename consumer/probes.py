"""The metrics port's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``; 404 elsewhere.

The probes read what the workers publish as gauges (consumer/health.py), so one
endpoint answers for every worker of ``consumer run --workers N``, through the same
multiprocess files as the metrics; the supervisor never talks to a service itself.

* ``/healthz`` (liveness): 200 unless a live worker's event loop has not beaten for
  ``stale_s``. Dependencies are not part of it: restarting a pod does not bring PostgreSQL
  back, and Kubernetes restarts on a failed liveness probe.
* ``/readyz`` (readiness): 200 when at least one worker reports and every worker has joined
  the group and reaches PostgreSQL and Kafka; 503 otherwise (starting, draining, a service
  away). Redis running degraded and halted partitions are not a reason to be unready (the
  worker is correct on PostgreSQL alone, and a halt needs an operator, not a restart):
  they are alerts on ``consumer_redis_degraded`` and ``consumer_partition_halted``.

Both answer a small JSON body saying why, one entry per worker (by pid in multiprocess
mode). The split follows Kubernetes' guidance (kubernetes.io, "Configure Liveness,
Readiness and Startup Probes") and FastStream's ``make_ping_asgi`` health route.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

HEARTBEAT = "consumer_worker_heartbeat_timestamp_seconds"
CHECK = "consumer_worker_check"
READY_CHECKS = ("started", "postgres", "kafka")


def workers(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Per worker (its pid label, "" in-process): ``{"heartbeat": t, "started": 1.0, ...}``."""
    out: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        if family.name not in (HEARTBEAT, CHECK):
            continue
        for sample in family.samples:
            who = sample.labels.get("pid", "")
            key = "heartbeat" if family.name == HEARTBEAT else sample.labels.get("check", "")
            out.setdefault(who, {})[key] = sample.value
    return out


def liveness(seen: dict[str, dict[str, float]], stale_s: float, now_s: float) -> tuple[bool, Any]:
    """(alive, body): alive unless some worker's heartbeat is older than ``stale_s``."""
    ages = {pid: round(now_s - w.get("heartbeat", now_s), 1) for pid, w in seen.items()}
    stale = {pid: age for pid, age in ages.items() if age > stale_s}
    return not stale, {"alive": not stale, "heartbeat_age_s": ages, "stale_after_s": stale_s}


def readiness(seen: dict[str, dict[str, float]]) -> tuple[bool, Any]:
    """(ready, body): every reporting worker passes every check, and there is one at least."""
    failing = {pid: [c for c in READY_CHECKS if w.get(c, 0.0) < 1.0] for pid, w in seen.items()}
    failing = {pid: checks for pid, checks in failing.items() if checks}
    ready = bool(seen) and not failing
    body: dict[str, Any] = {"ready": ready, "workers": len(seen), "failing": failing}
    if not seen:
        body["reason"] = "no worker has reported yet"
    return ready, body


def serve(
    port: int, addr: str, registry: CollectorRegistry, stale_s: float
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the endpoint on a daemon thread; (server, thread)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, body = liveness(workers(registry), stale_s, time.time())
                self._json(200 if ok else 503, body)
            elif path == "/readyz":
                ok, body = readiness(workers(registry))
                self._json(200 if ok else 503, body)
            else:
                self._json(
                    404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}
                )

        def _json(self, code: int, body: Any) -> None:
            self._send(code, json.dumps(body).encode() + b"\n", "application/json")

        def _send(self, code: int, data: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a probe every few seconds is not news

    httpd = ThreadingHTTPServer((addr, port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="consumer-metrics", daemon=True)
    thread.start()
    return httpd, thread
