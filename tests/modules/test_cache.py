"""KV cache for SparseAttention / CausalAttention: prefill + decoding equal the full forward at every position,
cached compressed keys equal the compressors on the whole sequence, batches of different lengths, overflow."""

from __future__ import annotations

import pytest
import torch

from nsa_flex.modules import CausalAttention, KVCache, NSACache, SparseAttention

TOL = dict(rtol=0, atol=1e-4)
NSA = dict(sliding_window_size=6, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
           num_selected_blocks=3)


# Decoding is many tiny ops; on a shared 2-core runner extra intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    attn = SparseAttention(32, 8, 4, **{"kv_heads": 2, **NSA, **kwargs})
    with torch.no_grad():  # gates that mix all three branches (the default starts on the window)
        attn.to_strategy_combine.weight.normal_(0, 0.5)
    return attn


def _incremental(attn, x, prompt_len, step=1, max_len=None):
    T = x.shape[1]
    cache = attn.init_cache(x.shape[0], max_len or T)
    outs = [attn(x[:, :prompt_len], cache=cache)]
    for i in range(prompt_len, T, step):
        outs.append(attn(x[:, i:i + step], cache=cache))
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("compress_mlp", [None, "mean", "conv", "attention_pool", "grouped_mlp", "linear"])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(compress_mlp):
    attn = _layer(compress_mlp=compress_mlp)
    x = torch.randn(2, 42, 32)
    full = attn(x)
    for prompt_len in (1, 11):  # decoding crosses compression (every 4) and selection (every 8) boundaries
        out, cache = _incremental(attn, x, prompt_len)
        torch.testing.assert_close(out, full, **TOL)
        # Compressed keys built incrementally equal the compressors on the whole sequence.
        h = attn.norm(x)
        _, k, v = attn.project_qkv(h)
        k_cmp, v_cmp = cache.compressed()
        torch.testing.assert_close(k_cmp, attn.k_compress(k), **TOL)
        torch.testing.assert_close(v_cmp, attn.v_compress(v), **TOL)
        assert cache.lengths.tolist() == [42, 42]


@pytest.mark.parametrize("kwargs", [dict(kv_heads=1, use_rotary=False), dict(kv_heads=4, num_initial_blocks=0,
                                    num_local_blocks=1), dict(compress_block_size=5, compress_block_sliding_stride=2,
                                                              selection_block_size=6, sliding_window_size=1)])
@torch.no_grad()
def test_other_configs_and_several_tokens_per_step(kwargs):
    attn = _layer(seed=1, **kwargs)
    x = torch.randn(1, 37, 32)
    full = attn(x)
    out, _ = _incremental(attn, x, prompt_len=9, step=3)
    torch.testing.assert_close(out, full, **TOL)


@torch.no_grad()
def test_decode_block_choices_equal_select_blocks_on_full_sequence():
    from nsa_flex import functional as F

    attn = _layer(seed=2)
    x = torch.randn(1, 40, 32)
    h = attn.norm(x)
    q, k, v = attn.project_qkv(h)
    _, branches = F.nsa_attention(q, k, v, attn.compute_gates(h), fine_qk=attn.rotate(q, k),
                                  return_branches=True, **attn.nsa_config())
    cache = attn.init_cache(1, 40)
    attn(x[:, :5], cache=cache)
    for t in range(5, 40):
        q_t, k_t, v_t = attn.project_qkv(attn.norm(x[:, t:t + 1]))
        attn(x[:, t:t + 1], cache=cache)  # fills the cache through the module's own path
        _, dbr = F.nsa_decode(q_t, cache.k, cache.v, cache.k_cmp, cache.v_cmp, torch.tensor([[t]]),
                              attn.compute_gates(attn.norm(x[:, t:t + 1])), return_branches=True,
                              compress_block_size=8, compress_stride=4, selection_block_size=8, num_selected=3,
                              window_size=6, rotary_base=attn.rotary_emb.base)
        got = dbr["block_indices"].sort(-1).values
        torch.testing.assert_close(got, branches["block_indices"][:, :, t:t + 1].sort(-1).values, rtol=0, atol=0)


@torch.no_grad()
def test_batch_of_different_prompt_lengths_equals_each_row_alone():
    attn = _layer(seed=3)
    x = torch.randn(3, 40, 32)
    lengths = torch.tensor([3, 17, 9])
    cache = attn.init_cache(3, 40)
    first = attn(x[:, :17], cache=cache, lengths=lengths)  # padded prefill (row b's prompt = x[b, :len_b])
    outs = [[first[b, :lengths[b]]] for b in range(3)]
    idx = lengths.clone()
    for _ in range(20):  # each row continues its own sequence at its own position
        step = attn(x[torch.arange(3), idx].unsqueeze(1), cache=cache)
        for b in range(3):
            outs[b].append(step[b])
        idx += 1
    for b in range(3):
        alone = attn(x[b:b + 1, : int(idx[b])])[0]
        torch.testing.assert_close(torch.cat(outs[b]), alone, **TOL)
    assert cache.lengths.tolist() == idx.tolist()


@torch.no_grad()
def test_cache_is_preallocated_and_overflow_raises():
    attn = _layer()
    x = torch.randn(2, 12, 32)
    cache = attn.init_cache(2, 10)
    ptrs = [t.data_ptr() for t in (cache.k, cache.v, cache.k_cmp, cache.v_cmp)]
    attn(x[:, :8], cache=cache)
    attn(x[:, 8:10], cache=cache)
    assert [t.data_ptr() for t in (cache.k, cache.v, cache.k_cmp, cache.v_cmp)] == ptrs
    with pytest.raises(ValueError, match="max_len=10"):
        attn(x[:, 10:11], cache=cache)
    assert cache.lengths.tolist() == [10, 10], "a refused step must leave the cache unchanged"
    with pytest.raises(ValueError, match="max_len=10"):
        attn(x[:, :11], cache=attn.init_cache(2, 10))


@torch.no_grad()
def test_return_cache_and_argument_errors():
    attn = _layer()
    x = torch.randn(2, 9, 32)
    out, cache = attn(x, return_cache=True)
    assert isinstance(cache, NSACache) and cache.max_len == 9
    torch.testing.assert_close(out, attn(x), **TOL)
    with pytest.raises(ValueError, match="lengths"):
        attn(x, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        attn(x, cache=attn.init_cache(2, 9), lengths=torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="lengths"):
        attn(x[:, :1], cache=cache, lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="batch size"):
        attn(x[:1], cache=attn.init_cache(2, 9))
    with pytest.raises(TypeError, match="NSACache"):
        attn(x, cache=KVCache(2, 2, 8, 9))
    with pytest.raises(ValueError, match="not made for this layer"):
        attn(x, cache=NSACache(2, 2, 8, 9, compress_block_size=4, compress_stride=4))


@pytest.mark.parametrize("window", [None, 4])
@torch.no_grad()
def test_causal_attention_cache(window):
    torch.manual_seed(4)
    attn = CausalAttention(32, 8, 4, kv_heads=2, window_size=window)
    x = torch.randn(2, 30, 32)
    full = attn(x)
    out, cache = _incremental(attn, x, prompt_len=5)
    torch.testing.assert_close(out, full, **TOL)
    with pytest.raises(ValueError, match="max_len"):
        attn(x[:, :1], cache=cache)


@pytest.mark.parametrize("make, error, match", [
    # every other constructor refuses a stride past the block (it skips tokens)
    (lambda: NSACache(1, 1, 8, 32, compress_block_size=8, compress_stride=16), ValueError,
     "compress_stride must be <= compress_block_size"),
    (lambda: NSACache(1, 1, 8, 32, compress_block_size=0, compress_stride=1), ValueError, "compress_block_size"),
    (lambda: NSACache(1, 1, 8, 32, compress_block_size=8, compress_stride=4, rotary_base=1.0), ValueError,
     "rotary_base"),
    (lambda: NSACache(1, 1, 8, 32, compress_block_size=8, compress_stride=4, rotary_base="1e4"), TypeError,
     "rotary_base"),
    (lambda: KVCache(1, 1, 8, 32, device="bogus"), ValueError, "device must be a valid device string"),
])
def test_constructor_arguments_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_a_cuda_cache_without_cuda_names_device():
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        KVCache(1, 1, 8, 32, device="cuda")
