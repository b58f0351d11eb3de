"""The layout's import rules, read from the source of every module under lra/.

Rooms (lra/<room>/ or lra/<room>.py) rank from the bottom up; a module imports its own room
or rooms of lower rank, never another room of its rank or one above:
  0  common                      shared helpers (Choice, option checks, dtype constants)
  1  models, tasks, presets      the model, the data, released settings (plain data)
  2  parallel                    mesh, shardings, multi-host start-up
  3  training                    the trainer and its parts
  4  experiments, bench          launch / sweep / report, benchmarks
  5  launch, report, data        `python -m lra.<entry>` runners
No module imports another module's private name (a leading underscore), and the graph of
imports between modules (function-level imports and `TYPE_CHECKING` blocks included;
registries' `importlib` lookups are data, not imports) has no cycle. The checker is run
on a small tree with each fault first, so the test is known to fail when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANKS = {"common": 0, "models": 1, "tasks": 1, "presets": 1, "parallel": 2, "training": 3,
         "experiments": 4, "bench": 4, "launch": 5, "report": 5, "data": 5}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `package_dir`."""
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement in `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (base, alias.name))
    root = next(iter(modules)).split(".")[0]
    return [(module, item) for module, item in found
            if module == root or module.startswith(root + ".")]


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(package_dir: Path, ranks: dict[str, int]) -> list[str]:
    """Every broken rule under `package_dir`, one line each."""
    modules = module_names(package_dir)
    problems, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        for target, item in imports_of(name, path, modules):
            if item is not None and item.startswith("_") and not item.startswith("__"):
                problems.append(f"{name} imports the private name {target}.{item}")
            if target in modules and target != name:
                graph[name].add(target)
            here, there = room(name), room(target)
            if here and there and here != there and ranks.get(there, 99) >= ranks.get(here, -1):
                problems.append(f"{name} ({here}, rank {ranks.get(here)}) imports {target} "
                                f"({there}, rank {ranks.get(there)})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [group + [group[0]] for group in groups]


def test_every_module_of_lra_keeps_the_import_rules():
    modules = module_names(ROOT / "lra")
    assert set(RANKS) >= {room(name) for name in modules if room(name)}, "a room without a rank"
    assert violations(ROOT / "lra", RANKS) == []


@pytest.mark.parametrize("files, expected", [
    ({"models/a.py": "from pkg.models.b import x", "models/b.py": "from pkg.models import a"},
     "import cycle: pkg.models.a -> pkg.models.b -> pkg.models.a"),
    ({"models/a.py": "from pkg.models.b import _helper", "models/b.py": ""},
     "imports the private name pkg.models.b._helper"),
    ({"models/a.py": "def f():\n    from pkg.training import t", "training/t.py": ""},
     "pkg.models.a (models, rank 1) imports pkg.training.t (training, rank 3)"),
    ({"models/a.py": "from pkg.tasks import t", "tasks/t.py": ""},
     "pkg.models.a (models, rank 1) imports pkg.tasks.t (tasks, rank 1)"),
])
def test_the_checker_finds_each_fault(tmp_path, files, expected):
    package = tmp_path / "pkg"
    for name, text in {"__init__.py": "", "models/__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text + "\n")
    for folder in package.rglob("*"):
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    found = violations(package, RANKS)
    assert any(expected in line for line in found), found
