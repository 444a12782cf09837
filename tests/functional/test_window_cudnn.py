"""The sliding window on cuDNN (nsa_flex.functional.window_cudnn) against the float64 dense window: outputs and
gradients. The cuDNN tests need CUDA and cudnn-frontend (the ``cudnn`` extra); without them the window runs on
FlexAttention, which the first test checks."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex import masks, testing
from nsa_flex.functional import cudnn_graph, window_cudnn


def test_not_supported_without_cuda_or_frontend_or_for_one_token():
    q = torch.randn(1, 4, 40, 16, dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 40, 16, dtype=torch.bfloat16)
    assert not window_cudnn.supported(q, k, v, 8, 0.25)
    with mock.patch.object(window_cudnn, "cudnn", None):
        assert not window_cudnn.supported(q, k, v, 8, 0.25)
    if torch.cuda.is_available():  # cuDNN refuses a single query against a single key: not even tried
        one = [x[:, :, :1].cuda() for x in (q, k, v)]
        assert not window_cudnn.supported(*one, 8, 0.25)


@pytest.mark.parametrize("B, Hq, Hkv, T, D, heads_per_call", [
    (1, 64, 4, 65536, 128, 16),  # paper config at 64k: 64 MiB a head, a group's 1 GiB fits q's 1 GiB
    (1, 16, 1, 65536, 128, 4),  # small config at 64k: 64 MiB a head, 256 MiB (q's size) for 4 of the 16
    (1, 16, 1, 16384, 128, 8),  # small config at 16k: 16 MiB a head, 8 of them twice q's 64 MiB
    (16, 8, 2, 4096, 64, 4),  # bench.train_lm's LM: the group's 128 MiB unsplit (twice q's 64 MiB)
    (1, 64, 4, 8192, 128, 16),  # paper config at 8k: 8 MiB a head, a group's 128 MiB is q's size
    (1, 4, 1, 300, 64, 4),  # a small problem: never split (under 64 MiB), whatever q's size
])
def test_backward_calls_keep_the_float32_workspace_near_q(B, Hq, Hkv, T, D, heads_per_call):
    """cuDNN's GQA backward holds 4 * B * T * (D + Dv) float32 bytes per query head of a call: at most q's size,
    or twice that up to 256 MiB, or 64 MiB (the split costs more than it saves when the workspace is small)."""
    q = torch.empty(B, Hq, T, D, device="meta", dtype=torch.bfloat16)
    v = torch.empty(B, Hkv, T, D, device="meta", dtype=torch.bfloat16)
    chunks = window_cudnn._backward_chunks(q, v)
    assert {len(c) for c in chunks} == {heads_per_call}
    assert [h for c in chunks for h in c] == list(range(Hq))


def _window_math(q, k, v, window_size, scale):
    """Float64 dense sliding-window attention with gradients (the reference)."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = testing.dense_attention(*leaves, masks.sliding_window(window_size), scale=scale)
    return out, leaves


def _assert_close_bf16(got, want, name):
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=1.5e-2, msg=name)


@pytest.mark.gpu
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 4, 8]), T=st.integers(2, 700),
       D=st.sampled_from([64, 128]), window=st.integers(1, 800), layout=st.sampled_from(["bthd", "bhtd"]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), split=st.sampled_from([None, 1, 2]),
       seed=st.integers(0, 2**16))
def test_cudnn_window_equals_dense_with_gradients(B, Hkv, G, T, D, window, layout, dtype, split, seed):
    """Any length (odd ones too), window (also wider than the sequence), GQA ratio and storage: cuDNN's banded
    attention and its backward, run per kv head or (``split``) per 1 or 2 query heads of a group, whose
    dk/dv parts are then summed."""
    pytest.importorskip("cudnn")
    gen = torch.Generator().manual_seed(seed)
    Hq = G * Hkv
    shapes = [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)]
    q, k, v = (torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes)
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    do = torch.randn(B, Hq, T, D, generator=gen).to("cuda", dtype)
    scale = D ** -0.5
    assert window_cudnn.supported(q, k, v, window, scale)
    heads = None if split is None or G % split else split
    with mock.patch.object(window_cudnn, "BACKWARD_HEADS", heads):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = F.sliding_window_attention(*leaves, window, scale)
        out.backward(do)
    assert out.stride() == (q.stride() if layout == "bthd" else out.contiguous().stride())
    ref, ref_leaves = _window_math(q, k, v, window, scale)
    ref.backward(do.double())
    _assert_close_bf16(out, ref, "out")
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        _assert_close_bf16(a.grad, b.grad, name)


@pytest.mark.gpu
def test_unbuildable_graph_warns_and_falls_back_to_flex():
    """Where cuDNN refuses the graph (here: made to), a warning names the shape and FlexAttention runs the
    window, with the same result."""
    pytest.importorskip("cudnn")
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    want = F.sliding_window_attention(q, k, v, 37)
    refused = mock.patch.object(cudnn_graph, "finish", side_effect=RuntimeError("no engine"))
    with refused, mock.patch.object(window_cudnn, "_SUPPORT", {}), \
            mock.patch.object(cudnn_graph, "_GRAPHS", cudnn_graph._GRAPHS.__class__()):
        with pytest.warns(UserWarning, match="cuDNN could not build"):
            assert not window_cudnn.supported(q, k, v, 37, 64 ** -0.5)
        got = F.sliding_window_attention(q, k, v, 37)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
