"""TransformerLM: shapes, causality, the three attention variants, argument errors, checkpoint config."""

from __future__ import annotations

import pytest
import torch

from nsa_flex.modules import TransformerLM

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
