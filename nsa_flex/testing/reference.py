"""Float64 dense attention: the reference every FlexAttention path is checked against."""

from __future__ import annotations

from typing import Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .._checks import check_qkv, score_mod_heads
from ..functional.dense import ScoreMod, dense_masked_attention
from ..masks import Mask, as_mask


def dense_attention(
    q: Float[Tensor, "B Hq Q D"],
    k: Float[Tensor, "B Hkv KV D"],
    v: Float[Tensor, "B Hkv KV Dv"],
    mask: Union[None, Mask, Bool[Tensor, "b h Q KV"], object] = None,
    score_mod: Optional[ScoreMod] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``softmax(q k^T * scale + score_mod, masked) v`` in float64 with an explicit, unfused softmax.

    ``mask`` is a Mask, any mask_mod, or a bool tensor broadcastable to ``[B, Hq, Q, KV]``. GQA: ``Hq`` a
    multiple of ``Hkv``. Rows that see nothing give 0 (and ``lse = -inf``). Returns float64 ``out`` or
    ``(out, lse)``. The inputs may have different floating dtypes (all are computed in float64).
    """
    B, Hq, _, Q = check_qkv(q, k, v, same_length=False, same_dtype=False)
    KV = k.shape[2]
    score_mod_heads("score_mod", score_mod, Hq)
    if mask is not None and not isinstance(mask, Tensor):
        mask = as_mask(mask).to_dense(Q, KV, B=B, H=Hq, device=q.device)
    return dense_masked_attention(
        q.double(), k.double(), v.double(), mask, score_mod, scale, return_lse, chunk_size=max(Q, 1)
    )


def attention_math(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Explicit GQA attention ``(out, lse [B, H, L, 1])`` in float32 (float64 stays float64), top-left causal
    or full: the stand-in for the cuDNN calls of :mod:`nsa_flex.functional.compressed_sdpa` in CPU tests
    (same signature as its ``attention_forward``). Its backward is written out (:func:`attention_math_backward`)
    because autograd records nothing inside a custom op's kernel, so an autograd-based reference cannot serve."""
    s, vr = _scores(q, k, v, scale, causal)
    lse = s.logsumexp(-1, keepdim=True)
    return (s - lse).exp().matmul(vr).to(q.dtype), lse


def attention_math_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                            causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_math` from its output and lse: ``(dq, dk, dv)``."""
    s, vr = _scores(q, k, v, scale, causal)
    p = (s - lse).exp()
    do32 = do.to(p.dtype)
    ds = p * (do32.matmul(vr.transpose(-1, -2)) - (do32 * out.to(p.dtype)).sum(-1, keepdim=True))
    G = q.shape[1] // k.shape[1]
    dq = ds.matmul(k.to(p.dtype).repeat_interleave(G, 1)) * scale
    dk = (ds.transpose(-1, -2).matmul(q.to(p.dtype)) * scale).unflatten(1, (-1, G)).sum(2)
    dv = p.transpose(-1, -2).matmul(do32).unflatten(1, (-1, G)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _scores(q, k, v, scale, causal):
    """Float32 (float64 stays float64) scores of :func:`attention_math`, masked, and the values repeated per head."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    G = q.shape[1] // k.shape[1]
    kr, vr = (x.to(dtype).repeat_interleave(G, 1) for x in (k, v))
    s = q.to(dtype).matmul(kr.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s, vr
