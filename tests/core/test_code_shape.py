"""services/ stays readable: no file over 400 lines, no function over 50 (issue 14's yardsticks)."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50


def _files() -> list[Path]:
    return sorted((ROOT / "services").rglob("*.py"))


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_over_50_lines():
    long = {}
    for p in _files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}
