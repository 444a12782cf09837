"""NSA fine selection: dense form == a loop definition (docs/design.md "Exact semantics"),
block_mask_from_indices == create_block_mask of the mask block for block, flex == float64 dense, rows with
nothing selected give 0, argument errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.functional import flex
from nsa_flex.testing import assert_matches_dense, dense_attention
from nsa_flex.testing import strategies as nst

BLOCKS = st.sampled_from([16, 32, 64, 128])


def ref_fine_selection(idx, block_size, group_size, q_len, kv_len):
    """Loop definition: query t of query head h sees j iff j // l' is among idx[b, h // G, t] and j <= t."""
    idx = idx.numpy()
    B, Hkv = idx.shape[:2]
    out = np.zeros((B, Hkv * group_size, q_len, kv_len), dtype=bool)
    for b in range(B):
        for h in range(Hkv * group_size):
            for t in range(q_len):
                chosen = {int(c) for c in idx[b, h // group_size, t] if c != -1}
                for c in chosen:
                    out[b, h, t, c * block_size : min((c + 1) * block_size, kv_len, t + 1)] = True
    return out


@st.composite
def selection_case(draw, max_len=300):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    q_len = draw(nst.lengths(max_len=max_len))
    T = q_len + draw(st.sampled_from([0, 0, 1, 7]))  # indices for more tokens than used
    kv_len = draw(st.one_of(st.just(q_len), nst.lengths(max_len=max_len)))
    bs, qbs = draw(BLOCKS), draw(BLOCKS)
    n = draw(st.integers(1, 5))
    idx = draw(nst.block_indices(B, Hkv, T, n, math.ceil(kv_len / bs)))
    return idx, bs, qbs, group, q_len, kv_len


@given(case=selection_case())
def test_fine_selection_matches_definition_and_dense(case):
    idx, bs, qbs, group, q_len, kv_len = case
    m = masks.fine_selection(idx, block_size=bs, group_size=group)
    B, Hkv = idx.shape[:2]
    assert (m.extent.batch, m.extent.heads) == (B, Hkv * group)
    np.testing.assert_array_equal(m.to_dense(q_len, kv_len).numpy(), ref_fine_selection(idx, bs, group, q_len, kv_len))
    assert_matches_dense(m, q_len, kv_len, kv_heads=Hkv, block_size=(qbs, bs))


def assert_same_block_mask(got, want):
    """Same block counts and, up to each count, the same block indices in the same order (kv and q side)."""
    assert got.BLOCK_SIZE == want.BLOCK_SIZE
    assert got.seq_lengths == want.seq_lengths
    pairs = [("kv", "kv_num_blocks", "kv_indices"), ("full kv", "full_kv_num_blocks", "full_kv_indices"),
             ("q", "q_num_blocks", "q_indices"), ("full q", "full_q_num_blocks", "full_q_indices")]
    for what, num_name, idx_name in pairs:
        num_got, num_want = getattr(got, num_name), getattr(want, num_name)
        assert torch.equal(num_got.long(), num_want.long()), f"{what} block counts differ"
        idx_got, idx_want = getattr(got, idx_name), getattr(want, idx_name)
        width = torch.arange(idx_want.shape[-1])
        used = width < num_want.long().unsqueeze(-1)
        assert torch.equal(idx_got.long()[..., : idx_want.shape[-1]][used], idx_want.long()[used]), (
            f"{what} block indices differ"
        )
        assert (idx_got >= 0).all() and (idx_got < idx_got.new_tensor(max(idx_got.shape[-1], 1))).all()


@given(case=selection_case())
def test_block_mask_from_indices_equals_create_block_mask(case):
    idx, bs, qbs, group, q_len, kv_len = case
    got = masks.block_mask_from_indices(idx, q_len, kv_len, block_size=bs, q_block_size=qbs, group_size=group)
    want = masks.fine_selection(idx, bs, group).to_block_mask(q_len, kv_len, block_size=(qbs, bs))
    assert_same_block_mask(got, want)
    # ... and it attends like the dense reference.
    B, Hkv = idx.shape[:2]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hkv * group, q_len, 16, generator=gen)
    k, v = (torch.randn(B, Hkv, kv_len, 16, generator=gen) for _ in range(2))
    out = flex(q, k, v, block_mask=got)
    ref = dense_attention(q, k, v, mask=masks.fine_selection(idx, bs, group))
    assert not torch.isnan(out).any()
    assert (out.double() - ref).abs().max() < 1e-5


def test_block_mask_from_indices_without_q_blocks():
    idx = torch.tensor([[[[0, 1], [1, -1], [0, 0], [-1, -1]]]]).repeat_interleave(16, dim=2)  # T = 64
    bm = masks.block_mask_from_indices(idx, 64, 64, block_size=16, q_block_size=32, compute_q_blocks=False)
    want = masks.fine_selection(idx, 16).to_block_mask(64, 64, block_size=(32, 16))
    assert bm.q_num_blocks is None
    assert torch.equal(bm.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, want.full_kv_num_blocks)


def test_small_example_by_hand():
    # T = 6, blocks of 2: token 5 selects blocks {0, 2} (and a duplicate, and -1); token 1 selects block 2.
    idx = torch.full((1, 1, 6, 3), -1)
    idx[0, 0, 5] = torch.tensor([2, 0, 2])
    idx[0, 0, 1] = torch.tensor([2, -1, -1])
    dense = masks.fine_selection(idx, block_size=2).to_dense(6, 6)[0, 0]
    assert dense[5].tolist() == [True, True, False, False, True, True]
    assert not dense[1].any()  # block 2 starts after token 1
    assert not dense[[0, 2, 3, 4]].any()


def test_rows_with_nothing_selected_give_zero_not_nan():
    idx = torch.full((1, 2, 50, 3), -1)
    idx[:, :, 20:, 0] = 0  # only tokens >= 20 select anything
    bm = masks.block_mask_from_indices(idx, 50, 50, block_size=16, q_block_size=16, group_size=2)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 50, 8, generator=gen)
    k, v = (torch.randn(1, 2, 50, 8, generator=gen) for _ in range(2))
    out, lse = flex(q, k, v, block_mask=bm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, :, :20] == 0).all() and torch.isneginf(lse[:, :, :20]).all()
    assert (out[:, :, 20:].abs().sum(-1) > 0).all()
    assert_matches_dense(masks.fine_selection(idx, 16, 2), 50, 50, kv_heads=2, block_size=16)


def test_repr():
    idx = torch.zeros(1, 2, 8, 4, dtype=torch.long)
    assert repr(masks.fine_selection(idx, 64)) == "fine_selection(<indices [1, 2, 8, 4]>, block_size=64)"
    assert repr(masks.fine_selection(idx, 32, group_size=4)) == (
        "fine_selection(<indices [1, 2, 8, 4]>, block_size=32, group_size=4)"
    )


# -- bad input --------------------------------------------------------------------------------------------------
IDX = torch.zeros(1, 2, 8, 4, dtype=torch.long)


@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: masks.fine_selection(IDX.float()), TypeError, "block_indices.*integer"),
        (lambda: masks.fine_selection(IDX.bool()), TypeError, "block_indices"),
        (lambda: masks.fine_selection(IDX.tolist()), TypeError, "block_indices"),
        (lambda: masks.fine_selection(IDX[0]), ValueError, "block_indices.*4 dimensions"),
        (lambda: masks.fine_selection(IDX[None]), ValueError, "block_indices.*4 dimensions"),
        (lambda: masks.fine_selection(IDX - 2), ValueError, "block_indices must be >= -1"),
        (lambda: masks.fine_selection(IDX, block_size=0), ValueError, "block_size"),
        (lambda: masks.fine_selection(IDX, group_size=0), ValueError, "group_size"),
        (lambda: masks.fine_selection(IDX, group_size=1.0), TypeError, "group_size"),
        (lambda: masks.fine_selection(IDX + 2, block_size=4).to_dense(8, 8), ValueError,
         r"block_indices must be < 2.*kv_len=8.*got maximum 2"),
        (lambda: masks.fine_selection(IDX).to_dense(9, 8), ValueError, "8 queries.*q_len=9"),
        (lambda: masks.fine_selection(IDX).to_dense(8, 8, B=2), ValueError, "B=1.*B=2"),
        (lambda: masks.fine_selection(IDX).to_dense(8, 8, H=4), ValueError, "H=2.*H=4"),
        (lambda: masks.block_mask_from_indices(IDX + 2, 8, 8, block_size=4), ValueError, "block_indices must be <"),
        (lambda: masks.block_mask_from_indices(IDX, 9, 8), ValueError, "q_len=9"),
        (lambda: masks.block_mask_from_indices(IDX, 8, 8, q_block_size=0), ValueError, "q_block_size"),
        (lambda: masks.block_mask_from_indices(IDX, 8, 8, block_size=0), ValueError, "block_size"),
        (lambda: masks.block_mask_from_indices(IDX.float(), 8, 8), TypeError, "block_indices"),
        (lambda: masks.block_mask_from_indices(IDX, 0, 8), ValueError, "q_len"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        make()


def test_materialize_is_an_exact_copy_that_traces():
    """masks.materialize: same values, dtype and strides, not the same storage; torch.compile traces it."""
    x = torch.arange(12, dtype=torch.int16).view(3, 4).t()
    y = masks.materialize(x)
    assert torch.equal(y, x) and y.dtype == x.dtype and y.stride() == x.stride()
    assert y.data_ptr() != x.data_ptr()
    compiled = torch.compile(lambda a: masks.materialize(a * 2) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), x * 2 + 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        masks.materialize([1, 2])


@pytest.mark.parametrize("q_len, error, fragment", [("8", TypeError, "q_len must be an int"),
                                                    (8.5, TypeError, "q_len must be an int"),
                                                    (0, ValueError, "q_len must be an int >= 1")])
def test_block_mask_from_indices_checks_lengths_before_using_them(q_len, error, fragment):
    idx = torch.zeros(1, 1, 8, 2, dtype=torch.long)
    with pytest.raises(error, match=fragment):
        masks.block_mask_from_indices(idx, q_len, 8, block_size=16, q_block_size=16)
