"""nsa_flex: composable FlexAttention sparse-attention masks, and Native Sparse Attention built from them."""

from . import functional, masks, modules, scores

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "masks", "modules", "scores", "testing"]
