"""NSA functional layer vs the float64 loop reference (nsa_flex.testing.reference_nsa)."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from helpers import assert_same_choices

from nsa_flex import functional as F
from nsa_flex import masks, testing
from nsa_flex.functional import selection
from nsa_flex.testing.strategies import nsa_cases

FP32_TOL = 1e-5


def make_inputs(case, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(case["seed"])
    B, Hq, Hkv, T, D = (case[k] for k in ("B", "Hq", "Hkv", "T", "D"))
    tensors = [
        torch.randn(B, Hq, T, D, generator=gen),
        torch.randn(B, Hkv, T, D, generator=gen),
        torch.randn(B, Hkv, T, D, generator=gen),
        torch.rand(B, Hq, T, 3, generator=gen),
    ]
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def _selection_problem(case):
    """float64 q, compressed keys and values, and select_blocks' configuration."""
    q, k, v, _ = make_inputs(case, torch.float64)
    cfg = case["cfg"]
    l, d = cfg["compress_block_size"], cfg["compress_stride"]
    config = (l, d, cfg["selection_block_size"], cfg["num_selected"], cfg["num_initial"], cfg["num_local"])
    return q, F.mean_pool(k, l, d), F.mean_pool(v, l, d), config


def _reference_lse(q, k_cmp, v_cmp, block_size, stride):
    """The compressed attention's float64 lse, which assert_same_choices scores the blocks with."""
    # a bool [T, Tc] mask, not compressed_causal: a Mask is defined for Tc >= 1 only
    visible = torch.arange(k_cmp.shape[2]) * stride + block_size - 1 <= torch.arange(q.shape[2]).view(-1, 1)
    return testing.dense_attention(q, k_cmp, v_cmp, visible, return_lse=True)[1]


@given(nsa_cases(), st.integers(1, 16))
def test_block_selection_matches_reference_exactly(case, chunk):
    """float64: the reference's blocks, with the softmax normalizer recomputed or taken from the compressed
    branch's lse (as nsa_attention passes it), in one chunk of queries or in chunks of ``chunk``."""
    q, k_cmp, v_cmp, config = _selection_problem(case)
    _, lse = F.compressed_attention(q, k_cmp, v_cmp, *config[:2], return_lse=True)
    want = testing.reference_select_blocks(q, k_cmp, *config)
    runs = [F.select_blocks(q, k_cmp, *config), F.select_blocks(q, k_cmp, *config, lse=lse)]
    S = -(-case["T"] // config[2])
    # select_blocks takes _TILE_ELEMENTS // (B * Hq * max(Tc, S)) queries a chunk
    with mock.patch.object(selection, "_TILE_ELEMENTS", chunk * case["B"] * case["Hq"] * max(k_cmp.shape[2], S)):
        runs += [F.select_blocks(q, k_cmp, *config), F.select_blocks(q, k_cmp, *config, lse=lse)]
    for got in runs:
        assert got.dtype == torch.long and got.shape == want.shape
        # Same sets (order within the n is free).
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@given(nsa_cases())
def test_fp32_block_selection_matches_reference_up_to_near_ties(case):
    """float32 scores ranked as int64 keys choose the float64 reference's blocks, except that blocks whose
    float64 scores tie within float32 rounding may swap; with and without the compressed branch's lse."""
    q, k_cmp, v_cmp, config = _selection_problem(case)
    want = testing.reference_select_blocks(q, k_cmp, *config)
    q32, k_cmp32 = q.float(), k_cmp.float()
    _, lse32 = F.compressed_attention(q32, k_cmp32, v_cmp.float(), *config[:2], return_lse=True)
    ref_lse = _reference_lse(q, k_cmp, v_cmp, *config[:2])
    for lse in (None, lse32):
        got = F.select_blocks(q32, k_cmp32, *config, lse=lse)
        assert got.dtype == torch.long and got.shape == want.shape
        assert_same_choices(got, want, q, k_cmp, ref_lse, *config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # int64-key top-k and stable sort
def test_selection_ties_break_toward_lower_block_and_forced_blocks_come_first(dtype):
    # All compressed keys equal -> every visible compressed key gets the same probability -> many tied blocks.
    B, Hkv, G, T, D = 1, 1, 2, 200, 4
    q = torch.randn(B, Hkv * G, T, D, dtype=dtype)
    k_cmp = torch.zeros(B, Hkv, (T - 8) // 8 + 1, D, dtype=dtype)
    got = F.select_blocks(q, k_cmp, 8, 8, 16, num_selected=4, num_initial=1, num_local=2)
    want = testing.reference_select_blocks(q.double(), k_cmp.double(), 8, 8, 16, 4, 1, 2)
    assert torch.equal(got, want)
    t = 199  # own block 12: forced 0, 12, 11; equal scores for blocks 1..10 -> lowest index, 1
    assert got[0, 0, t].tolist() == [0, 12, 11, 1]
    assert got[0, 0, 5].tolist() == [0, -1, -1, -1]  # only block 0 exists yet
    # n smaller than the forced list: initial blocks first, then own block.
    short = F.select_blocks(q, k_cmp, 8, 8, 16, num_selected=2, num_initial=1, num_local=2)
    assert short[0, 0, t].tolist() == [0, 12]


@given(stride=st.integers(1, 8), blocks=st.integers(1, 4), extra=st.integers(0, 7), ratio=st.integers(1, 5),
       T=st.integers(1, 300))
def test_overlap_pattern_is_the_band_of_overlap_weights(stride, blocks, extra, ratio, T):
    """select_blocks scores with the shift-invariant band ``w``; it must describe ``W`` entirely (also l % d)."""
    block, sel = stride * blocks + extra % stride, stride * ratio
    Tc, S = max(0, (T - block) // stride + 1), -(-T // sel)
    W = F.overlap_weights(Tc, S, block, stride, sel, dtype=torch.float64)
    w = selection.overlap_pattern(block, stride, sel, dtype=torch.float64)
    r, L = sel // stride, w.numel() - sel // stride
    banded = torch.zeros_like(W)
    for s in range(S):
        for j, wj in enumerate(w.tolist()):
            if 0 <= s * r + j - L < Tc:
                banded[s * r + j - L, s] = wj
    assert torch.equal(banded, W)


def test_static_overlap_pattern_is_built_once_as_a_plain_tensor():
    """select_blocks reuses one band per configuration; one first built under inference_mode still serves a
    training step (an inference tensor would be refused there), and compiled code builds its own in-graph."""
    with torch.inference_mode():
        w = selection.static_overlap_pattern(24, 8, 16, "cpu", torch.float32)
    assert not w.is_inference()
    assert selection.static_overlap_pattern(24, 8, 16, torch.device("cpu"), torch.float32) is w
    assert torch.equal(w, selection.overlap_pattern(24, 8, 16))
    traced = torch.compile(lambda: selection.static_overlap_pattern(24, 8, 16, "cpu", torch.float32) + 0,
                           fullgraph=True, backend="eager")
    assert torch.equal(traced(), w)


@given(nsa_cases())
def test_nsa_and_each_branch_match_reference_fp32(case):
    """Each branch and the gated sum against float64 references. float32 scores may order a float64 near-tie
    differently, so the blocks are checked up to such ties and the selected branch against the reference
    attention over the blocks nsa_attention chose."""
    q, k, v, g = make_inputs(case)
    cfg = case["cfg"]
    out, branches = F.nsa_attention(q, k, v, g, return_branches=True, **cfg)
    _, ref = testing.reference_nsa(q, k, v, g, return_branches=True, **cfg)
    q64, k_cmp, v_cmp, config = _selection_problem(case)
    lse = _reference_lse(q64, k_cmp, v_cmp, *config[:2])
    assert_same_choices(branches["block_indices"], ref["block_indices"], q64, k_cmp, lse, *config)
    chosen = masks.fine_selection(branches["block_indices"], cfg["selection_block_size"], case["Hq"] // case["Hkv"])
    ref["selected"] = testing.dense_attention(q, k, v, chosen)
    for name in ("compressed", "selected", "window"):
        err = (branches[name].double() - ref[name]).abs().max().item()
        assert err <= FP32_TOL, f"{name} branch differs by {err}"
    g = g.double()
    ref_out = g[..., 0:1] * ref["compressed"] + g[..., 1:2] * ref["selected"] + g[..., 2:3] * ref["window"]
    assert (out.double() - ref_out).abs().max().item() <= FP32_TOL
    assert not torch.isnan(out).any()


@given(nsa_cases(max_len=48))
def test_gradients_match_reference_autograd(case):
    q, k, v, g = make_inputs(case, torch.float64, requires_grad=True)
    out = F.nsa_attention(q, k, v, g, **case["cfg"])
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, g))
    ref = testing.reference_nsa(q, k, v, g, **case["cfg"])
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v, g))
    for name, a, b in zip("qkvg", grads, ref_grads):
        assert not torch.isnan(a).any(), f"NaN in d{name}"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("T", [3, 11, 40])
def test_gradcheck_tiny_float64(T):
    case = dict(B=1, Hq=2, Hkv=1, T=T, D=3, seed=T)
    q, k, v, g = make_inputs(case, torch.float64, requires_grad=True)
    cfg = dict(compress_block_size=8, compress_stride=4, selection_block_size=8, num_selected=2, window_size=5)
    assert torch.autograd.gradcheck(lambda *x: F.nsa_attention(*x, **cfg), (q, k, v, g))


def test_no_nan_for_first_tokens_and_padded_selections_forward_and_backward():
    # T < compression block: no compressed key at all; n far above the available blocks: all -1 padding.
    for T in (1, 7, 33):
        case = dict(B=2, Hq=4, Hkv=2, T=T, D=8, seed=T)
        q, k, v, g = make_inputs(case, requires_grad=True)
        out, br = F.nsa_attention(q, k, v, g, compress_block_size=16, compress_stride=8, selection_block_size=16,
                                  num_selected=32, window_size=4, return_branches=True)
        assert torch.all(br["compressed"][:, :, : min(T, 15)] == 0)
        out.sum().backward()
        for x in (q, k, v, g):
            assert torch.isfinite(x.grad).all()


def test_separate_key_and_value_compressors():
    case = dict(B=1, Hq=2, Hkv=1, T=50, D=4, seed=0)
    q, k, v, g = make_inputs(case)
    cfg = dict(compress_block_size=8, compress_stride=4, selection_block_size=8, num_selected=3, window_size=6)
    first = lambda x: F.compression_blocks(x, 8, 4)[..., 0, :]  # noqa: E731 - key: first token of each block
    last = lambda x: F.compression_blocks(x, 8, 4)[..., -1, :]  # noqa: E731 - value: last token
    out = F.nsa_attention(q, k, v, g, compress=(first, last), **cfg)
    ref = testing.reference_nsa(q, k, v, g, compress=(first, last), **cfg)
    assert (out.double() - ref).abs().max() <= FP32_TOL


BAD_CONFIGS = [
    (dict(compress_stride=64, compress_block_size=32), ValueError, "stride"),
    (dict(selection_block_size=40, compress_stride=16), ValueError, "selection_block_size"),
    (dict(num_selected=0), ValueError, "num_selected"),
    (dict(window_size=-1), ValueError, "window_size"),
    (dict(compress_block_size=0), ValueError, "block_size"),
    (dict(compress="max"), ValueError, "compress"),
    (dict(compress=3), TypeError, "compress"),
]


@pytest.mark.parametrize("bad, error, word", BAD_CONFIGS)
def test_bad_configs_raise_naming_the_argument(bad, error, word):
    q, k, v, g = make_inputs(dict(B=1, Hq=2, Hkv=1, T=70, D=4, seed=0))
    with pytest.raises(error, match=word):
        F.nsa_attention(q, k, v, g, **bad)


def test_bad_shapes_raise():
    q, k, v, g = make_inputs(dict(B=1, Hq=3, Hkv=2, T=20, D=4, seed=0))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        F.nsa_attention(q, k, v, g[:, :2])
    q, k, v, g = make_inputs(dict(B=1, Hq=4, Hkv=2, T=20, D=4, seed=0))
    with pytest.raises(ValueError, match="gates"):
        F.nsa_attention(q, k, v, g[..., :2])
    with pytest.raises(ValueError, match="same length"):
        F.nsa_attention(q, k[:, :, :10], v[:, :, :10], g)
    with pytest.raises(TypeError, match="block_indices"):
        F.selected_attention(q, k, v, torch.zeros(1, 2, 20, 2), 8)
    with pytest.raises(ValueError, match="block_indices"):
        F.selected_attention(q, k, v, torch.zeros(1, 2, 19, 2, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="block_indices must be <"):
        F.selected_attention(q, k, v, torch.full((1, 2, 20, 2), 5), 8)
    with pytest.raises(TypeError, match="dtype"):
        F.sliding_window_attention(q, k.double(), v, 4)


def test_select_blocks_rejects_an_lse_of_the_wrong_shape_or_dtype():
    q, k_cmp = torch.randn(1, 4, 20, 4), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"lse must have shape \[1, 4, 20\], got \[3\]"):
        F.select_blocks(q, k_cmp, 8, 4, 8, 2, lse=torch.zeros(3))
    with pytest.raises(ValueError, match=r"lse must have shape \[1, 4, 20\], got \[1, 2, 20\]"):
        F.select_blocks(q, k_cmp, 8, 4, 8, 2, lse=torch.zeros(1, 2, 20))  # per kv head, not per query head
    with pytest.raises(TypeError, match="lse must have a floating dtype"):
        F.select_blocks(q, k_cmp, 8, 4, 8, 2, lse=torch.zeros(1, 4, 20, dtype=torch.long))


@pytest.mark.parametrize(
    "args, error, name",
    [((4, 2, 0, 4, 8), ValueError, "block_size"), ((4, 2, 8, 0, 8), ValueError, "stride"),
     ((4, 2, 8, 16, 8), ValueError, "stride"), ((4, 2, 8, 4, 0), ValueError, "selection_block_size"),
     ((-1, 2, 8, 4, 8), ValueError, "num_cmp"), ((4, 2.0, 8, 4, 8), TypeError, "num_sel")],
)
def test_overlap_weights_rejects_bad_sizes(args, error, name):
    with pytest.raises(error, match=name):
        F.overlap_weights(*args)


@pytest.mark.parametrize(
    "args, error, name",
    [((0, 4, 8), ValueError, "block_size"), ((8, 0, 8), ValueError, "stride"), ((8, 16, 32), ValueError, "stride"),
     ((8, 4, 0), ValueError, "selection_block_size"), ((8, 4, 6), ValueError, "multiple of the compression stride"),
     ((8, 4, 8.0), TypeError, "selection_block_size")],
)
def test_overlap_pattern_rejects_bad_sizes_also_through_its_cache(args, error, name):
    with pytest.raises(error, match=name):
        selection.overlap_pattern(*args)
    with pytest.raises(error, match=name):
        selection.static_overlap_pattern(*args, "cpu", torch.float32)


@pytest.mark.parametrize("selected_gated", [False, True])
def test_gate_function_gradients_and_layouts(monkeypatch, selected_gated):
    """The CUDA gate (an autograd Function around two compiled kernels, run here uncompiled): float64
    gradcheck, and its output and each branch's gradient laid out as that branch's output (token-major here,
    so that the cuDNN compressed backward needs no copy of its gradient). With ``selected_gated`` the selected
    output comes gated already (its gate column gets no gradient here: the selected branch gives it)."""
    from nsa_flex.functional import nsa

    monkeypatch.setattr(nsa, "_compiled", lambda fn: fn)
    gen = torch.Generator().manual_seed(0)

    def token_major(*shape):
        B, H, T, D = shape
        return torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()

    g = torch.rand(2, 3, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    outs = [token_major(2, 3, 5, 4) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *a: nsa._Gate.apply(*a, selected_gated), (g, *outs))
    y = nsa._Gate.apply(g, *outs, selected_gated)
    expected = g[..., 0:1] * outs[0] + (1 if selected_gated else g[..., 1:2]) * outs[1] + g[..., 2:3] * outs[2]
    torch.testing.assert_close(y, expected)
    assert y.stride() == outs[0].stride()
    y.backward(torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64).transpose(1, 2))
    for o in outs:
        assert o.grad.stride() == o.stride()
    if selected_gated:
        assert (g.grad[..., 1] == 0).all()


ARGUMENT_CFG = dict(compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected=2, window_size=4)


@pytest.mark.parametrize("fine_qk, error, match", [
    (("q",), TypeError, r"fine_qk must be a pair.*a tuple of length 1"),  # had been an IndexError
    (("q", "q", "k"), TypeError, "fine_qk must be a pair"),
    (("q", None), TypeError, r"fine_qk\[1\] must be a torch.Tensor"),
    (("q", "q"), ValueError, r"fine_qk\[1\] must have shape"),  # k has 1 head, q 2
])
def test_nsa_attention_rejects_fine_qk_that_is_not_a_pair_like_q_and_k(fine_qk, error, match):
    q, k, v, gates = testing.nsa_inputs(16, 2, 1, 4)
    named = {"q": q, "k": k, None: None}
    with pytest.raises(error, match=match):
        F.nsa_attention(q, k, v, gates, fine_qk=tuple(named[x] for x in fine_qk), **ARGUMENT_CFG)


@pytest.mark.parametrize("scale, error", [("a", TypeError), (True, TypeError), (0.0, ValueError),
                                          (-1.0, ValueError), (float("inf"), ValueError)])
def test_nsa_attention_rejects_a_scale_that_is_not_a_positive_number(scale, error):
    """scale='a' had raised torch's TypeError from inside an einsum, not naming scale."""
    q, k, v, gates = testing.nsa_inputs(16, 2, 1, 4)
    with pytest.raises(error, match="scale"):
        F.nsa_attention(q, k, v, gates, scale=scale, **ARGUMENT_CFG)


def test_no_tokens_gives_an_empty_output_with_gradients():
    """T = 0 had failed inside the selected branch's mask check, naming its internal q_len; the dense layer
    (CausalAttention) returns an empty output, and so does NSA now."""
    from nsa_flex.modules import SparseAttention

    q, k, v = torch.randn(2, 4, 0, 8, requires_grad=True), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8)
    gates = torch.rand(2, 4, 0, 3)
    out, branches = F.nsa_attention(q, k, v, gates, compress_block_size=16, compress_stride=8,
                                    selection_block_size=16, num_selected=2, window_size=8, return_branches=True)
    assert out.shape == (2, 4, 0, 8) and branches["block_indices"].shape == (2, 2, 0, 2)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    layer = SparseAttention(dim=16, dim_head=4, heads=4, sliding_window_size=6, compress_block_size=4,
                            compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=3)
    assert layer(torch.randn(2, 0, 16)).shape == (2, 0, 16)
