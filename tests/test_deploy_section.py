"""The README's "Deploy your own app" section, run as written: its module and script are
written to a folder, and its shell commands run there, on the real Redis broker and a
PostgreSQL store in a schema of this test's own.

Only the values the section exports are the test's own (its broker database, queues and
store), plus a one-second recovery interval so that beat's ticks show up quickly. A section
edited into something that no longer works fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from livingai_tasks import ExecutionStatus, Status
from livingai_tasks.stores import open_store

from .conftest import REDIS_URL, need_redis, pg_url
from .fleet import BROKER_DB, ROOT, Proc, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(180)]

TITLE = "## Deploy your own app"
# The variables the section exports, each given a value of this test's own below.
EXPORTED = {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "LIVINGAI_STORE", "AGENTS_QUEUE",
            "LIVINGAI_RECOVERY_QUEUE"}


def section() -> str:
    text = (ROOT / "README.md").read_text()
    assert TITLE in text, f"README.md has no {TITLE!r} section"
    body = text.split(TITLE, 1)[1]
    return body.split("\n## ", 1)[0]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of `text`, as (language, code)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def python_files(text: str) -> dict[str, str]:
    """Each python block that names its file on its first line (`# mymodule.py ...`)."""
    files = {}
    for lang, code in blocks(text):
        named = re.match(r"# (\w+\.py)\b", code)
        if lang == "python" and named:
            files[named.group(1)] = code
    return files


def shell_lines(text: str) -> list[str]:
    shells = [code for lang, code in blocks(text) if lang == "sh"]
    assert len(shells) == 1, f"expected one sh block in the section, found {len(shells)}"
    return [line for line in shells[0].splitlines() if line.strip()]


def test_the_section_names_its_files_and_one_beat() -> None:
    text = section()
    assert set(python_files(text)) == {"mymodule.py", "start.py"}
    lines = shell_lines(text)
    beats = [line for line in lines if re.match(r"celery -A \S+ beat\b", line)]
    assert len(beats) == 1, f"the section must start exactly one beat: {beats}"


def test_the_section_runs_as_written(tmp_path: Path, pg_schema: str) -> None:
    need_redis()
    text = section()
    folder = tmp_path / "app"
    folder.mkdir()
    for name, code in python_files(text).items():
        (folder / name).write_text(code)

    tag = uuid.uuid4().hex[:10]
    ours = {
        "CELERY_BROKER_URL": BROKER_DB,
        "CELERY_RESULT_BACKEND": REDIS_URL,
        "LIVINGAI_STORE": pg_url(pg_schema),
        "AGENTS_QUEUE": f"lai-deploy-{tag}",
        "LIVINGAI_RECOVERY_QUEUE": f"lai-deploy-{tag}-recovery",
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LIVINGAI_", "CELERY_"))},
        "LIVINGAI_RECOVERY_INTERVAL_S": "1",
        # The section's commands, from this checkout: its console scripts and package.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    procs: list[Proc] = []
    started: list[tuple[str, Proc]] = []  # (command, its process)
    outputs: dict[str, str] = {}
    try:
        for line in shell_lines(text):
            if line.startswith("export "):
                names = {word.split("=", 1)[0] for word in shlex.split(line)[1:]}
                unknown = names - EXPORTED
                assert not unknown, f"the section exports {unknown}, unknown to this test"
                env.update({name: ours[name] for name in names})
                continue
            if re.match(r"celery -A \S+ (worker|beat)\b", line):
                proc = Proc(["bash", "-c", f"cd {shlex.quote(str(folder))} && exec {line}"],
                            env, tmp_path / f"proc{len(procs)}.log")
                procs.append(proc)
                started.append((line, proc))
                _wait_started(proc, "ready." if " worker " in line else "beat: Starting...",
                              line)
                continue
            done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, text=True,
                                  capture_output=True, timeout=120)
            assert done.returncode == 0, (f"{line!r} exited {done.returncode}:\n"
                                          f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n"
                                          + _logs(procs))
            outputs[line.split("#")[0].strip()] = done.stdout

        for command in ("python start.py", "livingai-tasks list"):
            assert command in outputs, f"the section no longer runs {command!r}: {list(outputs)}"
        printed = outputs["python start.py"].split()
        assert len(printed) == 2 and printed[1] == "3", outputs["python start.py"]
        execution_id = printed[0]
        assert execution_id in outputs["livingai-tasks list"]

        store = open_store(ours["LIVINGAI_STORE"])
        try:
            wait_for(lambda: getattr(store.get_execution(execution_id), "status", None)
                     is ExecutionStatus.COMPLETED, 15, "the execution to be COMPLETED")
            nodes = store.nodes(execution_id)
        finally:
            store.close()
        assert [n.metadata["task"] for n in nodes] == ["mymodule.plan", "mymodule.count"]
        assert [n.status for n in nodes] == [Status.SUCCESS, Status.SUCCESS]
        assert [n.output for n in nodes] == [["book", "a", "flight"], 3]

        # Beat's ticks go to the recovery queue, and only its worker runs them.
        tick = re.compile(r"livingai_tasks\.recover\[[^\]]+\] succeeded")
        recovery = [p for line, p in started if " -Q " in line]
        steps = [p for line, p in started if " worker " in line and " -Q " not in line]
        assert len(recovery) == 1 and steps, "expected step workers and one recovery worker"
        wait_for(lambda: tick.search(recovery[0].text()), 30, "the recovery worker to run a tick")
        assert not any(tick.search(p.text()) for p in steps), _logs(steps)
    finally:
        for proc in procs:
            proc.stop()
        broker = redis.Redis.from_url(BROKER_DB)
        broker.delete(ours["AGENTS_QUEUE"], ours["LIVINGAI_RECOVERY_QUEUE"])
        broker.close()


def _wait_started(proc: Proc, ready: str, line: str) -> None:
    wait_for(lambda: ready in proc.text() or proc.popen.poll() is not None, 60,
             f"{line!r} to start")
    assert proc.popen.poll() is None, f"{line!r} exited:\n{proc.text()[-3000:]}"


def _logs(procs: list[Proc]) -> str:
    return "\n".join(f"===== {p.log.name}\n{p.text()[-3000:]}" for p in procs)
