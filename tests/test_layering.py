"""The layering, read from the source: no import cycles, actors only from the sweep and the CLI, a leaf
config module, and every import inside a function says why it is deferred."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dfc_ray", "actors")
MAY_IMPORT_ACTORS = ("dfc_ray.sweep", "dfc_ray.commands", "dfc_ray.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    """The internal modules an import statement loads (a `from package import name` that names a
    submodule counts as that submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def _imports(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """(imported internal module or external top-level name, statement, inside a function?)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out: list[tuple[str, ast.stmt, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                internal = _resolve(child, module, path.name == "__init__.py")
                external = [] if isinstance(child, ast.ImportFrom) and child.level else \
                    [(a.name if isinstance(child, ast.Import) else child.module or "").split(".")[0]
                     for a in (child.names if isinstance(child, ast.Import) else child.names[:1])]
                for name in internal or external:
                    out.append((name, child, in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:  # a type-only import of our own module hides a cycle
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)) and _resolve(stmt, module, False):
                        out.append(("<TYPE_CHECKING>", stmt, in_function))
                visit(ast.Module(body=child.orelse, type_ignores=[]), in_function)
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _graph() -> dict[str, set[str]]:
    """Module → internal modules it imports, at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        edges = set()
        for name, _, _ in _imports(module):
            if name in MODULES and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    for v in graph:
        if v not in index:
            connect(v)
    sys.setrecursionlimit(limit)
    return found


def test_no_import_cycles_module_or_function_level():
    assert _cycles(_graph()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_sweep_and_the_cli_import_actors():
    offenders = [f"{module} imports {name}" for module in MODULES if module.startswith("dfc_ray")
                 and not module.startswith(MAY_IMPORT_ACTORS)
                 for name, _, _ in _imports(module) if name.split(".")[0] == "actors"]
    assert offenders == []


def test_config_imports_only_the_standard_library():
    names = {name for name, _, _ in _imports("dfc_ray.config")}
    assert names and all(name in sys.stdlib_module_names for name in names), names


def test_no_type_checking_import_dodges():
    dodges = [module for module in MODULES for name, _, _ in _imports(module) if name == "<TYPE_CHECKING>"]
    assert dodges == []


def test_every_function_level_import_says_why_it_is_deferred():
    """An import inside a function defers a heavy module on purpose: a comment on its line or the line
    above says so."""
    missing = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        seen = set()
        for _, stmt, in_function in _imports(module):
            if not in_function or stmt.lineno in seen:
                continue
            seen.add(stmt.lineno)
            here, above = lines[stmt.lineno - 1], lines[stmt.lineno - 2] if stmt.lineno > 1 else ""
            block_start = stmt.lineno - 2
            while block_start >= 0 and lines[block_start].strip().startswith(("from ", "import ")):
                block_start -= 1  # a run of imports shares the comment above the first one
            first_above = lines[block_start] if block_start >= 0 else ""
            if "#" not in here and not above.strip().startswith("#") and not first_above.strip().startswith("#"):
                missing.append(f"{path.relative_to(ROOT)}:{stmt.lineno}: {here.strip()}")
    assert missing == [], "\n".join(missing)


def test_nothing_refers_outside_the_repository():
    """Docs and code are self-contained: no design file from outside the repository is cited."""
    outside = ("DESIGN" + ".md", "../" + "shared", "DESIGN " + "weakness")
    hits = []
    for path in ROOT.rglob("*"):
        if {".git", "__pycache__", ".pytest_cache"} & set(path.parts) or not path.is_file() \
                or path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}:
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{path.relative_to(ROOT)}: {needle}" for needle in outside if needle in text]
    assert hits == []


def test_ci_runs_the_readme_command():
    """README's test command and .ci/run stay the same line, lint and type checks included."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line).replace("pip install -q", "pip install")
    assert "ruff check ." in command and "mypy" in command
    assert command.replace(" -q -e", " -e") in readme


def test_the_modules_handed_out_first_exist():
    """tests/conftest.py's LONGEST_MODULES names test files that exist (a renamed module would silently lose its
    early start, and two workers would wait on it at the end)."""
    from conftest import LONGEST_MODULES

    assert [name for name in LONGEST_MODULES if not (ROOT / "tests" / name).is_file()] == []
