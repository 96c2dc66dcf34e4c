"""The core imports no framework (P1); the check itself is shown to catch a violation."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

FORBIDDEN = ("ray", "diffusers", "pydantic", "transformers", "peft", "wandb", "services")
CHECK = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    pkg = importlib.import_module(sys.argv[1])
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(mod.name)
    bad = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))
    sys.exit(f"{sys.argv[1]} imports {bad}" if bad else 0)
    """
)


def _check(package: str, path: str | None = None) -> subprocess.CompletedProcess:
    env_path = [path] if path else []
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + CHECK
    return subprocess.run([sys.executable, "-c", code, package, *FORBIDDEN], capture_output=True, text=True)


def test_core_imports_no_frameworks():
    result = _check("normguard_core")
    assert result.returncode == 0, result.stderr


def test_boundary_check_catches_a_framework_import(tmp_path):
    pkg = tmp_path / "leaky_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "math_bits.py").write_text("import pydantic\n")
    result = _check("leaky_core", str(tmp_path))
    assert result.returncode != 0 and "pydantic" in result.stderr
