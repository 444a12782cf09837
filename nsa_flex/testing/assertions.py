"""``assert_matches_dense``: run FlexAttention with a mask's BlockMask and compare with float64 dense attention,
outputs and, on CUDA, gradients."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._checks import device as check_device, floating_dtype, number, positive_int, score_mod_heads
from .._checks import seed as check_seed
from ..functional.flex import flex
from ..masks import Mask, as_mask
from .reference import dense_attention

# The batch size and head count of the inputs where neither the caller nor the mask (nor a per-head score_mod)
# sets them.
DEFAULT_SIZE = 2
# Default tolerances (max abs error on outputs of unit-variance inputs) per compute dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# Default tolerances on gradients (``||got - want|| / ||want||`` per input tensor) per compute dtype: a few units
# of the format's rounding (bfloat16 2**-8, float16 2**-11), as FlexAttention's backward recomputes the
# probabilities and rounds dO, P and dS to the inputs' dtype for its matmuls. Measured on an H100 (torch 2.11,
# N(0, 1) inputs, T 257-1000, D 32-128, blocks 16-128): bfloat16 2.4-2.5e-3, float16 3.0e-4, float32 4e-7.
GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_matches_dense(
    mask: Union[Mask, object],
    q_len: int,
    kv_len: Optional[int] = None,
    *,
    batch: Optional[int] = None,
    heads: Optional[int] = None,
    kv_heads: Optional[int] = None,
    head_dim: int = 16,
    block_size: Union[int, tuple[int, int]] = 128,
    score_mod: Optional[Callable] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
    atol: Optional[float] = None,
    seed: int = 0,
    gradients: bool = False,
    rtol: Optional[float] = None,
) -> float:
    """Check ``flex_attention(q, k, v, block_mask=mask.to_block_mask(...))`` against dense float64 attention.

    Draws ``q, k, v ~ N(0, 1)`` (``[batch, heads, q_len, head_dim]``; keys and values with ``kv_heads`` heads,
    GQA), runs FlexAttention (compiled on CUDA, eager on CPU) with the mask's BlockMask and ``score_mod``,
    and compares with :func:`dense_attention` using the mask's dense form. Raises ``AssertionError`` with
    the worst position, its error, how many rows exceed ``atol`` and whether any output is NaN. Returns the
    maximum absolute error. Batch/heads default to what the mask (or, for heads, a per-head ``score_mod``) is
    defined for, else 2. ``atol`` defaults to ``TOLERANCE[dtype]``; other floating dtypes need it given.

    With ``gradients=True`` (CUDA only: FlexAttention has no CPU backward) it also backpropagates a random
    ``dout ~ N(0, 1)`` through both and compares ``dq, dk, dv`` by relative error ``||got - want|| / ||want||``
    per tensor, at most ``rtol`` (default ``GRADIENT_TOLERANCE[dtype]``); the backward reads the BlockMask's
    transposed (per key block) index, which the forward never does.
    """
    m = as_mask(mask)
    positive_int("q_len", q_len)
    kv_len = q_len if kv_len is None else positive_int("kv_len", kv_len)
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads)):
        if value is not None:
            positive_int(name, value)
    B = batch or m.extent.batch or DEFAULT_SIZE
    H = heads or m.extent.heads or getattr(score_mod, "num_heads", None) or DEFAULT_SIZE
    Hkv = kv_heads or H
    positive_int("head_dim", head_dim)
    if H % Hkv:
        raise ValueError(f"heads must be a multiple of kv_heads, got heads={H}, kv_heads={Hkv}")
    score_mod_heads("score_mod", score_mod, H)
    floating_dtype("dtype", dtype)
    if atol is None:
        if dtype not in TOLERANCE:
            raise ValueError(f"dtype {dtype} has no default tolerance (TOLERANCE has {list(TOLERANCE)}): pass atol")
        atol = TOLERANCE[dtype]
    else:
        atol = number("atol", atol, at_least=0)
    device = check_device("device", device) or m.extent.device or torch.device("cpu")
    if not isinstance(gradients, bool):
        raise TypeError(f"gradients must be a bool, got {type(gradients).__name__} {gradients!r}")
    if gradients and device.type != "cuda":
        raise ValueError(f"gradients=True needs a CUDA device (FlexAttention has no CPU backward), got device={device}")
    if rtol is None:
        rtol = GRADIENT_TOLERANCE.get(dtype)
        if gradients and rtol is None:
            raise ValueError(f"dtype {dtype} has no default gradient tolerance (GRADIENT_TOLERANCE has "
                             f"{list(GRADIENT_TOLERANCE)}): pass rtol")
    else:
        rtol = number("rtol", rtol, at_least=0)

    gen = torch.Generator(device="cpu").manual_seed(check_seed("seed", seed))
    q, k, v = (
        torch.randn(B, h, n, head_dim, generator=gen).to(device=device, dtype=dtype)
        for h, n in ((H, q_len), (Hkv, kv_len), (Hkv, kv_len))
    )
    block_mask = m.to_block_mask(q_len, kv_len, B=B, H=H, device=device, block_size=block_size)
    exact = [x.double().requires_grad_(gradients) for x in (q, k, v)]  # float64 leaves: float64 gradients
    inputs = [x.requires_grad_(gradients) for x in (q, k, v)]
    out = flex(*inputs, block_mask=block_mask, score_mod=score_mod)
    ref = dense_attention(*exact, mask=m, score_mod=score_mod)
    what = f"{m!r} (q_len={q_len}, kv_len={kv_len}, block_size={block_size}, {dtype})"
    worst = _report(out.detach(), ref.detach(), atol, what)
    if gradients:
        dout = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
        got = torch.autograd.grad(out, inputs, dout)
        want = torch.autograd.grad(ref, exact, dout.double())
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            _report_gradient(name, g, w, rtol, what)
    return worst


def _report_gradient(name: str, got: Tensor, want: Tensor, rtol: float, what: str) -> float:
    """``||got - want|| / ||want||`` (``||got||`` where ``want`` is all zero, e.g. no row sees a key), or
    ``AssertionError`` past ``rtol`` or on NaN."""
    err = got.double() - want
    scale = float(want.norm())
    rel = float(err.norm()) / scale if scale > 0 else float(err.norm())
    if torch.isnan(got).any() or not rel <= rtol:
        flat = int(err.abs().nan_to_num(float("inf")).flatten().argmax())
        b, h, t, d = (int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name} of flex_attention with {what} differs from dense attention's: relative error {rel:.3g} > "
            f"rtol {rtol:g}; worst at (b={b}, h={h}, t={t}, d={d}): got {float(got[b, h, t, d]):.6g}, expected "
            f"{float(want[b, h, t, d]):.6g}" + ("; gradient has NaN" if torch.isnan(got).any() else "")
        )
    return rel


def _report(out: Tensor, ref: Tensor, atol: float, what: str) -> float:
    err = (out.double() - ref).abs()
    nan = torch.isnan(out)
    worst = float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0
    if nan.any() or worst > atol:
        flat = int(err.nan_to_num(float("inf")).flatten().argmax())
        b, h, t, d = torch.unravel_index(torch.tensor(flat), err.shape)
        bad_rows = int((err.nan_to_num(float("inf")).amax(-1) > atol).sum())
        raise AssertionError(
            f"flex_attention with {what} differs from dense attention: max |error| {worst:.3g} > atol {atol:g} "
            f"at (b={int(b)}, h={int(h)}, t={int(t)}, d={int(d)}): got {float(out[b, h, t, d]):.6g}, "
            f"expected {float(ref[b, h, t, d]):.6g}; {bad_rows} of {err.shape[0] * err.shape[1] * err.shape[2]} "
            f"rows exceed atol" + ("; output has NaN" if nan.any() else "")
        )
    return worst
