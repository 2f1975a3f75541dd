"""The ``consumer`` command's failure modes: one line, a named exit code; and its helpers."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import pytest

from consumer import exitcodes, logs
from consumer.cli import main
from consumer.supervisor import backoff_s, describe_exit, worker_command

pytestmark = pytest.mark.unit


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    code = exc.value.code
    assert isinstance(code, int)
    return code, out, err


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of throw-away app modules, importable as the loader does (from the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "handlers.app:app", "--workers", "0"], "--workers"),
        (["run", "handlers.app:app", "--bogus"], "--bogus"),
        (["run"], "MODULE:APP"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_bad_options_are_one_line_and_ret_config(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert code == exitcodes.RET_CONFIG
    assert needle in one_line_error(err)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
        ("handlers.app", "expected 'module:app'"),
        ("handlers.app:nothing_here", "is not a consumer.App"),
    ],
)
def test_unloadable_apps_are_one_line_and_ret_import(capsys, spec, needle):
    code, _, err = run_cli(capsys, "migrate", spec)
    assert code == exitcodes.RET_IMPORT
    assert needle in one_line_error(err)


def test_a_module_that_raises_while_imported_is_ret_import(capsys, app_dir):
    (app_dir / "raising_app_mod.py").write_text("x = 1\nraise RuntimeError('boom at import')\n")
    code, _, err = run_cli(capsys, "migrate", "raising_app_mod:app")
    assert code == exitcodes.RET_IMPORT
    line = one_line_error(err)
    assert "RuntimeError: boom at import" in line
    assert "raising_app_mod.py:2" in line


def test_bad_handler_options_are_ret_config(capsys, app_dir):
    (app_dir / "bad_handler_mod.py").write_text(
        "from pydantic import BaseModel\n"
        "from consumer import App\n"
        "class P(BaseModel):\n    a: int\n"
        "app = App('g')\n"
        "@app.handler('t', schema=P, hash_exclude={'nope'})\n"
        "async def h(p, ctx):\n    return None\n"
    )
    code, _, err = run_cli(capsys, "migrate", "bad_handler_mod:app")
    assert code == exitcodes.RET_CONFIG
    assert "hash_exclude" in err


def test_a_bad_setting_is_ret_config_naming_the_variable(capsys, app_dir, monkeypatch):
    (app_dir / "plain_app_mod.py").write_text("from consumer import App\napp = App('g')\n")
    monkeypatch.setenv("CONSUMER_LEASE_MS", "5")
    code, _, err = run_cli(capsys, "run", "plain_app_mod:app")
    assert code == exitcodes.RET_CONFIG
    assert err.startswith("error: invalid settings")
    assert "CONSUMER_LEASE_MS" in err


def test_bare_command_prints_the_help_with_the_exit_codes(capsys):
    code, out, _ = run_cli(capsys)
    assert code == exitcodes.RET_CONFIG
    assert "Exit codes:" in out
    for command in ("run", "migrate", "relay", "inspect", "evict", "conflicts"):
        assert command in out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert "worker" not in listed  # hidden: what `run` starts


def test_exit_codes_are_distinct_and_named():
    codes = [v for k, v in vars(exitcodes).items() if k.startswith("RET_")]
    assert len(codes) == len(set(codes)) == len(exitcodes.NAMES)
    assert exitcodes.NAMES[3] == "RET_IMPORT"


def test_describe_exit_says_why_a_worker_is_gone():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3 (RET_IMPORT)"
    assert describe_exit(77) == "exited with code 77"


def test_backoff_doubles_per_quick_failure_and_is_capped():
    assert [backoff_s(n, 0.5, 5.0) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1, 2, 4, 5, 5]


def test_worker_command_line():
    argv = worker_command("m:app", 2, relay=False, log_json=True, parent_pid=42)
    assert argv[:3] == [sys.executable, "-m", "consumer"]
    assert argv[3:] == [
        "worker",
        "m:app",
        "--id",
        "2",
        "--no-relay",
        "--supervisor-pid",
        "42",
        "--log-json",
    ]


def test_json_log_lines_carry_the_worker_and_the_status_fields():
    # What `--log-json` promises for the per-worker status line.
    record = logging.LogRecord("consumer.worker", logging.INFO, __file__, 1, "w %d", (1,), None)
    record.status = {"applied": 3}
    record.worker = 1
    line = json.loads(logs.JsonFormatter().format(record))
    assert (line["msg"], line["level"], line["worker"]) == ("w 1", "info", 1)
    assert line["status"] == {"applied": 3}


def test_topics_kafka_auth_error_is_one_line_and_ret_kafka_auth(capsys, monkeypatch):
    from consumer import topics
    from consumer.errors import KafkaAuthError

    async def refused(app, s):
        raise KafkaAuthError("localhost:1: SASL authentication failed: bad password")

    monkeypatch.setattr(topics, "inspect", refused)
    code, _, err = run_cli(capsys, "topics", "handlers.app:app")
    assert code == exitcodes.RET_KAFKA_AUTH
    assert "SASL authentication failed" in one_line_error(err)


def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    code, out, _ = run_cli(capsys, "--version")
    assert code == exitcodes.RET_OK
    assert out.strip() == f"dedup-consumer {version('dedup-consumer')}"


def test_log_level_setting_reaches_the_root_logger(monkeypatch):
    from consumer.cli.common import log_level
    from consumer.settings import Settings

    monkeypatch.setenv("CONSUMER_LOG_LEVEL", "WARNING")
    assert log_level(Settings()) == logging.WARNING


def test_run_no_create_topics_reaches_the_supervisor_and_the_workers_env(capsys, monkeypatch):
    import os

    from consumer import supervisor
    from consumer.cli import run as run_cmd

    seen = {}

    def fake_supervise(app_spec, *, settings, **_kw):
        seen["setting"] = settings.topics_create
        seen["env"] = os.environ.get("CONSUMER_TOPICS_CREATE")
        return exitcodes.RET_OK

    monkeypatch.delenv("CONSUMER_TOPICS_CREATE", raising=False)
    monkeypatch.setattr(supervisor, "supervise", fake_supervise)
    monkeypatch.setattr(run_cmd, "apply_migrations", lambda app: [])
    code, _, err = run_cli(capsys, "run", "handlers.app:app", "--no-create-topics")
    os.environ.pop("CONSUMER_TOPICS_CREATE", None)  # the command set it for its children
    assert code == exitcodes.RET_OK, err
    assert seen == {"setting": False, "env": "false"}
