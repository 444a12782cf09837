"""Kernel options nsa_flex passes to compiled FlexAttention on CUDA (pure logic, checked on CPU)."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks, scores
from nsa_flex.functional.flex import (SMALL_BLOCK_BWD_TILES, _lowering_block_sizes, backward_tiles_to_add,
                                     decode_kernel_options, decoding_rows, flex, forward_tiles, kernel_options_for)


def _block_mask(q_block, kv_block, q_len=256, kv_len=256):
    return masks.causal().to_block_mask(q_len, kv_len, device="cpu", block_size=(q_block, kv_block))


@pytest.mark.parametrize("q_block, kv_block, want", [
    (128, 128, {}), (128, 64, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}), (16, 64, {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 64}),
    (48, 32, {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 32}),
])
def test_forward_tiles_divide_the_block_sizes(q_block, kv_block, want):
    q = k = torch.empty(1, 2, 256, 8)  # 128 queries or more: no cap from the decoding kernel
    assert forward_tiles(_block_mask(q_block, kv_block), q, k) == want


@given(q_len=st.integers(1, 300), group=st.sampled_from([1, 2, 3, 4, 8, 16]),
       q_block=st.sampled_from([16, 32, 48, 64, 128, 256]), kv_block=st.sampled_from([16, 64, 128]))
def test_forward_row_tile_never_exceeds_the_decoding_kernels_below_128_queries(q_len, group, q_block, kv_block):
    """Torch's decoding kernel sets its boundary checks from its own row tile before applying fwd_BLOCK_M; a
    larger one gave wrong outputs silently (H100, torch 2.11). The tile must still divide the Q block."""
    q, k = torch.empty(1, 2 * group, q_len, 8), torch.empty(1, 2, q_len, 8)
    bm = _block_mask(q_block, kv_block, q_len, q_len)
    tiles = forward_tiles(bm, q, k)
    if tiles == {}:
        assert q_block % 128 == 0 and kv_block % 128 == 0
        return
    assert q_block % tiles["fwd_BLOCK_M"] == 0 and kv_block % tiles["fwd_BLOCK_N"] == 0
    if q_len < 128:
        assert tiles["fwd_BLOCK_M"] <= decoding_rows(q, k)
    else:  # the largest power of two dividing each block, at most 64
        assert tiles == {"fwd_BLOCK_M": min(64, q_block & -q_block), "fwd_BLOCK_N": min(64, kv_block & -kv_block)}


def test_forward_tiles_for_the_case_found_on_torch_2_11():
    q, k = torch.empty(2, 2, 16, 8), torch.empty(2, 2, 128, 8)
    bm = masks.causal().to_block_mask(16, 128, device="cpu", block_size=(128, 16))
    assert forward_tiles(bm, q, k) == {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 16}
    # 128 queries over the same blocks get the uncapped tile, which 16 queries got before the fix
    assert forward_tiles(bm, torch.empty(2, 2, 128, 8), k) == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 16}


@given(q_len=st.integers(1, 300), group=st.sampled_from([1, 2, 4, 8, 16]), q_block=st.sampled_from([16, 64, 128]))
def test_decode_kernel_forced_off_exactly_where_its_tile_cannot_divide_the_q_block(q_len, group, q_block):
    q, k = torch.empty(1, 2 * group, q_len, 8), torch.empty(1, 2, q_len, 8)
    rows = 16
    while rows < q_len * group:
        rows *= 2
    assert decoding_rows(q, k) == rows
    decoding_has_a_tile = q_block % rows == 0
    forced = decode_kernel_options(q, k, _block_mask(q_block, 64, q_len, q_len)) == {"FORCE_USE_FLEX_ATTENTION": True}
    assert forced == (q_len < 128 and not decoding_has_a_tile)


def test_kernel_options_for_a_users_own_compiled_call():
    """What flex passes, for users' own torch.compile(flex_attention): tiles, capped for short queries, and
    the main kernel where the decoding kernel has no tile; nothing for 128-multiples and long queries."""
    q, k = torch.empty(2, 2, 16, 8), torch.empty(2, 2, 128, 8)
    small = masks.causal().to_block_mask(16, 128, device="cpu", block_size=(128, 16))
    assert kernel_options_for(q, k, small) == {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 16}
    q_gqa, k_gqa = torch.empty(1, 4, 120, 8), torch.empty(1, 2, 120, 8)
    assert kernel_options_for(q_gqa, k_gqa, None) == {"FORCE_USE_FLEX_ATTENTION": True}
    q_long, k_long = torch.empty(1, 2, 256, 8), torch.empty(1, 2, 256, 8)
    assert kernel_options_for(q_long, k_long, _block_mask(128, 128)) == {}
    assert kernel_options_for(q_long, k_long, _block_mask(128, 64)) == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}


@pytest.mark.parametrize("q, k, block_mask, exc, match", [
    (torch.empty(2, 16, 8), torch.empty(1, 2, 16, 8), None, ValueError, "q must have 4 dimensions"),
    ([[1.0]], torch.empty(1, 2, 16, 8), None, TypeError, "q must be a torch.Tensor"),
    (torch.empty(1, 2, 16, 8), torch.empty(2, 16, 8), None, ValueError, "k must have 4 dimensions"),
    (torch.empty(1, 3, 16, 8), torch.empty(1, 2, 16, 8), None, ValueError, "Hq=3, Hkv=2"),
    (torch.empty(1, 2, 16, 8), torch.empty(1, 2, 16, 8), masks.causal(), TypeError, "to_block_mask"),
])
def test_kernel_options_for_names_bad_arguments(q, k, block_mask, exc, match):
    with pytest.raises(exc, match=match):
        kernel_options_for(q, k, block_mask)


def test_decode_kernel_options_for_the_case_found_on_torch_2_11():
    # a 120-token GQA prefill with 2 query heads per kv head and 128-row blocks: 256 decoding rows
    q, k = torch.empty(1, 4, 120, 8), torch.empty(1, 2, 120, 8)
    assert decode_kernel_options(q, k, None) == {"FORCE_USE_FLEX_ATTENTION": True}
    assert decode_kernel_options(q[:, :, :1], k, None) == {}  # one-token decoding keeps torch's decoding kernel


@pytest.mark.parametrize("q_block", [16, 32, 64, 128])
@pytest.mark.parametrize("kv_block", [16, 32, 64])
def test_every_small_block_pair_has_a_valid_backward_tile(q_block, kv_block):
    """Torch's backward needs BLOCK_M1, BLOCK_M2 | Q block, BLOCK_N1, BLOCK_N2 | KV block, and its kernel
    BLOCK_N1 % BLOCK_M1 == BLOCK_M2 % BLOCK_N2 == 0 (KV blocks of 16 and 32 had none: NoValidChoicesError)."""
    fits = [(m1, n1, m2, n2) for m1, n1, m2, n2, _, _ in SMALL_BLOCK_BWD_TILES
            if q_block % m1 == q_block % m2 == kv_block % n1 == kv_block % n2 == 0]
    assert fits, (q_block, kv_block)
    assert all(n1 % m1 == 0 and m2 % n2 == 0 for m1, n1, m2, n2 in fits)


TORCH_H100_TILE = (64, 128, 128, 64)  # torch 2.11's one backward tile on sm90 for head dims up to 128


@pytest.mark.parametrize("blocks, added", [
    ((128, 128), ()), ((256, 128), ()),  # torch's tile fits: its choice and compile time stay as they are
    ((128, 64), SMALL_BLOCK_BWD_TILES), ((64, 128), SMALL_BLOCK_BWD_TILES), ((16, 16), SMALL_BLOCK_BWD_TILES),
    (None, SMALL_BLOCK_BWD_TILES),  # sizes unknown: offer ours, so that no BlockMask is left without a tile
])
def test_small_block_tiles_are_offered_only_where_torch_has_none(blocks, added):
    assert backward_tiles_to_add([TORCH_H100_TILE], blocks) == added
    assert backward_tiles_to_add([], blocks) == SMALL_BLOCK_BWD_TILES


def _asks_for_tiles():  # stands for NSAFlexChoices.get_flex_attention_bwd_configs
    return _lowering_block_sizes()


def _lowering(q_block, kv_block):  # stands for inductor's flex backward lowering
    SPARSE_Q_BLOCK_SIZE, SPARSE_KV_BLOCK_SIZE = q_block, kv_block  # noqa: F841 (read from this frame)
    return _asks_for_tiles()


def test_block_sizes_are_read_from_the_lowering_that_asks_for_tiles():
    assert _lowering(128, 64) == (128, 64)
    assert _lowering(torch.tensor(32), 16) == (32, 16)  # anything int() takes, as sympy's integers
    sympy = pytest.importorskip("sympy")
    assert _lowering(sympy.Symbol("s"), 64) is None  # symbolic sizes: unknown
    assert _asks_for_tiles() is None  # no lowering among the callers


def test_torch_lowering_names_the_block_sizes_before_asking_for_tiles():
    """_lowering_block_sizes reads these names from torch's frame: a torch release that renames them would
    quietly bring back the extra candidates (and compile time) for every backward, so say so here."""
    import inspect

    from torch._inductor.kernel.flex import flex_attention as lowering

    source = inspect.getsource(lowering)
    asks = source.index("get_flex_attention_bwd_configs(")
    function = source[source.rindex("\ndef ", 0, asks):asks]  # the lowering function, up to where it asks
    for name in ("SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE"):
        assert f"{name} = " in function, name


def test_small_block_tiles_reach_inductor_even_after_an_earlier_compile():
    """Inductor builds its choices object once per thread, at its first compile; tiles installed later must
    still reach it (a GPU test found the selection backward failing to lower after an unrelated compile). A
    fresh process, so that the state this checks is not left over from other tests."""
    script = (
        "import torch\n"
        "from torch._inductor.virtualized import V\n"
        "before = type(V.choices)\n"  # what the first compile initializes
        "import importlib\n"
        "flex = importlib.import_module('nsa_flex.functional.flex')\n"
        "assert flex.enable_small_block_kernels()\n"
        "assert type(V.choices).__name__ == 'NSAFlexChoices', type(V.choices)\n"
        "assert issubclass(type(V.choices), before)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_mask_passed_as_block_mask_says_to_build_its_block_mask():
    """A Mask (a mask_mod) as block_mask had raised AttributeError 'BLOCK_SIZE' from inside torch."""
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(TypeError, match=r"block_mask.*\.to_block_mask"):
        flex(q, q, q, block_mask=masks.causal())
    with pytest.raises(TypeError, match="block_mask"):
        flex(q, q, q, block_mask="causal")
    out = flex(q, q, q, block_mask=masks.causal().to_block_mask(16, 16, block_size=16))
    assert out.shape == q.shape


@pytest.mark.parametrize("score_mod", [scores.alibi(4), scores.relative_bias(torch.zeros(2, 5))])
def test_a_per_head_score_mod_for_other_heads_raises(score_mod):
    """Past its heads relative_bias had indexed its table out of range (IndexError); alibi silently used the
    slopes of another head count."""
    q = torch.randn(1, 8, 16, 8)
    with pytest.raises(ValueError, match="score_mod"):
        flex(q, q, q, score_mod=score_mod)
