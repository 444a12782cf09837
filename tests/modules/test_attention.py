"""SparseAttention: shapes, gradients, equality with a hand-written composition over functional.nsa_attention,
GQA, short sequences, config validation, gradcheck, and (on CUDA) torch.compile."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex.modules import MeanPool, MLPCompress, SparseAttention
from nsa_flex.modules import compression as C

# Small NSA: l=4, d=2, l'=4, n=3, window 6, so T ~ 20 exercises every branch.
SMALL = dict(dim=16, dim_head=4, heads=4, sliding_window_size=6, compress_block_size=4,
             compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=3)


def make(**overrides):
    torch.manual_seed(0)
    cfg = {**SMALL, **overrides}
    model = SparseAttention(**cfg)
    with torch.no_grad():  # non-trivial gates / norm weights (their inits are constant)
        model.to_strategy_combine.weight.normal_(0, 0.3)
        model.to_strategy_combine.bias.normal_(0, 0.5)
        if isinstance(model.norm, torch.nn.RMSNorm):
            model.norm.weight.uniform_(0.5, 1.5)
    return model


# ---- an independent re-statement of the layer ----

def manual_rms_norm(x, weight):
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def manual_rotary(x, base=10000.0):
    """Pairs (i, i + D/2) as complex numbers, times exp(i * pos * base^(-2i/D))."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    xd = x.double()
    z = torch.complex(xd[..., :half], xd[..., half:])
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = base ** (-2 * torch.arange(half, dtype=torch.float64) / D)
    z = z * torch.exp(1j * pos * freq)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def manual_forward(model, x, compress=None):
    Hq, Hkv, Dh = model.heads, model.kv_heads, model.dim_head
    B, T, _ = x.shape
    h = manual_rms_norm(x, model.norm.weight) if isinstance(model.norm, torch.nn.RMSNorm) else x
    W = model.to_qkv.weight
    q = (h @ W[: Hq * Dh].T).view(B, T, Hq, Dh).transpose(1, 2)
    k = (h @ W[Hq * Dh : (Hq + Hkv) * Dh].T).view(B, T, Hkv, Dh).transpose(1, 2)
    v = (h @ W[(Hq + Hkv) * Dh :].T).view(B, T, Hkv, Dh).transpose(1, 2)
    gl = model.to_strategy_combine
    gates = torch.sigmoid(h @ gl.weight.T + gl.bias).view(B, T, Hq, 3).transpose(1, 2)
    fine_qk = (manual_rotary(q), manual_rotary(k)) if model.use_rotary else None
    o = F.nsa_attention(
        q, k, v, gates,
        compress=(model.k_compress, model.v_compress) if compress is None else compress,
        compress_block_size=model.compress_block_size, compress_stride=model.compress_block_sliding_stride,
        selection_block_size=model.selection_block_size, num_selected=model.num_selected_blocks,
        num_initial=model.num_initial_blocks, num_local=model.num_local_blocks,
        window_size=model.sliding_window_size, fine_qk=fine_qk,
    )
    return o.transpose(1, 2).reshape(B, T, Hq * Dh) @ model.combine_heads.weight.T


@given(B=st.integers(1, 2), T=st.integers(1, 24))
def test_forward_shape(B, T):
    model = make(kv_heads=2)
    x = torch.randn(B, T, SMALL["dim"])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (B, T, SMALL["dim"]) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_forward_same_with_and_without_grad():
    # without grad: FlexAttention; with grad on CPU: the exact dense path
    model = make(kv_heads=2)
    x = torch.randn(2, 21, SMALL["dim"])
    with torch.no_grad():
        y_flex = model(x)
    torch.testing.assert_close(model(x), y_flex, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["G1", "G2", "G4"])
def test_matches_manual_composition(kv_heads):
    model = make(kv_heads=kv_heads)
    x = torch.randn(2, 21, SMALL["dim"])
    with torch.no_grad():
        y = model(x)
        y_ref = manual_forward(model, x)
    assert y.shape == (2, 21, SMALL["dim"])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["G1", "G2", "G4"])
def test_backward_finite_for_all_parameters(kv_heads):
    model = make(kv_heads=kv_heads)
    x = torch.randn(2, 21, SMALL["dim"], requires_grad=True)
    model(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    for compressor in (model.k_compress, model.v_compress):
        assert any(p.grad.abs().sum() > 0 for p in compressor.parameters())


def test_without_rotary_is_nsa_attention_on_projections():
    model = make(kv_heads=2, use_rotary=False)
    x = torch.randn(1, 19, SMALL["dim"])
    with torch.no_grad():
        h = model.norm(x)
        q, k, v = model.project_qkv(h)
        o = F.nsa_attention(q, k, v, model.compute_gates(h), compress=(model.k_compress, model.v_compress),
                            compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected=3,
                            window_size=6)
        expected = model.combine_heads(o.transpose(1, 2).reshape(1, 19, -1))
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), manual_forward(model, x), atol=1e-5, rtol=1e-5)


def test_rotary_changes_only_fine_branches():
    # same weights with and without rotary: compressed-branch output and block selection are identical
    torch.manual_seed(1)
    a, b = make(use_rotary=True), make(use_rotary=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 20, SMALL["dim"])
    with torch.no_grad():
        outs = []
        for model in (a, b):
            h = model.norm(x)
            q, k, v = model.project_qkv(h)
            cfg = model.nsa_config()
            outs.append(F.nsa_attention(q, k, v, model.compute_gates(h), fine_qk=model.rotate(q, k),
                                        return_branches=True, **cfg)[1])
    torch.testing.assert_close(outs[0]["compressed"], outs[1]["compressed"])
    assert torch.equal(outs[0]["block_indices"], outs[1]["block_indices"])
    assert not torch.allclose(outs[0]["window"], outs[1]["window"])


def test_rotary_is_relative():
    # q_t . k_j after rotation depends only on t - j
    from nsa_flex.modules import apply_rotary

    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    dots = [(apply_rotary(q, offset=t) * apply_rotary(k, offset=t - 3)).sum() for t in (3, 7, 50)]
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    torch.testing.assert_close(apply_rotary(q.expand(1, 1, 5, 8)), manual_rotary(q.expand(1, 1, 5, 8)))


def test_rotary_compiles_whole_with_its_table_op():
    """The cos/sin table is the custom op ``nsa_flex::rotary_table`` (made once per call, not per element of
    the input): a fullgraph compile traces it without a break and gives the eager result, at an offset too."""
    from nsa_flex.modules import apply_rotary

    x = torch.randn(2, 3, 9, 16)
    compiled = torch.compile(apply_rotary, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, 5), apply_rotary(x, 5), rtol=0, atol=1e-6)
    shifted = manual_rotary(torch.cat([torch.zeros(2, 3, 5, 16), x], dim=2))[:, :, 5:]  # positions 5..13
    torch.testing.assert_close(apply_rotary(x, 5), shifted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_shorter_than_one_compression_block(T):
    model = make(kv_heads=2)
    x = torch.randn(2, T, SMALL["dim"], requires_grad=True)
    y = model(x)
    assert y.shape == (2, T, SMALL["dim"]) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        if p.grad is None:
            # functional.compressed_attention keeps q and v_cmp in the graph when Tc == 0, but not k_cmp
            assert name.startswith("k_compress."), f"{name} got no gradient"
            continue
        assert torch.isfinite(p.grad).all(), name
        if name.startswith(("k_compress.", "v_compress.")):
            assert (p.grad == 0).all(), name
    with torch.no_grad():
        torch.testing.assert_close(model(x), manual_forward(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(C.COMPRESSORS))
def test_compressor_by_name(name):
    model = make(kv_heads=2, compress_mlp=name)
    assert type(model.k_compress) is C.COMPRESSORS[name] and model.k_compress is not model.v_compress
    x = torch.randn(1, 13, SMALL["dim"], requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_default_compressor_is_paper_mlp():
    model = SparseAttention(**SMALL, compress_mlp_expand_factor=0.5)
    assert isinstance(model.k_compress, MLPCompress) and isinstance(model.v_compress, MLPCompress)
    assert model.k_compress.hidden_dim == 4 * 4 // 2  # l * D * expand_factor


def test_compressor_module_is_copied_and_pair_is_used_as_given():
    proto = MLPCompress(4, 2, 4)
    model = SparseAttention(**SMALL, compress_mlp=proto)
    assert model.k_compress is proto and model.v_compress is not proto
    assert model.v_compress.net[0].weight.data_ptr() != proto.net[0].weight.data_ptr()
    kc, vc = MeanPool(4, 2), MLPCompress(4, 2, 4)
    model = SparseAttention(**SMALL, compress_mlp=(kc, vc))
    assert model.k_compress is kc and model.v_compress is vc
    x = torch.randn(1, 10, SMALL["dim"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), manual_forward(model, x, compress=(kc, vc)), atol=1e-5, rtol=1e-5)


def test_default_gates_start_on_window():
    model = SparseAttention(**SMALL)
    g = model.compute_gates(torch.randn(1, 5, SMALL["dim"]))
    assert g.shape == (1, SMALL["heads"], 5, 3)
    torch.testing.assert_close(g[..., 2], torch.full_like(g[..., 2], 1 / (1 + math.exp(-2))))
    torch.testing.assert_close(g[..., 0], torch.full_like(g[..., 0], 1 / (1 + math.exp(2))))


def test_gradcheck_float64_input():
    torch.manual_seed(3)
    model = SparseAttention(dim=4, dim_head=2, heads=2, kv_heads=1, sliding_window_size=3, compress_block_size=2,
                            compress_block_sliding_stride=1, selection_block_size=2, num_selected_blocks=2,
                            compress_mlp_expand_factor=1.0).double()
    x = torch.randn(1, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5)


# ---- configuration validation: one test each ----

def test_kv_heads_not_dividing_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        SparseAttention(**{**SMALL, "heads": 4}, kv_heads=3)


def test_kv_heads_more_than_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        SparseAttention(**{**SMALL, "heads": 2}, kv_heads=4)


def test_stride_larger_than_compress_block():
    with pytest.raises(ValueError, match="compress_block_sliding_stride"):
        SparseAttention(**{**SMALL, "compress_block_size": 2, "compress_block_sliding_stride": 4})


def test_selection_block_not_multiple_of_stride():
    with pytest.raises(ValueError, match="selection_block_size"):
        SparseAttention(**{**SMALL, "compress_block_sliding_stride": 3, "selection_block_size": 4})


@pytest.mark.parametrize("name", ["dim", "dim_head", "heads", "sliding_window_size", "compress_block_size",
                                  "compress_block_sliding_stride", "selection_block_size", "num_selected_blocks"])
def test_non_positive_size(name):
    with pytest.raises(ValueError, match=name):
        SparseAttention(**{**SMALL, name: 0})


@pytest.mark.parametrize("name", ["num_initial_blocks", "num_local_blocks"])
def test_negative_forced_blocks(name):
    with pytest.raises(ValueError, match=name):
        SparseAttention(**SMALL, **{name: -1})


def test_zero_kv_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        SparseAttention(**SMALL, kv_heads=0)


def test_odd_dim_head_with_rotary():
    with pytest.raises(ValueError, match="dim_head"):
        SparseAttention(**{**SMALL, "dim_head": 3})
    SparseAttention(**{**SMALL, "dim_head": 3}, use_rotary=False)  # fine without rotary


def test_unknown_compressor_name():
    with pytest.raises(ValueError, match="compress_mlp"):
        SparseAttention(**SMALL, compress_mlp="median")


def test_input_dim_mismatch():
    model = SparseAttention(**SMALL)
    with pytest.raises(ValueError, match=r"dim=16.*\[2, 5, 8\]"):
        model(torch.randn(2, 5, 8))


def test_input_wrong_rank():
    model = SparseAttention(**SMALL)
    with pytest.raises(ValueError, match="3 dimensions"):
        model(torch.randn(5, SMALL["dim"]))


def test_inference_traces_into_one_graph():
    """torch.compile(fullgraph=True) traces the whole layer: in-graph BlockMasks, the selection mask_mod over
    in-graph top-k indices (through masks.selection.materialize), no data-dependent checks. aot_eager runs the
    traced graph on CPU; the GPU tests below compile it with inductor."""
    torch.manual_seed(0)
    model = SparseAttention(dim=64, dim_head=16, heads=4, kv_heads=2, sliding_window_size=32, compress_block_size=16,
                            compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=3)
    x = torch.randn(2, 100, 64)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, model(x), atol=1e-5, rtol=1e-5)


# ---- GPU: eager training step and torch.compile(fullgraph=True) in bf16 ----

GPU_CFG = dict(dim=256, dim_head=64, heads=4, kv_heads=2, sliding_window_size=64, compress_block_size=32,
               compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=4)


@pytest.mark.gpu
def test_backward_bf16_cuda():
    torch.manual_seed(0)
    model = SparseAttention(**GPU_CFG).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, GPU_CFG["dim"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x).float().square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
def test_compile_fullgraph_bf16_cuda():
    torch.manual_seed(0)
    cfg = GPU_CFG
    model = SparseAttention(**cfg).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, cfg["dim"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
    assert compiled.shape == eager.shape and torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled.float(), eager.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_compile_fullgraph_backward_bf16_cuda():
    """Training under the user's torch.compile(fullgraph=True): the in-graph selection mask and the three
    FlexAttention branches trace into one graph, and its bf16 gradients are as close to exact ones as eager's.

    (Compared with a float64 run of the CPU path, not with eager bf16: some gradients are exactly zero in exact
    arithmetic, e.g. the key compressor's output bias, which shifts every logit of a query equally, so both
    bf16 runs give rounding noise there, and noise against noise is no test.)"""
    torch.manual_seed(0)
    model = SparseAttention(**GPU_CFG).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, GPU_CFG["dim"], device="cuda", dtype=torch.bfloat16)

    def grads(module, fn, like):
        module.zero_grad(set_to_none=True)
        xi = x.to(like, copy=True).requires_grad_()  # a fresh leaf: x.to(like) may be x itself
        fn(xi).double().square().sum().backward()
        return [t.double().cpu() for t in [xi.grad] + [p.grad for p in module.parameters()]]

    eager = grads(model, model, model.norm.weight)
    compiled = grads(model, torch.compile(model, fullgraph=True, dynamic=False), model.norm.weight)
    exact = copy.deepcopy(model).double().cpu()  # the CPU path: no compilation, dense masked attention
    ref = grads(exact, exact, exact.norm.weight)
    for (name, _), e, c, r in zip([("x", None)] + list(model.named_parameters()), eager, compiled, ref):
        assert torch.isfinite(c).all(), name
        scale = r.norm() + 1e-3 * ref[0].norm()  # near-zero gradients: measured against the input's gradient
        assert (c - r).norm() <= 2 * (e - r).norm() + 2e-2 * scale, name


def test_strategy_combine_mlp_must_be_callable():
    """A non-callable had been accepted and failed at forward with "'int' object is not callable"."""
    with pytest.raises(TypeError, match="strategy_combine_mlp"):
        SparseAttention(**SMALL, strategy_combine_mlp=5)


@pytest.mark.parametrize("scale, error", [("a", TypeError), (0.0, ValueError), (float("nan"), ValueError)])
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale"):
        SparseAttention(**SMALL, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm's, under autocast
def test_input_of_another_dtype_than_the_parameters(dtype):
    """The projection had raised torch's raw dtype mismatch; autocast (which casts inside) stays allowed."""
    model = SparseAttention(**SMALL)
    with pytest.raises(TypeError, match=r"x must have the layer's parameter dtype torch.float32"):
        model(torch.randn(1, 8, SMALL["dim"], dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 8, SMALL["dim"], dtype=torch.bfloat16)).shape == (1, 8, SMALL["dim"])


@pytest.mark.parametrize("compress", [MeanPool(8, 2), (MeanPool(4, 2), MLPCompress(4, 4, 4))])
def test_a_compressor_cutting_other_blocks_than_the_layer_is_refused(compress):
    """The forward refused it (its compressed keys are not Tc), but decoding cuts the newest block itself and had
    run with the layer's blocks instead, silently."""
    with pytest.raises(ValueError, match="compressor cuts blocks of .* compress_block_size=4"):
        SparseAttention(**SMALL, compress_mlp=compress)


@pytest.mark.parametrize("layer", ["nsa", "dense"])
def test_a_bad_rotary_base_is_named_as_the_layers_argument(layer):
    """RotaryEmbedding calls it base; the layers' users pass rotary_base (the message had said base)."""
    from nsa_flex.modules.transformer import CausalAttention

    build = (lambda **kw: SparseAttention(**SMALL, **kw)) if layer == "nsa" else (
        lambda **kw: CausalAttention(16, 4, 4, 4, **kw))
    with pytest.raises(ValueError, match="rotary_base must be a finite number > 1, got 0.5"):
        build(rotary_base=0.5)
    build(rotary_base=0.5, use_rotary=False)  # unused without RoPE


def test_a_cache_of_the_wrong_kind_is_a_type_error_in_both_layers():
    from nsa_flex.modules import KVCache
    from nsa_flex.modules.transformer import CausalAttention

    x = torch.randn(1, 3, 16)
    with pytest.raises(TypeError, match="cache must be an NSACache"):
        SparseAttention(**SMALL)(x, cache=KVCache(1, 4, 4, 8))
    with pytest.raises(TypeError, match="cache must be a KVCache"):  # had been a ValueError
        CausalAttention(16, 4, 4, 4)(x, cache=SparseAttention(**SMALL).init_cache(1, 8))
