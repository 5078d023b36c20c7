"""Layering contracts (pyproject.toml [tool.importlinter]) hold, and would catch a violation."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT + ["--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    for name in ("pipeline", "actors"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("actors/sampler.py", "from pipeline import plan", "import nothing from pipeline"),
    ("pipeline/report.py", "from pipeline import cli", "no import cycles"),
    ("pipeline/runner.py", "from pipeline import plan", "driver layers"),
])
def test_a_violation_breaks_a_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n\ndef _violation():\n    {line}\n")
    result = _lint(root)
    assert result.returncode != 0
    broken = [l for l in result.stdout.splitlines() if l.endswith("BROKEN")]
    assert any(contract in l for l in broken), result.stdout
