"""The checking kit must be able to fail: assert_matches_dense raises a useful AssertionError when flex and dense
disagree (wrong score_mod, wrong BlockMask, NaN), and dense_attention is itself a plain softmax."""

import pytest
import torch

from nsa_flex import masks, scores
from nsa_flex.masks import Mask
from nsa_flex.testing import TOLERANCE, assert_matches_dense, dense_attention
from nsa_flex.testing import assertions


def test_passes_and_returns_the_error():
    err = assert_matches_dense(masks.causal() & masks.sliding_window(5), 37, 37, block_size=16)
    assert 0 <= err <= TOLERANCE[torch.float32]
    err64 = assert_matches_dense(masks.causal(), 37, 37, block_size=16, dtype=torch.float64)
    assert err64 <= TOLERANCE[torch.float64]


def test_fails_on_a_score_mod_that_flex_and_dense_see_differently():
    """A deliberately inconsistent score_mod: it biases keys only when evaluated densely (4-d index tensors),
    not per element as FlexAttention evaluates it. The kit must notice."""

    def wrong_bias(score, b, h, q_idx, kv_idx):
        return score + (0.5 * kv_idx if kv_idx.dim() > 0 else 0.0)

    with pytest.raises(AssertionError) as info:
        assert_matches_dense(masks.causal(), 40, 40, block_size=16, score_mod=wrong_bias)
    msg = str(info.value)
    assert "causal()" in msg and "differs from dense attention" in msg
    assert "max |error|" in msg and "at (b=" in msg and "rows exceed atol" in msg
    assert "q_len=40" in msg


class WrongBlockMask(Mask):
    """A mask whose BlockMask is built from another mask (a broken BlockMask builder)."""

    def __init__(self, mask, block_mask_of):
        super().__init__(mask)
        self.block_mask_of = block_mask_of

    def to_block_mask(self, *args, **kwargs):
        return self.block_mask_of.to_block_mask(*args, **kwargs)


def test_fails_on_a_block_mask_that_drops_keys():
    m = WrongBlockMask(masks.causal(), masks.causal() & masks.sliding_window(20))
    with pytest.raises(AssertionError, match="differs from dense attention"):
        assert_matches_dense(m, 64, 64, block_size=16)


class WrongDense(Mask):
    """A mask whose dense form is another mask's (a mask_mod that is not what it claims)."""

    def __init__(self, mask, dense_of):
        super().__init__(mask)
        self.dense_of = dense_of

    def to_dense(self, *args, **kwargs):
        return self.dense_of.to_dense(*args, **kwargs)


@pytest.mark.parametrize("other", [masks.full(), masks.sliding_window(3), masks.causal() & ~masks.global_tokens(1)],
                         ids=repr)
def test_fails_on_a_mask_with_a_different_dense_form(other):
    with pytest.raises(AssertionError, match="differs from dense attention"):
        assert_matches_dense(WrongDense(masks.causal(), other), 50, 50, block_size=16)


def test_fails_on_a_small_error_above_atol():
    def tiny(score, b, h, q_idx, kv_idx):
        return score + (1e-3 * kv_idx if kv_idx.dim() > 0 else 0.0)

    with pytest.raises(AssertionError, match="atol 1e-05"):
        assert_matches_dense(masks.full(), 30, 30, block_size=16, score_mod=tiny)
    # ... and the same difference passes with a loose tolerance, which is then the caller's explicit choice.
    assert assert_matches_dense(masks.full(), 30, 30, block_size=16, score_mod=tiny, atol=1.0) < 1.0


def test_reports_nan(monkeypatch):
    real_flex = assertions.flex

    def nan_flex(*args, **kwargs):
        out = real_flex(*args, **kwargs)
        out = out.clone()
        out[0, 0, 3, 0] = float("nan")
        return out

    monkeypatch.setattr(assertions, "flex", nan_flex)
    with pytest.raises(AssertionError, match="output has NaN") as info:
        assert_matches_dense(masks.causal(), 20, 20, block_size=16)
    assert "t=3" in str(info.value)


def test_defaults_follow_the_mask_extent():
    ids = torch.zeros(3, 20, dtype=torch.long)
    ids[:, 10:] = 1
    assert_matches_dense(masks.document(ids) & masks.causal(), 20, 20, block_size=16)  # batch 3 from the mask
    with pytest.raises(ValueError, match="B=3.*B=2"):
        assert_matches_dense(masks.document(ids), 20, 20, batch=2)


@pytest.mark.parametrize(
    "kwargs, exc, names",
    [
        (dict(heads=4, kv_heads=3), ValueError, "heads must be a multiple of kv_heads"),
        (dict(head_dim=0), ValueError, "head_dim"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=(16, 0)), ValueError, "block_size"),
        (dict(q_len=-1), ValueError, "q_len"),  # had been a raw RuntimeError from torch.randn
        (dict(kv_len=0), ValueError, "kv_len"),
        (dict(batch=0), ValueError, "batch"),  # had fallen back to the default silently
        (dict(dtype=torch.int64), TypeError, "dtype"),  # had been a KeyError
        (dict(dtype=torch.float8_e4m3fn), ValueError, "atol"),  # no default tolerance: asks for atol
        (dict(atol=-1), ValueError, "atol"),  # had been accepted, then a confusing AssertionError
        (dict(atol="1e-3"), TypeError, "atol"),
        (dict(device="bogus"), ValueError, "device must be a valid device string"),
        (dict(heads=8, score_mod=scores.alibi(4)), ValueError, "score_mod"),
        (dict(heads=8, score_mod=scores.relative_bias(torch.zeros(2, 5))), ValueError, "score_mod"),
        (dict(gradients=True), ValueError, "gradients=True needs a CUDA device"),  # FlexAttention: no CPU backward
        (dict(gradients=1), TypeError, "gradients must be a bool"),
        (dict(rtol=-1), ValueError, "rtol"),
        (dict(seed="x"), TypeError, "seed"),  # had been torch's "manual_seed expected a long"
        (dict(seed=2**70), ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, names):
    args = dict(q_len=16, kv_len=16) | kwargs
    with pytest.raises(exc, match=names):
        assert_matches_dense(masks.causal(), **args)


def test_gradient_report_measures_relative_error_and_names_the_tensor():
    want = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    assert assertions._report_gradient("dq", want.float(), want, 1e-6, "m") < 1e-6
    assert assertions._report_gradient("dk", torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.float64),
                                       0.0, "m") == 0.0  # rows that see nothing: zero gradients on both sides
    off = want.clone()
    off[0, 1, 3, 2] += 0.5 * want.norm()  # relative error 0.5, all of it at one place
    with pytest.raises(AssertionError, match=r"dv of flex_attention with m .*relative error 0.5 > rtol 0.02.*"
                                             r"\(b=0, h=1, t=3, d=2\)"):
        assertions._report_gradient("dv", off, want, 0.02, "m")
    nan = want.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="gradient has NaN"):
        assertions._report_gradient("dq", nan, want, 1.0, "m")


def test_heads_default_to_a_per_head_score_mod():
    assert assert_matches_dense(masks.causal(), 16, score_mod=scores.relative_bias(torch.randn(3, 5))) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_a_cuda_device_without_cuda_names_device():
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        assert_matches_dense(masks.causal(), 16, device="cuda")


# -- dense_attention ------------------------------------------------------------------------------------------
def test_dense_attention_is_plain_softmax_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = (torch.randn(2, 2, 11, 8, generator=gen) for _ in range(2))
    mask = masks.causal().to_dense(9, 11)
    out, lse = dense_attention(q, k, v, mask=masks.causal(), return_lse=True)
    assert out.dtype == torch.float64
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = q.double() @ kk.transpose(-1, -2) / 8**0.5
    s = s.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ vv)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    # a bool tensor mask works the same
    torch.testing.assert_close(dense_attention(q, k, v, mask=mask), out)


@pytest.mark.parametrize("shapes, match", [
    (((1, 1, 4, 4), (1, 1, 4, 3), (1, 1, 4, 3)), "head dim"),  # had been an einsum RuntimeError
    (((1, 3, 4, 4), (1, 2, 4, 4), (1, 2, 4, 4)), "multiple of kv heads"),
    (((1, 1, 4, 4), (1, 1, 5, 4), (1, 1, 4, 4)), "k and v"),
    (((1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4)), "q must have 4 dimensions"),
])
def test_dense_attention_checks_shapes(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        dense_attention(q, k, v)


def test_dense_attention_takes_mixed_dtypes_and_checks_per_head_score_mods():
    q, k, v = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4)
    assert dense_attention(q, k, v).dtype == torch.float64
    with pytest.raises(ValueError, match="score_mod"):
        dense_attention(q, k, v, score_mod=scores.alibi(8))


def test_dense_attention_rows_that_see_nothing():
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    out, lse = dense_attention(q, k, v, mask=~masks.full(), return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
