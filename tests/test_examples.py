"""Every script in examples/ runs as written (as a user would run it) and exits 0; bad arguments give one line
on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_example

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


@pytest.mark.parametrize(
    "script, argv, fragment",
    [
        ("generate", ["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        ("generate", ["--top-k", "0"], "--top-k must be >= 1, got 0"),
        ("generate", ["--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
        ("generate", ["--checkpoint", "/nonexistent.pt"], "--checkpoint: cannot read '/nonexistent.pt'"),
        ("generate", ["--checkpoint", "{json}"], "is not a checkpoint torch.load(weights_only=True) can read"),
        ("generate", ["--prompt", ""], "--prompt must not be empty"),
        ("generate", ["--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
        ("compose_pattern", ["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        ("compose_pattern", ["--block-size", "-1"], "--block-size must be >= 1, got -1"),
        ("compose_pattern", ["--png", "/nonexistent/x.png"], "--png: no directory '/nonexistent'"),
        ("compose_pattern", ["--png", "x.txt"], "argument --png: expected a file name ending in .png"),
        ("compose_pattern", ["--seq-len", "100000"], "too many to draw"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, script, argv, fragment):
    json_file = tmp_path / "config.json"
    json_file.write_text('{"config": {}}')
    argv = [str(json_file) if a == "{json}" else a for a in argv]
    try:
        code = load_example(script).main(argv)
    except SystemExit as exit_:  # argparse's own errors exit, one line like the others
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and fragment in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_generate_on_cuda_without_cuda_is_a_one_line_error(capsys):
    assert load_example("generate").main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err == "generate.py: error: --device cuda: CUDA is not available\n"
