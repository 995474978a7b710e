"""Imports point down the layers and never go round in a cycle (docs/DESIGN.md, "Layers").

Every import counts wherever it is written: at the top, inside a function, under TYPE_CHECKING.
A module gets its folder's layer unless LAYER_OF names it, so a new file needs no edit here; a
module that belongs lower than its folder's default is listed in LAYER_OF, and a package listed there
places every module inside it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top: a module may import from its own layer or any layer below it.
LAYERS = ("schema", "data", "models", "knowledge", "work", "actors", "orchestration", "cli")

# The repository's folders and the package each one installs as (pyproject.toml's package-dir).
FOLDERS = {
    "polydistill": "polydistill",
    "cluster": "polydistill.cluster",
    "actors": "polydistill.actors",
    "student": "polydistill.student",
    "storage": "polydistill.storage",
}

FOLDER_LAYER = {
    "polydistill": "cli",  # the public API and `python -m polydistill`
    "cluster": "orchestration",
    "actors": "work",  # plain classes that tests drive without Ray; the Ray shells are listed below
    "student": "work",  # training, evaluation and compression; models and knowledge are listed below
    "storage": "data",
}

LAYER_OF = {
    # schema: what every layer reads; imports nothing of ours but other schema modules
    "polydistill.cluster.config": "schema",
    "polydistill.cluster.report_schema": "schema",
    "polydistill.cluster.autoscaling": "schema",
    "polydistill.cluster.quiet": "schema",
    "polydistill.cluster.progress": "schema",
    "polydistill.cluster.exit_codes": "schema",
    "polydistill.storage.wire": "schema",
    "polydistill.storage.schema": "schema",  # how a wire message declares its fields
    "polydistill.storage.frame": "schema",  # wire schema version 2's framing
    "polydistill.storage.knowledge_codec": "schema",  # packed top-k and int8 features, pure numpy
    "polydistill.storage.wire_codec": "schema",  # the codec's settings, without numpy
    "polydistill.storage.keys": "schema",
    "polydistill.storage.ledger": "schema",
    "polydistill.storage.delivery": "schema",
    "polydistill.cluster.task_specs": "schema",  # each task kind's config checks and model class, no torch
    # models: building, loading and saving the teacher and the students
    "polydistill.student.architecture": "models",
    "polydistill.student.build": "models",
    "polydistill.student.precision": "models",
    "polydistill.student.vocab_trim": "models",
    "polydistill.student.checkpoint": "models",
    # knowledge: what a student asks the teachers for and the losses it learns by
    "polydistill.student.contract": "knowledge",
    "polydistill.student.losses": "knowledge",
    "polydistill.student.lm_losses": "knowledge",
    "polydistill.student.metrics": "knowledge",
    # actors: the thin Ray shells around the plain classes
    "polydistill.actors.shells": "actors",
    "polydistill.actors.pool": "actors",
    # the command line sits beside the public API, above orchestration
    "polydistill.cluster.cli": "cli",
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module
    file: str  # the importing file, relative to the repository root
    line: int


def discover_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file under the package folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> str:
    listed = [name for name in LAYER_OF if module == name or module.startswith(name + ".")]
    if listed:  # the module itself, else the innermost listed package that holds it
        return LAYER_OF[max(listed, key=len)]
    # polydistill.cluster.x is in cluster/, not in polydistill/: the longest package that holds it wins.
    holders = [folder for folder, package in FOLDERS.items() if module == package or module.startswith(package + ".")]
    return FOLDER_LAYER[max(holders, key=lambda folder: len(FOLDERS[folder]))]


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _own(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` starts with, or None for an import from elsewhere."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path = ROOT) -> list[Import]:
    """Every import of our own modules in the file, at any depth of its syntax tree."""
    file = str(path.relative_to(root))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from the importing module's package
                package = module if _is_package(path) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from package import module` imports that module; `from module import name` the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _own(name, modules)
            if target is not None and target != module:
                found.append(Import(module, target, file, node.lineno))
    return list(dict.fromkeys(found))  # `from module import a, b` is one import of the module


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = discover_modules(root)
    return [found for module, path in modules.items() for found in imports_of(module, path, modules, root)]


def upward_imports(imports: list[Import]) -> list[str]:
    """One message per import that reaches a higher layer than its own."""
    problems = []
    for found in imports:
        have, wants = layer_of(found.source), layer_of(found.target)
        if LAYERS.index(wants) > LAYERS.index(have):
            problems.append(
                f"{found.file}:{found.line} imports {found.target}: layer {have!r} "
                f"({found.source}) must not import from the higher layer {wants!r}; move the imported code down "
                f"or this code up (LAYER_OF in tests/unit/test_layering.py says which module sits where)"
            )
    return problems


def import_cycles(imports: list[Import]) -> list[tuple[list[str], list[Import]]]:
    """Each strongly connected group of files (Tarjan's algorithm) with one cycle of imports through it."""
    edges: dict[str, dict[str, Import]] = {}
    for found in imports:
        edges.setdefault(found.source, {}).setdefault(found.target, found)
        edges.setdefault(found.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in edges[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [(sorted(group), _cycle_within(group, edges)) for group in groups]


def _cycle_within(group: set[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """A shortest path of imports from the group's first module back to itself (breadth first)."""
    start = min(group)
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor, found in sorted(edges[node].items()):
                if successor not in group or successor in came_by:
                    continue
                came_by[successor] = found
                if successor == start:
                    cycle, node_back = [], start
                    while True:
                        step = came_by[node_back]
                        cycle.append(step)
                        node_back = step.source
                        if node_back == start:
                            return cycle[::-1]
                following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its strongly connected group {sorted(group)}")


def describe_cycle(group: list[str], cycle: list[Import]) -> str:
    steps = " -> ".join(f"{found.source} ({found.file}:{found.line})" for found in cycle)
    return (f"import cycle: {steps} -> {cycle[0].source}; break it by moving code to a lower module "
            f"(an import inside a function counts too). The {len(group)} files that reach each other: "
            + ", ".join(f"{module} ({layer_of(module)})" for module in group))


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


def test_every_import_points_to_the_same_or_a_lower_layer(imports):
    problems = upward_imports(imports)
    assert not problems, "imports that point up:\n" + "\n".join(problems)


def test_no_import_cycle_between_files(imports):
    cycles = import_cycles(imports)
    assert not cycles, "\n".join(describe_cycle(group, cycle) for group, cycle in cycles)


def test_the_layer_table_names_only_modules_that_exist():
    stale = sorted(set(LAYER_OF) - set(discover_modules()))
    assert not stale, f"LAYER_OF names modules that no longer exist: {stale}; drop or rename them"


def test_the_checks_catch_an_upward_import_and_a_cycle_hidden_in_a_function(tmp_path):
    """The same parsing, on a throwaway tree: schema importing orchestration from inside a function."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "cluster" / "config.py").write_text(
        "def check():\n    from polydistill.cluster.driver import run_job\n")
    (tmp_path / "cluster" / "driver.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from polydistill.cluster import config\n")
    found = all_imports(tmp_path)
    assert {(item.file, item.target, item.line) for item in found} == {
        ("cluster/config.py", "polydistill.cluster.driver", 2),
        ("cluster/driver.py", "polydistill.cluster.config", 3),
    }
    (problem,) = upward_imports(found)
    assert problem.startswith("cluster/config.py:2 imports polydistill.cluster.driver: layer 'schema'")
    assert "'orchestration'" in problem
    ((group, cycle),) = import_cycles(found)
    message = describe_cycle(group, cycle)
    assert "cluster/config.py:2" in message and "cluster/driver.py:3" in message


def test_a_listed_package_places_every_module_inside_it():
    assert layer_of("polydistill.cluster.task_specs") == "schema"
    assert layer_of("polydistill.cluster.task_specs.seq2seq") == "schema"
    assert layer_of("polydistill.cluster.task_specs_elsewhere") == "orchestration"  # a prefix of the name is not a package
