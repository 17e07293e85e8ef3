"""The package's import graph, read from the source (nothing is imported): every import, also those
inside functions, names a module and a name that exist; library packages import only from the
layers below theirs; and no modules import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "megadoc_megatron"
# Lowest first. "commands" are the thin CLI modules (cli.py, */command.py, *_command.py): they may use
# any library layer; the experiment runs whole stage command lines, so it sits above them.
LAYERS = ["base", "data", "model", "synth", "megadocs", "decontaminate", "blend", "train", "evaluate", "tune",
          "commands", "experiment"]
BASE = {"__init__", "errors", "files", "jsonl", "config", "distributed", "progress"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts[0] in BASE:
        return "base"
    if parts[0] == "cli" or parts[0] != "experiment" and (parts[-1] == "command" or parts[-1].endswith("_command")):
        return "commands"
    return parts[0]


def type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
            and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}


def sources() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def imports(modules: dict[str, ast.Module]) -> list[tuple[str, str, int]]:
    """(importer, imported module, line) of every megadoc_megatron import outside TYPE_CHECKING."""
    found = []
    for name, tree in modules.items():
        skipped = type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megadoc_megatron"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.append((name, submodule if submodule in modules else node.module, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(name, a.name, node.lineno) for a in node.names if a.name.startswith("megadoc_megatron")]
    return found


@pytest.fixture(scope="module")
def modules():
    return sources()


def test_every_import_names_a_module_and_a_name_that_exist(modules):
    names = {name: top_level_names(tree) for name, tree in modules.items()}
    missing = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megadoc_megatron"):
                if node.module not in modules:
                    missing.append(f"{name}:{node.lineno}: no module {node.module}")
                    continue
                missing += [f"{name}:{node.lineno}: {node.module} has no {alias.name}" for alias in node.names
                            if alias.name not in names[node.module] and f"{node.module}.{alias.name}" not in modules]
    assert not missing


def test_library_layers_import_only_from_below(modules):
    upward = [f"{source}:{line} ({layer(source)}) imports {target} ({layer(target)})"
              for source, target, line in imports(modules)
              if LAYERS.index(layer(target)) > LAYERS.index(layer(source))]
    assert not upward


def test_no_import_loops(modules):
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for source, target, _ in imports(modules):
        if target != source and target in modules:
            edges[source].add(target)
    loops, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                loops.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in modules:
        if name not in state:
            visit(name, [name])
    assert not loops
