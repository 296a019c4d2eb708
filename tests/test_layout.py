"""The house rules of the package layout, checked on the source with ``ast``.

* Subpackages sit on floors along the data's way; a module imports only from its own
  floor or the floors below (``FLOORS``), never up.
* No import circle between modules.
* An import inside a function is only for a heavy optional dependency (TensorFlow,
  PyTorch, Ray, faiss, ONNX Runtime, FastAPI, ...), never for one of our own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "delf_retrieval"

# Lowest first. A module may import from its own floor and any floor before it.
FLOORS = [
    ["core"],
    ["features", "viz"],
    ["models"],
    ["config"],
    ["search"],
    ["matching"],
    ["scoring"],
    ["kaggle"],
    ["tasks"],
    ["service"],
    ["distributed"],
    ["demo"],
    ["cli"],
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module of ours, inside a function?, line)`` of every import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.startswith("delf_retrieval"):
                    for alias in child.names:  # "from pkg import module" imports the module
                        if child.module == "delf_retrieval" and alias.name == "__version__":
                            continue  # the root defines only the version eagerly; its API is lazy
                        candidate = f"{child.module}.{alias.name}"
                        target = candidate if _is_module(candidate) else child.module
                        found.append((target, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.level:
                found.append(("<relative>", in_function, child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("delf_retrieval"):
                        found.append((alias.name, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOOR_OF.get(parts[1]) if len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {target for target, _, _ in imports_of(path)}
    return graph


def test_every_subpackage_has_a_floor():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops - {"__init__"} <= set(FLOOR_OF), sorted(tops - {"__init__"} - set(FLOOR_OF))


def test_no_relative_imports_and_no_import_runs_up():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        if source == "delf_retrieval":
            continue  # the root only names the public API, imported lazily
        for target, _, line in imports_of(path):
            if target == "<relative>":
                problems.append(f"{source}:{line} relative import")
            elif target == "delf_retrieval":
                problems.append(f"{source}:{line} imports the package root")
            elif floor(target) is not None and floor(target) > floor(source):
                problems.append(f"{source}:{line} imports {target} (a higher floor)")
    assert problems == []


def test_no_import_circle():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1 on the path, 2 done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if seen.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in seen:
                walk(target, path + [target])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            walk(start, [start])
    # a package's __init__ importing its own modules is no circle with them
    cycles = [c for c in cycles if not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert cycles == []


# Our modules that import a heavy optional dependency at their top, and so are imported late.
HEAVY_MODULES = {"delf_retrieval.matching._kernels_numba": "Numba (extra [fast])"}


def test_imports_inside_functions_are_not_our_own_modules():
    inner = [
        f"{module_name(path)}:{line} imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target, in_function, line in imports_of(path)
        if in_function and target not in HEAVY_MODULES
    ]
    assert inner == []


@pytest.mark.parametrize("module", ["delf_retrieval", "delf_retrieval.tasks.recognition", "delf_retrieval.service.recognizer"])
def test_heavy_frameworks_are_not_imported_with_the_package(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('tensorflow', 'torch', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_console_script_points_at_a_function():
    """``delf-retrieval`` (setup.py's entry point) names an importable callable."""
    import importlib
    import re

    text = (PACKAGE.parent / "setup.py").read_text()
    target = re.search(r'"delf-retrieval=([\w.]+):(\w+)"', text)
    assert target is not None
    function = getattr(importlib.import_module(target.group(1)), target.group(2))
    assert callable(function) and function.__module__ == "delf_retrieval.cli.main"


# The steps that read per-step settings, never the user's Config (built at the task level).
SETTINGS_STEPS = ("search", "matching", "scoring")


def test_search_matching_and_scoring_never_see_a_config():
    """No module of ``search/``, ``matching/`` or ``scoring/`` imports ``delf_retrieval.config``, and no
    function there has a parameter annotated ``Config``: each step takes its own settings
    object (``XSettings.from_config(config)``, built by the task) or keyword arguments."""
    problems = []
    for step in SETTINGS_STEPS:
        for path in sorted((PACKAGE / step).rglob("*.py")):
            source = module_name(path)
            problems += [f"{source}:{line} imports {target}" for target, _, line in imports_of(path) if target == "delf_retrieval.config"]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    problems += [
                        f"{source}:{node.lineno} {node.name}({argument.arg}: {ast.unparse(argument.annotation)})"
                        for argument in arguments
                        if argument.annotation is not None and _names_config(argument.annotation)
                    ]
    assert problems == []


def _names_config(annotation: ast.expr) -> bool:
    return any(
        (isinstance(node, ast.Name) and node.id == "Config") or (isinstance(node, ast.Attribute) and node.attr == "Config")
        for node in ast.walk(annotation)
    )
