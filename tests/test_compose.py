"""docker-compose.yml and workers/Dockerfile, checked without a Docker engine.

`docker compose config` renders the file exactly as `up` would read it (interpolation,
merge keys, defaults), and needs only the client with its compose plugin. What it cannot
see (missing mounted files, COPY sources, the modules and commands the containers run) is
checked against the repository here, so a deploy does not fail on the first `up`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .tools import require_tool_or_skip

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "workers" / "Dockerfile"
SERVICES = {"redis", "postgres", "migrate", "worker", "recovery", "beat", "flower"}
REQUIRED_VARS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "POSTGRES_FLEET_PASSWORD",
                 "DEMO_LEDGER_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")
ENV_EXAMPLE = ROOT / "workers" / "compose.env.example"
FLEET = ("worker", "recovery", "beat", "flower")  # every long-running process of the app


def _compose_command() -> tuple[list[str], bool]:
    """(`docker compose` v2 plugin or a v2 `docker-compose`, True), else Debian's v1
    `docker-compose` (False: it renders YAML and has no --format)."""
    tried = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            tried.append(f"{cmd[0]}: not on PATH")
            continue
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cmd, True
        if out.returncode == 0 and re.search(r"version 1\.(29|[3-9]\d)", out.stdout):
            return cmd, False
        tried.append(f"{' '.join(cmd)} version: {(out.stdout + out.stderr).strip()[:200]!r}")
    require_tool_or_skip("Docker Compose (the docker compose plugin, or Debian's docker-compose)",
                         "; ".join(tried), "apt-get install docker-compose")


def _env(**values: str | None) -> dict[str, str]:
    """The caller's environment without the stack's variables, then `values` (None: unset)."""
    env = {k: v for k, v in os.environ.items()
           if k not in REQUIRED_VARS and not k.startswith("COMPOSE_")}
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # An empty --env-file: a developer's .env must not fill in what the test leaves unset.
    cmd, v2 = _compose_command()
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:  # v1 refuses /dev/null
        args = [*cmd, "--env-file", empty.name, "-f", str(COMPOSE_FILE), "-p", "livingai-test",
                "config", *(["--format", "json"] if v2 else [])]
        out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    if not v2 and out.returncode == 0:  # v1 renders YAML: hand the tests the same JSON
        import yaml

        out.stdout = json.dumps(_as_v2(yaml.safe_load(out.stdout)))
    return out


def _as_v2(rendered: dict[str, Any]) -> dict[str, Any]:
    """v1's short volume syntax ("src:dst:ro") in v2's long form, as the tests read it."""
    for service in rendered.get("services", {}).values():
        volumes = []
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source, target, *mode = volume.split(":")
                kind = "bind" if source.startswith(("/", ".")) else "volume"
                volume = {"type": kind, "source": source, "target": target,
                          "read_only": mode == ["ro"]}
            volumes.append(volume)
        if volumes:
            service["volumes"] = volumes
    return rendered


@pytest.fixture(scope="module")
def secrets_env() -> dict[str, str]:
    # Fresh random values: whatever shows up in the rendered config can only have come
    # from these variables.
    return {"REDIS_PASSWORD": secrets.token_hex(12), "POSTGRES_PASSWORD": secrets.token_hex(12),
            "POSTGRES_FLEET_PASSWORD": secrets.token_hex(12),
            "DEMO_LEDGER_PASSWORD": secrets.token_hex(12),
            "FLOWER_USER": "ops-" + secrets.token_hex(3), "FLOWER_PASSWORD": secrets.token_hex(12)}


@pytest.fixture(scope="module")
def config(secrets_env: dict[str, str]) -> dict[str, Any]:
    out = _config(_env(**secrets_env))
    assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
    rendered: dict[str, Any] = json.loads(out.stdout)
    return rendered


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command if isinstance(command, list) else command.split()


# -- (a) what the rendered file says --------------------------------------------------------


def test_services_and_dependencies(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == SERVICES

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    healthy, done = "service_healthy", "service_completed_successfully"
    assert conditions("migrate") == {"postgres": healthy}
    assert conditions("worker") == {"redis": healthy, "postgres": healthy, "migrate": done}
    assert conditions("recovery") == {"redis": healthy, "postgres": healthy, "migrate": done}
    assert conditions("beat") == {"redis": healthy, "migrate": done}
    assert conditions("flower") == {"redis": healthy}

    assert _command(services["migrate"]) == ["livingai-tasks", "migrate"]
    assert services["migrate"]["restart"] == "no", "a one-shot must not be restarted"
    for name in ("worker", "recovery", "beat", "flower"):
        cmd = _command(services[name])
        assert cmd[:3] == ["celery", "-A", "agent_app"], (name, cmd)
    assert _command(services["worker"])[3] == "worker"
    assert _command(services["beat"])[3] == "beat"
    assert _command(services["flower"])[3] == "flower"
    # The execution id is in the kwargs column, which Flower 2.2 hides unless listed.
    columns = [c for c in _command(services["flower"]) if c.startswith("--tasks_columns=")]
    assert columns and "kwargs" in columns[0].split("=", 1)[1].split(","), columns


def test_recovery_ticks_have_a_worker_of_their_own(config: dict[str, Any]) -> None:
    services = config["services"]
    queue = services["beat"]["environment"]["LIVINGAI_RECOVERY_QUEUE"]
    assert all(services[name]["environment"]["LIVINGAI_RECOVERY_QUEUE"] == queue
               for name in ("worker", "recovery", "beat"))
    recovery = _command(services["recovery"])
    assert recovery[3] == "worker" and f"--queues={queue}" in recovery
    # The step workers consume Celery's default queue only, never the recovery one.
    assert not any(c.startswith(("--queues", "-Q")) for c in _command(services["worker"]))


def test_health_checks(config: dict[str, Any]) -> None:
    services = config["services"]

    def check(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])

    assert re.search(r"redis-cli .*ping", check("redis")) and "PONG" in check("redis")
    assert "pg_isready" in check("postgres")
    assert "/healthcheck" in check("flower")


def test_worker_scales_and_beat_does_not(config: dict[str, Any]) -> None:
    worker, beat = config["services"]["worker"], config["services"]["beat"]
    # --scale worker=N needs no fixed name and no fixed host port.
    assert "container_name" not in worker
    assert not worker.get("ports")
    # Exactly one beat: one replica, and a fixed container name that makes
    # `--scale beat=2` fail instead of sending every schedule twice.
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert beat.get("container_name"), "beat needs a container_name so it cannot be scaled"
    # The worker's grace period must outlast celeryconfig's soft shutdown (60 s) + flush.
    assert worker["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    assert worker["stop_grace_period"] in ("1m30s", "90s")


def test_secrets_come_from_the_environment(config: dict[str, Any],
                                           secrets_env: dict[str, str]) -> None:
    services = config["services"]
    flower = services["flower"]
    auth = f"{secrets_env['FLOWER_USER']}:{secrets_env['FLOWER_PASSWORD']}"
    # Flower reads FLOWER_BASIC_AUTH as its --basic-auth option.
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == auth
    assert not any("basic" in part for part in _command(flower)), \
        "credentials on the command line are visible to `ps`"
    assert f">{secrets_env['REDIS_PASSWORD']}" in _command(services["redis"])
    postgres_env = services["postgres"]["environment"]
    for var in ("POSTGRES_PASSWORD", "POSTGRES_FLEET_PASSWORD", "DEMO_LEDGER_PASSWORD"):
        assert postgres_env[var] == secrets_env[var], var
    for name in FLEET:
        env = services[name]["environment"]
        assert f"livingai:{secrets_env['REDIS_PASSWORD']}@redis:" in env["LIVINGAI_BROKER"]
        assert f"livingai:{secrets_env['REDIS_PASSWORD']}@redis:" in env["LIVINGAI_BACKEND"]
        assert f"livingai:{secrets_env['POSTGRES_FLEET_PASSWORD']}@postgres:" in \
            env["LIVINGAI_STORE"]
    assert f"postgres:{secrets_env['POSTGRES_PASSWORD']}@postgres:" in \
        services["migrate"]["environment"]["LIVINGAI_STORE"]


def test_no_password_literal_in_the_file() -> None:
    text = COMPOSE_FILE.read_text()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if not line.lstrip().startswith("#")]
    found = []
    for n, line in lines:
        # user:password@host in a URL: the password part must be an interpolation.
        for match in re.finditer(r"://[^/\s:@\"']*:([^@\s\"']+)@", line):
            if not match.group(1).startswith("${"):
                found.append((n, line.strip()))
        # KEY: value for anything that names a password, secret or credentials.
        match = re.match(r"\s*(?:-\s*)?([A-Z0-9_]*(?:PASSWORD|SECRET|BASIC_AUTH|AUTH)[A-Z0-9_]*)"
                         r"\s*[:=]\s*(.+)", line)
        if match and "${" not in match.group(2):
            found.append((n, line.strip()))
        # A Redis ACL rule ">password" (the user's password) must be an interpolation too.
        for m in re.finditer(r"[\"'\s]>([^\"'\s]*)", line):
            if not m.group(1).startswith("${"):
                found.append((n, line.strip()))
        for flag in ("--requirepass", "--basic-auth", "--password"):
            for m in re.finditer(re.escape(flag) + r"[=\s\"',]+([^\s\"',\]]+)", line):
                if not m.group(1).startswith("${"):
                    found.append((n, line.strip()))
    assert not found, f"password literals in docker-compose.yml: {found}"
    # No fallback values for secrets either: ${X:-default} would be a password in the file.
    for var in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"):
        assert not re.search(r"\$\{" + var + r":?-", text), f"{var} has a default value"
        assert "${" + var + ":?" in text, f"{var} is not required with ${{{var}:?...}}"


# -- (b) everything the files name exists -------------------------------------------------


def test_mounted_paths_and_build_context_exist(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                # A missing bind source is silently created as an empty directory.
                source = Path(volume["source"])
                assert source.exists(), f"{name}: mounted path {source} does not exist"
                assert ROOT in source.parents, f"{name}: {source} is outside the repository"
        build = service.get("build")
        if build:
            context = Path(build["context"])
            assert context == ROOT, f"{name}: build context {context} is not the repo root"
            assert (context / build["dockerfile"]).is_file()
    initdb = ROOT / "stores" / "postgres" / "initdb"
    assert list(initdb.glob("*.sql")), f"{initdb} holds no .sql file for the postgres image"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _dockerignore_allows(path: str) -> bool:
    """Whether workers/Dockerfile's COPY source survives .dockerignore (last match wins)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return True
    allowed = True
    for pattern in ignore.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerfile_copy_sources_exist() -> None:
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword == "COPY"]
    assert copies, "workers/Dockerfile copies nothing"
    for rest in copies:
        parts = [p for p in rest.split() if not p.startswith("--")]
        assert not rest.startswith("--from"), "multi-stage COPY: extend this test"
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile COPY source {source} does not exist"
            assert _dockerignore_allows(source), f"{source} is excluded by .dockerignore"


def test_dockerfile_runs_agent_app_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["python:3.11-slim"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == "/app/workers"
    cmd = json.loads(next(rest for keyword, rest in instructions if keyword == "CMD"))
    assert cmd[:4] == ["celery", "-A", "agent_app", "worker"]
    copied = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    assert "workers/agent_app.py" in copied and "workers/celeryconfig.py" in copied
    # The extras pip installs must exist, or pip only warns and Flower is missing.
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    extras = {e.strip() for group in re.findall(r'"\.\[([^\]]+)\]"', runs)
              for e in group.split(",")}
    assert extras == {"flower"}, runs
    declared = _pyproject()["project"]["optional-dependencies"]
    assert extras <= set(declared), f"Dockerfile installs {extras}; pyproject has {set(declared)}"


def test_agent_app_imports_from_workers() -> None:
    """What `celery -A agent_app` does inside the image: import it from /app/workers."""
    code = ("import agent_app; app = agent_app.app; "
            "assert 'example.charge_card' in app.tasks, sorted(app.tasks); "
            "assert 'livingai_tasks.recover' in app.tasks; "
            "assert app.conf.task_acks_late and not app.conf.task_reject_on_worker_lost; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "workers", capture_output=True,
                         text=True, timeout=60,
                         env=_env(LIVINGAI_STORE="memory://", PYTHONPATH=None))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    parsed: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return parsed


def test_commands_the_containers_run_exist(config: dict[str, Any]) -> None:
    scripts = _pyproject()["project"]["scripts"]
    programs = {_command(s)[0] for s in config["services"].values() if _command(s)}
    programs -= {"redis-server"}  # the redis image's own
    assert programs == {"celery", "livingai-tasks"}, programs
    target = scripts.get("livingai-tasks")
    assert target, "pyproject.toml [project.scripts] declares no livingai-tasks"
    module, _, func = target.partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"livingai-tasks points at {target}, but {path} does not exist"
    out = subprocess.run([sys.executable, "-c", f"import {module} as m; assert callable(m.{func})"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]


# -- (c) a missing secret stops compose, naming it ----------------------------------------


@pytest.mark.parametrize("missing", REQUIRED_VARS)
def test_missing_variable_is_refused(missing: str, secrets_env: dict[str, str]) -> None:
    out = _config(_env(**{**secrets_env, missing: None}))
    assert out.returncode != 0, f"compose accepted a config without {missing}"
    assert missing in out.stderr, out.stderr
    assert not out.stdout.strip(), "nothing may be rendered without it"


# -- (d) least privilege: who gets which credential ----------------------------------------


def _where(config: dict[str, Any], value: str) -> set[str]:
    """The services whose rendered definition contains `value` anywhere."""
    return {name for name, service in config["services"].items()
            if value in json.dumps(service)}


def test_each_secret_reaches_only_the_services_that_need_it(
        config: dict[str, Any], secrets_env: dict[str, str]) -> None:
    # The superuser's password: the server and the one-shot migration, nothing long-running.
    assert _where(config, secrets_env["POSTGRES_PASSWORD"]) == {"postgres", "migrate"}
    # The fleet role: created by the server's init SQL, used by every fleet process, never
    # by migrate (which creates tables the fleet role may not create).
    assert _where(config, secrets_env["POSTGRES_FLEET_PASSWORD"]) == {"postgres", *FLEET}
    # The example's ledger: only the workers that run its steps.
    assert _where(config, secrets_env["DEMO_LEDGER_PASSWORD"]) == {"postgres", "worker"}
    # Redis: the server and whoever talks to the broker; migrate does not.
    assert _where(config, secrets_env["REDIS_PASSWORD"]) == {"redis", *FLEET}
    assert _where(config, secrets_env["FLOWER_PASSWORD"]) == {"flower"}


def test_postgres_roles(config: dict[str, Any]) -> None:
    services = config["services"]
    # The image's superuser is `postgres` when POSTGRES_USER is unset; the fleet is not it.
    assert "POSTGRES_USER" not in services["postgres"]["environment"]
    from sqlalchemy.engine import make_url

    assert make_url(services["migrate"]["environment"]["LIVINGAI_STORE"]).username == "postgres"
    for name in FLEET:
        url = make_url(services[name]["environment"]["LIVINGAI_STORE"])
        assert url.username == "livingai" and url.query.get("schema") == "livingai", name
    ledger = make_url(services["worker"]["environment"]["LIVINGAI_DEMO_LEDGER"])
    assert ledger.username == "livingai_demo_ledger"
    # The init SQL that creates those roles is mounted where the image runs it.
    mounts = {v["target"]: Path(v["source"]) for v in services["postgres"]["volumes"]
              if v["type"] == "bind"}
    initdb = mounts["/docker-entrypoint-initdb.d"]
    assert (initdb / "002-least-privilege.sql").is_file()


def test_redis_has_no_default_user_and_the_fleet_user_no_dangerous_command(
        config: dict[str, Any], secrets_env: dict[str, str]) -> None:
    command = _command(config["services"]["redis"])
    users = redis_users(command)
    assert set(users) == {"default", "livingai"}, users
    assert users["default"][:2] == ["off", "resetpass"] and "+@all" not in users["default"]
    rules = users["livingai"]
    assert rules[:2] == ["on", f">{secrets_env['REDIS_PASSWORD']}"]
    # -@dangerous last: nothing after it may add a dangerous command back.
    assert rules[-1] == "-@dangerous", rules
    assert not any(r.startswith("+") and r != "+@all" for r in rules), rules
    # The health check logs in as that user (there is no other).
    assert "--user livingai" in " ".join(config["services"]["redis"]["healthcheck"]["test"])


def redis_users(command: list[str]) -> dict[str, list[str]]:
    """redis-server's `--user NAME RULE...` arguments as {name: rules}, in order."""
    users: dict[str, list[str]] = {}
    rules: list[str] | None = None
    for previous, arg in zip(["", *command[:-1]], command, strict=True):
        if arg.startswith("--"):
            rules = None
        elif previous == "--user":
            rules = users.setdefault(arg, [])
        elif rules is not None:
            rules.append(arg)
    return users


def test_env_example_names_every_variable_and_holds_no_value() -> None:
    code = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", code))
    assert required == set(REQUIRED_VARS)
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    example = dict(line.split("=", 1) for line in lines)
    assert set(example) == required, f"{ENV_EXAMPLE.name} and docker-compose.yml disagree"
    # Empty: compose refuses an empty value (${VAR:?}), so the example as it is starts nothing
    # and no placeholder password can reach a deployment.
    assert all(value == "" for value in example.values()), example
