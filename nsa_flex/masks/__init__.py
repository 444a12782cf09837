"""What may attend to what: composable FlexAttention mask_mods. Pure index arithmetic, no nn.Module."""

from .compressed import compressed_causal, num_compressed_blocks
from .layouts import (
    bigbird,
    bigbird_layout,
    block_layout,
    fixed,
    fixed_layout,
    longformer,
    longformer_layout,
    variable,
    variable_layout,
)
from .mask import Extent, Mask, as_mask
from .selection import block_mask_from_indices, fine_selection, materialize
from .spatial import neighborhood
from .static import causal, chunked, dilated, document, full, global_tokens, prefix_lm, sliding_window

__all__ = [
    "Extent",
    "Mask",
    "as_mask",
    "bigbird",
    "bigbird_layout",
    "block_layout",
    "block_mask_from_indices",
    "causal",
    "chunked",
    "compressed_causal",
    "dilated",
    "document",
    "fine_selection",
    "fixed",
    "fixed_layout",
    "full",
    "global_tokens",
    "longformer",
    "longformer_layout",
    "materialize",
    "neighborhood",
    "num_compressed_blocks",
    "prefix_lm",
    "sliding_window",
    "variable",
    "variable_layout",
]
