"""/healthz, /readyz and 404 on the metrics port: in one process, and behind ``consumer run``."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import pytest
from pydantic import BaseModel

from consumer import App, Context, metrics
from tests.conftest import app_settings, eventually, running
from tests.integration.test_observability import _free_port, supervisor

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            body = resp.read()
            code = resp.status
    except urllib.error.HTTPError as exc:
        body, code = exc.read(), exc.code
    ctype = "json" if body.startswith(b"{") else "text"
    return code, json.loads(body) if ctype == "json" else body.decode()


class Order(BaseModel):
    n: int


async def _noop(p: Order, ctx: Context) -> None:
    return None


async def test_probes_follow_a_worker_through_start_and_drain(
    settings, topics, unique, monkeypatch
):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)  # this process's registry
    topic = await topics("probe")
    app = App(f"g-{unique}", settings=app_settings(settings))
    app.handler(topic, schema=Order, key="record")(_noop)
    server = metrics.Server(_free_port(), addr="127.0.0.1")
    try:
        port = server.port
        assert get(port, "/nope")[0] == 404
        assert get(port, "/metrics")[0] == 200
        assert get(port, "/healthz")[0] == 200
        async with running(app, app.settings):

            async def ready() -> bool:
                return get(port, "/readyz")[0] == 200

            await eventually(ready, timeout_s=30)
            code, body = get(port, "/readyz")
            assert body == {"ready": True, "workers": 1, "failing": {}}
            code, body = get(port, "/healthz")
            assert code == 200 and body["alive"] is True

        async def unready() -> bool:  # drained: the checks went to 0 on the way out
            return get(port, "/readyz")[0] == 503

        await eventually(unready, timeout_s=10)
        assert get(port, "/readyz")[1]["failing"] == {"": ["started", "postgres", "kafka"]}
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_one_endpoint_answers_for_every_worker_of_consumer_run(topics, unique, tmp_path):
    topic = await topics("probe-run", extra=("probe-run-out",))
    port = _free_port()
    env = {
        **os.environ,
        "OBSERVED_GROUP": f"g-{unique}",
        "OBSERVED_TOPIC": topic,
        "OBSERVED_OUT": f"probe-run-out-{unique}",
        "CONSUMER_METRICS_PORT": str(port),
    }
    env.pop(metrics.MULTIPROC_ENV, None)
    async with supervisor(env, tmp_path / "run.log"):

        async def both_ready() -> bool:
            try:
                code, body = get(port, "/readyz")
            except OSError:
                return False
            return code == 200 and body["workers"] == 2

        try:
            await eventually(both_ready, timeout_s=60, every_s=0.5)
        except AssertionError:
            print((tmp_path / "run.log").read_text()[-3000:])
            raise
        code, body = get(port, "/healthz")
        assert code == 200 and len(body["heartbeat_age_s"]) == 2
        assert get(port, "/readyz/")[0] == 200  # a trailing slash is the same path
        assert get(port, "/health")[0] == 404
