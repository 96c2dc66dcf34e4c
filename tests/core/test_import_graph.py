"""The import graph of services/ and normguard_core/ has no circle and no import from a lower layer up to a
higher one, counting every import: those inside functions and those under ``if TYPE_CHECKING:`` too (as
``../shared/tools/import_cycles.py`` does). A deferred import hides a circle from Python at import time,
not from a reader; an annotation that names a type from a layer above ties the layers as a call does.
The same reading keeps the frameworks in their layers: the core names none of them anywhere (the run-time
check of ``test_import_boundary.py`` cannot see an import inside a function that no test calls), and Ray
is imported below the services' layer only where a module's one job is to talk to it, each listed below.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
PACKAGES = ("services", "normguard_core")


def _imported(tree: ast.AST, files: set[str]) -> set[str]:
    """Every module of ``files`` that ``tree`` imports, wherever the import sits (module level, a
    function body, an ``if TYPE_CHECKING:`` block)."""
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"line {node.lineno}: a relative import; the packages import absolutely")
        if isinstance(node, ast.ImportFrom) and node.module:
            deps.add(node.module)
            deps |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return deps & files


def _graph() -> dict[str, set[str]]:
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    return {name: _imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


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


def test_imports_in_functions_and_for_annotations_are_counted():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\nimport c\n"
        "def f():\n    from d import x\n"
    )
    assert _imported(tree, {"a", "b", "c", "d", "d.x", "e"}) == {"a", "b", "c", "d", "d.x"}


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


# services/ in layers above the core: a module imports from its own layer or the ones below, never from above
LAYERS = (
    ("normguard_core",),  # the algorithms: torch only, no service
    # messages, config, the RL methods' plug-ins, checkpoint files, plots, the checked from_pretrained,
    # the data sets that generators and scorers share
    (
        "services.types",
        "services.signals",
        "services.config",
        "services.methods",
        "services.points",
        "services.checkpoints",
        "services.report",
        "services.hub",
        "services.data",
    ),
    ("services.models", "services.rewards"),  # generators and scorers
    # the embedded default's assets (built, or unpacked from a committed archive), the one evaluation path, the
    # placement plan
    ("services.prepare", "services.prepare_colour", "services.assets", "services.evaluation", "services.cluster"),
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


FRAMEWORKS = ("ray", "diffusers", "pydantic", "transformers", "peft", "wandb")  # as test_import_boundary.py


def _third_party(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """``(top-level package, line, inside a function)`` of every import of ``FRAMEWORKS`` in ``tree``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [child.module]
            found.extend((n.split(".")[0], child.lineno, in_function) for n in names if n.split(".")[0] in FRAMEWORKS)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _framework_imports() -> dict[str, list[tuple[str, int, bool]]]:
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    named = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}
    return {name: _third_party(ast.parse(path.read_text())) for name, path in named.items()}


def test_the_core_names_no_framework_even_inside_a_function():
    core = {m: found for m, found in _framework_imports().items() if _layer(m) == 0 and found}
    assert core == {}


# Below the services' layer, Ray is imported only here, and only inside the function that needs it (a
# deferred import of an optional framework: loading a config, planning on a file, or scoring in process
# runs without Ray). Each is the module's job, not a reach upward.
RAY_BELOW_SERVICES = {
    "services.cluster.connect": "joining (or starting) the cluster a command runs on is what the module is for",
    "services.cluster.plan": "reads the connected cluster's nodes when no node file is given",
    "services.cluster.submit": "submits a Ray job through Ray's job-submission client",
    "services.rewards.remote": "a remote scorer reached by a Serve handle calls Serve and names its actor error",
}


def test_ray_below_the_services_layer_only_where_listed_and_deferred():
    services_layer = _layer("services.training")
    found = sorted(
        f"{m}:{line}{'' if deferred else ' (module level)'}"
        for m, imports in _framework_imports().items()
        for pkg, line, deferred in imports
        if pkg == "ray" and _layer(m) < services_layer and not (m in RAY_BELOW_SERVICES and deferred)
    )
    assert found == []
    assert all(any(p == "ray" for p, _, _ in _framework_imports()[m]) for m in RAY_BELOW_SERVICES)  # none stale


def test_framework_imports_are_found_inside_functions():
    tree = ast.parse("import os\nfrom ray import serve\ndef f():\n    import diffusers.models\n    import numpy\n")
    assert _third_party(tree) == [("ray", 2, False), ("diffusers", 4, True)]
