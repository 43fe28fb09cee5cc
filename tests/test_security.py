"""No pickle by any door, and no store password anywhere a user can see it: checked against
real worker processes on a real Redis broker."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import livingai_tasks as lai
from livingai_tasks import ConfigError

from .conftest import POSTGRES_URL, REDIS_URL, need_postgres, need_redis
from .fleet import Proc, wait_for

BROKER = REDIS_URL.rsplit("/", 1)[0] + "/3"
PASSWORD = "Kn0wn-s3cret-pw"


@pytest.mark.parametrize("conf", [
    {"accept_content": ["json", "pickle"]},
    {"accept_content": ["json", "application/x-python-serialize"]},  # the content type
    {"accept_content": ["json", "my-own-serializer"]},  # unknown: may decode with pickle
    {"result_accept_content": ["application/x-python-serialize"]},
    {"task_serializer": "pickle"},
    {"result_serializer": "PICKLE"},
    {"event_serializer": "pickle"},
])
def test_install_refuses_any_serializer_that_can_run_code(conf: dict[str, Any],
                                                          tmp_path: Path) -> None:
    app = Celery(f"unsafe-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(conf)
    with pytest.raises(ConfigError, match="must never be able to run code") as info:
        lai.install(app, store=f"sqlite:///{tmp_path}/s.db")
    message = str(info.value)
    assert next(iter(conf)) in message and "Accepted: json, msgpack, yaml" in message


def test_install_takes_the_data_only_formats(tmp_path: Path) -> None:
    app = Celery(f"safe-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(accept_content=["json", "application/x-msgpack", "yaml"],
                    result_accept_content=["json"], task_serializer="json")
    lai.install(app, store=f"sqlite:///{tmp_path}/s.db")


# -- real workers ----------------------------------------------------------------------------

_APP = """
    import os
    from celery import Celery
    import livingai_tasks as lai

    app = Celery("secapp", broker=os.environ["SEC_BROKER"])
    app.conf.update(task_default_queue=os.environ["SEC_QUEUE"], worker_hijack_root_logger=False,
                    livingai_store=os.environ["SEC_STORE"])
    lai.install(app)
    {after_install}

    @lai.agent_step(app, name="secapp.touch")
    def touch(path: str) -> str:
        open(path, "w").close()
        return path
"""


@pytest.fixture
def secapp(tmp_path: Path, pg_schema: str) -> Iterator[dict[str, Any]]:
    need_redis()
    need_postgres()
    user_host = POSTGRES_URL.split("://", 1)[1]
    user, host = user_host.split("@", 1)
    store = (f"postgresql+psycopg://{user.split(':')[0]}:{PASSWORD}@{host}"
             f"?schema={pg_schema}")  # trust auth here: the password is carried, not checked
    opened = lai.open_store(store)
    opened.migrate()
    opened.close()
    queue = f"lai-sec-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SEC_BROKER": BROKER, "SEC_QUEUE": queue, "SEC_STORE": store,
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[1]}",
           "LIVINGAI_STORE": ""}
    procs: list[Proc] = []

    def worker(after_install: str = "", level: str = "INFO", wait: bool = True) -> Proc:
        module = f"secapp_{uuid.uuid4().hex[:6]}"
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(_APP).format(after_install=after_install))
        proc = Proc([sys.executable, "-m", "celery", "-A", f"{module}:app", "worker", "-n",
                     f"{module}@%h", "-c", "1", "-P", "prefork", "--without-mingle",
                     "--without-gossip", "-l", level], env, tmp_path / f"{module}.log")
        procs.append(proc)
        if wait:
            wait_for(lambda: "ready." in proc.text() or proc.popen.poll() is not None, 60,
                     "the worker to be ready or to exit")
        proc.module = module  # type: ignore[attr-defined]
        return proc

    yield {"worker": worker, "env": env, "queue": queue, "store": store, "tmp": tmp_path}
    for proc in procs:
        proc.stop()
    import redis

    redis.Redis.from_url(BROKER).delete(queue)


@pytest.mark.slow  # a real worker process
def test_a_pickle_payload_is_refused_by_a_real_worker_and_nothing_runs(
        secapp: dict[str, Any]) -> None:
    from kombu import Connection, Exchange, Queue

    proc = secapp["worker"]()
    assert proc.popen.poll() is None, proc.text()
    marker = secapp["tmp"] / "unpickled"
    ran = secapp["tmp"] / "ran"

    class Exploit:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    body = pickle.dumps(((str(ran), Exploit()), {}, {"callbacks": None, "errbacks": None,
                                                     "chain": None, "chord": None}))
    task_id = str(uuid.uuid4())
    with Connection(BROKER) as conn, conn.channel() as channel:
        queue = Queue(secapp["queue"], Exchange(secapp["queue"]), secapp["queue"])
        conn.Producer(channel).publish(body, exchange=queue.exchange, routing_key=secapp["queue"],
                                declare=[queue], serializer=None,
                                content_type="application/x-python-serialize",
                                content_encoding="binary",
                                headers={"lang": "py", "task": "secapp.touch", "id": task_id,
                                         "root_id": task_id, "parent_id": None, "argsrepr": "",
                                         "kwargsrepr": "", "origin": "attacker"})
    wait_for(lambda: "ContentDisallowed" in proc.text() or "Refusing" in proc.text(), 30,
             "the worker to refuse the message")
    time.sleep(1.0)
    assert not marker.exists(), "the worker unpickled the payload"
    assert not ran.exists(), "the step ran"
    assert proc.popen.poll() is None  # refused, and still serving


@pytest.mark.slow  # a real worker process
def test_pickle_allowed_after_install_stops_the_worker_at_start(secapp: dict[str, Any]) -> None:
    proc = secapp["worker"]("app.conf.accept_content = ['json', 'application/x-python-serialize']")
    assert proc.popen.wait(30) != 0
    out = proc.text()
    assert "found when the worker started" in out and "application/x-python-serialize" in out
    assert "ready." not in out


@pytest.mark.slow  # a real worker process
def test_the_store_password_is_nowhere_a_user_can_see_it(secapp: dict[str, Any]) -> None:
    proc = secapp["worker"](level="DEBUG")
    assert proc.popen.poll() is None, proc.text()
    env = secapp["env"]
    module = proc.module  # type: ignore[attr-defined]
    inspect = subprocess.run(
        [sys.executable, "-m", "celery", "-A", f"{module}:app", "inspect", "conf", "--json",
         "-d", f"{module}@{os.uname().nodename}", "-t", "10"],
        capture_output=True, text=True, timeout=60, env=env)
    assert inspect.returncode == 0, inspect.stderr
    conf = json.loads(inspect.stdout.strip().splitlines()[-1])
    shown = next(iter(conf.values()))["livingai_store"]
    assert "***" in shown and PASSWORD not in shown

    debug = subprocess.run([sys.executable, "-m", "livingai_tasks.cli.main", "--debug", "list",
                            "--app", f"{module}:app"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert debug.returncode == 0, debug.stderr
    code = (f"import logging, {module} as m, livingai_tasks as lai\n"
            "logging.basicConfig(level=logging.DEBUG)\n"
            "print(repr(lai.install(m.app)))\n")
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=env)
    assert again.returncode == 0, again.stderr
    seen = {"worker log (DEBUG)": proc.text(), "celery inspect conf": inspect.stdout,
            "livingai-tasks --debug": debug.stdout + debug.stderr,
            "install() at DEBUG, repr(Settings)": again.stdout + again.stderr}
    leaks = [where for where, text in seen.items() if PASSWORD in text]
    assert not leaks, f"the store password shows in: {leaks}"


@pytest.mark.slow  # a real worker process and Flower
def test_flower_shows_the_masked_store_url_only(secapp: dict[str, Any]) -> None:
    """Flower's worker page (its Config tab) and API read `inspect conf` from the worker."""
    import base64
    import socket
    import urllib.request

    pytest.importorskip("flower")
    proc = secapp["worker"]()
    assert proc.popen.poll() is None, proc.text()
    module = proc.module  # type: ignore[attr-defined]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flower = Proc([sys.executable, "-m", "celery", "-A", f"{module}:app", "flower",
                   f"--port={port}", "--address=127.0.0.1"],
                  {**secapp["env"], "FLOWER_BASIC_AUTH": "ops:flower-pw"},
                  secapp["tmp"] / "flower.log")
    try:
        token = base64.b64encode(b"ops:flower-pw").decode()

        def get(path: str) -> str:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                             headers={"Authorization": f"Basic {token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return str(response.read().decode())
            except OSError:
                return ""

        worker = f"{module}@{os.uname().nodename}"
        api = wait_for(lambda: (body := get("/api/workers?refresh=1")) and
                       "livingai_store" in body and body, 60, "Flower's API to show the conf")
        page = wait_for(lambda: (body := get(f"/worker/{worker}")) and "livingai_store" in body
                        and body, 30, "Flower's worker page to show the conf")
        shown = json.loads(api)[worker]["conf"]["livingai_store"]
        assert "***" in shown
        assert PASSWORD not in api and PASSWORD not in page
        assert PASSWORD not in flower.text()
    finally:
        flower.stop()
