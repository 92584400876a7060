"""The house rules on imports, read from the source (docs/architecture.md, "What may import what"):
data flows one way (``pipelines/`` and ``jobs/`` import ``echopulse``, never the reverse; only the
entry point ``echopulse.cli`` reaches up to run them), model code imports only the configs and
knows no Ray, and no modules import each other round a circle (lazy imports inside functions
included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("echopulse", "pipelines", "jobs")
# who may import whom (by top-level package)
ALLOWED = {"echopulse": {"echopulse"}, "pipelines": {"echopulse", "pipelines"},
           "jobs": {"echopulse", "pipelines", "jobs"}}
ENTRY_POINT = "echopulse.cli"  # the command line runs the pipelines and jobs
MODELS_MAY_IMPORT = ("echopulse.models", "echopulse.config")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        # keep project modules only (``from echopulse import storage`` names the module storage)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_packages_import_only_downwards():
    bad = [(m, d) for m, deps in _imports().items() for d in deps
           if m != ENTRY_POINT and d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, f"imports against the layering (pipelines/jobs -> echopulse only): {bad}"


def test_model_code_knows_no_ray_and_only_the_configs():
    bad = [(m, d) for m, deps in _imports().items() if m.startswith("echopulse.models") for d in deps
           if not d.startswith(MODELS_MAY_IMPORT)]
    assert not bad, bad
    for path in (ROOT / "echopulse" / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n.split(".")[0] == "ray"}, path


def test_no_import_cycles():
    graph = _imports()
    # a module's package __init__ is imported with it; edges into a parent package are not cycles
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
