"""Every script in examples/ runs as written (as a user would run it) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def _env() -> dict[str, str]:
    # Works from a plain checkout too (without `pip install -e .`).
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"compose_pattern.py", "plug_into_flex.py", "property_test_new_strategy.py", "generate.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path):
    args = [sys.executable, str(script)]
    if script.name == "compose_pattern.py":
        args += ["--png", str(tmp_path / "pattern.png")]
    proc = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_has_a_docstring(script: Path):
    import ast

    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc and len(doc.splitlines()) >= 2, f"{script.name} needs a docstring saying what it shows"


def test_property_example_runs_under_pytest(tmp_path: Path):
    script = REPO / "examples" / "property_test_new_strategy.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(script)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout
