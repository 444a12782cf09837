"""neighborhood (2D, NATTEN; dilated as DiNAT): dense form == a list-based definition, FlexAttention == float64
dense attention on Hypothesis-drawn images, dilations, lengths and block sizes, the window's size and placement,
and argument errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.cli import parse_mask
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst


def axis_windows(size, kernel, dilation):
    """``[size, size]`` bool: key coordinate in query coordinate's window along one axis, by listing each
    query's sub-grid and taking ``kernel`` consecutive members of it, centred where they fit."""
    out = np.zeros((size, size), dtype=bool)
    for q in range(size):
        grid = list(range(q % dilation, size, dilation))
        i = grid.index(q)
        start = min(max(i - kernel // 2, 0), len(grid) - kernel)
        out[q, grid[start:start + kernel]] = True
    return out


@st.composite
def images(draw):
    """``(H, W, kh, kw, dh, dw, q_len, kv_len)``: dilations and kernels that fit, lengths up to ``H * W``."""
    H, W = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dh, dw = draw(st.integers(1, H)), draw(st.integers(1, W))
    kh, kw = draw(st.integers(1, H // dh)), draw(st.integers(1, W // dw))
    q_len, kv_len = (draw(st.integers(1, H * W)) for _ in range(2))
    return H, W, kh, kw, dh, dw, q_len, kv_len


@given(image=images(), shape=nst.shapes(max_len=1), data=st.data())
def test_matches_definition_and_dense_attention(image, shape, data):
    H, W, kh, kw, dh, dw, q_len, kv_len = image
    kernel = kh if kh == kw and data.draw(st.booleans()) else (kh, kw)
    dilation = dh if dh == dw and data.draw(st.booleans()) else [dh, dw]
    mask = masks.neighborhood(H, W, kernel, dilation)
    t, j = np.ogrid[:q_len, :kv_len]
    expected = axis_windows(H, kh, dh)[t // W, j // W] & axis_windows(W, kw, dw)[t % W, j % W]
    dense = mask.to_dense(q_len, kv_len)[0, 0].numpy()
    bad = np.argwhere(dense != expected)
    assert bad.size == 0, f"{mask!r}: differs from its definition at (t, j) = {bad[:5].tolist()}"
    assert_matches_dense(mask, q_len, kv_len, batch=shape.batch, heads=shape.heads, kv_heads=shape.kv_heads,
                         head_dim=shape.head_dim, block_size=(shape.q_block_size, shape.kv_block_size))


@given(image=images())
def test_every_pixel_sees_a_full_window_containing_itself(image):
    # NATTEN's property: kh * kw keys for every query (dilated too), and (odd sizes, no dilation) the window
    # centred wherever it fits, the form attention-gym writes (the window's centre clamped, then |centre - key| <= k // 2)
    H, W, kh, kw, dh, dw, _, _ = image
    dense = masks.neighborhood(H, W, (kh, kw), (dh, dw)).to_dense(H * W, H * W)[0, 0].numpy()
    assert (dense.sum(-1) == kh * kw).all()
    assert dense.diagonal().all()
    if kh % 2 and kw % 2 and dh == dw == 1:
        t, j = np.ogrid[: H * W, : H * W]
        centre_r = np.clip(t // W, kh // 2, H - 1 - kh // 2)
        centre_c = np.clip(t % W, kw // 2, W - 1 - kw // 2)
        assert (dense == ((np.abs(centre_r - j // W) <= kh // 2) & (np.abs(centre_c - j % W) <= kw // 2))).all()


def test_corner_and_centre_windows():
    dense = masks.neighborhood(5, 7, 3).to_dense(35, 35)[0, 0]
    corner = torch.zeros(5, 7, dtype=torch.bool)
    corner[:3, :3] = True  # pixel (0, 0): the window moved inward, not cut
    assert torch.equal(dense[0].view(5, 7), corner)
    centre = torch.zeros(5, 7, dtype=torch.bool)
    centre[1:4, 2:5] = True  # pixel (2, 3) = token 17
    assert torch.equal(dense[17].view(5, 7), centre)


def test_dilated_windows_stay_in_the_query_sub_grid():
    # one row of 10 pixels, 3 keys 2 apart: columns 0, 2, 4, ... and 1, 3, 5, ... are separate sub-grids
    dense = masks.neighborhood(1, 10, (1, 3), dilation=(1, 2)).to_dense(10, 10)[0, 0]
    seen = {t: dense[t].nonzero().flatten().tolist() for t in (0, 4, 5, 9)}
    assert seen == {0: [0, 2, 4], 4: [2, 4, 6], 5: [3, 5, 7], 9: [5, 7, 9]}
    assert repr(masks.neighborhood(1, 10, (1, 3), dilation=(1, 2))) == "neighborhood(1, 10, (1, 3), dilation=(1, 2))"
    assert repr(masks.neighborhood(9, 9, 3, dilation=3)) == "neighborhood(9, 9, 3, dilation=3)"
    assert repr(masks.neighborhood(4, 4, 3, dilation=1)) == "neighborhood(4, 4, 3)"


def test_composes_and_round_trips_through_the_cli():
    mask = masks.neighborhood(8, 8, (3, 5)) | masks.global_tokens(2)
    assert repr(mask) == "neighborhood(8, 8, (3, 5)) | global_tokens(2)"
    assert repr(parse_mask(repr(mask))) == repr(mask)
    assert repr(masks.neighborhood(4, 6, [1, 3])) == "neighborhood(4, 6, (1, 3))"
    assert_matches_dense(mask & masks.causal(), 64, block_size=16)


@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: masks.neighborhood(0, 4, 3), ValueError, "height"),
        (lambda: masks.neighborhood(4, 2.0, 1), TypeError, "width"),
        (lambda: masks.neighborhood(4, 4, 0), ValueError, "kernel_size"),
        (lambda: masks.neighborhood(4, 4, 5), ValueError, "kernel_size"),
        (lambda: masks.neighborhood(4, 9, (3, 10)), ValueError, "kernel_size"),
        (lambda: masks.neighborhood(4, 4, (3,)), ValueError, "kernel_size"),
        (lambda: masks.neighborhood(8, 8, 3, dilation=3), ValueError, "dilation"),
        (lambda: masks.neighborhood(8, 8, 3, dilation=0), ValueError, "dilation"),
        (lambda: masks.neighborhood(8, 8, 3, dilation=(1, 1.5)), TypeError, "dilation[1]"),
        (lambda: masks.neighborhood(4, 4, (3, "3")), TypeError, "kernel_size[1]"),
        (lambda: masks.neighborhood(4, 4, 3).to_dense(17, 16), ValueError, "16 pixels"),
        (lambda: masks.neighborhood(4, 4, 3).to_block_mask(16, 20, block_size=16), ValueError, "kv_len=20"),
    ],
)
def test_bad_arguments_name_themselves(make, exc, names):
    with pytest.raises(exc, match=names.replace("[", r"\[").replace("]", r"\]")):
        make()
