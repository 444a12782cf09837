"""The cache kernels (nsa_flex.functional.cache_update) against the torch ops they replace, through
write_cache and update_compressed (use_kernel=True vs False). Both paths move the same values, so they must
agree exactly. On CUDA the kernels run compiled; on a CPU machine with triton, under Triton's interpreter; without
triton only the torch path's cases run."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F

BASE = 500.0  # RoPE base of the rotated-key cases


class WeightedSum:
    """A compressor with ``compress_blocks`` (a fixed weighting of the block's tokens), as the modules' have."""

    def __init__(self, block_size):
        self.w = torch.linspace(0.5, 1.5, block_size, dtype=torch.float64)

    def compress_blocks(self, blocks):  # [B, H, N, l, D] -> [B, H, N, D]
        return torch.einsum("bhnld,l->bhnd", blocks.double(), self.w.to(blocks.device)).to(blocks.dtype)


@st.composite
def cache_cases(draw):
    """Caches of odd lengths and head sizes, values of another width and dtype, 1-3 new tokens per sequence at
    per-sequence positions (before, on and after block boundaries), blocks longer and shorter than the cache;
    keys stored rotated (with the raw-key ring for the compressor) or position-free; compressors "mean", a
    plain callable and one with compress_blocks; write_cache + update_compressed, or append_to_cache (with
    "mean" on the kernel path: one fused kernel)."""
    L = draw(st.integers(1, 70))
    T = draw(st.integers(1, min(3, L)))
    l = draw(st.integers(1, 20))
    D = draw(st.sampled_from([8, 24, 34]))
    return dict(B=draw(st.integers(1, 3)), H=draw(st.integers(1, 3)), L=L, T=T, D=D,
                Dv=draw(st.sampled_from([D, 8])), block_size=l, stride=draw(st.integers(1, l)),
                new_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                compressor=draw(st.sampled_from(["mean", "callable", "weighted"])), rotary=draw(st.booleans()),
                one_call=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _compressor(kind, l):
    return {"mean": "mean", "callable": lambda x: F.mean_pool(x, l, l), "weighted": WeightedSum(l)}[kind]


def _state(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    B, H, L, T, D, Dv, l, d = (case[k] for k in ("B", "H", "L", "T", "D", "Dv", "block_size", "stride"))
    C1 = max(0, (L - l) // d + 1) + 1
    ends = torch.randint(T, L + 1, (B,), generator=g)
    rand = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g, dtype=dtype).to(device)  # noqa: E731
    return dict(k_cache=rand(B, H, L, D), v_cache=rand(B, H, L, Dv), k_cmp=rand(B, H, C1, D), v_cmp=rand(B, H, C1, Dv),
                k=rand(B, H, T, D, dtype=case["new_dtype"]), v=rand(B, H, T, Dv, dtype=case["new_dtype"]),
                k_ring=rand(B, H, l, D), positions=(ends.view(B, 1) - T + torch.arange(T)).to(device))


def _step(s, case, use_kernel):
    s = {k: x.clone() for k, x in s.items()}
    l, d = case["block_size"], case["stride"]
    base = BASE if case["rotary"] else None
    comp = _compressor(case["compressor"], l)
    if case["one_call"]:
        F.append_to_cache(s["k_cache"], s["v_cache"], s["k_cmp"], s["v_cmp"], s["k"], s["v"], s["positions"], comp,
                          comp, l, d, base, s["k_ring"] if case["rotary"] else None, use_kernel=use_kernel)
        return s
    F.write_cache(s["k_cache"], s["v_cache"], s["k"], s["v"], s["positions"], use_kernel=use_kernel, rotary_base=base)
    ring = dict(k_ring=s["k_ring"], k_new=s["k"]) if case["rotary"] else {}
    F.update_compressed(s["k_cache"], s["v_cache"], s["k_cmp"], s["v_cmp"], s["positions"], comp, comp, l, d,
                        use_kernel=use_kernel, **ring)
    return s


@given(case=cache_cases())
def test_kernels_move_what_the_torch_ops_move(triton_device, case):
    """Exactly, but for the rotation (tl.cos/tl.sin against torch's: float32 ulps) and the fused mean (another
    summation order)."""
    s = _state(case, triton_device)
    got, want = _step(s, case, use_kernel=True), _step(s, case, use_kernel=False)
    close = dict(rtol=1e-6, atol=1e-6)
    for name in ("v_cache", "k_ring"):
        assert torch.equal(got[name], want[name]), name
    if case["rotary"]:
        torch.testing.assert_close(got["k_cache"], want["k_cache"], **close)
    else:
        assert torch.equal(got["k_cache"], want["k_cache"])
    for name in ("k_cmp", "v_cmp"):  # all but the scratch slot, which tokens completing nothing share
        if case["compressor"] == "mean":
            torch.testing.assert_close(got[name][:, :, :-1], want[name][:, :, :-1], **close, msg=name)
        else:
            assert torch.equal(got[name][:, :, :-1], want[name][:, :, :-1]), name


@pytest.fixture
def device(request, use_kernel):
    """Where a case parametrized by ``use_kernel`` runs: the kernel cases where triton does (skipping without
    it), the torch cases on any machine, so that an install without triton (CI's) still runs them."""
    if use_kernel:
        return request.getfixturevalue("triton_device")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("one_call", [True, False])
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_completed_blocks_are_stored_where_the_full_sequence_puts_them(device, use_kernel, one_call, rotary, step):
    """Through a whole sequence, ``step`` tokens at a time (7 > l: a step longer than the ring), the compressed
    slots equal the compressor applied to the full sequence (mean pooling, l=5, d=3: blocks overlap and the
    last tokens complete none), the cache holds the keys (rotated or not) and the ring the last l raw keys;
    through append_to_cache (one_call) or write_cache + update_compressed."""
    B, H, L, D, l, d = 2, 3, 23, 16, 5, 3
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, H, L, D, generator=g).to(device)
    C = (L - l) // d + 1
    k_cache, k_cmp = torch.zeros_like(keys), torch.zeros(B, H, C + 1, D, device=device)
    v_cache, v_cmp = torch.zeros_like(k_cache), torch.zeros_like(k_cmp)
    ring = dict(k_ring=torch.zeros(B, H, l, D, device=device)) if rotary else {}
    for first in range(0, L, step):
        pos = (first + torch.arange(min(step, L - first))).expand(B, -1).to(device)
        new = keys[:, :, first:first + pos.shape[1]]
        base = BASE if rotary else None
        if one_call:
            F.append_to_cache(k_cache, v_cache, k_cmp, v_cmp, new, -new, pos, "mean", "mean", l, d, base,
                              ring.get("k_ring"), use_kernel=use_kernel)
            continue
        F.write_cache(k_cache, v_cache, new, -new, pos, use_kernel=use_kernel, rotary_base=base)
        F.update_compressed(k_cache, v_cache, k_cmp, v_cmp, pos, "mean", "mean", l, d, use_kernel=use_kernel,
                            **(dict(ring, k_new=new) if rotary else {}))
    want = F.mean_pool(keys, l, d)
    positions = torch.arange(L, device=device).expand(B, -1)
    torch.testing.assert_close(k_cache, F.rotary_at(keys, positions, BASE) if rotary else keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, -keys)
    torch.testing.assert_close(k_cmp[:, :, :C], want)
    torch.testing.assert_close(v_cmp[:, :, :C], -want)
    if rotary:
        assert torch.equal(ring["k_ring"], keys[:, :, L - l:].roll(L % l, dims=2)), "ring: token j at slot j % l"


def test_kernel_write_outside_the_cache_writes_nothing(triton_device):
    """The kernel cannot raise without a host sync; a position past the cache must not write out of bounds
    (here into the next sequence's rows of the same buffer)."""
    buf = torch.zeros(2, 1, 4, 8, device=triton_device)
    k_cache, v_cache = buf[:1], buf[:1].clone()
    new = torch.ones(1, 1, 1, 8, device=triton_device)
    F.write_cache(k_cache, v_cache, new, new, torch.tensor([[4]], device=triton_device), use_kernel=True)
    assert not buf.any() and not v_cache.any()


def test_write_cache_argument_errors():
    cache = torch.zeros(2, 3, 10, 8)
    new, pos = torch.zeros(2, 3, 1, 8), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"k must have shape \[2, 3, \*, 8\]"):
        F.write_cache(cache, cache.clone(), new[:1], new, pos)
    with pytest.raises(ValueError, match=r"v_cache must have shape"):
        F.write_cache(cache, cache[:, :2], new, new, pos)
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        F.write_cache(cache, cache.clone(), new, new, pos.float())
    with pytest.raises(ValueError, match=r"positions must have shape \[2, 1\]"):
        F.write_cache(cache, cache.clone(), new, new, pos[:1])


def test_use_kernel_without_triton_is_a_clear_error(monkeypatch):
    from nsa_flex.functional import cache_update

    monkeypatch.setattr(cache_update, "triton", None)
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="use_kernel=True needs triton"):
        F.write_cache(x, x.clone(), x[:, :, :1], x[:, :, :1], torch.zeros(1, 1, dtype=torch.long), use_kernel=True)
