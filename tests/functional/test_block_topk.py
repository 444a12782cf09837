"""The fused scoring + top-n kernel (nsa_flex.functional.block_topk) against select_blocks' unfused path.

On CUDA the kernel runs compiled; on a CPU machine with triton installed it runs under Triton's interpreter
(slow: small shapes only). Without triton these tests skip: nothing else calls the kernel there, since
select_blocks takes it only for CUDA tensors.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from helpers import assert_same_choices

from nsa_flex import functional as F
from nsa_flex.functional import block_topk, selection


@st.composite
def selection_cases(draw):
    """Configurations the kernel takes (``r = l'/d`` a power of two, ``L <= r``): odd T, GQA 1..16 (also 3),
    n beyond the blocks and beyond one step's 16 blocks, l % d != 0, D not a power of two."""
    G = draw(st.sampled_from([1, 2, 3, 4, 16]))
    stride = draw(st.sampled_from([4, 8]))
    r = draw(st.sampled_from([1, 2, 4]))
    block = draw(st.integers(stride, stride * (r + 1)))  # L = ceil(l/d) - 1 <= r
    return dict(B=draw(st.integers(1, 2)), G=G, Hkv=draw(st.integers(1, 2)) if G < 16 else 1,
                T=draw(st.integers(1, 160)), D=draw(st.sampled_from([8, 24])), block=block, stride=stride,
                sel=stride * r, n=draw(st.integers(1, 20)), num_initial=draw(st.integers(0, 2)),
                num_local=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**16)))


def _problem(case, device, dtype=torch.float32):
    """q, compressed keys and the compressed branch's lse, as nsa_attention hands them to select_blocks."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, G, Hkv, T, D = (case[k] for k in ("B", "G", "Hkv", "T", "D"))
    q = torch.randn(B, G * Hkv, T, D, generator=gen)
    k, v = torch.randn(2, B, Hkv, T, D, generator=gen)
    k_cmp, v_cmp = (F.mean_pool(x, case["block"], case["stride"]) for x in (k, v))
    _, lse = F.compressed_attention(q, k_cmp, v_cmp, case["block"], case["stride"], return_lse=True)
    return [x.to(device=device, dtype=dtype if x is not lse else torch.float32) for x in (q, k_cmp, lse)]


def _config(case):
    return (case["block"], case["stride"], case["sel"], case["n"], case["num_initial"], case["num_local"])


def _fused(q, k_cmp, lse, block, stride, sel, n, num_initial, num_local):
    w = selection.overlap_pattern(block, stride, sel, q.device)
    return block_topk.launch(q, k_cmp, lse, w, q.shape[-1] ** -0.5, block, stride, sel, n, num_initial, num_local)


def _unfused(q, k_cmp, lse, *config):
    return F.select_blocks(q.double().cpu(), k_cmp.double().cpu(), *config, lse=lse.double().cpu())




def test_compiled_graphs_see_the_op_through_its_fake():
    """torch.compile traces the opaque op with fake tensors: its fake gives ``[B, Hkv, T, n]`` int64 without
    launching anything (the kernel runs only on real tensors, as in eager code)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k_cmp, lse, w = torch.empty(2, 6, 100, 16), torch.empty(2, 3, 5, 16), torch.empty(2, 6, 100), torch.empty(3)
        out = torch.ops.nsa_flex.block_topk(q, k_cmp, lse, w, 0.25, 32, 16, 64, 7, 1, 2)
    assert out.shape == (2, 3, 100, 7) and out.dtype == torch.long


def test_kernel_is_taken_only_on_cuda_for_configs_it_handles():
    q = torch.randn(1, 4, 64, 16)
    assert not block_topk.supported(q, 32, 16, 64, 16)  # CPU: always the chunked torch path
    if torch.cuda.is_available() and block_topk.triton is not None:
        q = q.cuda()
        assert block_topk.supported(q, 32, 16, 64, 16)
        assert not block_topk.supported(q, 32, 16, 48, 16)  # r = 3: not a power of two
        assert not block_topk.supported(q, 64, 8, 16, 16)  # L = 7 compressed blocks reach back past r = 2
        assert not block_topk.supported(q.double(), 32, 16, 64, 16)
        assert block_topk.supported(torch.randn(1, 4, 64, 128, device="cuda", dtype=torch.bfloat16), 32, 16, 64, 16)
        assert not block_topk.supported(torch.randn(1, 4, 64, 128, device="cuda"), 32, 16, 64, 16)  # fp32 row: 512 B


@given(case=selection_cases())
def test_kernel_equals_unfused_selection(triton_device, case):
    q, k_cmp, lse = _problem(case, triton_device)
    got = _fused(q, k_cmp, lse, *_config(case))
    assert got.shape == (case["B"], case["Hkv"], case["T"], case["n"]) and got.dtype == torch.long
    assert_same_choices(got, _unfused(q, k_cmp, lse, *_config(case)), q, k_cmp, lse, *_config(case))


def test_kernel_breaks_ties_toward_lower_block_like_select_blocks(triton_device):
    # All compressed keys equal: every visible compressed key has the same probability, many blocks tie.
    T = 200
    q = torch.randn(1, 2, T, 8)
    k_cmp = torch.zeros(1, 1, (T - 8) // 8 + 1, 8)
    _, lse = F.compressed_attention(q, k_cmp, k_cmp, 8, 8, return_lse=True)  # on CPU: CUDA flex wants D >= 16
    got = _fused(q.to(triton_device), k_cmp.to(triton_device), lse.to(triton_device), 8, 8, 16, 4, 1, 2).cpu()
    assert torch.equal(got, F.select_blocks(q, k_cmp, 8, 8, 16, 4, 1, 2))
    assert got[0, 0, 199].tolist() == [0, 12, 11, 1] and got[0, 0, 5].tolist() == [0, -1, -1, -1]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_gpu_select_blocks_takes_the_kernel_in_bf16_and_under_compile(kind, monkeypatch):
    """Paper configuration, 4096 tokens, bf16: the kernel (eager and inside a fullgraph compile) chooses what
    the unfused tiles choose from the same bf16 inputs, up to float32 near-ties."""
    from nsa_flex import testing

    T, cfg = 4096, (32, 16, 64, 16, 1, 2)
    q, k, v, _ = testing.nsa_inputs(T, 16, 1, 128, kind, "cuda", torch.bfloat16)
    k_cmp, v_cmp = F.mean_pool(k, 32, 16), F.mean_pool(v, 32, 16)
    _, lse = F.compressed_attention(q, k_cmp, v_cmp, 32, 16, return_lse=True)
    assert block_topk.supported(q, 32, 16, 64, 16)
    fused = F.select_blocks(q, k_cmp, *cfg, lse=lse)
    compiled = torch.compile(lambda q, k, lse: F.select_blocks(q, k, *cfg, lse=lse), fullgraph=True)
    assert torch.equal(compiled(q, k_cmp, lse), fused)
    monkeypatch.setattr(block_topk, "supported", lambda *args: False)
    tiles = F.select_blocks(q, k_cmp, *cfg, lse=lse)
    same = (fused == tiles).all(-1).float().mean().item()
    assert same > 0.99, f"only {same:.2%} of tokens chose the same blocks"
    assert_same_choices(fused, tiles, q.float(), k_cmp.float(), lse, *cfg, tol=1e-3)
