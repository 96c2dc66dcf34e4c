"""The import graph of services/ has no circle, counting imports inside functions too.

Imports under ``if TYPE_CHECKING:`` are not counted: they never run, so they can close no circle at
import time and pull no layer in; they only name the config types of annotations.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "services").rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_services_has_no_import_circle():
    graph = _graph()
    assert len(graph) > 20 and graph["services.rewards.clip"] >= {"services.rewards.base"}
    assert _cycles(graph) == []


def test_imports_for_annotations_only_are_not_counted():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\nimport c\n"
    )
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"b", "c"}


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


# services/ in layers: a module imports from its own layer or the ones below, never from above
LAYERS = (
    # messages, config, the RL methods' plug-ins, checkpoint files, plots, the checked from_pretrained,
    # the data sets that generators and scorers share
    (
        "services.types",
        "services.config",
        "services.methods",
        "services.points",
        "services.checkpoints",
        "services.report",
        "services.hub",
        "services.data",
    ),
    ("services.models", "services.rewards"),  # generators and scorers
    # the embedded default's assets, the one evaluation path, the placement plan
    ("services.prepare", "services.prepare_colour", "services.evaluation", "services.cluster"),
    ("services.training", "services.serving", "services.rewards.server"),  # the services (a reward server is one)
    ("services.sweeps", "services.analyze"),  # built on training
    ("services.cli", "services"),  # parses and calls one function per command
)


def _layer(module: str) -> int:
    best = max(
        ((len(p), i) for i, layer in enumerate(LAYERS) for p in layer if module == p or module.startswith(p + ".")),
        default=None,
    )
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def test_no_module_imports_from_a_layer_above_it():
    graph = _graph()
    upward = sorted(
        f"{u} (layer {_layer(u)}) imports {v} (layer {_layer(v)})"
        for u, deps in graph.items()
        for v in deps
        if _layer(v) > _layer(u)
    )
    assert upward == []


def test_training_and_serving_do_not_import_each_other():
    graph = _graph()
    services = ("services.training", "services.serving")

    def owner(m: str) -> str | None:
        return next((s for s in services if m == s or m.startswith(s + ".")), None)

    crossing = sorted(
        f"{u} imports {v}" for u, deps in graph.items() for v in deps if owner(u) and owner(v) and owner(u) != owner(v)
    )
    assert crossing == []
