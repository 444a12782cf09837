"""Tensors in, tensors out: the NSA branches, block scoring / top-k and the paths they run on."""

from .branches import compressed_attention, selected_attention, sliding_window_attention
from .compress import compression_blocks, mean_pool, num_compressed_blocks  # the latter from masks, for modules
from .decode import (append_to_cache, cached_attention, compiled_nsa_decode, nsa_decode, rotary_at, update_compressed,
                     write_cache)
from .dense import dense_masked_attention
from .flex import SlowPathError, enable_small_block_kernels, flex, kernel_options_for
from .nsa import nsa_attention
from .selection import overlap_weights, select_blocks

__all__ = [
    "SlowPathError",
    "append_to_cache",
    "cached_attention",
    "compiled_nsa_decode",
    "compressed_attention",
    "compression_blocks",
    "dense_masked_attention",
    "enable_small_block_kernels",
    "flex",
    "kernel_options_for",
    "mean_pool",
    "nsa_attention",
    "nsa_decode",
    "num_compressed_blocks",
    "overlap_weights",
    "rotary_at",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "update_compressed",
    "write_cache",
]
