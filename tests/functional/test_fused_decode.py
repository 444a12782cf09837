"""The fused decode kernels (nsa_flex.functional.fused_decode) against nsa_decode's gather path in float64.

On CUDA the kernels run compiled; on a CPU machine with triton installed, under Triton's interpreter (small
shapes only). Without triton these tests skip, except the argument checks.
"""

from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex.functional import fused_decode


# The NSA paper's configuration (l=32, d=16, l'=64, n=16, w=512), for the GPU tests.
PAPER = dict(compress_block_size=32, compress_stride=16, selection_block_size=64, num_selected=16, num_initial=1,
             num_local=2, window_size=512)


@st.composite
def decode_cases(draw):
    """Shapes the kernels take (l' a power of two in [16, 128]): GQA 1..16 (also 3), head dims that are not
    powers of two, values of another width, l % d != 0, windows shorter and longer
    than a block, n beyond the blocks, a few new tokens at per-sequence positions, garbage past them."""
    G = draw(st.sampled_from([1, 2, 3, 4, 16]))
    D = draw(st.sampled_from([16, 24, 32]))
    stride = draw(st.sampled_from([4, 8]))
    return dict(
        B=draw(st.integers(1, 2)), G=G, Hkv=draw(st.integers(1, 2)) if G < 16 else 1, D=D,
        Dv=draw(st.sampled_from([D, 8])), L=draw(st.integers(1, 260)), num_new=draw(st.integers(1, 3)),
        cfg=dict(compress_block_size=draw(st.integers(stride, 2 * stride + 1)), compress_stride=stride,
                 selection_block_size=draw(st.sampled_from([16, 32])), num_selected=draw(st.integers(1, 6)),
                 num_initial=draw(st.integers(0, 2)), num_local=draw(st.integers(0, 3)),
                 window_size=draw(st.integers(1, 70))),
        rotary=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        sparse_programs=draw(st.sampled_from([1, 10**9])),  # splits of up to 4 key tiles, or of one
    )


def _problem(case, device, dtype=torch.float32):
    """A decode step's arguments: caches filled with random keys (compressed slots with random values: the
    kernels need not know how they were made), new tokens at random positions of each sequence."""
    g = torch.Generator().manual_seed(case["seed"])
    B, G, Hkv, D, Dv, L = (case[k] for k in ("B", "G", "Hkv", "D", "Dv", "L"))
    l, d = case["cfg"]["compress_block_size"], case["cfg"]["compress_stride"]
    T = min(case["num_new"], L)
    C = max(0, (L - l) // d + 1)
    ends = torch.randint(T, L + 1, (B,), generator=g)
    positions = ends.view(B, 1) - T + torch.arange(T)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(q=rand(B, G * Hkv, T, D), k_cache=rand(B, Hkv, L, D), v_cache=rand(B, Hkv, L, Dv),
                k_cmp=rand(B, Hkv, C + 1, D), v_cmp=rand(B, Hkv, C + 1, Dv), positions=positions.to(device),
                gates=torch.rand(B, G * Hkv, T, 3, generator=g).to(device=device, dtype=dtype))


def _decode(args, case, **kwargs):
    return F.nsa_decode(*args.values(), **case["cfg"], rotary_base=500.0 if case["rotary"] else None,
                        return_branches=True, **kwargs)


def _float64_gathered(args, case):
    return _decode({k: v.cpu().double() if v.is_floating_point() else v.cpu() for k, v in args.items()}, case,
                   use_kernel=False)


@given(case=decode_cases())
def test_kernels_equal_gathered_decode_in_float64(triton_device, case):
    args = _problem(case, triton_device)
    with mock.patch.object(fused_decode, "_SPARSE_PROGRAMS", case["sparse_programs"]):
        out, branches = _decode(args, case, use_kernel=True)
    want, want_branches = _float64_gathered(args, case)
    assert torch.equal(branches["block_indices"].cpu(), want_branches["block_indices"])
    for name in ("compressed", "selected", "window"):
        torch.testing.assert_close(branches[name].cpu().double(), want_branches[name], rtol=1e-5, atol=2e-5,
                                   msg=name)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=2e-5)


def test_torch_ranking_beyond_max_blocks_gives_the_same_choices(triton_device, monkeypatch):
    """Past MAX_BLOCKS selection blocks the kernel path ranks the blocks in torch (from the merged compressed
    partials); with the limit lowered, that path must agree with the gathered one too."""
    case = dict(B=2, G=4, Hkv=2, D=16, Dv=16, L=230, num_new=2, rotary=True, seed=5,
                cfg=dict(compress_block_size=12, compress_stride=8, selection_block_size=16, num_selected=4,
                         num_initial=1, num_local=2, window_size=20))
    monkeypatch.setattr(fused_decode, "MAX_BLOCKS", 2)
    args = _problem(case, triton_device)
    out, branches = _decode(args, case, use_kernel=True)
    want, want_branches = _float64_gathered(args, case)
    assert torch.equal(branches["block_indices"].cpu(), want_branches["block_indices"])
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=2e-5)


def test_empty_branches_give_zero(triton_device):
    """A token before the first complete compressed block sees no compressed key: the kernel's partials are
    all empty and the branch is 0, as in the gathered path; a -1 selected block contributes nothing."""
    case = dict(B=1, G=2, Hkv=1, D=16, Dv=16, L=5, num_new=1, rotary=True, seed=3,
                cfg=dict(compress_block_size=8, compress_stride=4, selection_block_size=16, num_selected=3,
                         num_initial=1, num_local=1, window_size=4))
    args = _problem(case, triton_device)
    _, branches = _decode(args, case, use_kernel=True)
    assert (branches["compressed"] == 0).all()
    assert branches["block_indices"].tolist() == [[[[0, -1, -1]]]]
    torch.testing.assert_close(branches["selected"].cpu().double(), _float64_gathered(args, case)[1]["selected"],
                               rtol=1e-5, atol=2e-5)  # a float32 kernel against float64: a few ulp apart on CUDA


def test_use_kernel_rejects_what_the_kernels_cannot_take():
    case = dict(B=1, G=2, Hkv=1, D=16, Dv=16, L=40, num_new=1, rotary=False, seed=0,
                cfg=dict(compress_block_size=8, compress_stride=4, selection_block_size=12, num_selected=2,
                         num_initial=1, num_local=1, window_size=4))
    args = _problem(case, "cpu")
    with pytest.raises(ValueError, match="selection_block_size must be a power of two|needs triton"):
        _decode(args, case, use_kernel=True)
    case["cfg"]["selection_block_size"] = 16
    with pytest.raises(ValueError, match="float64|needs triton"):
        _decode(_problem(case, "cpu", torch.float64), case, use_kernel=True)
    assert not fused_decode.supported(args["q"], args["k_cache"], 16)  # CPU tensors: never by default


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_paper_config_bf16_equals_gathered_path_and_compiles(B):
    """Paper configuration (64 query heads, 4 kv heads, D=128, l=32, d=16, l'=64, n=16, w=512, RoPE) at 8k
    tokens in bf16: the default (kernel) path, eagerly and in a fullgraph compile, against the gather path on
    the same inputs in float32 (bf16 products are exact there, so scores agree up to summation order: rows
    whose choices differ by a near-tie are left out of the output comparison)."""
    case = dict(B=B, G=16, Hkv=4, D=128, Dv=128, L=8192, num_new=1, rotary=True, seed=1, cfg=PAPER)
    args = _problem(case, "cuda", torch.bfloat16)
    assert fused_decode.supported(args["q"], args["k_cache"], 64)
    out, branches = _decode(args, case)
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in args.items()}
    want, want_branches = _decode(upcast, case, use_kernel=False)
    same = (branches["block_indices"] == want_branches["block_indices"]).all(-1)  # [B, Hkv, T]
    assert same.float().mean() >= 0.9, f"only {same.float().mean():.0%} of rows chose the same blocks"
    rows = same.repeat_interleave(16, dim=1)  # per query head
    for name in ("compressed", "window", "selected"):
        torch.testing.assert_close(branches[name].float()[rows], want_branches[name][rows], rtol=1e-2, atol=1e-2,
                                   msg=name)
    compiled = torch.compile(lambda *a: _decode(dict(zip(args, a)), case)[0], fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args.values()), out, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_steps_repeat_bitwise():
    """A decode step is deterministic (no atomics; the partials are merged in a fixed order): at 32k tokens,
    batch 16 (paper configuration, bf16), 100 eager steps and 100 CUDA-graph replays of the compiled step each
    give bitwise their first output."""
    case = dict(B=16, G=16, Hkv=4, D=128, Dv=128, L=32768, num_new=1, rotary=True, seed=2, cfg=PAPER)
    args = _problem(case, "cuda", torch.bfloat16)
    for step in (F.nsa_decode, F.compiled_nsa_decode()):
        first = step(*args.values(), **PAPER, rotary_base=500.0).clone()  # graph outputs are overwritten
        for i in range(100):
            assert torch.equal(step(*args.values(), **PAPER, rotary_base=500.0), first), f"step {i} differs"
