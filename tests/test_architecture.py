"""The house's rules, checked: imports run one way (no cycles), the core never imports
Celery, every module imports on its own, and no module grows past its room."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "livingai_tasks"
WING = "livingai_tasks.celery_wing"
ADAPTERS = "livingai_tasks.adapters"
# Outside the core: the wing, and what is built on it (the CLI, the demo app, the framework
# adapters, each of which may import its framework and the wing).
NOT_CORE = (WING, "livingai_tasks.cli", "livingai_tasks.demo", ADAPTERS)
CELERY_PACKAGES = {"celery", "kombu", "billiard"}
# The agent frameworks an adapter may import; nothing else in the package may.
FRAMEWORKS = {"pydantic_ai", "agents", "langgraph", "langchain_core", "langchain", "crewai"}
MAX_LINES = 420
# The module each adapter room imports, where its name is not the room's.
_FRAMEWORKS = {"openai_agents": "agents"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at module level, [(line, module) imported inside a function])."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        # `from . import x` may name a submodule: then it imports that, not the package.
        found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        return found if len(found) == len(node.names) else [base, *found]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = [t for t in targets(child) if t]
                if in_function:
                    nested.extend((child.lineno, t) for t in found)
                else:
                    top.update(found)
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, nested


GRAPH = {name: _imports(name, path)[0] for name, path in MODULES.items()}


def _internal(name: str) -> set[str]:
    """The package's modules `name` imports at module level (a package's __init__ aside:
    importing a submodule runs it, but that edge is Python's, not the module's)."""
    return {t for t in GRAPH[name] if t in MODULES and t != name and t != "livingai_tasks"}


def _is_core(name: str) -> bool:
    return name != "livingai_tasks" and not name.startswith(NOT_CORE)


def test_the_package_has_a_core_and_a_celery_wing() -> None:
    assert WING in MODULES
    core = [m for m in MODULES if _is_core(m)]
    assert {"livingai_tasks.nodes", "livingai_tasks.engine", "livingai_tasks.recovery",
            "livingai_tasks.stores", "livingai_tasks.settings"} <= set(core)


def test_imports_run_one_way() -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(_internal(node)):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_the_core_never_imports_celery() -> None:
    for module in (m for m in MODULES if _is_core(m)):
        seen: set[str] = set()
        todo = [module]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            outside = {t.split(".")[0] for t in GRAPH[current]} & CELERY_PACKAGES
            assert not outside, f"{current} (reached from {module}) imports {outside}"
            wing = [t for t in _internal(current) if not _is_core(t)]
            assert not wing, f"{current} (reached from {module}) imports the wing: {wing}"
            todo.extend(_internal(current))


def test_only_adapters_import_adapters_or_frameworks() -> None:
    """`import livingai_tasks` (core, wing, CLI) must work without any framework installed:
    a framework is an optional extra, reached only through its adapter's module."""
    for module in (m for m in MODULES if not m.startswith(ADAPTERS)):
        frameworks = {t.split(".")[0] for t in GRAPH[module]} & FRAMEWORKS
        assert not frameworks, f"{module} imports {frameworks}: only adapters may"
        adapters = [t for t in _internal(module) if t.startswith(ADAPTERS)]
        assert not adapters, f"{module} imports an adapter: {adapters}"


def _reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current == goal:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(_internal(current))
    return False


def test_no_import_hides_in_a_function_to_dodge_a_cycle() -> None:
    """An import inside a function is fine for a heavy optional dependency (a store's
    driver); it is a hidden cycle when the imported module reaches back to the importer."""
    offenders = []
    for name, path in MODULES.items():
        for line, target in _imports(name, path)[1]:
            if target in MODULES and target != name and _reaches(target, name):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not offenders, "imports that hide a cycle:\n" + "\n".join(offenders)


@pytest.mark.timeout(600)  # ~100 interpreters; an adapter's framework takes seconds to import
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    def load(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"],
                              capture_output=True, text=True, timeout=120)
        return module, done.returncode, done.stderr[-2000:]

    def extra_missing(module: str, err: str) -> bool:
        """An adapter whose framework this environment lacks (CrewAI cannot share the test
        extra's venv) must fail with the error naming its extra, and only that."""
        room = module.split(".")[2] if module.startswith("livingai_tasks.adapters.") else ""
        extra = room.replace("_", "-")
        return bool(room) and importlib.util.find_spec(_FRAMEWORKS.get(room, room)) is None \
            and f"pip install 'livingai-tasks[{extra}]'" in err

    with ThreadPoolExecutor(4) as pool:
        failed = [r for r in pool.map(load, MODULES)
                  if r[1] != 0 and not extra_missing(r[0], r[2])]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, _, err in failed)


def test_no_module_outgrows_its_room() -> None:
    big = {name: n for name, path in MODULES.items()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
