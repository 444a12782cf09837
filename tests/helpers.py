"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples are scripts, not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
