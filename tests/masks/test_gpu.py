"""The mask property tests on CUDA: compiled FlexAttention in bf16 vs float64 dense, for every generator, random
compositions and score_mods, short queries (torch's decoding kernel) and gradients; fine_selection /
block_mask_from_indices on the GPU, forward and backward. Skipped without CUDA.

Each Hypothesis example builds new mask_mod closures, which compiled flex_attention guards on; dynamo is reset
per example so the recompile limit (which nsa_flex turns into a SlowPathError) is never reached.
"""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_flex import masks, scores
from nsa_flex.functional import flex
from nsa_flex.masks import mask as mask_module
from nsa_flex.testing import GRADIENT_TOLERANCE, TOLERANCE, assert_matches_dense, assertions, dense_attention
from nsa_flex.testing import strategies as nst

pytestmark = pytest.mark.gpu
# Every example compiles new kernels (5-20 s each on an H100): a fifth of the profile's examples, at least 3.
gpu_settings = settings(max_examples=max(3, settings.default.max_examples // 5))

CUDA = "cuda"
BF16 = torch.bfloat16
SHAPES = nst.shapes(head_dims=(16, 32, 64))


def fresh_compile():
    torch._dynamo.reset()


def check(mask, shape, q_len=None, kv_len=None, score_mod=None, gradients=False):
    fresh_compile()
    assert_matches_dense(
        mask, q_len or shape.q_len, kv_len or shape.kv_len, batch=shape.batch, heads=shape.heads,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size, score_mod=score_mod,
        dtype=BF16, device=CUDA, atol=TOLERANCE[BF16], gradients=gradients,
    )


@st.composite
def generator_mask(draw, kind, shape):
    T = shape.q_len
    if kind == "causal":
        return masks.causal()
    if kind == "sliding_window":
        return masks.sliding_window(draw(st.integers(1, 300)))
    if kind == "chunked":
        return masks.chunked(draw(st.integers(1, 100)))
    if kind == "dilated":
        return masks.dilated(draw(st.integers(1, 12)), draw(st.integers(1, 8)))
    if kind == "global_tokens":
        return masks.global_tokens(draw(st.integers(1, 40)))
    if kind == "prefix_lm":
        return masks.prefix_lm(torch.randint(0, 300, (shape.batch,), device=CUDA))
    if kind == "document":
        ids = torch.randint(0, draw(st.integers(1, 6)), (shape.batch, T), device=CUDA).sort(-1).values
        return masks.document(ids)
    if kind == "neighborhood":
        return draw(nst.neighborhoods(max(T, shape.kv_len)))
    if kind == "compressed_causal":
        d = draw(st.integers(1, 16))
        return masks.compressed_causal(block_size=draw(st.integers(d, 4 * d)), stride=d)
    bs = draw(st.sampled_from([16, 32, 64]))
    nb = math.ceil(T / bs)
    attention = draw(st.sampled_from(["bidirectional", "unidirectional"]))
    per_head = draw(st.booleans())
    H = shape.heads if per_head else 1
    if kind == "fixed":
        return masks.fixed(T, bs, 2, 1, attention, H, per_head, num_different_global_patterns=2 if per_head else 1,
                           device=CUDA)
    if kind == "variable":
        return masks.variable(T, bs, min(nb, 2), [1, 3], [0, nb // 2], attention, draw(st.integers(0, 99)),
                              num_heads=H, different_layout_per_head=per_head, device=CUDA)
    if kind == "bigbird":
        return masks.bigbird(T, bs, min(nb, 2), min(nb, 3), min(nb, 1), attention, H, per_head,
                             draw(st.integers(0, 99)), device=CUDA)
    if kind == "longformer":
        return masks.longformer(T, bs, min(nb, 3), [0, nb - 1], attention, device=CUDA)
    if kind == "block_layout":
        size = (shape.heads, nb, nb) if per_head else (nb, nb)
        return masks.block_layout(torch.rand(size, device=CUDA) < 0.5, bs)
    raise AssertionError(kind)


KINDS = ["causal", "sliding_window", "chunked", "dilated", "global_tokens", "prefix_lm", "document",
         "neighborhood", "compressed_causal", "fixed", "variable", "bigbird", "longformer", "block_layout"]


@pytest.mark.parametrize("kind", KINDS)
@gpu_settings
@given(shape=SHAPES, data=st.data())
def test_generators_compiled_bf16(kind, shape, data):
    same = kind in ("document", "fixed", "variable", "bigbird", "longformer", "block_layout")
    kv_len = shape.q_len if same else shape.kv_len
    if kind == "compressed_causal":
        kv_len = max(1, shape.kv_len // 8)
    check(data.draw(generator_mask(kind, shape)), shape, kv_len=kv_len)


@gpu_settings
@given(shape=nst.shapes(same_length=True, head_dims=(16, 32, 64)), data=st.data())
def test_random_compositions_compiled_bf16(shape, data):
    m = data.draw(nst.masks(shape.q_len, batch=shape.batch, heads=shape.heads, device=CUDA))
    check(m, shape)


@gpu_settings
@given(shape=SHAPES, data=st.data())
def test_length_free_compositions_compiled_bf16_q_ne_kv(shape, data):
    check(data.draw(nst.masks(device=CUDA)), shape)


@gpu_settings
@given(shape=SHAPES, data=st.data())
def test_score_mods_compiled_bf16(shape, data):
    table = torch.randn(shape.heads, 2 * data.draw(st.integers(1, 40)) - 1, device=CUDA)
    mod = data.draw(st.sampled_from([
        scores.softcap(5.0), scores.alibi(shape.heads), scores.relative_bias(table),
        scores.compose(scores.alibi(shape.heads), scores.relative_bias(table), scores.softcap(20.0)),
    ]))
    check(masks.causal() | masks.global_tokens(3), shape, score_mod=mod)


# Gradients: the backward reads what the forward never does, the BlockMask's per-key-block (transposed) index,
# and for blocks under 128 it runs on the tiles nsa_flex adds to inductor's choices (functional.flex).
@pytest.mark.parametrize("block_size", [(128, 128), (128, 64), (64, 64), (16, 64), (64, 128), (32, 32), (128, 16),
                                        (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_gradients_compiled_bf16_per_block_size(block_size):
    fresh_compile()
    assert_matches_dense((masks.causal() & masks.sliding_window(70)) | masks.global_tokens(5), 300, 300, batch=2,
                         heads=4, kv_heads=2, head_dim=64, block_size=block_size, dtype=BF16, device=CUDA,
                         gradients=True)


def test_small_block_tiles_offered_only_where_torch_has_none(monkeypatch):
    """What inductor is offered while lowering each backward: torch's own tiles alone for 128-token blocks (its
    choice and compile time unchanged by importing nsa_flex), ours beside them for 64-token KV blocks. The
    block sizes come from torch's lowering frame (functional.flex._lowering_block_sizes): this is the check
    that it finds them in the torch the GPU runs."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from nsa_flex.functional.flex import SMALL_BLOCK_BWD_TILES, NSAFlexChoices

    offered = []
    ask = NSAFlexChoices.get_flex_attention_bwd_configs

    def recording(self, *args, **kwargs):
        configs = ask(self, *args, **kwargs)
        offered.append({(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in configs})
        return configs

    monkeypatch.setattr(NSAFlexChoices, "get_flex_attention_bwd_configs", recording)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # lower again, not from an earlier run's cache
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    ours = SMALL_BLOCK_BWD_TILES[-1][:4]  # (16, 16, 16, 16): fits every block, and is no default of torch's
    for block_size, added in (((128, 128), False), ((128, 64), True)):
        offered.clear()
        fresh_compile()
        assert_matches_dense(masks.causal(), 256, 256, heads=2, head_dim=64, block_size=block_size, dtype=BF16,
                             device=CUDA, gradients=True)
        assert offered, f"no backward was lowered for {block_size}"
        assert all((ours in tiles) == added for tiles in offered), (block_size, offered)


@gpu_settings
@given(data=st.data(), block_size=st.sampled_from([(128, 128), (64, 64), (16, 64), (128, 16)]))
def test_compiled_block_mask_equals_eager_above_the_eager_size(data, block_size):
    """Above EAGER_BLOCK_MASK_ENTRIES a CUDA BlockMask comes from compiled create_block_mask (no Q x KV
    tensor); the tests of smaller shapes run the eager build, so the compiled one is checked against it here."""
    fresh_compile()
    seq_len = math.isqrt(mask_module.EAGER_BLOCK_MASK_ENTRIES) + data.draw(st.integers(1, 100), label="extra")
    mask = data.draw(nst.masks(seq_len, device=CUDA), label="mask")
    compiled = mask.to_block_mask(seq_len, seq_len, device=CUDA, block_size=block_size)
    with mock.patch.object(mask_module, "EAGER_BLOCK_MASK_ENTRIES", 1 << 62):
        eager = mask.to_block_mask(seq_len, seq_len, device=CUDA, block_size=block_size)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert torch.equal(compiled.to_dense(), eager.to_dense()), repr(mask)


@gpu_settings
@given(shape=SHAPES, data=st.data())
def test_gradients_of_compositions_compiled_bf16(shape, data):
    check(data.draw(nst.masks(device=CUDA)), shape, gradients=True)


def test_gradient_check_fails_below_bf16_precision():
    fresh_compile()
    with pytest.raises(AssertionError, match="dq of flex_attention .* relative error"):
        assert_matches_dense(masks.causal(), 100, block_size=64, dtype=BF16, device=CUDA, gradients=True, rtol=1e-6)


# Fewer than 128 queries run on torch's flex-decoding kernel (for power-of-two GQA ratios and BlockMasks shared by
# the heads), which computed wrong outputs without an error when our tiles for small blocks handed it a row tile
# larger than its own (16 queries, (128, 16) blocks: every row off). forward_tiles caps it; these are the shapes.
@pytest.mark.parametrize("q_len, group, block_size", [
    (16, 1, (128, 16)), (16, 1, (128, 64)), (16, 1, (64, 32)), (8, 2, (128, 64)), (1, 4, (128, 16)),
    (32, 2, (128, 32)), (33, 1, (128, 64)), (100, 1, (128, 16)),
])
def test_short_queries_compiled_bf16(q_len, group, block_size):
    fresh_compile()
    assert_matches_dense(masks.chunked(40) | masks.global_tokens(3), q_len, 300, batch=2, heads=2 * group,
                         kv_heads=2, head_dim=32, block_size=block_size, dtype=BF16, device=CUDA)


@gpu_settings
@given(shape=nst.shapes(max_len=127, head_dims=(16, 32, 64)), data=st.data())
def test_length_free_compositions_compiled_bf16_short_queries(shape, data):
    check(data.draw(nst.masks(device=CUDA)), shape, kv_len=shape.kv_len + data.draw(st.integers(0, 300)))


@st.composite
def selection_case(draw):
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    q_len = draw(nst.lengths(max_len=300))
    kv_len = draw(st.one_of(st.just(q_len), nst.lengths(max_len=300)))
    bs, qbs = draw(st.sampled_from([16, 32, 64, 128])), draw(st.sampled_from([16, 32, 64, 128]))
    n = draw(st.integers(1, 5))
    idx = draw(nst.block_indices(B, Hkv, q_len, n, math.ceil(kv_len / bs))).to(CUDA)
    return idx, bs, qbs, group, q_len, kv_len


@gpu_settings
@given(case=selection_case())
def test_block_mask_from_indices_on_cuda(case):
    idx, bs, qbs, group, q_len, kv_len = case
    fresh_compile()
    got = masks.block_mask_from_indices(idx, q_len, kv_len, block_size=bs, q_block_size=qbs, group_size=group)
    # The definition is eager create_block_mask (on CPU). Torch's compiled create_block_mask can call a tile
    # "full" whose padding rows/keys lie past q_len/kv_len; either way the same scores are computed.
    want = masks.fine_selection(idx.cpu(), bs, group).to_block_mask(q_len, kv_len, device="cpu", block_size=(qbs, bs))
    for num_name, idx_name in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                               ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
        n_got, n_want = getattr(got, num_name).long().cpu(), getattr(want, num_name).long()
        assert torch.equal(n_got, n_want), num_name
        i_got, i_want = getattr(got, idx_name).long().cpu(), getattr(want, idx_name).long()
        used = torch.arange(i_want.shape[-1]) < n_want.unsqueeze(-1)
        assert torch.equal(i_got[..., : i_want.shape[-1]][used], i_want[used]), idx_name
    check_attention_and_gradients(got, idx, bs, group, kv_len)


def check_attention_and_gradients(block_mask, idx, bs, group, kv_len):
    """flex with the selection BlockMask vs float64 dense attention, outputs and dq, dk, dv: training reads its
    per-key-block index, which nsa_flex builds itself (not torch)."""
    B, Hkv, q_len = idx.shape[:3]
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, Hkv * group, q_len, 64), (B, Hkv, kv_len, 64), (B, Hkv, kv_len, 64)]
    inputs = [torch.randn(s, generator=gen).to(CUDA, BF16).requires_grad_() for s in shapes]
    exact = [x.detach().double().requires_grad_() for x in inputs]
    mask = masks.fine_selection(idx, bs, group)
    out = flex(*inputs, block_mask=block_mask)
    ref = dense_attention(*exact, mask=mask)
    what = f"block_mask_from_indices for {mask!r} (q_len={q_len}, kv_len={kv_len}, block_size={bs})"
    assertions._report(out.detach(), ref.detach(), TOLERANCE[BF16], what)  # raises on NaN too
    dout = torch.randn(out.shape, generator=gen).to(CUDA, BF16)
    got, want = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, exact, dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assertions._report_gradient(name, g, w, GRADIENT_TOLERANCE[BF16], what)


@gpu_settings
@given(case=selection_case())
def test_fine_selection_compiled_bf16(case):
    idx, bs, qbs, group, q_len, kv_len = case
    Hkv = idx.shape[1]
    fresh_compile()
    assert_matches_dense(masks.fine_selection(idx, bs, group), q_len, kv_len, kv_heads=Hkv, head_dim=64,
                         block_size=(qbs, bs), dtype=BF16, device=CUDA)


def test_fully_masked_rows_on_cuda_give_zero():
    idx = torch.full((1, 2, 200, 4), -1, device=CUDA)
    idx[:, :, 100:, 0] = 1
    bm = masks.block_mask_from_indices(idx, 200, 200, block_size=64, q_block_size=64, group_size=2)
    q = torch.randn(1, 4, 200, 64, device=CUDA, dtype=BF16)
    k, v = (torch.randn(1, 2, 200, 64, device=CUDA, dtype=BF16) for _ in range(2))
    out, lse = flex(q, k, v, block_mask=bm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, :, :100] == 0).all() and torch.isneginf(lse[:, :, :100]).all()
