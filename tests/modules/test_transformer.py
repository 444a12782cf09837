"""TransformerLM: shapes, causality, the three attention variants, argument errors, checkpoint config."""

from __future__ import annotations

import pytest
import torch

from nsa_flex.modules import TransformerLM

# Decoding is many tiny ops; on a shared 2-core runner extra intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(dim=32, depth=2, heads=4, kv_heads=2, sliding_window_size=8, compress_block_size=8,
            compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2, max_seq_len=128)


@pytest.mark.parametrize("attn", ["nsa", "dense", "window"])
def test_forward_shape_causal_and_backward(attn):
    torch.manual_seed(0)
    model = TransformerLM(attn=attn, **TINY)
    ids = torch.randint(0, 256, (2, 37))
    logits = model(ids)
    assert logits.shape == (2, 37, 256) and torch.isfinite(logits).all()
    # Causal: changing the last token leaves every earlier position's logits unchanged.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids2)[:, :-1], model(ids)[:, :-1], rtol=0, atol=1e-5)
    logits.logsumexp(-1).mean().backward()
    assert model.token_emb.weight.grad is not None


def test_head_is_tied_and_config_rebuilds():
    model = TransformerLM(vocab_size=97, attn="dense", **TINY)
    clone = TransformerLM(**model.config)
    clone.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(clone(ids), model(ids))
    assert [n for n, p in model.named_parameters() if 97 in p.shape] == ["token_emb.weight"]


def test_dense_variant_matches_explicit_softmax():
    torch.manual_seed(1)
    model = TransformerLM(attn="dense", dim=16, depth=1, heads=2, mlp="gelu", max_seq_len=32).double()
    attn = model.layers[0].attn
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    q, k, v = attn.project_qkv(attn.norm(x))
    q, k = attn.rotate(q, k)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.project_out(s.softmax(-1) @ v)
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn="sparse"), "attn"),
    (dict(mlp="relu"), "mlp"),
    (dict(foo=1), "foo"),
    (dict(dim=30, heads=4), "heads"),
    (dict(depth=0), "depth"),
    (dict(kv_heads=3), "kv_heads"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TransformerLM(**{**dict(dim=32, heads=4), **kwargs})


def test_too_long_or_bad_ids_raise():
    model = TransformerLM(attn="dense", dim=16, depth=1, heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="ids"):
        model(torch.zeros(1, 4))


def _mixing(model):
    """Gates that use all three NSA branches (the default init leans on the window)."""
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.attn, "to_strategy_combine"):
                layer.attn.to_strategy_combine.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("attn", ["nsa", "dense", "window"])
@torch.no_grad()
def test_prefill_and_decoding_logits_equal_full_forward(attn):
    """A padded batch of prompts (lengths crossing compression/selection blocks), then token by token."""
    torch.manual_seed(5)
    model = _mixing(TransformerLM(attn=attn, **{**TINY, "max_seq_len": 48}))
    B, T = 3, 45
    ids = torch.randint(0, 256, (B, T))
    full = model(ids)
    lengths = torch.tensor([1, 14, 7])
    cache = model.init_cache(B, 48)
    first = model(ids[:, :14], cache=cache, lengths=lengths)
    for b in range(B):
        torch.testing.assert_close(first[b, : lengths[b]], full[b, : lengths[b]], rtol=0, atol=1e-4)
    pos = lengths.clone()
    rows = torch.arange(B)
    while int(pos.max()) < T:
        pos = pos.clamp(max=T - 1)
        step = model(ids[rows, pos].unsqueeze(1), cache=cache)[:, 0]
        torch.testing.assert_close(step, full[rows, pos], rtol=0, atol=1e-4)
        pos = pos + 1
    with pytest.raises(ValueError, match="max_len"):
        for _ in range(10):
            model(ids[:, :1], cache=cache)


@pytest.mark.parametrize("attn", ["nsa", "dense"])
@torch.no_grad()
def test_greedy_generate_equals_argmax_of_full_forward_and_batches(attn):
    torch.manual_seed(6)
    model = _mixing(TransformerLM(attn=attn, **TINY))
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 12, 7)]
    batch = model.generate(prompts, 12, temperature=0)
    assert batch.shape == (3, 12) and batch.dtype == torch.long
    for b, p in enumerate(prompts):
        seq = p.clone()
        for _ in range(12):  # no cache: full forward each step
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax().view(1)])
        assert batch[b].tolist() == seq[len(p):].tolist()
    # The same batch as a padded tensor + prompt_lengths.
    padded = torch.zeros(3, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    same = model.generate(padded, 12, temperature=0, prompt_lengths=torch.tensor([3, 12, 7]))
    assert same.tolist() == batch.tolist()


@pytest.mark.parametrize("attn", ["nsa", "dense"])
@torch.no_grad()
def test_generate_up_to_max_seq_len_with_padded_prefill(attn):
    """generate pads its prefill to a power of two (compiled kernels per length bucket), capped by max_seq_len:
    a prompt plus new tokens that exactly fill max_seq_len still decode like the full forward."""
    torch.manual_seed(8)
    model = _mixing(TransformerLM(attn=attn, **{**TINY, "max_seq_len": 40}))
    prompt = torch.randint(0, 256, (21,))
    new = model.generate([prompt], 19, temperature=0)[0]
    seq = torch.cat([prompt, new])
    assert seq.shape == (40,)
    assert model(seq[None])[0, 20:-1].argmax(-1).tolist() == new.tolist()  # logits at t predict token t + 1


@torch.no_grad()
def test_sampling_top_k_and_generator():
    model = TransformerLM(attn="window", **TINY)
    prompt = torch.randint(0, 256, (2, 5))
    a = model.generate(prompt, 8, top_k=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 8, top_k=3, generator=torch.Generator().manual_seed(0))
    assert a.tolist() == b.tolist() and a.shape == (2, 8)
    # top_k=1 is greedy
    assert model.generate(prompt, 4, top_k=1).tolist() == model.generate(prompt, 4, temperature=0).tolist()


@torch.no_grad()
def test_generate_from_a_flat_list_of_ints_is_one_prompt():
    """``generate([1, 2, 3], n)`` had decoded three one-token prompts (B=3)."""
    model = TransformerLM(attn="dense", **TINY)
    flat = model.generate([104, 105, 33], 4, temperature=0)
    assert flat.shape == (1, 4)
    assert flat.tolist() == model.generate([torch.tensor([104, 105, 33])], 4, temperature=0).tolist()
    assert flat.tolist() == model.generate((104, 105, torch.tensor(33)), 4, temperature=0).tolist()
    with pytest.raises(TypeError, match="prompt_ids"):
        model.generate([1, [2, 3]], 4)
    with pytest.raises(TypeError, match=r"prompt_ids\[0\]"):
        model.generate([[1.5, 2.0]], 4)  # floats were truncated to ints


@torch.no_grad()
def test_token_ids_outside_the_vocabulary_raise_on_cpu():
    """They had raised IndexError from the embedding (on CUDA they stay unchecked: a host sync per step)."""
    model = TransformerLM(attn="dense", **TINY)
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="ids must be token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="prompt_ids must be token ids"):
        model.generate([1, 300], 2)
    # columns past the longest prompt are never read, so they are not checked
    padded = torch.tensor([[5, 6, -1], [7, 8, -1]])
    assert model.generate(padded, 2, prompt_lengths=torch.tensor([2, 1])).shape == (2, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),  # had failed inside torch.multinomial
    (dict(top_k=0), "top_k"),
    (dict(prompt_lengths=torch.tensor([0, 3])), "prompt_lengths"),
    (dict(prompt_lengths=torch.tensor([5, 6])), "prompt_lengths"),
    (dict(max_new_tokens=124), "max_seq_len"),
    (dict(cuda_graph=True), "cuda_graph"),
])
def test_generate_bad_arguments_raise(kwargs, match):
    model = TransformerLM(attn="dense", **TINY)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(torch.zeros(2, 5, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=[])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["nsa", "dense", "window"])
@torch.no_grad()
def test_gpu_generate_from_cuda_graph_equals_eager(attn):
    """The decode step replayed from a CUDA graph (generate's default on CUDA) gives the eager steps' tokens, for
    a batch of different prompt lengths, and keeps the caches' host-side counts right up to max_seq_len."""
    torch.manual_seed(9)
    # head dim 16 and 16-token selection blocks: the fused decode kernels' path (TINY's 8 takes the gather path)
    config = {**TINY, "dim": 64, "selection_block_size": 16, "max_seq_len": 64}
    model = _mixing(TransformerLM(attn=attn, **config)).cuda()
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 30, 17)]
    eager = model.generate(prompts, 34, temperature=0, cuda_graph=False)
    graphed = model.generate(prompts, 34, temperature=0)
    assert graphed.tolist() == eager.tolist()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompts, 35, temperature=0)


def test_each_layer_gets_its_own_copy_of_modules_passed():
    """One compressor or gate module passed to TransformerLM had become the key compressor and the gate of every
    layer: one set of weights trained by all of them."""
    from torch import nn

    from nsa_flex.modules import MLPCompress

    model = TransformerLM(attn="nsa", **{**TINY, "depth": 3}, compress_mlp=MLPCompress(8, 4, 8),
                          strategy_combine_mlp=nn.Linear(32, 12))
    attns = [layer.attn for layer in model.layers]
    for name in ("k_compress", "v_compress", "to_strategy_combine"):
        assert len({id(getattr(a, name)) for a in attns}) == 3, name
    assert len(list(model.parameters())) == len(model.state_dict())  # no parameter is shared


def test_generate_ignores_padding_values_and_names_an_empty_prompt():
    """Padding past prompt_lengths is padding whatever its value (-1 had been refused as out of vocabulary), and
    an empty prompt in a list says so (it had been 'must have an integer dtype, got torch.float32')."""
    model = TransformerLM(attn="nsa", **TINY)
    padded = torch.tensor([[5, 6, 7], [8, -1, -1]])
    got = model.generate(padded, 3, temperature=0, prompt_lengths=torch.tensor([3, 1]))
    assert torch.equal(got, model.generate([[5, 6, 7], [8]], 3, temperature=0))
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="prompt_ids"):  # a prompt token out of range is still refused
        model.generate(torch.tensor([[5, -1, 7]]), 2)
