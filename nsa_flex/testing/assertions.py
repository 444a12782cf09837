"""``assert_matches_dense``: run FlexAttention with a mask's BlockMask and compare with float64 dense attention."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._checks import device as check_device, floating_dtype, number, positive_int, score_mod_heads
from ..functional.flex import flex
from ..masks import Mask, as_mask
from .reference import dense_attention

# Default tolerances (max abs error on outputs of unit-variance inputs) per compute dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}


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
) -> float:
    """Check ``flex_attention(q, k, v, block_mask=mask.to_block_mask(...))`` against dense float64 attention.

    Draws ``q, k, v ~ N(0, 1)`` (``[batch, heads, q_len, head_dim]``; keys and values with ``kv_heads`` heads,
    GQA), runs FlexAttention (compiled on CUDA, eager on CPU) with the mask's BlockMask and ``score_mod``,
    and compares with :func:`dense_attention` using the mask's dense form. Raises ``AssertionError`` with
    the worst position, its error, how many rows exceed ``atol`` and whether any output is NaN. Returns the
    maximum absolute error. Batch/heads default to what the mask (or, for heads, a per-head ``score_mod``) is
    defined for, else 2. ``atol`` defaults to ``TOLERANCE[dtype]``; other floating dtypes need it given.
    """
    m = as_mask(mask)
    positive_int("q_len", q_len)
    kv_len = q_len if kv_len is None else positive_int("kv_len", kv_len)
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads)):
        if value is not None:
            positive_int(name, value)
    B = batch or m.extent.batch or 2
    H = heads or m.extent.heads or getattr(score_mod, "num_heads", None) or 2
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

    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(B, h, n, head_dim, generator=gen).to(device=device, dtype=dtype)
        for h, n in ((H, q_len), (Hkv, kv_len), (Hkv, kv_len))
    )
    block_mask = m.to_block_mask(q_len, kv_len, B=B, H=H, device=device, block_size=block_size)
    out = flex(q, k, v, block_mask=block_mask, score_mod=score_mod)
    ref = dense_attention(q, k, v, mask=m, score_mod=score_mod)
    return _report(out, ref, atol, f"{m!r} (q_len={q_len}, kv_len={kv_len}, block_size={block_size}, {dtype})")


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
