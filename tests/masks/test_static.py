"""Static generators: dense form == an independent numpy definition (docs/design.md "Exact semantics"),
FlexAttention == float64 dense attention on Hypothesis-drawn shapes, and argument errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.functional import flex
from nsa_flex.testing import assert_matches_dense, dense_attention
from nsa_flex.testing import strategies as nst


def grid(shape):
    """numpy index grids b [B,1,1,1], h [1,H,1,1], t [1,1,Q,1], j [1,1,1,KV]."""
    return np.ogrid[: shape.batch, : shape.heads, : shape.q_len, : shape.kv_len]


def check(mask, expected, shape):
    """The mask's dense form equals ``expected`` (numpy, broadcastable) and flex matches dense attention."""
    dense = mask.to_dense(shape.q_len, shape.kv_len, B=shape.batch, H=shape.heads).numpy()
    want = np.broadcast_to(expected, dense.shape)
    bad = np.argwhere(dense != want)
    assert bad.size == 0, f"{mask!r}: dense form differs from its definition at (b, h, t, j) = {bad[:5].tolist()}"
    assert_matches_dense(
        mask, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, block_size=shape.block_size,
    )


# -- one property test per generator: (mask, numpy definition) drawn together ----------------------------------
@st.composite
def static_case(draw, kind, shape):
    b, h, t, j = grid(shape)
    if kind == "causal":
        return masks.causal(), j <= t
    if kind == "full":
        return masks.full(), np.ones_like(j <= t)
    if kind == "sliding_window":
        w = draw(st.integers(1, 2 * max(shape.q_len, shape.kv_len)))
        return masks.sliding_window(w), (t - w < j) & (j <= t)
    if kind == "chunked":
        c = draw(st.integers(1, 100))
        return masks.chunked(c), t // c == j // c
    if kind == "dilated":
        w, d = draw(st.integers(1, 12)), draw(st.integers(1, 8))
        diff = t - j
        return masks.dilated(w, d), np.isin(diff, [k * d for k in range(w)])
    if kind == "global_tokens":
        g = draw(st.integers(1, 40))
        return masks.global_tokens(g), (t < g) | (j < g)
    if kind == "prefix_lm":
        p = draw(st.integers(0, 300))
        return masks.prefix_lm(p), (j < p) | (j <= t)
    if kind == "prefix_lm_per_batch":
        p = np.array(draw(st.lists(st.integers(0, 300), min_size=shape.batch, max_size=shape.batch)))
        return masks.prefix_lm(torch.tensor(p)), (j < p[b]) | (j <= t)
    if kind in ("document", "document_per_batch"):
        n = max(shape.q_len, shape.kv_len) + draw(st.integers(0, 5))
        num_docs = draw(st.integers(1, 8))
        rows = shape.batch if kind == "document_per_batch" else 1
        ids = np.sort(np.array(draw(st.lists(st.integers(0, num_docs - 1), min_size=rows * n, max_size=rows * n))).reshape(rows, n), -1)
        if kind == "document":
            return masks.document(torch.tensor(ids[0])), ids[0][t] == ids[0][j]
        return masks.document(torch.tensor(ids)), ids[b, t] == ids[b, j]
    raise AssertionError(kind)


KINDS = ["causal", "full", "sliding_window", "chunked", "dilated", "global_tokens", "prefix_lm",
         "prefix_lm_per_batch", "document", "document_per_batch"]


@pytest.mark.parametrize("kind", KINDS)
@given(shape=nst.shapes(), data=st.data())
def test_generator_matches_definition_and_dense(kind, shape, data):
    mask, expected = data.draw(static_case(kind, shape))
    check(mask, expected, shape)


def test_sliding_window_is_flash_attn_window():
    # w keys including t itself: flash-attn window_size=(w - 1, 0).
    dense = masks.sliding_window(3).to_dense(6, 6)[0, 0]
    assert dense[5].tolist() == [False, False, False, True, True, True]
    assert dense[0].tolist() == [True] + [False] * 5
    assert int(dense.sum(-1).max()) == 3


def test_reprs_read_like_calls():
    assert repr(masks.causal()) == "causal()"
    assert repr(masks.full()) == "full()"
    assert repr(masks.sliding_window(256)) == "sliding_window(256)"
    assert repr(masks.chunked(64)) == "chunked(64)"
    assert repr(masks.dilated(8, 2)) == "dilated(8, 2)"
    assert repr(masks.global_tokens(4)) == "global_tokens(4)"
    assert repr(masks.prefix_lm(10)) == "prefix_lm(10)"
    assert repr(masks.prefix_lm(torch.tensor([1, 2]))) == "prefix_lm(<tensor of 2>)"
    assert repr(masks.document(torch.zeros(2, 5, dtype=torch.long))) == "document(<ids [2, 5]>)"


def test_data_dependent_masks_know_their_batch():
    ids = torch.zeros(3, 10, dtype=torch.long)
    assert masks.document(ids).extent.batch == 3
    assert masks.document(ids).to_dense(10, 10).shape == (3, 1, 10, 10)
    assert masks.prefix_lm(torch.tensor([1, 2])).extent.batch == 2


# -- fully masked rows ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask",
    [masks.sliding_window(4) & ~masks.causal(), ~masks.full(), masks.causal() & ~masks.global_tokens(5)],
    ids=repr,
)
def test_fully_masked_rows_give_zero_not_nan(mask):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) for _ in range(3))
    out, lse = flex(q, k, v, block_mask=mask.to_block_mask(37, 37, device="cpu", block_size=16), return_lse=True)
    empty = ~mask.to_dense(37, 37, B=1, H=2).any(-1)
    assert empty.any()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all()
    ref, ref_lse = dense_attention(q, k, v, mask=mask, return_lse=True)
    assert (ref[empty] == 0).all() and torch.isneginf(ref_lse[empty]).all()
    assert_matches_dense(mask, 37, 37, block_size=16)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: masks.sliding_window(-3), ValueError, "window_size"),
        (lambda: masks.sliding_window(0), ValueError, "window_size"),
        (lambda: masks.sliding_window(2.5), TypeError, "window_size"),
        (lambda: masks.sliding_window(True), TypeError, "window_size"),
        (lambda: masks.chunked(0), ValueError, "chunk_size"),
        (lambda: masks.dilated(4, 0), ValueError, "dilation"),
        (lambda: masks.dilated(-1, 2), ValueError, "window_size"),
        (lambda: masks.global_tokens(0), ValueError, "num_global"),
        (lambda: masks.prefix_lm(-1), ValueError, "prefix_len"),
        (lambda: masks.prefix_lm("3"), TypeError, "prefix_len"),
        (lambda: masks.prefix_lm(torch.tensor([1.0, 2.0])), TypeError, "prefix_len"),
        (lambda: masks.prefix_lm(torch.tensor([[1, 2]])), ValueError, "prefix_len"),
        (lambda: masks.prefix_lm(torch.tensor([1, -2])), ValueError, "prefix_len"),
        (lambda: masks.document([0, 0, 1]), TypeError, "document_ids"),
        (lambda: masks.document(torch.zeros(5)), TypeError, "document_ids"),
        (lambda: masks.document(torch.zeros(1, 2, 5, dtype=torch.long)), ValueError, "document_ids"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        make()


def test_document_shorter_than_lengths_is_rejected():
    m = masks.document(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_len=11"):
        m.to_dense(10, 11)
    with pytest.raises(ValueError, match="q_len=11"):
        m.to_block_mask(11, 5)


@pytest.mark.parametrize("q_len, kv_len, error", [(0, 5, ValueError), (5, -1, ValueError), (2.0, 3, TypeError),
                                                  ("4", 4, TypeError), (4, True, TypeError)])
def test_lengths_must_be_positive_ints(q_len, kv_len, error):
    """Out of range is a ValueError, not an int at all a TypeError (as for every argument)."""
    with pytest.raises(error, match="q_len|kv_len"):
        masks.causal().to_dense(q_len, kv_len)


def test_batch_mismatch_is_rejected_when_materializing():
    m = masks.prefix_lm(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="B=2.*B=3"):
        m.to_dense(4, 4, B=3)
