"""The README's Python snippets run as written (in order, one namespace, as a reader pastes them), and print
what the README shows beside their ``print`` calls."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _shown_output(block: str) -> list[str]:
    """The output the README shows: the comment on a ``print(...)`` line, or the comment line right below it."""
    shown, lines = [], block.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("print("):
            if "#" in line:
                shown.append(line.split("#", 1)[1].strip())
            elif i + 1 < len(lines) and lines[i + 1].startswith("# "):
                shown.append(lines[i + 1][2:].strip())
    return shown


def test_readme_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "the README's tour and NSA snippets went missing"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README
        except Exception as err:  # pragma: no cover - the failure report
            pytest.fail(f"README python block {i} failed: {type(err).__name__}: {err}\n{block}")
    shown = [line for block in blocks for line in _shown_output(block)]
    assert shown, "the tour no longer shows what it prints"
    assert capsys.readouterr().out.splitlines() == shown
