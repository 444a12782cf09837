"""The selected-attention kernels (nsa_flex.functional.selected_kernel) against selected_attention's float64
dense path: outputs and gradients. On CUDA the kernels run compiled; on a CPU machine with triton installed,
under Triton's interpreter (small shapes); without triton these tests skip."""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F


@st.composite
def cases(draw):
    G = draw(st.sampled_from([1, 2, 3, 4, 16]))
    return dict(B=draw(st.integers(1, 2)), G=G, Hkv=draw(st.integers(1, 2)) if G < 16 else 1,
                T=draw(st.integers(1, 130)), D=draw(st.sampled_from([16, 24])), Dv=draw(st.sampled_from([16, 8])),
                block=draw(st.sampled_from([16, 32])), n=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)),
                token_major=draw(st.booleans()), forced=draw(st.booleans()),
                chunk=draw(st.sampled_from([16, None])),  # dk/dv programs of 16 tokens: many chunks per block
                pass_query=draw(st.booleans()))  # q handed on to other math, its gradient summed by the dq kernel


def _problem(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    B, G, Hkv, T, D, Dv, bs, n = (case[k] for k in ("B", "G", "Hkv", "T", "D", "Dv", "block", "n"))
    q = torch.randn(B, G * Hkv, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, Dv, generator=gen)
    S = -(-T // bs)
    # Any block index, also repeated, later than the token or -1: the kernel must mask what the mask masks.
    idx = torch.randint(-1, S, (B, Hkv, T, n), generator=gen)
    if case["forced"]:  # NSA's forced blocks: the first and the token's own, listed alike by neighbouring tokens
        idx[..., 0] = 0
        idx[..., -1] = torch.arange(T) // bs
    do = torch.randn(B, G * Hkv, T, Dv, generator=gen)
    if case["token_major"]:  # [B, T, H, D] storage, as an attention layer's projections give it
        q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    return [x.to(device) for x in (q, k, v, idx, do)]


def _grads(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


@given(case=cases())
def test_kernels_equal_dense_selected_attention_with_gradients(triton_device, case):
    from nsa_flex.functional import selected_kernel

    q, k, v, idx, do = _problem(case, triton_device)
    bs, scale = case["block"], case["D"] ** -0.5
    chunk = case["chunk"] or selected_kernel._CHUNK

    def plus_other_use(attention):
        """``attention``'s output, plus (with ``pass_query``) a function of the q it hands on, as the window
        branch of nsa_attention uses it: dq then sums both gradients."""
        def fn(q, k, v):
            if not case["pass_query"]:
                return attention(q, k, v)
            o, q_on = attention(q, k, v, return_query=True)
            return o + q_on.square().mean(-1, keepdim=True)
        return fn

    def kernel(q, k, v, return_query=False):
        return selected_kernel.selected_attention_kernel(q, k, v, idx, bs, scale, pass_query=return_query)

    with mock.patch.object(selected_kernel, "_CHUNK", chunk):
        got = _grads(plus_other_use(kernel), q, k, v, do)
    cpu = [x.cpu().double() for x in (q, k, v, do)]
    want = _grads(plus_other_use(lambda q, k, v, **kw: F.selected_attention(q, k, v, idx.cpu(), bs, scale, **kw)),
                  *cpu[:3], cpu[3])
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=2e-5, msg=name)


@given(counts=st.lists(st.integers(0, 600), min_size=1, max_size=40), chunk=st.sampled_from([1, 16, 256]))
def test_dkv_work_list_covers_every_chunk_once(counts, chunk):
    from nsa_flex.functional.selected_kernel import _chunks

    work = _chunks(torch.tensor(counts, dtype=torch.int32), sum(counts), chunk)
    seg, first = work.tolist()
    want = [(s, c) for s, count in enumerate(counts) for c in range(0, count, chunk)]
    assert [(s, c) for s, c in zip(seg, first) if s >= 0] == want  # in segment order, each once
    assert all(s == -1 and c == 0 for s, c in zip(seg[len(want):], first[len(want):]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_gpu_kernels_equal_flex_path_bf16_paper_config(kind, monkeypatch):
    """64 query heads, 4 kv heads, D=128, l'=64, n=16 at 4096 tokens in bf16, the blocks select_blocks
    chooses: the kernels against the FlexAttention path (same inputs, both float32 inside), forward and
    gradients, eagerly and in a fullgraph compile."""
    from nsa_flex import testing
    from nsa_flex.functional import selected_kernel

    T = 4096
    q, k, v, _ = testing.nsa_inputs(T, 64, 4, 128, kind, "cuda", torch.bfloat16)
    k_cmp = F.mean_pool(k, 32, 16)
    _, lse = F.compressed_attention(q, k_cmp, F.mean_pool(v, 32, 16), 32, 16, return_lse=True)
    idx = F.select_blocks(q, k_cmp, 32, 16, 64, 16, lse=lse)
    do = torch.randn_like(q)
    assert selected_kernel.supported(q, k, v, 64)
    kernel = _grads(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), q, k, v, do)
    compiled = torch.compile(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), fullgraph=True)
    traced = _grads(compiled, q, k, v, do)
    monkeypatch.setattr(selected_kernel, "supported", lambda *args: False)
    flex = _grads(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), q, k, v, do)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), kernel, flex, traced):
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=0, atol=2e-2, msg=name)
        torch.testing.assert_close(c.float() / scale, a.float() / scale, rtol=0, atol=2e-2, msg=name)
