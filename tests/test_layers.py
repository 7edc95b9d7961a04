"""The import contracts of ``make lint`` ([tool.importlinter] in pyproject.toml) really bite:
the same contracts, on a copy of the tree with one deliberately wrong import, fail."""

from __future__ import annotations

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
