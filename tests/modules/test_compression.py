"""Compression networks: shapes (incl. T < l), gradients, and each one against an explicit per-block loop."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex.modules import compression as C

NAMES = sorted(C.COMPRESSORS)


def make(name, l, d, D, H, **kwargs):
    return C.get_compressor(name, block_size=l, stride=d, head_dim=D, num_heads=H, **kwargs)


def randomize_(module, seed=0):
    """Give every parameter random values (several start at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def expected_tc(T, l, d):
    return max(0, (T - l) // d + 1)


@st.composite
def configs(draw):
    l = draw(st.integers(1, 6))
    d = draw(st.integers(1, l))
    T = draw(st.integers(1, 4 * l + 3))
    return dict(name=draw(st.sampled_from(NAMES)), l=l, d=d, T=T, B=draw(st.integers(1, 2)),
                H=draw(st.integers(1, 3)), D=draw(st.sampled_from([1, 2, 4])))


@given(configs())
@example(dict(name="mlp", l=4, d=2, T=3, B=1, H=2, D=2))  # T < l
@example(dict(name="conv", l=4, d=2, T=4, B=1, H=2, D=2))  # T == l
@example(dict(name="grouped_mlp", l=4, d=3, T=11, B=2, H=3, D=2))  # odd T, ragged tail
@example(dict(name="mean", l=5, d=5, T=4, B=1, H=1, D=1))  # T < l, parameter-free
def test_shape_and_gradients(cfg):
    torch.manual_seed(0)
    m = randomize_(make(cfg["name"], cfg["l"], cfg["d"], cfg["D"], cfg["H"]))
    x = torch.randn(cfg["B"], cfg["H"], cfg["T"], cfg["D"], requires_grad=True)
    y = m(x)
    Tc = expected_tc(cfg["T"], cfg["l"], cfg["d"])
    assert y.shape == (cfg["B"], cfg["H"], Tc, cfg["D"])
    assert y.requires_grad  # even when empty: it stays in the graph
    (y.square().sum() + 0 * x.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if Tc == 0:
        assert (x.grad == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_output_backward_alone(name):
    # T < l: the empty output itself can be back-propagated (no "does not require grad" error).
    m = make(name, 4, 2, 2, 2)
    x = torch.randn(1, 2, 3, 2, requires_grad=True)
    y = m(x)
    assert y.shape == (1, 2, 0, 2)
    y.sum().backward()
    assert x.grad is not None and (x.grad == 0).all()


@pytest.mark.parametrize("T", [3, 4, 7, 16])
def test_mean_pool_equals_functional(T):
    x = torch.randn(2, 3, T, 5)
    torch.testing.assert_close(C.MeanPool(4, 2)(x), F.mean_pool(x, 4, 2))


def test_fresh_attention_pool_is_mean_pool():
    x = torch.randn(2, 3, 13, 4)
    torch.testing.assert_close(C.AttentionPool(4, 3, 4)(x), F.mean_pool(x, 4, 3))


# ---- each compressor computes what it claims: explicit per-block loops with the module's own weights ----

def per_block(x, l, d, fn):
    """Stack ``fn(block [B, H, l, D]) -> [B, H, D]`` over the blocks ``[c*d, c*d + l)``."""
    Tc = expected_tc(x.shape[2], l, d)
    return torch.stack([fn(x[:, :, c * d : c * d + l]) for c in range(Tc)], dim=2)


L, S, D, H = 4, 2, 3, 2
T_LOOP = 13


@pytest.fixture
def x():
    return torch.randn(2, H, T_LOOP, D, dtype=torch.float64)


def test_linear_matches_loop(x):
    m = randomize_(C.LinearCompress(L, S, D, bias=True)).double()
    W, b = m.proj.weight, m.proj.bias  # [D, L*D], [D]

    def block(X):
        out = b.expand(X.shape[0], X.shape[1], D).clone()
        for i in range(L):  # token i of the block uses columns [i*D, (i+1)*D)
            out = out + X[:, :, i] @ W[:, i * D : (i + 1) * D].T
        return out

    torch.testing.assert_close(m(x), per_block(x, L, S, block))


def test_mlp_matches_loop(x):
    m = randomize_(C.MLPCompress(L, S, D, hidden_dim=5)).double()
    P, l1, l2 = m.pos_emb, m.net[0], m.net[2]

    def block(X):
        flat = torch.cat([X[:, :, i] + P[i] for i in range(L)], dim=-1)
        return l2.weight @ torch.relu(l1.weight @ flat.unsqueeze(-1) + l1.bias.unsqueeze(-1)) + l2.bias.unsqueeze(-1)

    torch.testing.assert_close(m(x), per_block(x, L, S, lambda X: block(X).squeeze(-1)))


def test_grouped_mlp_matches_loop(x):
    m = randomize_(C.GroupedMLP(L, S, D, H, hidden_dim=5)).double()

    def block(X):
        outs = []
        for h in range(H):
            flat = torch.cat([X[:, h, i] + m.pos_emb[h, i] for i in range(L)], dim=-1)
            hid = torch.relu(flat @ m.w1[h] + m.b1[h])
            outs.append(hid @ m.w2[h] + m.b2[h])
        return torch.stack(outs, dim=1)

    torch.testing.assert_close(m(x), per_block(x, L, S, block))


@pytest.mark.parametrize("per_head", [False, True])
def test_conv_matches_loop(x, per_head):
    m = randomize_(C.ConvCompress(L, S, D, H, per_head=per_head)).double()
    W, b = m.conv.weight, m.conv.bias  # shared: [D, D, L]; per head: [H*D, D, L]

    def block(X):
        out = torch.zeros(X.shape[0], H, D, dtype=X.dtype)
        for h in range(H):
            rows = slice(h * D, (h + 1) * D) if per_head else slice(0, D)
            for o in range(D):
                out[:, h, o] = b[rows][o] + sum(
                    X[:, h, k, i] * W[rows][o, i, k] for k in range(L) for i in range(D)
                )
        return out

    y = m(x)
    torch.testing.assert_close(y, per_block(x, L, S, block))
    # the einsum path (used for T < l and for compress_blocks) agrees with the convolution
    torch.testing.assert_close(m.compress_blocks(m.blocks(x)), y)


def test_attention_pool_matches_loop(x):
    m = randomize_(C.AttentionPool(L, S, D)).double()
    W, P = m.to_logits.weight, m.pos_logits

    def block(X):
        logits = torch.stack([X[:, :, i] @ W.T + P[i] for i in range(L)], dim=-2)  # [B, H, L, D]
        w = torch.softmax(logits, dim=-2)
        return sum(w[:, :, i] * X[:, :, i] for i in range(L))

    torch.testing.assert_close(m(x), per_block(x, L, S, block))


@pytest.mark.parametrize("name", NAMES)
def test_compress_blocks_equals_forward(name, x):
    m = randomize_(make(name, L, S, D, H)).double()
    blocks = F.compression_blocks(x, L, S)
    torch.testing.assert_close(m.compress_blocks(blocks), m(x))
    torch.testing.assert_close(m.compress_blocks(blocks[:, :, -1:]), m(x)[:, :, -1:])  # one block at a time


@pytest.mark.parametrize("name", ["mlp", "conv", "grouped_mlp", "attention_pool"])
def test_gradcheck_float64(name):
    m = randomize_(make(name, 3, 2, 2, 1, **({"hidden_dim": 3} if "mlp" in name else {}))).double()
    x = torch.randn(1, 1, 7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


# ---- argument validation ----

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=2, stride=3), "stride"),
        (dict(block_size=0, stride=1), "block_size"),
        (dict(block_size=4, stride=0), "stride"),
        (dict(block_size=4, stride=-2), "stride"),
        (dict(block_size=4, stride=2, head_dim=0), "head_dim"),
        (dict(block_size=4, stride=2, head_dim=4, num_heads=0), "num_heads"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_sizes_raise(name, kwargs, match):
    kwargs = {"head_dim": 4, "num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        C.get_compressor(name, **kwargs)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: C.GroupedMLP(4, 2, 3), "num_heads"),
        (lambda: C.ConvCompress(4, 2, 3, per_head=True), "num_heads"),
        (lambda: C.MLPCompress(4, 2, None), "head_dim"),
        (lambda: C.MLPCompress(4, 2, 3, hidden_dim=0), "hidden_dim"),
        (lambda: C.MLPCompress(4, 2, 3, expand_factor=0.0), "expand_factor"),
        (lambda: C.MLPCompress(4, 2, 3, expand_factor=float("inf")), "expand_factor"),  # had been an OverflowError
        (lambda: C.get_compressor("median", block_size=4, stride=2, head_dim=3), "median"),
    ],
)
def test_bad_constructor_args_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_non_int_size_is_type_error():
    with pytest.raises(TypeError, match="block_size"):
        C.MeanPool(4.0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(name):
    m = make(name, 4, 2, 3, 2)
    with pytest.raises(ValueError, match="dimensions"):
        m(torch.randn(2, 9, 3))  # rank 3
    with pytest.raises(ValueError, match="head_dim"):
        m(torch.randn(1, 2, 9, 5))  # wrong D
    with pytest.raises(ValueError, match="num_heads"):
        m(torch.randn(1, 3, 9, 3))  # wrong H
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 2, 9, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        m.compress_blocks(torch.randn(1, 2, 2, 3, 3))  # blocks of 3 tokens, not 4


def test_get_compressor_passes_modules_through():
    m = C.MeanPool(4, 2)
    assert C.get_compressor(m) is m
    with pytest.raises(TypeError, match="kwargs"):
        C.get_compressor(m, block_size=4)
    with pytest.raises(TypeError):
        C.get_compressor(3)
    assert isinstance(C.get_compressor("conv", block_size=4, stride=2, head_dim=3), C.ConvCompress)
