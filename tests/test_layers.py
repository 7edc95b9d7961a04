"""The import contracts of ``make lint`` ([tool.importlinter] in pyproject.toml) really bite:
the same contracts, on a copy of the tree with one deliberately wrong import, fail."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tipgraph", "deployments", "tuning", "graphs", "tipgraph_ops")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_copy(tmp_path: Path, wrong: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, source in wrong.items():
        (tmp_path / module).write_text(source, encoding="utf-8")
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", "pyproject.toml", "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_tree_as_it_is_keeps_both_contracts(tmp_path: Path) -> None:
    done = _lint_copy(tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # The core reaching up into a serving shell.
        ("tipgraph/_wrong.py", "import deployments.scoring\n", "Imports point down"),
        # The core reaching the operator surface.
        ("tipgraph/_wrong.py", "from tipgraph_ops import cli\n", "Imports point down"),
        # An offline tool importing a serving shell.
        ("tuning/_wrong.py", "import deployments.ingress\n", "never import each other"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, source: str, broken: str
) -> None:
    done = _lint_copy(tmp_path, {module: source})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 broken" in done.stdout or "2 broken" in done.stdout, done.stdout
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout, done.stdout
    assert module.removesuffix(".py").replace("/", ".") in done.stdout, done.stdout


# Imported inside a function only because they are heavy, each with its reason beside it.
LAZY = {"ray", "mlflow", "litellm", "matplotlib", "optuna", "numba"}
LAZY_IN_OPS = {"graphs"}  # the Serve graph is Ray Serve: only `tipgraph serve` loads it


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import inside a function body of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.lineno, node.module.split(".")[0]))
    return found


def has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or above it within its block of imports."""
    i = lineno - 1
    if "#" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("import ", "from ", "#")):
        i -= 1
        if "#" in lines[i]:
            return True
    return False


def test_only_heavy_third_party_modules_are_imported_inside_functions() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for lineno, module in function_level_imports(path):
                allowed = LAZY | (LAZY_IN_OPS if package == "tipgraph_ops" else set())
                if module not in allowed or not has_reason(lines, lineno):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert offenders == []


def test_the_import_check_sees_a_function_level_project_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tipgraph import settings\n    import ray  # heavy\n")
    assert function_level_imports(module) == [(2, "tipgraph"), (3, "ray")]
