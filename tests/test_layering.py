"""The layering the design fixes: no import cycles (function-level imports included), and a runtime
package that the bundle can ship alone."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("pipeline", "export", "calib", "edgerun")
# Who may import whom: the runtime is the bottom layer, the libraries sit on it, the pipeline on top.
ALLOWED = {"edgerun": {"edgerun"}, "export": {"export", "edgerun"}, "calib": {"calib", "edgerun"},
           "pipeline": {"pipeline", "export", "calib", "edgerun"}}
HEAVY = ("torch", "torch_pruning", "nncf")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):   # every import, also inside functions
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    # A package's __init__ runs before any of its modules anyway: an edge to one's own parent is no cycle.
    return {m: {i for i in _imports(p) if i in files and i != m and not m.startswith(i + ".")}
            for m, p in files.items()}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in g[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_layers_import_only_downwards():
    for m, deps in graph().items():
        top = m.split(".")[0]
        bad = {d for d in deps if d.split(".")[0] not in ALLOWED[top]}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_runtime_package_imports_no_heavy_library():
    for p in (ROOT / "edgerun").rglob("*.py"):
        heavy = {i for i in _imports(p) if i.split(".")[0] in HEAVY}
        assert not heavy, f"{p.name} imports {sorted(heavy)}"


def test_only_the_api_and_cli_import_the_stage_list():
    users = {m for m, deps in graph().items() if "pipeline.stages" in deps}
    assert users <= {"pipeline.api", "pipeline.cli"}, users


MAX_MODULE_LINES = 450   # issue 20: a module a newcomer can read whole


def test_no_library_module_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for pkg in ("pipeline", "export", "calib", "edgerun")
            for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
