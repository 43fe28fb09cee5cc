"""Flower, as an operator uses it, on a real fleet: the example agent on workers/agent_app.py.

One real worker (with task events) and one real Flower process on the real Redis broker, both
started from workers/ the way workers/README.md says. Agent executions run through them; then
Flower's HTTP API and, in headless Chromium, its /tasks page must show each step with the
"[livingai execution=<id> seq=<n> type=<T>]" tag that signals._on_publish adds to the step's
kwargsrepr. Beat's recovery ticks must show up too.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import REDIS_URL, need_redis, require_or_skip
from .fleet import Proc, wait_for
from .tools import require_tool_or_skip

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
BROKER = REDIS_URL.rsplit("/", 1)[0] + "/3"  # brokers' keys apart from the stores', as elsewhere
CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no network: no sandbox, no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STEPS = {"example.plan": "PROMPT", "example.search": "TOOL", "example.charge_card": "TOOL",
         "example.summarize": "PROMPT"}
TAG = re.compile(r"\[livingai execution=(?P<execution>\S+) seq=(?P<seq>\d+) type=(?P<type>\w+)\]")

# Three runs of the example agent; prints their execution ids.
CLIENT = """
import json, agent_app, livingai_tasks as lai
from livingai_tasks.demo.agent import agent_run
ids = []
for goal in ("book a flight", "rent a car", "find a hotel"):
    run = lai.start(agent_run(goal))
    assert run.get(timeout=40).startswith(goal + ": charged 42.00"), goal
    ids.append(run.execution_id)
print(json.dumps(ids))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FlowerFleet:
    url: str
    user: str
    password: str
    queue: str
    env: dict[str, str]
    tmp: Path
    store: Any = None
    procs: list[Proc] = field(default_factory=list)
    executions: list[str] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        cmd = [sys.executable, "-m", "celery", "-A", "agent_app", *args]
        proc = Proc(cmd, {**self.env, **(env or {})}, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def get(self, path: str, *, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of a GET; `auth` None sends no credentials."""
        request = urllib.request.Request(self.url + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""  # not listening yet

    def post(self, path: str, body: dict[str, Any], *,
             auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of a JSON POST; `auth` None sends no credentials."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def tasks(self, **query: str) -> dict[str, dict[str, Any]]:
        path = "/api/tasks?limit=1000" + "".join(f"&{k}={v}" for k, v in query.items())
        status, body = self.get(path, auth=(self.user, self.password))
        assert status == 200, (status, body[:500])
        found: dict[str, dict[str, Any]] = json.loads(body)
        return found

    def finished_steps(self, execution_id: str) -> list[dict[str, Any]] | None:
        """Flower's record of each step of the execution (the store says which task ids
        those are), in seq order; None until Flower has them all as SUCCESS."""
        nodes = self.store.nodes(execution_id)
        tasks = self.tasks()
        steps = [tasks.get(node.id) for node in nodes]
        if len(steps) != len(STEPS) or any(t is None or t["state"] != "SUCCESS" for t in steps):
            return None
        return [t for t in steps if t is not None]

    def logs(self) -> str:
        return "\n".join(f"===== {p.log.name}\n{p.text()[-4000:]}" for p in self.procs)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerFleet]:
    need_redis()
    try:
        import flower  # noqa: F401
    except ImportError as exc:
        require_or_skip("Flower (pip install -e '.[test]')", exc)
    import redis

    import livingai_tasks as lai

    tmp = tmp_path_factory.mktemp("flower")
    tag = uuid.uuid4().hex[:10]
    prefix = f"laitest-{tag}"
    store_url = f"{REDIS_URL}?prefix={prefix}"
    port = _free_port()
    fleet = FlowerFleet(
        url=f"http://127.0.0.1:{port}", user="ops", password=secrets.token_hex(12),
        queue=f"lai-flower-{tag}", tmp=tmp, store=lai.open_store(store_url),
        env={**os.environ,
             # what workers/celeryconfig.py and install() read
             "LIVINGAI_BROKER": BROKER, "LIVINGAI_BACKEND": REDIS_URL, "LIVINGAI_STORE": store_url,
             "LIVINGAI_DEMO_STEP_S": "0.05", "LIVINGAI_DEMO_LEDGER": f"sqlite:///{tmp}/ledger.db",
             # `celery -A agent_app` from workers/, as in the image
             "PYTHONPATH": str(ROOT / "workers")})
    fleet.env["LIVINGAI_QUEUE"] = fleet.queue
    try:
        worker = fleet.start("worker", "worker", "-n", f"flower-{tag}@%h", "-c", "2",
                             "-P", "prefork", "-Q", fleet.queue, "--without-mingle",
                             "--without-gossip", "-l", "INFO")
        # Basic auth from FLOWER_BASIC_AUTH, as docker-compose.yml passes it; the kwargs
        # column, which Flower 2.2 hides by default, as docker-compose.yml shows it.
        fleet.start("flower", "flower", f"--port={port}", "--address=127.0.0.1",
                    "--tasks_columns=name,uuid,state,kwargs,received,runtime,worker",
                    env={"FLOWER_BASIC_AUTH": f"{fleet.user}:{fleet.password}"})
        wait_for(lambda: "ready." in worker.text() or worker.popen.poll() is not None, 60,
                 "the worker to be ready")
        assert worker.popen.poll() is None, fleet.logs()
        wait_for(lambda: fleet.get("/healthcheck")[0] == 200, 60, "Flower to listen")
        # Flower only knows what happens after its event consumer is connected: wait until
        # it has seen this worker's heartbeat.
        online = re.compile(r'flower_worker_online\{worker="flower-' + tag + r'@[^"]+"\} 1\.0')
        wait_for(lambda: online.search(fleet.get("/metrics")[1].decode()), 30,
                 "Flower to see the worker's heartbeat")

        # The client in a process of its own, as workers/README.md runs it: install() and
        # Celery's current app are process-wide, and this test must not leave them changed.
        out = subprocess.run([sys.executable, "-c", CLIENT], env=fleet.env, cwd=ROOT / "workers",
                             capture_output=True, text=True, timeout=150)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:] + fleet.logs()
        fleet.executions = json.loads(out.stdout.strip().splitlines()[-1])
        yield fleet
    finally:
        for proc in fleet.procs:
            proc.stop()
        fleet.store.close()
        r = redis.Redis.from_url(REDIS_URL)
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.delete(key)
        r.close()
        b = redis.Redis.from_url(BROKER)
        b.delete(fleet.queue)
        b.close()


def test_api_lists_each_step_with_its_execution(fleet: FlowerFleet) -> None:
    for execution_id in fleet.executions:
        steps = wait_for(lambda eid=execution_id: fleet.finished_steps(eid), 30,
                         f"Flower to show the 4 finished steps of {execution_id}")
        assert [t["name"] for t in steps] == list(STEPS), steps
        # One canvas: Flower links every step to the first one.
        assert {t["root_id"] for t in steps} == {steps[0]["uuid"]}
        for seq, (task, step_type) in enumerate(zip(steps, STEPS.values(), strict=True), 1):
            match = TAG.search(task["kwargs"])
            assert match is not None, f"{task['name']} lost its tag in Flower: {task['kwargs']}"
            assert (match["execution"], int(match["seq"]), match["type"]) == \
                (execution_id, seq, step_type), task["kwargs"]
        # What workers/README.md tells an operator to query.
        found = fleet.tasks(search=f"kwargs:{execution_id}")
        assert set(found) == {t["uuid"] for t in steps}


def test_api_needs_credentials_but_health_and_metrics_do_not(fleet: FlowerFleet) -> None:
    assert fleet.get("/api/tasks")[0] == 401
    assert fleet.get("/api/tasks", auth=(fleet.user, "wrong-" + fleet.password))[0] == 401
    assert fleet.get("/tasks")[0] == 401
    assert fleet.get("/api/tasks?limit=1", auth=(fleet.user, fleet.password))[0] == 200
    # Flower 2.2 serves these two without authentication (no @web.authenticated on
    # views/monitor.py's handlers). If this changes, update workers/README.md and the
    # compose health check, which relies on it.
    assert fleet.get("/healthcheck") == (200, b"OK")
    status, body = fleet.get("/metrics")
    assert status == 200 and b"flower_events_total" in body


def test_credentials_start_any_registered_task(fleet: FlowerFleet) -> None:
    """What workers/README.md warns of: Flower's credentials run tasks, not only show them.
    The task here is a recovery tick, harmless; a step such as charge_card would run the same
    way, with arguments of the caller's choosing."""
    recover = "livingai_tasks.recover"
    path = f"/api/task/async-apply/{recover}"
    before = set(fleet.tasks(taskname=recover))
    assert fleet.post(path, {"args": []})[0] == 401
    status, body = fleet.post(path, {"args": []}, auth=(fleet.user, fleet.password))
    assert status == 200, body[:500]
    task_id = json.loads(body)["task-id"]
    assert task_id not in before
    wait_for(lambda: fleet.tasks(taskname=recover).get(task_id, {}).get("state") == "SUCCESS",
             30, "the worker to run the task Flower sent")


def test_recovery_ticks_show_up_when_beat_runs(fleet: FlowerFleet) -> None:
    recover = "livingai_tasks.recover"
    beat = fleet.start("beat", "beat", "-s", str(fleet.tmp / "beat-schedule"), "-l", "INFO",
                       env={"LIVINGAI_RECOVERY_INTERVAL_S": "1"})
    try:
        ticks = wait_for(
            lambda: (t := fleet.tasks(taskname=recover))
            and sum(v["state"] == "SUCCESS" for v in t.values()) >= 2 and t,
            45, f"two {recover} runs in Flower")
    finally:
        beat.stop()
    assert {t["name"] for t in ticks.values()} == {recover}
    assert all(t["worker"].startswith("flower-") for t in ticks.values() if t.get("worker"))


def test_tasks_page_in_chromium(fleet: FlowerFleet) -> None:
    if not Path(CHROMIUM).exists():
        require_tool_or_skip(f"Chromium ({CHROMIUM})", "not installed", "apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        require_tool_or_skip("Playwright (the pip package; it drives the system's Chromium)", exc,
                             "pip install -e '.[test]'")
    flower_steps = {eid: wait_for(lambda eid=eid: fleet.finished_steps(eid), 30,
                                  f"the steps of {eid} in Flower") for eid in fleet.executions}
    execution_id = next(iter(flower_steps))
    tagged = len(STEPS)
    charge_id = flower_steps[execution_id][2]["uuid"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    (ARTIFACTS / "flower-task.png").unlink(missing_ok=True)  # never leave a stale one
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(
                http_credentials={"username": fleet.user, "password": fleet.password},
                viewport={"width": 1800, "height": 800})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{fleet.url}/tasks", wait_until="domcontentloaded")
            page.wait_for_selector("#tasks-table tbody tr td")
            # What an operator types to see one execution: Flower searches the kwargs text.
            page.fill("#tasks-table_filter input", f"kwargs:{execution_id}")
            page.wait_for_function(
                "n => document.querySelectorAll('#tasks-table tbody tr').length === n"
                " && document.querySelector('#tasks-table tbody').innerText.includes("
                "'livingai execution=')", arg=tagged)
            table = page.inner_text("#tasks-table")
            page.screenshot(path=str(shot), full_page=True)
            # The list cuts kwargs at 400 px; the step's own page (its UUID is the link)
            # shows the whole tag.
            row = page.locator("#tasks-table tbody tr",
                               has=page.locator("a", has_text="example.charge_card"))
            row.locator(f"a[href$='/task/{charge_id}']").click()
            page.wait_for_url(f"**/task/{charge_id}")
            page.wait_for_selector("pre code:has-text('livingai execution=')")
            detail = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "flower-task.png"), full_page=True)
        finally:
            browser.close()
    assert table.count(f"livingai execution={execution_id}") == tagged, table
    for other in fleet.executions:
        if other != execution_id:
            assert other not in table, "the search should show one execution only"
    assert shot.stat().st_size > 10_000
    for name in STEPS:
        assert name in table, f"{name} not on Flower's /tasks page:\n{table}"
    for seq, step_type in enumerate(STEPS.values(), 1):
        assert f"seq={seq} type={step_type}" in table, table
    assert f"livingai execution={execution_id} seq=3 type=TOOL" in detail, detail
