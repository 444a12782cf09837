"""Tensors in, tensors out: the NSA branches, block scoring / top-k and the paths they run on."""

from .dense import dense_masked_attention
from .flex import SlowPathError, flex

__all__ = ["SlowPathError", "dense_masked_attention", "flex"]
