"""Fast-path details of the branch functions (nsa_flex.functional.branches) against the float64 dense reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex import masks, testing
from nsa_flex.functional import branches


@given(chunk=st.sampled_from([128, 256]), extra=st.integers(0, 3 * 256 + 100), G=st.sampled_from([1, 2, 16]),
       Hkv=st.integers(1, 2), stride=st.sampled_from([8, 16]), ratio=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_chunked_compressed_attention_equals_dense(chunk, extra, G, Hkv, stride, ratio, seed):
    """Queries cut into chunks moved into the batch (padded last chunk): output and lse as the dense
    compressed-causal attention. On CPU the forward runs FlexAttention eagerly, so the chunking is exercised."""
    T, block = 2 * chunk + extra, stride * ratio
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, G * Hkv, T, 16, generator=gen)
    k, v = (torch.randn(2, Hkv, T, 16, generator=gen) for _ in range(2))
    k_cmp, v_cmp = F.mean_pool(k, block, stride), F.mean_pool(v, block, stride)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(branches, "COMPRESSED_QUERY_CHUNK", chunk)
        out, lse = F.compressed_attention(q, k_cmp, v_cmp, block, stride, return_lse=True)
    ref, ref_lse = testing.dense_attention(q, k_cmp, v_cmp, masks.compressed_causal(block, stride), return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    seen = ref_lse > float("-inf")
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], rtol=0, atol=1e-5)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))


@pytest.mark.gpu
def test_gpu_chunked_compressed_attention_gradients_equal_unchunked():
    """Paper configuration, 20000 tokens (five chunks, the last padded), bf16: outputs, lse and gradients of
    the chunked path, eager and in a fullgraph compile, against one FlexAttention call over all queries."""
    q, k, v, _ = testing.nsa_inputs(20000, 64, 4, 128, "random", "cuda", torch.bfloat16)
    k_cmp, v_cmp = F.mean_pool(k, 32, 16), F.mean_pool(v, 32, 16)
    do = torch.randn_like(q)
    compiled = torch.compile(F.compressed_attention, fullgraph=True)
    results = []
    for fn, chunk in ((F.compressed_attention, branches.COMPRESSED_QUERY_CHUNK),
                      (compiled, branches.COMPRESSED_QUERY_CHUNK), (F.compressed_attention, 10**9)):
        leaves = [x.detach().requires_grad_() for x in (q, k_cmp, v_cmp)]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(branches, "COMPRESSED_QUERY_CHUNK", chunk)
            out, lse = fn(*leaves, 32, 16, return_lse=True)
        out.backward(do)
        results.append([out, lse, *(x.grad for x in leaves)])
    want_out, want_lse, *want_grads = results[-1]
    for out, lse, *grads in results[:-1]:
        _assert_close_bf16(out, lse, grads, want_out, want_lse, want_grads)


def _assert_close_bf16(out, lse, grads, want_out, want_lse, want_grads):
    seen = want_lse > float("-inf")  # the first 31 tokens see no compressed key
    assert torch.equal(lse > float("-inf"), seen)
    torch.testing.assert_close(lse[seen], want_lse[seen], rtol=0, atol=1e-2)
    for name, a, b in zip(("out", "dq", "dk_cmp", "dv_cmp"), (out, *grads), (want_out, *want_grads)):
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=0, atol=1e-2, msg=name)
