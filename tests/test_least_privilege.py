"""The compose file's least privilege, applied to the real servers here.

PostgreSQL: stores/postgres/initdb/*.sql run as the postgres image runs them (psql, as the
superuser, in a database of their own), then `migrate` as the superuser; the fleet role must
then read and write every livingai table (those a later migration creates too) and be refused
everything else. Redis: the fleet user's rules exactly as docker-compose.yml gives them, set on
a user of this test's own; a real worker, the CLI, and the Redis store must work as that user,
and the commands it must not run are refused. Every role, database, user and key made here is
removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from livingai_tasks import Execution, ExecutionNode, NodeType, Status, open_store
from livingai_tasks.stores import TracksWorkers

from .conftest import POSTGRES_URL, REDIS_URL, need_postgres, need_redis
from .fleet import Proc, wait_for
from .test_compose import COMPOSE_FILE, redis_users
from .tools import require_tool_or_skip

pytestmark = [pytest.mark.services]

ROOT = Path(__file__).resolve().parent.parent
INITDB = ROOT / "stores" / "postgres" / "initdb"
INSUFFICIENT_PRIVILEGE = "42501"  # SQLSTATE of every refusal below


@dataclass
class Database:
    name: str
    schema: str
    fleet_url: str  # as the fleet role, with ?schema=, as compose's LIVINGAI_STORE
    ledger_url: str  # as the example ledger's role, as compose's LIVINGAI_DEMO_LEDGER
    admin: sa.Engine  # the superuser, in that database


def _url(user: str, password: str, database: str) -> sa.URL:
    return sa.make_url(POSTGRES_URL).set(username=user, password=password, database=database)


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    need_postgres()
    psql = shutil.which("psql")
    if psql is None:
        require_tool_or_skip("psql >= 15 (PostgreSQL's client: the postgres image runs initdb "
                             "with it)", "not on PATH", "apt-get install postgresql-client")
    tag = uuid.uuid4().hex[:10]
    name, fleet, ledger = f"laitest_lp_{tag}", f"laitest_fleet_{tag}", f"laitest_ledger_{tag}"
    schema = "livingai"  # the database is this test's own, so compose's own schema name
    server = sa.make_url(POSTGRES_URL)
    root = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with root.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin = sa.create_engine(server.set(database=name))
    fleet_password, ledger_password = secrets.token_hex(12), secrets.token_hex(12)
    try:
        # What the image's entrypoint does with each file, in name order.
        env = {**os.environ, "PGPASSWORD": server.password or "",
               "POSTGRES_FLEET_PASSWORD": fleet_password, "DEMO_LEDGER_PASSWORD": ledger_password,
               "LIVINGAI_FLEET_ROLE": fleet, "LIVINGAI_LEDGER_ROLE": ledger,
               "LIVINGAI_SCHEMA": schema}
        for sql in sorted(INITDB.glob("*.sql")):
            out = subprocess.run(
                [psql, "-v", "ON_ERROR_STOP=1", "-q", "-h", server.host or "127.0.0.1",
                 "-p", str(server.port or 5432), "-U", server.username or "postgres",
                 "-d", name, "-f", str(sql)], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"{sql.name}: {out.stderr}"
        # compose's migrate: the superuser, the schema of the store URL.
        migrator = open_store(f"{server.set(database=name).render_as_string(False)}"
                              f"?schema={schema}")
        migrator.migrate()
        migrator.close()
        yield Database(
            name, schema,
            f"{_url(fleet, fleet_password, name).render_as_string(False)}?schema={schema}",
            _url(ledger, ledger_password, name).render_as_string(False), admin)
    finally:
        admin.dispose()
        with root.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            for role in (fleet, ledger):  # default privileges went with the database
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        root.dispose()


def _refused(engine: sa.Engine, statement: str) -> str:
    """Run `statement`; return why PostgreSQL refused it (the test fails if it did not)."""
    with engine.connect() as conn:
        try:
            conn.execute(sa.text(statement))
        except sa.exc.DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            assert code == INSUFFICIENT_PRIVILEGE, f"{statement}: {code} {exc.orig}"
            return str(exc.orig)
    raise AssertionError(f"the fleet role was allowed: {statement}")


def _execution_roundtrip(store: Any) -> None:
    """What a worker and recovery do to the store: executions, nodes, claims, lease scans."""
    eid = f"lp-{uuid.uuid4().hex[:12]}"
    assert store.create_execution(Execution(id=eid))
    first = ExecutionNode(execution_id=eid, type=NodeType.TOOL, seq=1, status=Status.RUNNING,
                          input={"card": "x"}, checkpoint=b"\x00state")
    store.append([first])
    done = first.evolve(status=Status.SUCCESS, output={"charged": 1})
    store.write([done], [(eid, {"current_node_id": done.id, "lease_deadline": time.time() - 1})])
    assert store.nodes(eid) == [done]
    assert eid in {e.id for e in store.list_executions(lease_expired_before=time.time())}
    execution = store.get_execution(eid)
    assert execution is not None and execution.current_node_id == done.id
    assert store.claim(eid, fence=execution.fence, owner="lp", lease_s=30)
    # Worker liveness (schema version 3's lai_workers on PostgreSQL): the fleet beats and
    # recovery reads and forgets.
    assert isinstance(store, TracksWorkers)
    store.beat_worker("lp-worker", expires_at=time.time() - 1, owners=["h:1"], holding=[eid])
    assert [w.holding for w in store.dead_workers(time.time())] == [(eid,)]
    store.forget_worker("lp-worker")
    assert store.worker("lp-worker") is None


def test_fleet_role_reads_and_writes_the_store_without_migrating(database: Database) -> None:
    store = open_store(database.fleet_url)
    try:
        _execution_roundtrip(store)
    finally:
        store.close()


def test_fleet_role_cannot_change_the_schema_nor_read_elsewhere(database: Database) -> None:
    with database.admin.begin() as conn:  # things the fleet must not see, made by the superuser
        conn.execute(sa.text("CREATE SCHEMA other"))
        conn.execute(sa.text("CREATE TABLE other.secrets (v text)"))
        conn.execute(sa.text("CREATE TABLE public.secrets (v text)"))
    # Autocommit: CREATE DATABASE refuses to run in a transaction before checking privileges.
    fleet = sa.create_engine(sa.make_url(database.fleet_url).difference_update_query(["schema"]),
                             isolation_level="AUTOCOMMIT")
    s = database.schema
    try:
        for statement in (
                f"CREATE TABLE {s}.lai_extra (v text)",
                f"DROP TABLE {s}.lai_node_versions",
                f"ALTER TABLE {s}.lai_executions ADD COLUMN v text",
                f"TRUNCATE {s}.lai_node_versions",
                f"CREATE INDEX lai_x ON {s}.lai_executions (id)",
                "CREATE SCHEMA mine",
                "CREATE TABLE public.mine (v text)",
                "CREATE TEMP TABLE mine (v text)",
                "SELECT * FROM other.secrets",
                "SELECT * FROM public.secrets",
                f'CREATE DATABASE "{database.name}_2"'):
            _refused(fleet, statement)
        # migrate itself is the superuser's: the fleet cannot create the store's tables.
        elsewhere = open_store(database.fleet_url.replace(f"schema={s}", "schema=lai_elsewhere"))
        with pytest.raises(Exception, match="permission denied"):
            elsewhere.migrate()
        elsewhere.close()
    finally:
        fleet.dispose()


def test_tables_a_later_migration_creates_are_the_fleets_too(database: Database) -> None:
    # A future migration, run by the same superuser: default privileges must cover it.
    with database.admin.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {database.schema}.lai_future "
                             "(id bigserial PRIMARY KEY, v text)"))
    fleet = sa.create_engine(sa.make_url(database.fleet_url).difference_update_query(["schema"]))
    try:
        with fleet.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {database.schema}.lai_future (v) VALUES ('x')"))
            conn.execute(sa.text(f"UPDATE {database.schema}.lai_future SET v = 'y'"))
            assert conn.execute(sa.text(f"SELECT v FROM {database.schema}.lai_future")
                                ).scalar_one() == "y"
            conn.execute(sa.text(f"DELETE FROM {database.schema}.lai_future"))
        _refused(fleet, f"DROP TABLE {database.schema}.lai_future")
    finally:
        fleet.dispose()


def test_ledger_role_has_its_own_schema_and_no_store_access(database: Database) -> None:
    from livingai_tasks.demo.ledger import Ledger

    ledger = Ledger(database.ledger_url)  # creates its table on first use, in its own schema
    charge = ledger.charge("key-1", "exec-1", 4200)
    assert ledger.find("key-1") == charge and ledger.counts() == {"exec-1": 1}
    ledger.engine.dispose()
    engine = sa.create_engine(database.ledger_url)
    try:
        _refused(engine, f"SELECT * FROM {database.schema}.lai_executions")
    finally:
        engine.dispose()


# -- Redis -------------------------------------------------------------------------------------


@dataclass
class RedisUser:
    name: str
    password: str
    rules: list[str]

    def url(self, db: int) -> str:
        base = sa.make_url(REDIS_URL.replace("redis://", "postgresql://", 1))  # URL parsing only
        host, port = base.host or "127.0.0.1", base.port or 6379
        return f"redis://{self.name}:{self.password}@{host}:{port}/{db}"


def _fleet_rules() -> list[str]:
    """The rules docker-compose.yml gives the fleet's Redis user, password rule left out."""
    import yaml

    command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["redis"]["command"]
    rules = redis_users(command)["livingai"]
    return [rule for rule in rules if not rule.startswith(">")]


@pytest.fixture(scope="module")
def redis_user() -> Iterator[RedisUser]:
    import redis

    need_redis()
    user = RedisUser(f"laitest-{uuid.uuid4().hex[:10]}", secrets.token_hex(12), _fleet_rules())
    admin = redis.Redis.from_url(REDIS_URL)
    admin.execute_command("ACL", "SETUSER", user.name, "reset", f">{user.password}",
                          *user.rules)
    try:
        yield user
    finally:
        admin.execute_command("ACL", "DELUSER", user.name)
        admin.close()


# Never run for real, even by mistake: ACL DRYRUN asks whether the user may, without running.
REFUSED = [["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "SET", "maxmemory", "1"], ["CONFIG", "GET", "*"],
           ["DEBUG", "SLEEP", "0"], ["SHUTDOWN", "NOSAVE"], ["KEYS", "*"], ["MONITOR"],
           ["ACL", "SETUSER", "x", "on"], ["SWAPDB", "0", "1"], ["CLIENT", "KILL", "ID", "1"],
           ["REPLICAOF", "10.0.0.1", "6379"], ["MODULE", "LOAD", "/x.so"], ["SAVE"]]


def test_fleet_user_cannot_run_dangerous_commands(redis_user: RedisUser) -> None:
    import redis

    admin = redis.Redis.from_url(REDIS_URL)
    try:
        allowed = [c for c in REFUSED
                   if admin.execute_command("ACL", "DRYRUN", redis_user.name, *c) in (b"OK", "OK")]
        assert not allowed, f"the fleet user may run {allowed}"
        # The commands the broker and the store use are allowed (so the check above can fail).
        for command in (["EVALSHA", "0" * 40, "0"], ["SCRIPT", "LOAD", "return 1"],
                        ["PUBLISH", "c", "m"], ["PSUBSCRIBE", "c*"], ["BRPOP", "q", "1"],
                        ["SCAN", "0"], ["MULTI"]):
            assert admin.execute_command("ACL", "DRYRUN", redis_user.name, *command) in \
                (b"OK", "OK"), command
    finally:
        admin.close()
    # And as the user itself, harmless ones only: refused by the server, not by this test.
    client = redis.Redis.from_url(redis_user.url(3))
    try:
        for command in (["CONFIG", "GET", "maxmemory"], ["KEYS", f"{redis_user.name}:*"]):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    finally:
        client.close()


def test_redis_store_works_as_the_fleet_user(redis_user: RedisUser, redis_prefix: str) -> None:
    store = open_store(f"{redis_user.url(0)}?prefix={redis_prefix}")
    try:
        _execution_roundtrip(store)
    finally:
        store.close()


AGENT = """
import json, agent_app, livingai_tasks as lai
from livingai_tasks.demo.agent import agent_run
run = lai.start(agent_run("book a flight"))
assert run.get(timeout=60).startswith("book a flight: charged 42.00"), run.execution_id
print(json.dumps(run.execution_id))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_fleet_runs_as_its_users_only(redis_user: RedisUser, database: Database,
                                          tmp_path: Path) -> None:
    """workers/agent_app.py as compose runs it: Redis broker and results as the ACL user, the
    store as the fleet role, the ledger as its role. A real worker runs the example agent and
    the recovery task, answers remote control, and the CLI lists what it recorded."""
    import redis

    tag = uuid.uuid4().hex[:10]
    queue = f"lai-lp-{tag}"
    env = {**os.environ, "LIVINGAI_BROKER": redis_user.url(3),
           "LIVINGAI_BACKEND": redis_user.url(3), "LIVINGAI_STORE": database.fleet_url,
           "LIVINGAI_DEMO_LEDGER": database.ledger_url, "LIVINGAI_DEMO_STEP_S": "0.05",
           "LIVINGAI_QUEUE": queue, "LIVINGAI_RECOVERY_QUEUE": f"{queue}-recovery",
           "LIVINGAI_RECOVERY_INTERVAL_S": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "workers"), str(ROOT)])}
    celery = [sys.executable, "-m", "celery", "-A", "agent_app"]
    worker = Proc([*celery, "worker", "-n", f"lp-{tag}@%h", "-c", "2", "-Q",
                   f"{queue},{queue}-recovery", "--without-mingle", "--without-gossip",
                   "-l", "INFO"], env, tmp_path / "worker.log")
    beat = None
    try:
        wait_for(lambda: "ready." in worker.text() or worker.popen.poll() is not None, 60,
                 "the worker to be ready")
        assert worker.popen.poll() is None, worker.text()[-4000:]
        beat = Proc([*celery, "beat", "-s", str(tmp_path / "beat-schedule"), "-l", "INFO"], env,
                    tmp_path / "beat.log")
        out = subprocess.run([sys.executable, "-c", AGENT], env=env, cwd=ROOT / "workers",
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:] + worker.text()[-4000:]
        execution_id = json.loads(out.stdout.strip().splitlines()[-1])
        # Remote control (pidbox, over pub/sub and lists), as the compose health check uses it.
        ping = subprocess.run([*celery, "inspect", "ping", "-d", f"lp-{tag}@" + os.uname()[1],
                               "-t", "10", "--json"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        # Beat's recovery ticks ran on the worker, through the store, as the fleet role.
        tick_done = re.compile(r"Task livingai_tasks\.recover\[[^\]]+\] succeeded")
        wait_for(lambda: tick_done.search(worker.text()), 30, "a recovery tick to succeed")
        listed = subprocess.run([sys.executable, "-m", "livingai_tasks.cli", "list", "--json",
                                 "--store", database.fleet_url], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert execution_id in listed.stdout
        for log in (worker.text(), beat.text()):
            assert "NOPERM" not in log and "permission denied" not in log, log[-4000:]
    finally:
        for proc in (worker, beat):
            if proc is not None:
                proc.stop()
        admin = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/3")
        for name in (queue, f"{queue}-recovery"):
            admin.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
        admin.close()
