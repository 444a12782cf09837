"""Block layouts: layouts == loop definitions of DeepSpeed's sparsity_config semantics, dense form == the layout
expanded to tokens (and causal for unidirectional), FlexAttention == float64 dense, seeded randomness, reprs,
argument errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst

ATTENTION = st.sampled_from(["bidirectional", "unidirectional"])


# -- loop definitions (DeepSpeed sparsity_config semantics, as documented in nsa_flex.masks.layouts) ---------
def ref_fixed(nb, L, G, attention, H=1, per_head=False, horizontal=False, P=1):
    out = np.zeros((H if per_head else 1, nb, nb), dtype=bool)
    uni = attention == "unidirectional"
    for h in range(out.shape[0]):
        lay = out[h]
        for w in range(0, nb, L):  # local windows
            for r in range(w, min(w + L, nb)):
                for c in range(w, min(w + L, nb)):
                    if not uni or c <= r:
                        lay[r, c] = True
        first = L - (1 + h % P) * G
        globals_ = []
        full_end = nb - nb % L
        for i in range(first, full_end, L):
            globals_ += list(range(i, i + G))
        if full_end < nb:
            start = max(0, min(full_end + first, nb - G))
            globals_ += list(range(start, min(start + G, nb)))
        for g in globals_:
            for r in range(nb):
                if not uni or r >= g:
                    lay[r, g] = True
                if horizontal:
                    lay[g, r] = True
        if uni:
            out[h] = np.tril(lay)
    return out


def ref_local_windows(nb, sizes, uni):
    lay = np.zeros((nb, nb), dtype=bool)
    start, k = 0, 0
    while start < nb:
        size = sizes[min(k, len(sizes) - 1)]
        for r in range(start, min(start + size, nb)):
            for c in range(start, min(start + size, nb)):
                if not uni or c <= r:
                    lay[r, c] = True
        start, k = start + size, k + 1
    return lay


def ref_variable_without_random(nb, windows, starts, ends, attention, horizontal):
    uni = attention == "unidirectional"
    lay = ref_local_windows(nb, windows, uni)
    ranges = [(s, s + 1) for s in starts] if ends is None else list(zip(starts, ends))
    for s, e in ranges:
        for g in range(s, min(e, nb)):
            for r in range(nb):
                if not uni or r >= g:
                    lay[r, g] = True
                if horizontal:
                    lay[g, r] = True
    return np.tril(lay) if uni else lay


def ref_bigbird_without_random(nb, W, G, attention):
    lay = np.zeros((nb, nb), dtype=bool)
    for r in range(nb):
        for c in range(nb):
            lay[r, c] = abs(r - c) <= W // 2 or r < G or c < G
    return np.tril(lay) if attention == "unidirectional" else lay


def ref_longformer(nb, W, starts, ends, attention):
    lay = np.zeros((nb, nb), dtype=bool)
    ranges = [(s, s + 1) for s in starts] if ends is None else list(zip(starts, ends))
    glob = {g for s, e in ranges for g in range(s, min(e, nb))}
    for r in range(nb):
        for c in range(nb):
            lay[r, c] = abs(r - c) <= W // 2 or r in glob or c in glob
    return np.tril(lay) if attention == "unidirectional" else lay


def expand(layout, block_size, q_len, kv_len):
    """Token-level form of a block layout, [..., q_len, kv_len]."""
    lay = np.asarray(layout)
    return lay.repeat(block_size, -2).repeat(block_size, -1)[..., :q_len, :kv_len]


def check_mask(mask, layout, block_size, attention, shape, seq_len):
    """mask.to_dense == the expanded layout (& causal) and flex == dense attention, for q_len == kv_len == seq_len."""
    assert mask.extent.heads in (None, shape.heads)
    dense = mask.to_dense(seq_len, seq_len, B=shape.batch, H=shape.heads).numpy()
    want = expand(layout, block_size, seq_len, seq_len)[None]  # [1, H|1, T, T]
    if attention == "unidirectional":
        want = want & np.tril(np.ones((seq_len, seq_len), dtype=bool))
    want = np.broadcast_to(want, dense.shape)
    bad = np.argwhere(dense != want)
    assert bad.size == 0, f"{mask!r}: dense form differs from the layout at (b, h, t, j) = {bad[:5].tolist()}"
    assert_matches_dense(
        mask, seq_len, seq_len, batch=shape.batch, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size,
    )


# -- fixed ------------------------------------------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True), data=st.data())
def test_fixed_matches_deepspeed_semantics_and_dense(shape, data):
    T, bs = shape.q_len, data.draw(st.sampled_from([8, 16, 32, 64]))
    L = data.draw(st.integers(1, 6))
    G = data.draw(st.sampled_from([g for g in range(1, L + 1) if L % g == 0]))
    attention = data.draw(ATTENTION)
    per_head = data.draw(st.booleans())
    H = shape.heads if per_head else 1
    P = data.draw(st.integers(1, L // G)) if per_head else 1
    horizontal = attention == "bidirectional" and data.draw(st.booleans())
    mask = masks.fixed(T, bs, L, G, attention, H, per_head, horizontal_global_attention=horizontal,
                       num_different_global_patterns=P)
    layout = masks.fixed_layout(T, bs, L, G, attention, H, per_head, horizontal_global_attention=horizontal,
                                num_different_global_patterns=P)
    nb = math.ceil(T / bs)
    np.testing.assert_array_equal(layout.numpy(), ref_fixed(nb, L, G, attention, H, per_head, horizontal, P))
    assert mask.extent.heads == (H if per_head else None)
    check_mask(mask, layout.numpy() if per_head else layout[0].numpy(), bs, attention, shape, T)


def test_fixed_small_example():
    # 6 blocks, windows of 3, last block of each window global (bidirectional).
    lay = masks.fixed_layout(6 * 16, 16, num_local_blocks=3, num_global_blocks=1)[0].int().tolist()
    assert lay == [
        [1, 1, 1, 0, 0, 1],
        [1, 1, 1, 0, 0, 1],
        [1, 1, 1, 0, 0, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ]


# -- variable ---------------------------------------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True), data=st.data())
def test_variable_matches_deepspeed_semantics_and_dense(shape, data):
    T, bs = shape.q_len, data.draw(st.sampled_from([8, 16, 32, 64]))
    nb = math.ceil(T / bs)
    windows = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    starts = data.draw(st.lists(st.integers(0, nb + 2), max_size=4))
    ends = [s + data.draw(st.integers(1, 3)) for s in starts] if data.draw(st.booleans()) else None
    attention = data.draw(ATTENTION)
    horizontal = attention == "bidirectional" and data.draw(st.booleans())
    R = data.draw(st.integers(0, min(nb, 3)))
    per_head = data.draw(st.booleans())
    H = shape.heads if per_head else 1
    seed = data.draw(st.integers(0, 100))
    kw = dict(global_block_end_indices=ends, horizontal_global_attention=horizontal, num_heads=H,
              different_layout_per_head=per_head)
    layout = masks.variable_layout(T, bs, R, windows, starts, attention, seed, **kw).numpy()
    base = ref_variable_without_random(nb, windows, starts, ends, attention, horizontal)
    check_random_part(layout, base, R, attention)
    mask = masks.variable(T, bs, R, windows, starts, attention, seed, **kw)
    check_mask(mask, layout if per_head else layout[0], bs, attention, shape, T)


def check_random_part(layout, base, R, attention):
    """layout = base | random blocks, every row has its own min(R, allowed) distinct random blocks."""
    assert layout.dtype == bool
    assert (layout >= base).all(), "a deterministic block is missing"
    extra = layout & ~base
    nb = base.shape[-1]
    allowed = np.arange(nb) + 1 if attention == "unidirectional" else np.full(nb, nb)
    assert (extra.sum(-1) <= np.minimum(R, allowed)).all(), "more random blocks than asked for"
    # A row with fewer extra blocks must have had its random picks inside the deterministic part.
    assert (layout.sum(-1) >= np.minimum(R, allowed)).all()
    if attention == "unidirectional":
        assert not np.triu(layout, 1).any()


def test_variable_small_example():
    lay = masks.variable_layout(7 * 16, 16, 0, local_window_blocks=[1, 2], global_block_indices=[5])[0]
    want = np.zeros((7, 7), dtype=bool)
    for blocks in ([0], [1, 2], [3, 4], [5, 6]):
        want[np.ix_(blocks, blocks)] = True
    want[:, 5] = True
    np.testing.assert_array_equal(lay.numpy(), want)


# -- bigbird ----------------------------------------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True), data=st.data())
def test_bigbird_matches_deepspeed_semantics_and_dense(shape, data):
    T, bs = shape.q_len, data.draw(st.sampled_from([8, 16, 32, 64]))
    nb = math.ceil(T / bs)
    R = data.draw(st.integers(0, min(nb, 4)))
    W = data.draw(st.integers(1, min(nb, 7)))
    G = data.draw(st.integers(0, min(nb, 2)))
    attention = data.draw(ATTENTION)
    per_head = data.draw(st.booleans())
    H = shape.heads if per_head else 1
    seed = data.draw(st.integers(0, 100))
    layout = masks.bigbird_layout(T, bs, R, W, G, attention, H, per_head, seed).numpy()
    assert layout.shape == (H if per_head else 1, nb, nb)
    check_random_part(layout, ref_bigbird_without_random(nb, W, G, attention), R, attention)
    mask = masks.bigbird(T, bs, R, W, G, attention, H, per_head, seed)
    check_mask(mask, layout if per_head else layout[0], bs, attention, shape, T)


@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_bigbird_random_blocks_are_exactly_r_distinct_per_row(attention):
    # With a 1-block window and no global block the layout is diag | random: row r has its min(R, allowed)
    # random blocks, plus the diagonal if it was not drawn.
    R, nb = 3, 20
    lay = masks.bigbird_layout(nb * 16, 16, R, 1, 0, attention, num_heads=4, different_layout_per_head=True,
                               seed=7).numpy()
    allowed = np.arange(nb) + 1 if attention == "unidirectional" else np.full(nb, nb)
    off_diag = lay & ~np.eye(nb, dtype=bool)
    count = lay.sum(-1)
    r = np.minimum(R, allowed)
    assert ((count == r) | (count == r + 1)).all()
    assert (off_diag.sum(-1) <= r).all()
    assert not all((lay[0] == lay[h]).all() for h in range(1, 4)), "heads should draw different random blocks"


def test_random_layouts_are_seeded_and_reproducible():
    a = masks.bigbird_layout(1024, 16, num_random_blocks=3, seed=5)
    b = masks.bigbird_layout(1024, 16, num_random_blocks=3, seed=5)
    c = masks.bigbird_layout(1024, 16, num_random_blocks=3, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(123)  # the global RNG plays no part
    d = masks.variable_layout(1024, 16, num_random_blocks=2, seed=5)
    torch.manual_seed(999)
    e = masks.variable_layout(1024, 16, num_random_blocks=2, seed=5)
    assert torch.equal(d, e)
    m1, m2 = masks.bigbird(1024, num_random_blocks=2, seed=1), masks.bigbird(1024, num_random_blocks=2, seed=1)
    assert torch.equal(m1.to_dense(1024, 1024), m2.to_dense(1024, 1024))


# -- longformer -------------------------------------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True), data=st.data())
def test_longformer_matches_deepspeed_semantics_and_dense(shape, data):
    T, bs = shape.q_len, data.draw(st.sampled_from([8, 16, 32, 64]))
    nb = math.ceil(T / bs)
    W = data.draw(st.integers(1, min(nb, 7)))
    starts = data.draw(st.lists(st.integers(0, nb + 2), max_size=4))
    ends = [s + data.draw(st.integers(1, 3)) for s in starts] if data.draw(st.booleans()) else None
    attention = data.draw(ATTENTION)
    layout = masks.longformer_layout(T, bs, W, starts, attention, global_block_end_indices=ends).numpy()
    np.testing.assert_array_equal(layout[0], ref_longformer(nb, W, starts, ends, attention))
    mask = masks.longformer(T, bs, W, starts, attention, global_block_end_indices=ends)
    assert mask.extent.heads is None
    check_mask(mask, layout[0], bs, attention, shape, T)


# -- block_layout -----------------------------------------------------------------------------------------------
@given(shape=nst.shapes(), data=st.data())
def test_block_layout_matches_definition_and_dense(shape, data):
    """Rectangular and per-head layouts, q_len != kv_len, int or bool layouts."""
    bs = data.draw(st.sampled_from([4, 16, 32, 64, 128]))
    nq = math.ceil(shape.q_len / bs) + data.draw(st.integers(0, 2))
    nkv = math.ceil(shape.kv_len / bs) + data.draw(st.integers(0, 2))
    per_head = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    size = (shape.heads, nq, nkv) if per_head else (nq, nkv)
    layout = torch.rand(size, generator=gen) < data.draw(st.sampled_from([0.1, 0.5, 0.9]))
    dtype = data.draw(st.sampled_from([torch.bool, torch.int64, torch.int32, torch.uint8]))
    mask = masks.block_layout(layout.to(dtype), bs)
    assert mask.extent.heads == (shape.heads if per_head else None)
    dense = mask.to_dense(shape.q_len, shape.kv_len, B=shape.batch, H=shape.heads).numpy()
    lay = layout.numpy()
    b, h, t, j = np.ogrid[: shape.batch, : shape.heads, : shape.q_len, : shape.kv_len]
    want = lay[h, t // bs, j // bs] if per_head else lay[t // bs, j // bs]
    np.testing.assert_array_equal(dense, np.broadcast_to(want, dense.shape))
    assert_matches_dense(mask, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads,
                         kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size)


def test_block_layout_copies_the_layout():
    layout = torch.eye(3, dtype=torch.bool)
    mask = masks.block_layout(layout, 4)
    before = mask.to_dense(12, 12)
    layout.fill_(True)
    assert torch.equal(mask.to_dense(12, 12), before)


# -- unidirectional is causal at token level ----------------------------------------------------------------
@pytest.mark.parametrize(
    "mask",
    [
        masks.fixed(100, 16, num_global_blocks=2, attention="unidirectional"),
        masks.variable(100, 16, 3, [2], [0, 3], attention="unidirectional", global_block_end_indices=[2, 5]),
        masks.bigbird(100, 16, 2, 3, 2, attention="unidirectional"),
        masks.longformer(100, 16, 5, [1, 4], attention="unidirectional"),
    ],
    ids=repr,
)
def test_unidirectional_is_exactly_causal(mask):
    dense = mask.to_dense(100, 100)[0, 0]
    assert not dense.triu(1).any()
    assert dense.diagonal().all()  # every block sees itself (local window / sliding window)


# -- reprs ------------------------------------------------------------------------------------------------------
def test_reprs_read_like_calls():
    assert repr(masks.bigbird(1024, block_size=64)) == "bigbird(1024, block_size=64)"
    assert repr(masks.bigbird(1024, 64, 2, attention="unidirectional", seed=3)) == (
        "bigbird(1024, block_size=64, num_random_blocks=2, attention='unidirectional', seed=3)"
    )
    assert repr(masks.fixed(256)) == "fixed(256)"
    assert repr(masks.fixed(256, num_local_blocks=8, num_global_blocks=2)) == (
        "fixed(256, num_local_blocks=8, num_global_blocks=2)"
    )
    assert repr(masks.variable(512, local_window_blocks=[2, 4])) == "variable(512, local_window_blocks=[2, 4])"
    assert repr(masks.longformer(512, 32, 5, (0, 7))) == (
        "longformer(512, block_size=32, num_sliding_window_blocks=5, global_block_indices=[0, 7])"
    )
    assert repr(masks.block_layout(torch.ones(2, 3, 4, dtype=torch.bool), 16)) == (
        "block_layout(<layout [2, 3, 4]>, block_size=16)"
    )
    assert repr(masks.fixed(256, attention="unidirectional") & masks.sliding_window(8)) == (
        "fixed(256, attention='unidirectional') & sliding_window(8)"
    )


@pytest.mark.parametrize(
    "mask",
    [
        masks.fixed(200, 32, 2, 2, "unidirectional"),
        masks.fixed(160, 16, 4, 1, "bidirectional", 3, True, horizontal_global_attention=True,
                    num_different_global_patterns=4),
        masks.variable(300, 16, 2, [1, 3], [0, 9], "unidirectional", 11, global_block_end_indices=[2, 12]),
        masks.bigbird(250, 32, 2, 5, 1, "bidirectional", 2, True, 9),
        masks.longformer(130, 8, 3, [1, 4], "unidirectional"),
    ],
    ids=repr,
)
def test_repr_rebuilds_the_same_mask(mask):
    rebuilt = eval(repr(mask), vars(masks))
    T = 128
    H = mask.extent.heads
    assert torch.equal(rebuilt.to_dense(T, T, H=H), mask.to_dense(T, T, H=H))
    assert repr(rebuilt) == repr(mask)


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: masks.block_layout(torch.ones(2, 2), 16), TypeError, "layout"),
        (lambda: masks.block_layout([[1, 0], [0, 1]], 16), TypeError, "layout"),
        (lambda: masks.block_layout(torch.ones(4, dtype=torch.bool), 16), ValueError, "layout"),
        (lambda: masks.block_layout(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16), ValueError, "layout"),
        (lambda: masks.block_layout(torch.ones(0, 2, dtype=torch.bool), 16), ValueError, "layout"),
        (lambda: masks.block_layout(torch.ones(2, 2, dtype=torch.bool), 0), ValueError, "block_size"),
        (lambda: masks.fixed(0), ValueError, "seq_len"),
        (lambda: masks.fixed(128, block_size=0), ValueError, "block_size"),
        (lambda: masks.fixed(128, block_size=16.0), TypeError, "block_size"),
        (lambda: masks.fixed(128, num_local_blocks=4, num_global_blocks=3), ValueError, "num_global_blocks"),
        (lambda: masks.fixed(128, attention="causal"), ValueError, "attention"),
        (lambda: masks.fixed(128, attention=1), TypeError, "attention"),
        (lambda: masks.fixed(128, attention="unidirectional", horizontal_global_attention=True), ValueError,
         "horizontal_global_attention"),
        (lambda: masks.fixed(128, num_different_global_patterns=2), ValueError, "different_layout_per_head"),
        (lambda: masks.fixed(128, num_heads=2, different_layout_per_head=True, num_different_global_patterns=5),
         ValueError, "num_different_global_patterns"),
        (lambda: masks.fixed(128, different_layout_per_head=1), TypeError, "different_layout_per_head"),
        (lambda: masks.fixed(128, num_heads=0), ValueError, "num_heads"),
        (lambda: masks.variable(128, num_random_blocks=-1), ValueError, "num_random_blocks"),
        (lambda: masks.variable(128, num_random_blocks=9), ValueError, "num_random_blocks"),
        (lambda: masks.variable(128, local_window_blocks=[]), ValueError, "local_window_blocks"),
        (lambda: masks.variable(128, local_window_blocks=[2, 0]), ValueError, r"local_window_blocks\[1\]"),
        (lambda: masks.variable(128, local_window_blocks=4), TypeError, "local_window_blocks"),
        (lambda: masks.variable(128, global_block_indices=[-1]), ValueError, "global_block_indices"),
        (lambda: masks.variable(128, global_block_indices=[0, 1], global_block_end_indices=[1]), ValueError,
         "global_block_end_indices"),
        (lambda: masks.variable(128, global_block_indices=[3], global_block_end_indices=[3]), ValueError,
         "global_block_end_indices"),
        (lambda: masks.variable(128, seed=-1), ValueError, "seed"),
        (lambda: masks.variable(128, seed=1.5), TypeError, "seed"),
        (lambda: masks.bigbird(128, num_random_blocks=9), ValueError, "num_random_blocks"),
        (lambda: masks.bigbird(128, num_sliding_window_blocks=0), ValueError, "num_sliding_window_blocks"),
        (lambda: masks.bigbird(32, num_sliding_window_blocks=3), ValueError, "num_sliding_window_blocks"),
        (lambda: masks.bigbird(128, num_global_blocks=9), ValueError, "num_global_blocks"),
        (lambda: masks.bigbird(128, seed="1"), TypeError, "seed"),
        (lambda: masks.longformer(128, num_sliding_window_blocks=-3), ValueError, "num_sliding_window_blocks"),
        (lambda: masks.longformer(128, global_block_indices=["0"]), TypeError, r"global_block_indices\[0\]"),
        (lambda: masks.longformer(128, attention="forward"), ValueError, "attention"),
        (lambda: masks.fixed(128, device="bogus"), ValueError, "device must be a valid device string"),
        (lambda: masks.bigbird(128, device=3), TypeError, "device"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        make()


@pytest.mark.parametrize(
    "mask",
    [masks.fixed(128), masks.variable(128), masks.bigbird(128), masks.longformer(128)],
    ids=repr,
)
def test_layout_masks_need_self_attention_lengths(mask):
    with pytest.raises(ValueError, match="q_len == kv_len.*q_len=64, kv_len=96"):
        mask.to_dense(64, 96)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        mask.to_block_mask(96, 64)
    with pytest.raises(ValueError, match="q_len=129"):  # longer than the layout
        mask.to_dense(129, 129)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        assert_matches_dense(mask, 64, 65)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
@pytest.mark.parametrize("make", [masks.fixed, masks.variable, masks.bigbird, masks.longformer])
def test_a_cuda_device_without_cuda_names_device(make):
    """torch's "Torch not compiled with CUDA enabled" AssertionError had come from moving the layout."""
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        make(128, device="cuda")


def test_block_layout_rejects_lengths_beyond_the_layout():
    mask = masks.block_layout(torch.ones(2, 3, dtype=torch.bool), 16)
    mask.to_dense(32, 48)  # rectangular is fine
    with pytest.raises(ValueError, match="kv_len=49"):
        mask.to_dense(32, 49)
    with pytest.raises(ValueError, match="q_len=33"):
        mask.to_block_mask(33, 48)


def test_per_head_layouts_reject_other_head_counts():
    per_head = masks.bigbird(128, num_heads=4, different_layout_per_head=True)
    with pytest.raises(ValueError, match="H=4.*H=2"):
        per_head.to_dense(128, 128, H=2)
    with pytest.raises(ValueError, match="heads=4.*heads=2"):
        per_head & masks.block_layout(torch.ones(2, 8, 8, dtype=torch.bool), 16)
