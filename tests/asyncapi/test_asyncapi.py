"""``consumer asyncapi``: the documents it writes are valid by the official AsyncAPI parser.

Validation is @asyncapi/parser 3.x (https://github.com/asyncapi/parser-js), the parser the
AsyncAPI CLI and Studio use, run by node on ``validate.mjs`` here, installed from
``package-lock.json`` by ``npm ci`` (``make test`` does it: ``make asyncapi-deps``). Without
node or the installed parser these tests skip, and fail under ``CI=true``. A deliberately
broken document must be rejected, so a parser that accepts anything cannot pass them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer import asyncapi as lib
from consumer import exitcodes
from consumer.cli import main
from consumer.constants import (
    HEADER_IDEMPOTENCY_KEY,
    HEADER_ORIGINAL_HEADERS,
    HEADER_REASON,
    HEADER_RETRY_ATTEMPT,
    HEADER_RETRY_DUE_MS,
    HEADER_RETRY_ORIGIN,
)
from consumer.settings import Settings
from consumer.topics import needed
from tests.asyncapi import shop_app

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PARSER = HERE / "node_modules" / "@asyncapi" / "parser" / "package.json"


def _unavailable(why: str) -> None:
    msg = f"{why}; run `make asyncapi-deps` (npm ci in tests/asyncapi)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with the pinned parser installed next to validate.mjs."""
    found = shutil.which("node")
    if found is None:
        _unavailable("node is not installed")
    assert found is not None
    if not PARSER.exists():
        _unavailable("@asyncapi/parser is not installed")
    version = json.loads(PARSER.read_text())["version"]
    assert version.startswith("3."), f"@asyncapi/parser {version}: 3.x expected"
    return found


def validate(node: str, *files: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run the parser on ``files``: its exit status and one result per file. Its diagnostics
    (warnings included) are printed, so pytest shows them with the test."""
    proc = subprocess.run(
        [node, str(HERE / "validate.mjs"), *map(str, files)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stderr, file=sys.stderr)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, results


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


def refs(node: Any) -> list[str]:
    """Every ``$ref`` in a JSON tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for k, v in node.items() if k != "$ref" for r in refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys(v)}
    return set()


# ------------------------------------------------------------------ the documented example


def _doc_commands() -> list[str]:
    text = (ROOT / "docs" / "asyncapi.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, flags=re.S)
    return [
        line.strip()
        for b in blocks
        for line in b.splitlines()
        if line.startswith("consumer asyncapi ")
    ]


def test_the_documented_command_writes_the_committed_document_and_it_is_valid(node, tmp_path):
    """docs/asyncapi.md's command (the one `make asyncapi` runs), run as written with no
    CONSUMER_* setting, writes exactly docs/asyncapi.yaml, which the parser accepts."""
    commands = _doc_commands()
    assert commands, "docs/asyncapi.md shows no `consumer asyncapi ...` command"
    example = commands[0]
    argv = shlex.split(example)
    assert argv[-2:] == ["-o", "docs/asyncapi.yaml"], example
    (tmp_path / "docs").mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("consumer")), *argv[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == exitcodes.RET_OK, proc.stderr
    written = tmp_path / "docs" / "asyncapi.yaml"
    committed = ROOT / "docs" / "asyncapi.yaml"
    assert written.read_text() == committed.read_text(), (
        "docs/asyncapi.yaml is stale: make asyncapi"
    )
    makefile = (ROOT / "Makefile").read_text()
    assert " ".join(argv[1:3]) in makefile and "-o docs/asyncapi.yaml" in makefile

    code, [result] = validate(node, written)
    assert code == 0 and result["errors"] == 0, result
    parsed = result["document"]
    assert parsed["version"] == "3.0.0" and parsed["title"] == "payments"
    addresses = {c["address"] for c in parsed["channels"]}
    assert addresses == {
        "payments.requested",
        "payments.requested.dlq",
        "payments.requested.conflicts",
        "payments.settled",
        None,  # the reply channel: its address is the request's reply-to
    }
    ops = {o["id"]: o for o in parsed["operations"]}
    assert ops["receive-payments.requested"]["reply"]["address"] == "$message.header#/reply-to"
    assert ops["send-payments.settled"]["action"] == "send"
    assert {"PaymentRequested", "PaymentSettled", "Receipt"} <= set(parsed["schemas"])
    assert parsed["servers"] == [
        {"id": "kafka", "host": "127.0.0.1:19092", "protocol": "kafka", "security": []}
    ]


# ------------------------------------------------------------------ an app using everything


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_every_topic_role_model_and_header_is_in_a_valid_document(node, tmp_path, capsys, fmt):
    out = tmp_path / f"shop.{fmt}"
    code, _, err = run_cli(
        capsys,
        "asyncapi",
        "tests.asyncapi.shop_app:app",
        "--bootstrap",
        "k1:9092,k2:9092",
        "--format",
        fmt,
        "-o",
        str(out),
    )
    assert code == exitcodes.RET_OK, err
    doc = yaml.safe_load(out.read_text()) if fmt == "yaml" else json.loads(out.read_text())
    assert doc == lib.document(shop_app.app, _settings("k1:9092,k2:9092"))  # same either way

    rc, [result] = validate(node, out)
    assert rc == 0 and result["errors"] == 0, result
    parsed = result["document"]

    # Channels: every topic `consumer topics` lists, and one reply channel per source.
    needs = needed(shop_app.app)
    addresses = [c["address"] for c in parsed["channels"]]
    assert sorted(a for a in addresses if a is not None) == sorted(n.topic for n in needs)
    sources = [n.topic for n in needs if n.role == "source"]
    assert addresses.count(None) == len(sources) == 3

    # Operations: what the framework does on each.
    actions = {(o["channels"][0], o["action"]) for o in parsed["operations"]}
    want = set()
    for n in needs:
        if n.role == "source":
            want.add((n.topic, "receive"))
        if n.role in ("dlq", "conflicts", "publish"):
            want.add((n.topic, "send"))
        if n.role == "retry":
            want |= {(n.topic, "send"), (n.topic, "receive")}
    want.add((shop_app.AUDIT, "send"))  # declared as a target, and a source too
    assert actions == want
    replies = [o["reply"] for o in parsed["operations"] if o["reply"]]
    assert {r["channel"] for r in replies} == {f"{t}.reply" for t in sources}
    assert {r["address"] for r in replies} == {"$message.header#/reply-to"}

    # Schemas: $defs hoisted into components (nested, union members, enum, two `Line`s),
    # and every $ref points into the document.
    schemas = set(parsed["schemas"])
    assert {"Order", "Card", "Transfer", "Currency", "Shipped", "Receipt", "Audited"} <= schemas
    assert len([s for s in schemas if s.startswith("Line")]) == 2
    assert "$defs" not in keys(doc) and "prefixItems" not in keys(doc)
    assert all(r.startswith(("#/components/", "#/channels/")) for r in refs(doc))
    payment = doc["components"]["schemas"]["Order"]["properties"]["payment"]
    assert payment["discriminator"] == "kind"  # AsyncAPI's form: the property name

    # Headers, as the parser read them.
    headers = {m["id"]: set(m["headers"]) for m in parsed["messages"]}
    assert HEADER_IDEMPOTENCY_KEY in headers[shop_app.ORDERS]  # key="header"
    assert {HEADER_RETRY_ATTEMPT, HEADER_RETRY_DUE_MS, HEADER_RETRY_ORIGIN} <= headers[
        f"{shop_app.ORDERS}.retry"
    ]
    assert {HEADER_REASON, HEADER_ORIGINAL_HEADERS} <= headers[f"{shop_app.ORDERS}.dlq"]
    assert {"x-payload-hash", "x-stored-hash"} <= headers[f"{shop_app.ORDERS}.conflicts"]
    assert {"x-outcome", "correlation-id"} <= headers[f"{shop_app.ORDERS}.reply"]
    messages = doc["components"]["messages"]
    assert messages[shop_app.SHIPPED]["payload"] == {"$ref": "#/components/schemas/Shipped"}
    assert messages[f"{shop_app.ORDERS}.reply"]["payload"]["anyOf"][0] == {
        "$ref": "#/components/schemas/Receipt"
    }
    assert messages[shop_app.METRICS]["payload"] == {}  # declared without a model
    assert messages[shop_app.AUDIT]["bindings"]["kafka"]["key"]["type"] == "string"  # key="record"
    assert [s["host"] for s in parsed["servers"]] == ["k1:9092", "k2:9092"]


def _settings(bootstrap: str, **more: Any) -> Settings:
    return Settings(
        kafka_bootstrap=bootstrap,
        redis_url="redis://unused:1",
        postgres_dsn="postgresql://unused:1/x",
        **more,
    )


SCHEMES = {"PLAIN": "plain", "SCRAM-SHA-512": "scramSha512", "OAUTHBEARER": "oauth2"}


def test_tls_and_sasl_settings_are_the_servers_protocol_and_security(node, tmp_path):
    files = {}
    for mechanism in SCHEMES:
        s = _settings(
            "broker:9094",
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism=mechanism,
            kafka_ssl_cert_file="client.pem",
            kafka_ssl_key_file="client.key",
        )
        files[mechanism] = tmp_path / f"{mechanism}.json"
        files[mechanism].write_text(json.dumps(lib.document(shop_app.app, s)))
    files["PLAINTEXT"] = tmp_path / "PLAINTEXT.json"
    files["PLAINTEXT"].write_text(json.dumps(lib.document(shop_app.app, _settings("b:9092"))))
    rc, results = validate(node, *files.values())
    assert rc == 0 and all(r["errors"] == 0 for r in results), results
    servers = {Path(r["file"]).stem: r["document"]["servers"] for r in results}
    for mechanism, scheme in SCHEMES.items():
        [server] = servers[mechanism]
        assert server["protocol"] == "kafka-secure"
        assert server["security"] == [[scheme], ["X509"]]
    [plain] = servers["PLAINTEXT"]
    assert plain["protocol"] == "kafka" and plain["security"] == []


REPO_APPS = [
    "handlers.app:app",
    "handlers.orders.ledger:app",
    "handlers.catalog.app:app",
    "scripts.chaos.downstream:app",
    "tests.apps.counting:app",
    "tests.apps.lifespan_app:app",
]


def test_every_app_of_the_repository_has_a_valid_document(node, tmp_path):
    """The example apps, the test apps and the retry-topic crash test's app (one node run)."""
    from consumer.loader import load_app
    from tests.integration.retry_app import build_app

    apps = {spec: load_app(spec) for spec in REPO_APPS}
    apps["retry_app"] = build_app("g", "pays", "t", "gate")
    files = []
    for i, app in enumerate(apps.values()):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(lib.document(app, _settings("h:9092"))))
    rc, results = validate(node, *files)
    assert rc == 0, results
    assert [r["errors"] for r in results] == [0] * len(apps)
    retry = results[-1]["document"]
    assert {c["address"] for c in retry["channels"]} >= {"pays", "pays.retry", "pays.dlq"}


# ------------------------------------------------------------------ the parser does reject


def _broken(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    no_info = copy.deepcopy(doc)
    del no_info["info"]  # required
    bad_action = copy.deepcopy(doc)
    bad_action["operations"]["receive-payments.requested"]["action"] = "subscribe"  # 2.x verb
    dangling = copy.deepcopy(doc)
    dangling["components"]["messages"]["payments.requested"]["payload"] = {
        "$ref": "#/components/schemas/NoSuchModel"
    }
    return {"no-info": no_info, "bad-action": bad_action, "dangling-ref": dangling}


def test_a_broken_document_is_rejected_by_the_parser(node, tmp_path):
    import handlers.app

    good = lib.document(handlers.app.app, _settings("127.0.0.1:19092"))
    files = []
    for name, doc in {"good": good, **_broken(good)}.items():
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(doc))
    rc, results = validate(node, *files)
    assert rc == 1  # some file has an error
    by_name = {Path(r["file"]).stem: r for r in results}
    assert by_name["good"]["errors"] == 0
    for name in ("no-info", "bad-action", "dangling-ref"):
        assert by_name[name]["errors"] > 0, name
        assert by_name[name]["document"] is None


# ------------------------------------------------------------------ the command's errors


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prints_json_to_stdout_by_default_and_yaml_by_the_output_suffix(capsys, tmp_path):
    code, out, err = run_cli(capsys, "asyncapi", "handlers.app:app", "--bootstrap", "h:1")
    assert code == exitcodes.RET_OK, err
    assert json.loads(out)["asyncapi"] == "3.0.0"
    target = tmp_path / "api.yml"
    code, out, _ = run_cli(
        capsys, "asyncapi", "handlers.app:app", "--bootstrap", "h:1", "-o", str(target)
    )
    assert code == exitcodes.RET_OK and out == ""
    assert yaml.safe_load(target.read_text())["servers"]["kafka"]["host"] == "h:1"
    assert "&id" not in target.read_text()  # no YAML anchors for shared schemas


def test_errors_are_one_line_with_a_named_exit_code(capsys, tmp_path, monkeypatch):
    code, _, err = run_cli(capsys, "asyncapi", "handlers.app:app", "--format", "xml")
    assert code == exitcodes.RET_CONFIG and "--format 'xml'" in _one_line(err)

    monkeypatch.delenv("CONSUMER_KAFKA_BOOTSTRAP", raising=False)
    import handlers.app

    monkeypatch.setattr(handlers.app.app, "_settings", None)  # read the environment again
    code, _, err = run_cli(capsys, "asyncapi", "handlers.app:app")
    assert code == exitcodes.RET_CONFIG and "CONSUMER_KAFKA_BOOTSTRAP" in _one_line(err)

    code, _, err = run_cli(capsys, "asyncapi", "no_such_module:app", "--bootstrap", "h:1")
    assert code == exitcodes.RET_IMPORT and "no_such_module" in _one_line(err)

    missing = tmp_path / "no" / "such" / "dir.json"
    code, _, err = run_cli(
        capsys, "asyncapi", "handlers.app:app", "--bootstrap", "h:1", "-o", str(missing)
    )
    assert code == exitcodes.RET_CONFIG and "cannot write" in _one_line(err)


def test_yaml_without_pyyaml_is_one_line_naming_the_way_out(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    code, out, err = run_cli(
        capsys, "asyncapi", "handlers.app:app", "--bootstrap", "h:1", "-f", "yaml"
    )
    assert code == exitcodes.RET_CONFIG and out == ""
    assert "PyYAML" in _one_line(err) and "--format json" in err
