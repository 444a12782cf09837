"""Tensors in, tensors out: the NSA branches, block scoring / top-k and the paths they run on."""

from .branches import compressed_attention, selected_attention, sliding_window_attention
from .compress import compression_blocks, mean_pool
from .dense import dense_masked_attention
from .flex import SlowPathError, enable_small_block_kernels, flex
from .nsa import nsa_attention
from .selection import overlap_weights, select_blocks

__all__ = [
    "SlowPathError",
    "compressed_attention",
    "compression_blocks",
    "dense_masked_attention",
    "enable_small_block_kernels",
    "flex",
    "mean_pool",
    "nsa_attention",
    "overlap_weights",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
