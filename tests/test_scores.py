"""score_mods: values == their formulas (ALiBi slopes == the paper's reference code), elementwise (vmap) and
broadcast evaluation agree, torch.compile traces them, flex == float64 dense with them, reprs, argument errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks, scores
from nsa_flex.functional.dense import _grid, dense_masked_attention
from nsa_flex.scores import ScoreMod
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst


def paper_slopes(n):
    """ALiBi reference implementation (Press et al., attention_with_linear_biases, get_slopes)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def elementwise(mod, score, B, H, Q, KV):
    """Evaluate a score_mod one scalar at a time, through vmap as FlexAttention does."""
    fn = mod
    for dims in [(0, None, None, None, 0), (0, None, None, 0, None), (0, None, 0, None, None), (0, 0, None, None, None)]:
        fn = torch.vmap(fn, in_dims=dims)  # innermost: kv_idx; outermost: b
    b, h, q, kv = (torch.arange(n) for n in (B, H, Q, KV))
    return fn(score, b, h, q, kv)


# -- values -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", list(range(1, 34)) + [64, 80])
def test_alibi_slopes_match_the_paper(n):
    torch.testing.assert_close(scores.alibi_slopes(n).double(), torch.tensor(paper_slopes(n), dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_alibi_slopes_for_8_heads():
    assert scores.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]


def test_formulas_on_a_grid():
    B, H, Q, KV = 2, 6, 7, 9
    score = torch.randn(B, H, Q, KV, dtype=torch.float64)
    b, h, q, kv = _grid(B, H, 0, Q, KV, "cpu")
    torch.testing.assert_close(scores.softcap(3.0)(score, b, h, q, kv), 3.0 * torch.tanh(score / 3.0))
    slopes = torch.tensor(paper_slopes(H), dtype=torch.float64).view(1, H, 1, 1)
    torch.testing.assert_close(scores.alibi(H)(score, b, h, q, kv), score + slopes * (kv - q), rtol=1e-6, atol=1e-6)
    table = torch.randn(H, 7)  # max_distance 4: distances -3..3
    got = scores.relative_bias(table)(score, b, h, q, kv)
    want = score.clone()
    for hh in range(H):
        for t in range(Q):
            for j in range(KV):
                want[:, hh, t, j] += table[hh, min(max(j - t, -3), 3) + 3].double()
    torch.testing.assert_close(got, want)
    shared = torch.randn(5)
    got = scores.relative_bias(shared)(score, b, h, q, kv)
    want = score + torch.tensor([[shared[min(max(j - t, -2), 2) + 2] for j in range(KV)] for t in range(Q)]).double()
    torch.testing.assert_close(got, want)


def test_compose_applies_in_order():
    B, H, Q, KV = 1, 4, 5, 5
    score = torch.randn(B, H, Q, KV, dtype=torch.float64) * 10
    idx = _grid(B, H, 0, Q, KV, "cpu")
    a, c = scores.alibi(H), scores.softcap(2.0)
    torch.testing.assert_close(scores.compose(a, c)(score, *idx), c(a(score, *idx), *idx))
    torch.testing.assert_close(scores.compose(c, a)(score, *idx), a(c(score, *idx), *idx))
    assert not torch.allclose(scores.compose(a, c)(score, *idx), scores.compose(c, a)(score, *idx))
    assert torch.equal(scores.compose()(score, *idx), score)

    def plus_one(score, b, h, q_idx, kv_idx):
        return score + 1

    torch.testing.assert_close(scores.compose(plus_one, c)(score, *idx), c(score + 1, *idx))


MODS = [
    scores.softcap(5.0),
    scores.alibi(6),
    scores.relative_bias(torch.randn(6, 31)),
    scores.relative_bias(torch.randn(9)),
    scores.compose(scores.alibi(6), scores.relative_bias(torch.randn(6, 5)), scores.softcap(4.0)),
]


@pytest.mark.parametrize("mod", MODS, ids=repr)
def test_elementwise_and_broadcast_evaluation_agree(mod):
    B, H, Q, KV = 2, 6, 11, 13
    score = torch.randn(B, H, Q, KV)
    broadcast = mod(score, *_grid(B, H, 0, Q, KV, "cpu"))
    torch.testing.assert_close(elementwise(mod, score, B, H, Q, KV), broadcast, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mod", MODS, ids=repr)
def test_traces_with_torch_compile_fullgraph(mod):
    compiled = torch.compile(mod.fn, fullgraph=True, backend="aot_eager")
    B, H, Q, KV = 1, 6, 4, 5
    score = torch.randn(B, H, Q, KV)
    idx = _grid(B, H, 0, Q, KV, "cpu")
    torch.testing.assert_close(compiled(score, *idx), mod(score, *idx))


# -- flex vs dense ---------------------------------------------------------------------------------------------
@st.composite
def score_mod_for(draw, heads):
    kind = draw(st.sampled_from(["softcap", "alibi", "relative_bias", "relative_bias_shared", "compose"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    m = draw(st.integers(1, 40))
    if kind == "softcap":
        return scores.softcap(draw(st.floats(0.5, 50.0)))
    if kind == "alibi":
        return scores.alibi(heads)
    if kind == "relative_bias":
        return scores.relative_bias(torch.randn(heads, 2 * m - 1, generator=gen))
    if kind == "relative_bias_shared":
        return scores.relative_bias(torch.randn(2 * m - 1, generator=gen))
    return scores.compose(scores.alibi(heads), scores.relative_bias(torch.randn(heads, 2 * m - 1, generator=gen)),
                          scores.softcap(draw(st.floats(0.5, 50.0))))


@given(shape=nst.shapes(), data=st.data())
def test_score_mods_match_dense_attention(shape, data):
    mod = data.draw(score_mod_for(shape.heads))
    mask = data.draw(nst.masks())
    assert_matches_dense(mask, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads,
                         kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size,
                         score_mod=mod)


def test_relative_bias_is_learnable():
    table = torch.nn.Parameter(torch.zeros(2, 9))
    mod = scores.relative_bias(table)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    mask = masks.causal().to_dense(10, 10)
    out = dense_masked_attention(q, k, v, mask, score_mod=mod)
    out.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    # the table is not copied: in-place updates change the mod
    before = mod(torch.zeros(()), torch.tensor(0), torch.tensor(0), torch.tensor(3), torch.tensor(3))
    with torch.no_grad():
        table.add_(1.0)
    after = mod(torch.zeros(()), torch.tensor(0), torch.tensor(0), torch.tensor(3), torch.tensor(3))
    assert float((after - before).detach()) == 1.0


# -- repr, wrapping ---------------------------------------------------------------------------------------------
def test_reprs_read_like_calls():
    assert repr(scores.softcap(30.0)) == "softcap(30.0)"
    assert repr(scores.softcap(30)) == "softcap(30.0)"
    assert repr(scores.alibi(8)) == "alibi(8)"
    assert repr(scores.relative_bias(torch.zeros(4, 63))) == "relative_bias(<table [4, 63]>)"
    assert repr(scores.relative_bias(torch.zeros(63))) == "relative_bias(<table [63]>)"
    assert repr(scores.compose(scores.alibi(8), scores.softcap(30.0))) == "compose(alibi(8), softcap(30.0))"

    def my_bias(score, b, h, q_idx, kv_idx):
        return score

    assert repr(ScoreMod(my_bias)) == "my_bias"
    assert repr(scores.compose(my_bias)) == "compose(my_bias)"
    assert scores.alibi(8).num_heads == 8 and scores.compose(scores.softcap(1.0), scores.alibi(4)).num_heads == 4


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: scores.softcap(0), ValueError, "cap"),
        (lambda: scores.softcap(-1.0), ValueError, "cap"),
        (lambda: scores.softcap(float("inf")), ValueError, "cap"),
        (lambda: scores.softcap(float("nan")), ValueError, "cap"),
        (lambda: scores.softcap("30"), TypeError, "cap"),
        (lambda: scores.softcap(True), TypeError, "cap"),
        (lambda: scores.alibi(0), ValueError, "num_heads"),
        (lambda: scores.alibi(2.0), TypeError, "num_heads"),
        (lambda: scores.alibi_slopes(-1), ValueError, "num_heads"),
        (lambda: scores.relative_bias([0.0, 1.0, 2.0]), TypeError, "table"),
        (lambda: scores.relative_bias(torch.zeros(5, dtype=torch.long)), TypeError, "table"),
        (lambda: scores.relative_bias(torch.zeros(4)), ValueError, "table.*odd"),
        (lambda: scores.relative_bias(torch.zeros(2, 2, 3)), ValueError, "table"),
        (lambda: scores.relative_bias(torch.zeros(0, 3)), ValueError, "table"),
        (lambda: scores.compose(scores.softcap(1.0), 3), TypeError, "argument 1"),
        (lambda: scores.compose(scores.alibi(4), scores.alibi(8)), ValueError, "heads"),
        (lambda: ScoreMod("softcap"), TypeError, "fn"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        make()
