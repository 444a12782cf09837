"""The GQA-folded selection BlockMask (rows t*G + g) equals create_block_mask of its mask_mod, block for block
(kv and q side, partial and full), at the tiles the selection branch folds into."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from nsa_flex import masks
from nsa_flex.functional.branches import SELECTION_TILE_ROWS
from nsa_flex.masks.selection import fine_selection_mod

from .test_selection import assert_same_block_mask


@given(
    G=st.sampled_from([1, 2, 3, 4, 6, 16]),
    min_rows=st.sampled_from([SELECTION_TILE_ROWS, 40]),  # the branch's tiles, and tiles of several tokens at G=16
    tokens=st.integers(1, 90),
    n=st.integers(1, 5),
    block=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_folded_block_mask_equals_create_block_mask(G, min_rows, tokens, n, block, seed):
    gen = torch.Generator().manual_seed(seed)
    num_kv = -(-tokens // block)
    idx = torch.randint(-1, num_kv, (2, 2, tokens, n), generator=gen)
    idx[..., 0] = 0  # shared choices make full blocks appear
    q_block = G * math.ceil(min_rows / G)  # whole tokens per tile, as selected_attention folds: 18 rows at G=3
    rows = tokens * G
    got = masks.block_mask_from_indices(idx, rows, tokens, block, q_block, rows_per_token=G)
    want = create_block_mask(fine_selection_mod(idx, block, 1, G), 2, 2, rows, tokens, device="cpu",
                             BLOCK_SIZE=(q_block, block))
    assert_same_block_mask(got, want)


def test_folded_layout_rejects_inconsistent_sizes():
    idx = torch.zeros(1, 1, 10, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="rows_per_token"):
        masks.block_mask_from_indices(idx, 40, 10, 16, 30, rows_per_token=4)
    with pytest.raises(ValueError, match="rows_per_token"):
        masks.block_mask_from_indices(idx, 40, 10, 16, 32, group_size=2, rows_per_token=4)


def test_transposed_block_lists_trace_into_one_graph():
    """The query-side lists are built with static shapes, so a user's fullgraph compile traces them."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 7, (1, 2, 100, 4), generator=gen)
    idx[..., 0] = 0

    def lists(idx):
        bm = masks.block_mask_from_indices(idx, 400, 100, 16, 16, rows_per_token=4)
        return bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices

    compiled = torch.compile(lists, fullgraph=True, backend="aot_eager")(idx)
    for got, want in zip(compiled, lists(idx)):
        assert torch.equal(got, want)
