"""The code stays readable: size budgets for services/ and for the math core (issue 14's yardsticks).

* services/: no file over 400 lines, no function over 50 (docstring included).
* normguard_core/: no file over 300 lines (the house style's core budget, P3: a core module is read
  top to bottom next to its paper), no function over 50 lines *not counting its docstring*: a core
  docstring gives every tensor argument's shape (P4), and a budget that counted it would push those
  shapes out of the code.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50
MAX_CORE_FILE_LINES, MAX_CORE_FUNCTION_CODE_LINES = 300, 50


def _files(package: str = "services") -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    is_doc = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def _long_files(package: str, budget: int) -> dict[str, int]:
    return {str(p.relative_to(ROOT)): n for p in _files(package) if (n := len(p.read_text().splitlines())) > budget}


def test_no_file_over_400_lines():
    assert _long_files("services", MAX_FILE_LINES) == {}


def test_no_function_over_50_lines():
    long = {}
    for p in _files():
        for node in _functions(p):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long[f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}


def test_no_core_file_over_300_lines():
    assert _long_files("normguard_core", MAX_CORE_FILE_LINES) == {}


def test_no_core_function_over_50_lines_of_code():
    long = {}
    for p in _files("normguard_core"):
        for node in _functions(p):
            n = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
            if n > MAX_CORE_FUNCTION_CODE_LINES:
                long[f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}
