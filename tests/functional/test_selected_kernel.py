"""The selected-attention kernels (nsa_flex.functional.selected_kernel) against selected_attention's float64
dense path: outputs and gradients. On CUDA the kernels run compiled; on a CPU machine with triton installed,
under Triton's interpreter (small shapes); without triton these tests skip."""

from unittest import mock

import numpy as np
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
                pass_query=draw(st.booleans()),  # q handed on to other math, its gradient summed by the dq kernel
                # NSA's gate fused into the kernels; negative gates take the dk/dv kernel's sign-flip branch
                gate=draw(st.sampled_from([None, "sigmoid", "with zeros", "signed"])))


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
    # the gate column of NSA's [B, H, T, 3] gates (a strided view), exact zeros included: a branch switched off
    gates = torch.rand(B, G * Hkv, T, 3, generator=gen)
    if case.get("gate") == "with zeros":
        gates = gates * (torch.rand(gates.shape, generator=gen) > 0.3)
    if case.get("gate") == "signed":
        gates = 2 * gates - 1
    if case["token_major"]:  # [B, T, H, D] storage, as an attention layer's projections give it
        q, k, v, do, gates = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do, gates))
    return [x.to(device) for x in (q, k, v, idx, do, gates)]


def _grads(fn, do, *inputs):
    """``fn(*inputs)`` and the gradients of ``do``'s dot with it, as the backward lays them out (``.grad`` would
    re-lay them as the inputs); a ``None`` input gets none."""
    leaves = [None if x is None else x.detach().requires_grad_() for x in inputs]
    o = fn(*leaves)
    used = [x for x in leaves if x is not None]
    return [o.detach(), *torch.autograd.grad(o, used, do)]


@given(case=cases())
def test_kernels_equal_dense_selected_attention_with_gradients(triton_device, case):
    from nsa_flex.functional import selected_kernel

    q, k, v, idx, do, gates = _problem(case, triton_device)
    gate = None if case["gate"] is None else gates[..., 1]
    bs, scale = case["block"], case["D"] ** -0.5
    chunk = case["chunk"] or selected_kernel._CHUNK

    def plus_other_use(attention):
        """``attention``'s output, plus (with ``pass_query``) a function of the q it hands on, as the window
        branch of nsa_attention uses it: dq then sums both gradients."""
        def fn(q, k, v, gate):
            if not case["pass_query"]:
                return attention(q, k, v, gate=gate)
            o, q_on = attention(q, k, v, return_query=True, gate=gate)
            return o + q_on.square().mean(-1, keepdim=True)
        return fn

    def kernel(q, k, v, return_query=False, gate=None):
        return selected_kernel.selected_attention_kernel(q, k, v, idx, bs, scale, pass_query=return_query,
                                                         gate=gate)

    with mock.patch.object(selected_kernel, "_CHUNK", chunk):
        got = _grads(plus_other_use(kernel), do, q, k, v, gate)
    cpu = [None if x is None else x.cpu().double() for x in (q, k, v, gate, do)]
    want = _grads(plus_other_use(lambda q, k, v, **kw: F.selected_attention(q, k, v, idx.cpu(), bs, scale, **kw)),
                  cpu[4], *cpu[:4])
    assert len(got) == len(want) == (4 if gate is None else 5)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dgate"), got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=2e-5, msg=name)
    # k's and v's gradients laid out as k and v: autograd sums them with the window's without a layout change
    assert all(_alike(g, x) for g, x in ((got[2], k), (got[3], v)))


def _alike(a, b):
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


@given(counts=st.lists(st.integers(0, 600), min_size=1, max_size=40), chunk=st.sampled_from([1, 16, 256]))
def test_dkv_work_list_covers_every_chunk_once(counts, chunk):
    from nsa_flex.functional.selected_kernel import _chunks

    work = _chunks(torch.tensor(counts, dtype=torch.int32), sum(counts), chunk)
    seg, first = work.tolist()
    want = [(s, c) for s, count in enumerate(counts) for c in range(0, count, chunk)]
    assert [(s, c) for s, c in zip(seg, first) if s >= 0] == want  # in segment order, each once
    assert all(s == -1 and c == 0 for s, c in zip(seg[len(want):], first[len(want):]))


@given(G=st.integers(1, 128))
def test_tile_shape_stacks_whole_tokens_in_at_least_16_rows(G):
    from nsa_flex.functional.selected_kernel import tile_shape

    rows, tokens = tile_shape(G)
    assert rows >= 16 and rows & (rows - 1) == 0  # tl.dot's tile: a power of two, at least 16
    assert tokens * G <= rows < (tokens + 1) * G  # as many whole tokens as fit
    assert 2 * tokens * G > rows  # so at most half the rows are padding


@given(T=st.integers(1, 40), n=st.integers(1, 6), G=st.sampled_from([1, 3, 4, 16]), blocks=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_block_lists_are_each_tokens_set_of_blocks(T, n, G, blocks, seed):
    """The kernels' lists from indices in any order, with repeats and -1: each token's distinct blocks once
    (sorted, int32, -1 elsewhere), and the tile lists of those for the group's tile shape."""
    from nsa_flex.functional.selected_kernel import _tile_lists, block_lists, tile_shape

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, blocks, (2, 2, T, n), generator=gen)
    lists, tiles = block_lists(idx, G)
    assert lists.dtype == torch.int32 and lists.shape == idx.shape
    for row, got in zip(idx.reshape(-1, n).tolist(), lists.reshape(-1, n).tolist()):
        kept = [x for x in got if x >= 0]
        assert kept == sorted(set(x for x in row if x >= 0))  # each listed block once, ascending
    want = _tile_lists(lists, tile_shape(G)[1])
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(tiles, want))


@given(T=st.integers(0, 70), n=st.integers(0, 20), blocks=st.integers(1, 40), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.int64, torch.int32]), strided=st.booleans())
def test_set_lists_kernel_equals_the_sort(triton_device, T, n, blocks, seed, dtype, strided):
    """The CUDA path of block_lists (one kernel placing each entry by comparisons) gives torch's sort-and-dedup
    to the bit: the same order, -1 where the sort leaves a repeat."""
    from nsa_flex.functional.selected_kernel import _set_lists, block_lists

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, blocks, (2, 3, T, n), generator=gen).to(dtype)
    want = block_lists(idx, 16)[0]
    if strided:  # token-major storage, as a view: any layout is taken
        idx = idx.transpose(1, 2).contiguous().transpose(1, 2)
    got = _set_lists(idx.to(triton_device))
    assert got.dtype == torch.int32 and got.is_contiguous()
    assert torch.equal(got.cpu(), want)


@given(T=st.integers(1, 40), n=st.integers(1, 6), tokens=st.integers(2, 16), blocks=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_tile_lists_are_the_union_of_the_tiles_token_lists(T, n, tokens, blocks, seed):
    """Each tile's list holds every block one of its tokens lists, once, ascending, then -1; its members bits
    say exactly which of the tile's tokens list it."""
    from nsa_flex.functional.selected_kernel import _tile_lists, block_lists

    gen = torch.Generator().manual_seed(seed)
    # a set per token, as the kernels get it (the lists alone: G = 16 makes no tiles)
    idx = block_lists(torch.randint(-1, blocks, (2, 2, T, n), generator=gen), 16)[0]
    lists, members, counts = _tile_lists(idx, tokens)
    assert lists.shape == members.shape == (2, 2, -(-T // tokens), tokens * n) and counts.shape == lists.shape[:3]
    for b, h, p in np.ndindex(*counts.shape):
        want = {}
        for i, t in enumerate(range(p * tokens, min(T, (p + 1) * tokens))):
            for block in idx[b, h, t].tolist():
                if block >= 0:
                    want[block] = want.get(block, 0) | 1 << i
        c = counts[b, h, p]
        assert lists[b, h, p, :c].tolist() == sorted(want)
        assert members[b, h, p, :c].tolist() == [want[x] for x in sorted(want)]
        assert (lists[b, h, p, c:] == -1).all() and (members[b, h, p, c:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("heads, kv_heads, D, n", [(64, 4, 128, 16), (8, 2, 64, 8)], ids=["paper", "lm"])
def test_gpu_kernels_equal_flex_path_bf16(kind, heads, kv_heads, D, n, monkeypatch):
    """At 4096 tokens in bf16 with l'=64 and the blocks select_blocks chooses, in the paper configuration (64
    query heads on 4 kv heads, D=128, n=16: one token a program) and bench.train_lm's attention (8 on 2,
    D=64, n=8: tiles of 4 tokens): the kernels against the FlexAttention path (same inputs, both float32
    inside), forward and gradients, eagerly and in a fullgraph compile (whose output and dq equal the eager
    ones bit for bit)."""
    from nsa_flex import testing
    from nsa_flex.functional import selected_kernel

    T = 4096
    q, k, v, _ = testing.nsa_inputs(T, heads, kv_heads, D, kind, "cuda", torch.bfloat16)
    k_cmp = F.mean_pool(k, 32, 16)
    _, lse = F.compressed_attention(q, k_cmp, F.mean_pool(v, 32, 16), 32, 16, return_lse=True)
    idx = F.select_blocks(q, k_cmp, 32, 16, 64, n, lse=lse)
    do = torch.randn_like(q)
    assert selected_kernel.supported(q, k, v, 64)
    kernel = _grads(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), do, q, k, v)
    compiled = torch.compile(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), fullgraph=True)
    traced = _grads(compiled, do, q, k, v)
    monkeypatch.setattr(selected_kernel, "supported", lambda *args: False)
    flex = _grads(lambda q, k, v: F.selected_attention(q, k, v, idx, 64), do, q, k, v)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), kernel, flex, traced):
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=0, atol=2e-2, msg=name)
        torch.testing.assert_close(c.float() / scale, a.float() / scale, rtol=0, atol=2e-2, msg=name)
    # compiled launches compute what eager ones do: the kernels take `scale` as float32 even when inductor
    # passes it as a double (the products then ran in float64 and came out a few ulps off)
    assert torch.equal(traced[0], kernel[0]) and torch.equal(traced[1], kernel[1])
