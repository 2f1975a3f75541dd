"""The built wheel, installed apart from the checkout, runs a user's app against the services.

The wheel holds ``consumer`` only (no top-level ``handlers``/``schemas`` to clash with the
user's), with ``py.typed`` and the migrations. It is installed with ``pip --target`` and run
with ``python -S`` from a directory outside the repository, the dependencies taken from this
venv's site-packages as a plain path (so the checkout's editable ``.pth`` is not read).
"""

from __future__ import annotations

import asyncio
import os
import signal
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.conftest import ROOT, eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = """
import os
from pydantic import BaseModel
from consumer import App, Context

class Order(BaseModel):
    n: int

app = App(os.environ["MYAPP_GROUP"])

@app.handler(os.environ["MYAPP_TOPIC"], schema=Order, key="record")
async def take(order: Order, ctx: Context) -> int:
    return order.n
"""


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


def _spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    return next(out.glob("dedup_consumer-*.whl"))


def test_the_wheel_holds_the_framework_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {
        "consumer",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    assert "consumer/py.typed" in names
    assert "consumer/migrations/0001_init.sql" in names


@pytest.mark.timeout(240)
async def test_a_users_app_runs_from_the_installed_wheel(
    settings, wheel, topics, producer, pg, unique, tmp_path
):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
    assert (await asyncio.to_thread(_run, [*pip, str(wheel)])).returncode == 0
    project = tmp_path / "project"  # the user's project: nowhere near the checkout
    project.mkdir()
    (project / "myapp.py").write_text(textwrap.dedent(APP))
    topic = await topics("wheel")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        "PYTHONPATH": os.pathsep.join([str(project), str(target), *site.getsitepackages()]),
        "MYAPP_GROUP": f"g-{unique}",
        "MYAPP_TOPIC": topic,
    }
    py = [sys.executable, "-S"]
    probe = (
        "import consumer, importlib.util as u; print(consumer.__file__, u.find_spec('handlers'))"
    )
    where = await asyncio.to_thread(_run, [*py, "-c", probe], cwd=project, env=env)
    found, handlers = where.stdout.split()
    assert found.startswith(str(target)) and handlers == "None", where.stderr

    migrate = [*py, "-m", "consumer", "migrate", "myapp:app"]
    migrated = await asyncio.to_thread(_run, migrate, cwd=project, env=env)
    assert migrated.returncode == 0, migrated.stderr
    for n in range(3):
        await producer.send_and_wait(topic, msgpack.packb({"n": n}), key=f"k{n}".encode())
    worker = _spawn([*py, "-m", "consumer", "worker", "myapp:app"], cwd=project, env=env)
    try:

        async def applied() -> bool:
            n = await pg.fetchval(
                "SELECT count(*) FROM dedup.inbox WHERE namespace = $1", f"g-{unique}.take"
            )
            return n == 3

        await eventually(applied, timeout_s=90)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(worker.communicate, timeout=60)
    assert worker.returncode == 0, err.decode()[-3000:]
