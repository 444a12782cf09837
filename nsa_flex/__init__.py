"""nsa_flex: composable FlexAttention sparse-attention masks, and Native Sparse Attention built from them."""

import importlib

from . import functional, masks, modules, scores

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "masks", "modules", "scores", "testing"]

# Submodules listed in __all__ but imported on first access (PEP 562): nothing imports ``testing`` at run time
# (docs/design.md), so ``import nsa_flex`` does not load the references and checking tools.
_LAZY = ("testing",)


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)  # also binds it here, so this runs once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
