"""The package layout is the architecture: imports run one way (cli -> training -> fileformat -> {loha, models,
data} -> config), with no circles, and each layer keeps to what it may touch. Read from the source with `ast`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loha_train"

# Higher layers may import lower ones, never the reverse; layers of one rank may not import each other.
LAYERS = {
    "loha_train": 0,  # the root package: __version__ only
    "config": 0,
    "loha": 1,
    "models": 1,
    "data": 1,
    "fileformat": 2,
    "training": 3,
    "cli": 4,
    "__main__": 5,
}
# What a layer must not import from outside the project, and why (shared/design.md).
FORBIDDEN_EXTERNAL = {
    "config": {"torch", "diffusers", "transformers", "accelerate", "safetensors"},  # validating a config is cheap
    "loha": {"accelerate", "safetensors", "pathlib", "diffusers", "transformers"},  # maths and modules, no files
    "data": {"accelerate", "diffusers", "transformers"},  # images and captions, not models
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path, modules: set[str]) -> Iterator[tuple[str, int]]:
    """Every module `path` imports (at any depth: functions and TYPE_CHECKING blocks count), with its line."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in modules else base), node.lineno


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: [(target, line) for target, line in imports(path, set(files)) if target.split(".")[0] == "loha_train"]
        for name, path in sorted(files.items())
    }


def upward_arrows(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Imports from a layer to one above it or beside it, as 'importer:line -> imported (layer -> layer)'."""
    wrong = []
    for importer, targets in graph.items():
        for target, line in targets:
            a, b = layer(importer), layer(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                kind = "upward" if LAYERS[b] > LAYERS[a] else "sideways"
                wrong.append(f"{importer}:{line} -> {target} ({kind}: {a} -> {b})")
    return wrong


def circles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Each import cycle once, as the list of modules around it."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target, _ in graph.get(node, []):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    return found


def test_imports_run_one_way_between_the_layers() -> None:
    graph = import_graph()
    assert {layer(m) for m in graph} <= set(LAYERS), "a new subpackage needs its place in LAYERS"
    assert upward_arrows(graph) == []


def test_there_are_no_import_circles() -> None:
    assert circles(import_graph()) == []


@pytest.mark.parametrize("name", sorted(FORBIDDEN_EXTERNAL))
def test_lower_layers_keep_off_what_they_must_not_touch(name: str) -> None:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    touched = [
        f"{module_name(p)}:{line} imports {target}"
        for p in sorted((PACKAGE / name).rglob("*.py"))
        for target, line in imports(p, modules)
        if target.split(".")[0] in FORBIDDEN_EXTERNAL[name]
    ]
    assert touched == []


def test_the_checks_name_an_upward_import_and_a_circle() -> None:
    """The checks above can fail: a loha module importing training, and a two-module circle, are both reported."""
    graph = {
        "loha_train.loha.layers": [("loha_train.training.plan", 7)],
        "loha_train.training.plan": [("loha_train.config", 3)],
        "loha_train.models.a": [("loha_train.models.b", 1)],
        "loha_train.models.b": [("loha_train.models.a", 2)],
        "loha_train.data.scan": [("loha_train.models.a", 5)],
    }
    assert upward_arrows(graph) == [
        "loha_train.loha.layers:7 -> loha_train.training.plan (upward: loha -> training)",
        "loha_train.data.scan:5 -> loha_train.models.a (sideways: data -> models)",
    ]
    assert circles(graph) == [["loha_train.models.a", "loha_train.models.b", "loha_train.models.a"]]


def test_every_module_says_its_job_and_stays_small() -> None:
    """Each module opens with a docstring; none grows past ~400 lines without a reason written here."""
    reasons: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{name} has no docstring"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= reasons.get(name, 400), f"{name} has {lines} lines"
