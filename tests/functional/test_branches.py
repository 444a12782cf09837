"""Fast-path details of the branch functions (nsa_flex.functional.branches), and the dense path under them on CPU
(nsa_flex.functional.dense), against the float64 dense reference."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex import masks, testing
from nsa_flex.functional import compressed_sdpa, cudnn_graph, dense
from nsa_flex.testing import reference
from nsa_flex.testing import strategies as nst


def _math_in_place_of_cudnn(monkeypatch):
    """The cuDNN calls as float64 math, so everything around them is checked on CPU."""
    monkeypatch.setattr(compressed_sdpa, "attention_forward", reference.attention_math)
    monkeypatch.setattr(compressed_sdpa, "attention_backward", reference.attention_math_backward)


@given(B=st.integers(1, 2), T=st.integers(1, 300), G=st.sampled_from([1, 2, 16]), Hkv=st.integers(1, 2),
       stride=st.sampled_from([1, 4, 8, 16]), ratio=st.sampled_from([1, 2, 3]),
       layout=st.sampled_from(["bhtd", "bthd"]), pass_query=st.sampled_from([None, "bthd", "bhtd", "unused"]),
       seed=st.integers(0, 2**16))
def test_folded_compressed_attention_equals_dense(B, T, G, Hkv, stride, ratio, layout, pass_query, seed):
    """The stride folded into the heads (token ``l - 1 + i*d + r`` -> causal row ``i`` of head ``r*H + h``),
    the partial last group and the rows that see nothing: outputs, lse and gradients equal the dense
    compressed-causal attention, in float64 with float64 math in place of cuDNN, for either storage of q.
    With ``pass_query`` the branch also hands q on, and the gradient coming back through that view (laid out
    as q's storage, or not, so it is first copied) is added into the branch's own; "unused": the branch's
    output gets no gradient, only the passed-on q does."""
    block = stride * ratio
    assume(T >= block)
    gen = torch.Generator().manual_seed(seed)
    shape = (B, G * Hkv, T, 8) if layout == "bhtd" else (B, T, G * Hkv, 8)
    q = torch.randn(shape, generator=gen, dtype=torch.float64)
    q = (q if layout == "bhtd" else q.transpose(1, 2)).requires_grad_()
    k, v = (torch.randn(B, Hkv, T, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k_cmp, v_cmp = (F.mean_pool(x, block, stride).requires_grad_() for x in (k, v))
    # another use of the passed-on q: a weighted sum whose gradient is `w`, stored as drawn
    w = torch.randn((B, T, G * Hkv, 8) if pass_query == "bthd" else (B, G * Hkv, T, 8), generator=gen,
                    dtype=torch.float64)
    w = w.transpose(1, 2) if pass_query == "bthd" else w
    with pytest.MonkeyPatch.context() as patch:
        _math_in_place_of_cudnn(patch)
        if pass_query is None:
            out, lse = compressed_sdpa.compressed_attention_cudnn(q, k_cmp, v_cmp, block, stride, 0.3)
        else:
            out, lse, q_view = compressed_sdpa.compressed_attention_cudnn(q, k_cmp, v_cmp, block, stride, 0.3,
                                                                          return_query=True)
            assert torch.equal(q_view, q)
        do = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        loss = (out * do).sum() if pass_query != "unused" else 0
        loss = loss + (q_view * w).sum() if pass_query is not None else loss
        grads = torch.autograd.grad(loss, (q, k_cmp, v_cmp), allow_unused=True, materialize_grads=True)
    ref, ref_lse = testing.dense_attention(q, k_cmp, v_cmp, masks.compressed_causal(block, stride), scale=0.3,
                                           return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    seen = ref_lse > float("-inf")
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], rtol=0, atol=1e-12)
    want = torch.autograd.grad(ref, (q, k_cmp, v_cmp), do if pass_query != "unused" else torch.zeros_like(do))
    want = (want[0] + (w if pass_query is not None else 0), *want[1:])
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_cudnn_ops_pass_opcheck(monkeypatch):
    """The custom ops' fake kernels, autograd registration and schema agree with their real kernels."""
    _math_in_place_of_cudnn(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 50, 4, 8, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k_cmp, v_cmp = (torch.randn(2, 2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.nsa_flex.compressed_cudnn.default, (q, k_cmp, v_cmp, 16, 16, 0.3))


@pytest.mark.gpu
@pytest.mark.parametrize("T, G, Hkv, stride, block, B, layout", [
    (20000, 16, 4, 16, 32, 1, "bhtd"), (4097, 1, 2, 16, 32, 2, "bthd"), (3001, 4, 1, 8, 64, 1, "bthd"),
    (1000, 16, 4, 16, 16, 2, "bhtd"), (40, 16, 1, 16, 32, 1, "bthd")])
def test_gpu_cudnn_compressed_attention_equals_flex(T, G, Hkv, stride, block, B, layout):
    """cuDNN over the folded queries against one FlexAttention call over the compressed mask, bf16: outputs,
    lse and gradients, eager and in a fullgraph compile; odd lengths (partial last groups, T = 40 has no whole
    group), batches of two, q stored either way."""
    q, k, v, _ = testing.nsa_inputs(T, G * Hkv, Hkv, 128, "random", "cuda", torch.bfloat16, batch=B)
    if layout == "bthd":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_cmp, v_cmp = F.mean_pool(k, block, stride), F.mean_pool(v, block, stride)
    assert compressed_sdpa.supported(q, k_cmp, v_cmp, block, stride)
    do = torch.randn_like(q)
    compiled = torch.compile(F.compressed_attention, fullgraph=True)
    results = []
    for fn, cudnn in ((F.compressed_attention, True), (compiled, True), (F.compressed_attention, False)):
        leaves = [x.detach().requires_grad_() for x in (q, k_cmp, v_cmp)]
        with pytest.MonkeyPatch.context() as patch:
            if not cudnn:
                patch.setattr(compressed_sdpa, "supported", lambda *args: False)
            out, lse = fn(*leaves, block, stride, return_lse=True)
        out.backward(do)
        results.append([out, lse, *(x.grad for x in leaves)])
    want_out, want_lse, *want_grads = results[-1]
    for out, lse, *grads in results[:-1]:
        _assert_close_bf16(out, lse, grads, want_out, want_lse, want_grads)


@pytest.mark.gpu
def test_gpu_compressed_forward_without_frontend_graph_warns_and_copies():
    """Where cudnn-frontend cannot build the folded forward's graph (here: made to fail), a warning names the
    shape and torch's cuDNN attention runs it, its output copied in: the same output and lse as the graph's."""
    pytest.importorskip("cudnn")
    q, k, v, _ = testing.nsa_inputs(3001, 16, 2, 64, "random", "cuda", torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_cmp, v_cmp = F.mean_pool(k, 32, 16), F.mean_pool(v, 32, 16)
    want_out, want_lse = F.compressed_attention(q, k_cmp, v_cmp, 32, 16, return_lse=True)
    refused = mock.patch.object(cudnn_graph, "finish", side_effect=RuntimeError("no engine"))
    with refused, mock.patch.object(compressed_sdpa, "_FRONTEND", {}) as verdicts, \
            mock.patch.object(cudnn_graph, "_GRAPHS", cudnn_graph._GRAPHS.__class__()):
        with pytest.warns(UserWarning, match="could not build the compressed attention graph"):
            out, lse = F.compressed_attention(q, k_cmp, v_cmp, 32, 16, return_lse=True)
        assert list(verdicts.values()) == [False]
    seen = want_lse > float("-inf")
    assert torch.equal(lse > float("-inf"), seen)
    torch.testing.assert_close(lse[seen], want_lse[seen], rtol=0, atol=1e-3)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=0, atol=2e-2)


def _assert_close_bf16(out, lse, grads, want_out, want_lse, want_grads):
    seen = want_lse > float("-inf")  # the first 31 tokens see no compressed key
    assert torch.equal(lse > float("-inf"), seen)
    torch.testing.assert_close(lse[seen], want_lse[seen], rtol=0, atol=1e-2)
    for name, a, b in zip(("out", "dq", "dk_cmp", "dv_cmp"), (out, *grads), (want_out, *want_grads)):
        # relative to the gradient's size, absolute below 1: where each token sees one compressed key
        # (T = 40) dq is exactly 0 and the paths differ only by rounding noise
        scale = b.float().abs().max().clamp(min=1.0)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=0, atol=1e-2, msg=name)


def test_cudnn_path_not_taken_when_determinism_is_required(monkeypatch):
    """Like torch's SDPA: cuDNN attention is not deterministic, so torch.use_deterministic_algorithms(True)
    keeps the FlexAttention path (checked through the readiness probe, which needs no GPU to say no)."""
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert compressed_sdpa.cudnn_attention_ready(0)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not compressed_sdpa.cudnn_attention_ready(0)
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert compressed_sdpa.cudnn_attention_ready(0)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@given(B=st.integers(1, 2), T=st.integers(1, 90), G=st.sampled_from([1, 3]), Hkv=st.integers(1, 2),
       chunk=st.integers(1, 40), seed=st.integers(0, 2**16), data=st.data())
def test_branches_cpu_gradient_path_in_chunks_matches_reference(B, T, G, Hkv, chunk, seed, data):
    """On CPU with gradients each branch is dense_masked_attention over its mask_mod's rows, ``dense.CHUNK_SIZE``
    queries at a time (here few, so that several chunks run): outputs, lse and gradients equal the float64
    reference, which takes all queries at once."""
    block, stride, sel, window = 8, 4, 8, 5
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, G * Hkv, T, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k_cmp, v_cmp = F.mean_pool(k, block, stride), F.mean_pool(v, block, stride)
    idx = data.draw(nst.block_indices(B, Hkv, T, 3, math.ceil(T / sel)))
    with mock.patch.object(dense, "CHUNK_SIZE", chunk):
        cmp, lse = F.compressed_attention(q, k_cmp, v_cmp, block, stride, return_lse=True)
        outs = [cmp, F.selected_attention(q, k, v, idx, sel), F.sliding_window_attention(q, k, v, window)]
    visible = torch.arange(k_cmp.shape[2]) * stride + block - 1 <= torch.arange(T).view(-1, 1)
    ref_cmp, ref_lse = testing.dense_attention(q, k_cmp, v_cmp, visible, return_lse=True)
    refs = [ref_cmp, testing.dense_attention(q, k, v, masks.fine_selection(idx, sel, G)),
            testing.dense_attention(q, k, v, masks.sliding_window(window))]
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    seen = ref_lse > float("-inf")
    torch.testing.assert_close(lse[seen], ref_lse[seen], rtol=0, atol=1e-12)
    for name, out, ref in zip(("compressed", "selected", "window"), outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, msg=name)
    dos = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in refs]
    # retained: both sides go through the same mean pooling into k_cmp, v_cmp
    grads = torch.autograd.grad(sum((o * do).sum() for o, do in zip(outs, dos)), (q, k, v), retain_graph=True)
    want = torch.autograd.grad(sum((o * do).sum() for o, do in zip(refs, dos)), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@given(B=st.integers(1, 2), Q=st.integers(1, 60), KV=st.integers(1, 60), chunk=st.integers(1, 16),
       mask_shape=st.sampled_from(["full", "key padding", "2d", "none"]), seed=st.integers(0, 2**16))
def test_dense_masked_attention_in_chunks_with_score_mod_and_tensor_masks(B, Q, KV, chunk, mask_shape, seed):
    """A score_mod of the query position, and bool masks of every broadcastable shape (a key padding mask
    ``[B, 1, 1, KV]`` is the same for every chunk's rows), give in chunks what all queries at once give."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, Q, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, 2, KV, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    shape = {"full": (B, 4, Q, KV), "key padding": (B, 1, 1, KV), "2d": (Q, KV), "none": None}[mask_shape]
    mask = None if shape is None else torch.rand(shape, generator=gen) < 0.7

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx).abs() + 0.2 * h

    out, lse = F.dense_masked_attention(q, k, v, mask, score_mod, return_lse=True, chunk_size=chunk)
    want, want_lse = testing.dense_attention(q, k, v, mask, score_mod, return_lse=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


def test_dense_masked_attention_rejects_bad_chunk_sizes_and_masks():
    q, k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"chunk_size must be an int >= 1, got {bad}"):
            F.dense_masked_attention(q, k, v, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        F.dense_masked_attention(q, k, v, chunk_size=2.0)
    want = r"mask must broadcast to \[B, Hq, Q, KV\] = \[1, 2, 10, 9\], got shape \[1, 2, 10, 10\]"
    with pytest.raises(ValueError, match=want):
        F.dense_masked_attention(q, k, v, torch.ones(1, 2, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must broadcast"):
        F.dense_masked_attention(q, k, v, torch.ones(1, 1, 1, 10, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor .* got dtype torch.float32"):
        F.dense_masked_attention(q, k, v, torch.ones(1, 2, 10, 9))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        F.dense_masked_attention(q, k, v, [[True] * 9] * 10)


@pytest.mark.parametrize("call", [
    lambda q, k, idx: F.sliding_window_attention(q, k, k, 4, scale=-1.0),
    lambda q, k, idx: F.compressed_attention(q, k[:, :, :3], k[:, :, :3], 8, 4, scale=0.0),
    lambda q, k, idx: F.selected_attention(q, k, k, idx, 4, scale="x"),
    lambda q, k, idx: F.select_blocks(q, k[:, :, :3], 8, 4, 8, 2, 1, 1, scale=float("nan")),
    lambda q, k, idx: F.dense_masked_attention(q, k, k, scale=float("inf")),
])
def test_every_branch_checks_a_given_scale(call):
    """nsa_attention and the decoders refused a non-positive scale; the branches had run with it (a NaN scale
    gave a meaningless selection, a string a raw indexing error)."""
    q, k, idx = torch.randn(1, 2, 20, 8), torch.randn(1, 1, 20, 8), torch.zeros(1, 1, 20, 2, dtype=torch.long)
    with pytest.raises((ValueError, TypeError), match="scale must be a finite number > 0"):
        call(q, k, idx)


def test_dense_masked_attention_checks_heads_and_score_mod():
    from nsa_flex import scores

    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):  # had been an einsum error
        F.dense_masked_attention(q, k, k)
    with pytest.raises(ValueError, match="same head dim"):
        F.dense_masked_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="score_mod .* 4 heads, got 3"):  # had run with another head count's slopes
        F.dense_masked_attention(q, q, q, score_mod=scores.alibi(4))
