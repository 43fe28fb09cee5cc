"""The `livingai-tasks` entry point: every command through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livingai_tasks import (
    ErrorInfo,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    Status,
    open_store,
)

ROOT = Path(__file__).resolve().parent.parent
CLI = shutil.which("livingai-tasks") or str(Path(sys.executable).parent / "livingai-tasks")


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture
def recorded(tmp_path: Path) -> str:
    """A SQLite store with one finished and one in-doubt execution, written by hand."""
    url = f"sqlite:///{tmp_path}/cli.db"
    s = open_store(url)
    s.migrate()
    s.create_execution(Execution(id="done-1", status=ExecutionStatus.COMPLETED))
    plan = ExecutionNode(execution_id="done-1", type=NodeType.PROMPT, id="n1", seq=1,
                         status=Status.SUCCESS, output={"plan": 1}, latency_ms=12,
                         cost_tokens=321, metadata={"task": "example.plan", "attempt": 1})
    tool = ExecutionNode(execution_id="done-1", type=NodeType.TOOL, id="n2", seq=2,
                         parent_id="n1", status=Status.FAILED, metadata={"task": "example.charge"},
                         error=ErrorInfo("ValueError", "card declined"))
    s.append([plan, tool])
    s.create_execution(Execution(id="held-1", status=ExecutionStatus.IN_DOUBT,
                                 reason="charge unknown"))
    s.close()
    return url


def test_list_show_and_stats(recorded: str) -> None:
    out = cli("list", "--store", recorded)
    assert out.returncode == 0, out.stderr
    assert "done-1" in out.stdout and "IN_DOUBT" in out.stdout and "EXECUTION" in out.stdout
    listed = json.loads(cli("list", "--store", recorded, "--json",
                            "--status", "IN_DOUBT").stdout)
    assert [e["id"] for e in listed] == ["held-1"]

    shown = cli("show", "done-1", "--store", recorded)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("execution done-1  COMPLETED")
    assert "#1 PROMPT" in lines[1] and "12 ms" in lines[1] and "tokens 321" in lines[1]
    assert lines[2].lstrip().startswith("└─ #2 TOOL") and "ValueError: card declined" in lines[2]
    as_json = json.loads(cli("show", "done-1", "--store", recorded, "--json").stdout)
    assert [n["id"] for n in as_json["nodes"]] == ["n1", "n2"]

    stats = json.loads(cli("stats", "--store", recorded, "--json").stdout)
    assert stats["executions"]["COMPLETED"] == 1 and stats["executions"]["IN_DOUBT"] == 1


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    out = cli("migrate", "--store", url)
    assert out.returncode == 0 and "schema created or upgraded to version" in out.stdout
    assert cli("list", "--store", url).stdout.strip() == "no executions"


@pytest.mark.parametrize("args, message", [
    (["show", "nope"], "No execution 'nope'"),
    (["list", "--store", "mysql://db/x"], "Unsupported store URL scheme 'mysql'"),
    (["resolve", "done-1", "n2", "--done", "{not json"], "--done (the step's output) takes JSON"),
    (["resolve", "done-1", "n1", "--retry", "--app", "livingai_tasks.demo.app:app"],
     "only IN_DOUBT"),
    (["resolve", "held-1", "n1", "--retry"], "name the Celery app to publish on with --app"),
    (["replay", "done-1", "--mode", "MOCK_TOOLS"], "name the Celery app to publish on"),
    (["show", "done-1", "n9"], "No node 'n9' in execution 'done-1'; its nodes: n1, n2"),
    (["replay", "done-1", "--mode", "FULL", "--app", "no.such.module:app"],
     "Cannot load the Celery app"),
])
def test_errors_are_one_line_and_exit_1(recorded: str, args: list[str], message: str) -> None:
    if "--store" not in args:
        args = [*args, "--store", recorded]
    out = cli(*args)
    assert out.returncode == 1, out
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["list", "--limit", "0"], ["replay", "x", "--mode", "SIDEWAYS"],
                                  ["resolve", "e", "n"], ["frobnicate"], []])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    out = cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error:" in out.stderr


def test_unreachable_store_is_one_clear_line() -> None:
    out = cli("list", "--store", "postgresql+psycopg://u:hunter2@127.0.0.1:1/db")
    assert out.returncode == 1
    assert "127.0.0.1" in out.stderr and "hunter2" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.fixture
def orphaned(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A SQLite store holding one execution whose lease expired 30 s ago mid-step."""
    import time

    url = f"sqlite:///{tmp_path}/orphans.db"
    s = open_store(url)
    s.migrate()
    s.create_execution(Execution(id="orphan", lease_deadline=time.time() - 30))
    s.append([ExecutionNode(execution_id="orphan", type=NodeType.PROMPT, id="o1", seq=1,
                            status=Status.RUNNING, metadata={"task": "example.plan"})])
    yield url, s
    s.close()


def test_recover_dry_run_plans_without_acting(tmp_path: Path,
                                             orphaned: tuple[str, Any]) -> None:
    url, s = orphaned
    out = cli("recover", "--dry-run", "--store", url, "--json",
              env={"LIVINGAI_BROKER": f"sqla+sqlite:///{tmp_path}/b.db",
                   "LIVINGAI_BACKEND": f"db+sqlite:///{tmp_path}/r.db"})
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    assert [p["action"] for p in report["plans"]] == ["RESUME"]
    assert report["claimed"] == [] and report["published"] == []
    assert s.get_execution("orphan").fence == 0  # nothing was claimed


def test_show_gives_a_node_in_full_and_says_what_to_do_with_a_held_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/held.db"
    s = open_store(url)
    s.migrate()
    s.create_execution(Execution(id="held-2", status=ExecutionStatus.IN_DOUBT))
    s.append([ExecutionNode(execution_id="held-2", type=NodeType.TOOL, id="t1", seq=1,
                            status=Status.IN_DOUBT, input={"args": [{"amount": 12}], "kwargs": {}},
                            metadata={"task": "example.charge_card", "attempt": 1})])
    s.close()
    tree = cli("show", "held-2", "--store", url, "--app", "agents:app")
    assert tree.returncode == 0, tree.stderr
    hint = tree.stdout.splitlines()[-1]
    assert "livingai-tasks show held-2 t1" in hint
    assert "livingai-tasks resolve held-2 t1 --app agents:app --done" in hint and "--retry" in hint

    one = cli("show", "held-2", "t1", "--store", url)
    assert one.returncode == 0, one.stderr
    node = json.loads(one.stdout)
    assert node["input"] == {"args": [{"amount": 12}], "kwargs": {}}
    assert node["status"] == "IN_DOUBT" and node["metadata"]["task"] == "example.charge_card"
    full = json.loads(cli("show", "held-2", "--full", "--store", url).stdout)
    assert [n["id"] for n in full["nodes"]] == ["t1"] and "input" in full["nodes"][0]


def test_json_and_debug_go_before_or_after_the_command(recorded: str) -> None:
    before = json.loads(cli("--json", "list", "--store", recorded).stdout)
    after = json.loads(cli("list", "--store", recorded, "--json").stdout)
    assert [e["id"] for e in before] == [e["id"] for e in after] != []
    out = cli("--debug", "show", "nope", "--store", recorded)
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_the_store_comes_from_the_environment_or_the_named_app(recorded: str,
                                                               tmp_path: Path) -> None:
    listed = cli("list", "--json", env={"LIVINGAI_STORE": recorded})
    assert {e["id"] for e in json.loads(listed.stdout)} == {"done-1", "held-1"}
    (tmp_path / "my_agents.py").write_text(
        "from celery import Celery\nimport livingai_tasks as lai\n"
        "app = Celery('mine', broker='memory://')\n"
        f"lai.install(app, store={recorded!r})\n")
    env = {"PYTHONPATH": str(tmp_path), "LIVINGAI_APP": "my_agents:app", "LIVINGAI_STORE": ""}
    shown = cli("show", "done-1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("execution done-1  COMPLETED")


# Each command with the answer that shows it read the recorded store. Where a command looks
# for a node or a waiting execution that is not there, its error names what it looked in.
READS = [
    (["list"], "held-1"),
    (["show", "done-1"], "execution done-1  COMPLETED"),
    (["show", "done-1", "n1"], '"id": "n1"'),
    (["stats"], "COMPLETED  1"),
    (["rejected"], "no rejected records"),
    (["migrate"], "schema created or upgraded"),
    (["recover"], "no orphaned executions"),
    (["cancel", "held-1"], "Execution held-1 is not waiting (IN_DOUBT)"),
]
PUBLISHES = [
    (["recover"], "no orphaned executions: nothing did"),  # not the dry run's answer
    (["resolve", "held-1", "x1", "--retry"], "No node 'x1' in execution 'held-1'"),
    (["approve", "held-1", "x1"], "not waiting for an approval (not found; execution IN_DOUBT)"),
    (["deny", "held-1", "x1"], "not waiting for an approval (not found; execution IN_DOUBT)"),
    (["send", "held-1", "go", "--key", "k1"], "for execution held-1"),
    (["replay", "done-2", "--mode", "FULL", "--wait", "1"], "No recorded steps for execution "
                                                           "'done-2'"),
]


@pytest.mark.parametrize(("args", "expected"), READS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_every_command_reads_the_store_named_by_livingai_store(
        recorded: str, args: list[str], expected: str) -> None:
    out = cli(*args, env={"LIVINGAI_STORE": recorded, "LIVINGAI_APP": ""})
    assert expected in out.stdout + out.stderr, (out.stdout, out.stderr)
    assert "no store named" not in out.stderr


@pytest.mark.parametrize(("args", "expected"), READS + PUBLISHES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_command_works_on_the_app_named_by_livingai_app(
        recorded: str, tmp_path: Path, args: list[str], expected: str) -> None:
    """The store is the app's own `livingai_store` config: nothing else names one."""
    (tmp_path / "conf_agents.py").write_text(
        "from celery import Celery\nimport livingai_tasks as lai\n"
        "app = Celery('mine', broker='memory://')\n"
        f"app.conf.livingai_store = {recorded!r}\nlai.install(app)\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "LIVINGAI_APP": "conf_agents:app",
           "LIVINGAI_STORE": ""}
    out = cli(*args, env=env)
    assert expected in out.stdout + out.stderr, (out.stdout, out.stderr)
    assert "name the Celery app" not in out.stderr and "a dry run" not in out.stdout


def test_the_demo_takes_no_app_and_says_which_store_it_uses() -> None:
    out = cli("demo", "--app", "conf_agents:app")
    assert out.returncode == 2 and "unrecognized arguments: --app" in out.stderr
    assert "$LIVINGAI_STORE is not read" in cli("demo", "--help").stdout


def test_no_store_named_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    out = subprocess.run([CLI, "list"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "LIVINGAI_STORE": "", "LIVINGAI_APP": ""})
    assert out.returncode == 1 and "no store named: pass --store URL" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_recover_without_an_app_only_plans_and_says_why(orphaned: tuple[str, Any]) -> None:
    url, s = orphaned
    out = cli("recover", "--store", url, env={"LIVINGAI_APP": ""})
    assert out.returncode == 0, out.stderr
    assert "RESUME" in out.stdout and "a dry run: no app was named" in out.stdout
    assert s.get_execution("orphan").fence == 0  # nothing was claimed


def test_stored_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ansi.db"
    s = open_store(url)
    s.migrate()
    evil = "boom\x1b[2J\x1b[31m\n└─ #9 TOOL fake  SUCCESS\u2028\x9b"
    s.create_execution(Execution(id="ansi-1", status=ExecutionStatus.FAILED, reason=evil))
    s.append([ExecutionNode(execution_id="ansi-1", type=NodeType.TOOL, id="a1", seq=1,
                            status=Status.FAILED, error=ErrorInfo("ValueError", evil),
                            metadata={"task": "t\x1b]0;title\x07"})])
    s.append([ExecutionNode(execution_id="ansi-2", type=NodeType.TOOL, id="b\x1b[2J", seq=1,
                            status=Status.SUCCESS, metadata={"task": "t"})])
    s.close()
    # An error line may quote what a step stored (here the nodes it has): escaped too.
    error = cli("show", "ansi-2", "zz", "--store", url)
    assert error.returncode == 1 and "its nodes: b\\x1b[2J" in error.stderr, error.stderr
    assert "\x1b" not in error.stderr
    for args in (["show", "ansi-1"], ["list"]):
        out = cli(*args, "--store", url)
        assert out.returncode == 0, out.stderr
        assert not any(c in out.stdout for c in "\x1b\x07\x9b\u2028"), out.stdout
        assert "\\x1b[2J" in out.stdout
    shown = cli("show", "ansi-1", "--store", url).stdout.splitlines()
    assert len(shown) == 3  # head, reason, one node: the fake tree line stays inside its row
