"""docs/request-reply.md's example, run as a user would: ``consumer run quotes_app:app`` in
its own process, then ``python ask_quote.py``, against the real services.

The example's names (group ``quotes``, topics ``quotes.*``) are made unique for the run, so
no other run's records answer it. A doc example that no longer works is a defect.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from consumer.exitcodes import RET_OK
from scripts.toolkit import processes
from tests.conftest import create_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "request-reply.md"


def examples() -> dict[str, str]:
    """The doc's code blocks that start with ``# <name>.py``, by file name."""
    blocks = re.findall(r"```python\n(# (\w+\.py)\n.*?)```", DOC.read_text(), re.S)
    return {name: code for code, name in blocks}


async def test_the_request_reply_example_runs(settings, tmp_path, unique):
    found = examples()
    assert set(found) == {"quotes_app.py", "ask_quote.py"}
    name = f"quotes-{unique}"
    for file, code in found.items():
        (tmp_path / file).write_text(code.replace('"quotes', f'"{name}'))
    await create_topics(settings, [f"{name}.requested", f"{name}.replies"], partitions=1)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    log = tmp_path / "worker.log"
    worker = processes.spawn(processes.consumer_argv("run", "quotes_app:app"), env, log)
    try:
        ask = await asyncio.create_subprocess_exec(
            sys.executable,
            str(tmp_path / "ask_quote.py"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ask.communicate(), 180)
        assert ask.returncode == 0, err.decode()[-3000:] + log.read_text()[-3000:]
        assert out.decode().splitlines() == [
            "done application/json {'sku': 'tea', 'total_cents': 750}",
            "identical: True True",
        ]
        worker.send_signal(signal.SIGTERM)
        assert await processes.wait_exit(worker, 60) == RET_OK, log.read_text()[-3000:]
    finally:
        processes.kill_tree(worker)
        processes.reap(worker)
