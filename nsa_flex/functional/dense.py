"""Exact attention from an explicit boolean mask: the CPU training path and the core of the float64 reference.

FlexAttention has no backward on CPU, so when gradients are needed there the functional layer computes
``softmax(q k^T * scale + score_mod)`` against the mask's dense form, a chunk of queries at a time
(memory ``O(chunk * KV)`` per head). Rows that see no key give exactly 0 and ``lse = -inf``, with finite
(zero) gradients: every ``log``/division below is guarded on both sides of its ``where``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .._checks import attention_scale, check_qkv, positive_int, score_mod_heads, tensor

# Query rows per chunk when the caller gives no chunk_size (the branches' CPU gradient path): memory
# O(CHUNK_SIZE * KV) per head. Read at call time, so tests can make it small to run several chunks.
CHUNK_SIZE = 1024

# (q_start, q_stop) -> bool [B|1, H|1, q_stop - q_start, KV]
MaskRows = Callable[[int, int], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def dense_masked_attention(
    q: Float[Tensor, "B Hq Q D"],
    k: Float[Tensor, "B Hkv KV D"],
    v: Float[Tensor, "B Hkv KV Dv"],
    mask: Union[None, Bool[Tensor, "b h Q KV"], MaskRows] = None,
    score_mod: Optional[ScoreMod] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention with an explicit mask, in the dtype of ``q``. Returns ``out`` or ``(out, lse)``.

    ``mask`` is a bool tensor broadcastable to ``[B, Hq, Q, KV]`` or a function giving its rows
    ``[q_start, q_stop)``; ``None`` means every key. GQA: ``Hq`` must be a multiple of ``Hkv``. Queries are
    taken ``chunk_size`` at a time (default :data:`CHUNK_SIZE`).
    """
    B, Hq, Hkv, Q = check_qkv(q, k, v, same_length=False)
    KV = k.shape[2]
    score_mod_heads("score_mod", score_mod, Hq)
    chunk_size = positive_int("chunk_size", CHUNK_SIZE if chunk_size is None else chunk_size)
    if mask is not None and not callable(mask):
        mask = _tensor_rows(mask, (B, Hq, Q, KV))
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = attention_scale(scale, q.shape[-1])
    outs, lses = [], []
    for start in range(0, max(Q, 1), chunk_size):
        stop = min(Q, start + chunk_size)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop], k) * scale
        if score_mod is not None:
            scores = score_mod(scores, *_grid(B, Hq, start, stop, KV, q.device))
        if mask is not None:
            scores = scores.masked_fill(~mask(start, stop).to(q.device), float("-inf"))
        out, lse = _safe_softmax_attend(scores, v)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(B, Hq, 0, v.shape[-1])
    if return_lse:
        return out, torch.cat(lses, dim=2)
    return out


def _tensor_rows(mask, full: tuple[int, int, int, int]) -> MaskRows:
    """The rows of a bool tensor broadcastable to ``full = [B, Hq, Q, KV]`` (checked: torch's broadcasting rules)."""
    tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True: may attend) or a function of rows, got dtype {mask.dtype}")
    if mask.ndim > 4 or any(m not in (1, f) for m, f in zip(reversed(mask.shape), reversed(full))):
        raise ValueError(f"mask must broadcast to [B, Hq, Q, KV] = {list(full)}, got shape {list(mask.shape)}")
    if mask.ndim < 2 or mask.shape[-2] == 1:  # the same for every query (a key padding mask): no rows to cut
        return lambda start, stop: mask
    return lambda start, stop: mask[..., start:stop, :]


def mask_rows(mask, B: int, H: int, KV: int, device) -> MaskRows:
    """Rows of a mask_mod evaluated by broadcasting index tensors (no vmap): ``[B|1, H|1, rows, KV]``."""

    def rows(start: int, stop: int) -> Tensor:
        return mask(*_grid(B, H, start, stop, KV, device))

    return rows


def _grid(B: int, H: int, start: int, stop: int, KV: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcastable (b, h, q_idx, kv_idx) index tensors for evaluating a score_mod densely."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q_idx = torch.arange(start, stop, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(KV, device=device).view(1, 1, 1, KV)
    return b, h, q_idx, kv_idx


def _safe_softmax_attend(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if scores.shape[-1] == 0:  # no keys at all: every row sees nothing
        out = scores.new_zeros(*scores.shape[:-1], v.shape[-1]) + 0 * v.sum()
        return out, scores.new_full(scores.shape[:-1], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries: exp(-inf) = 0
    denom = weights.sum(dim=-1, keepdim=True)
    seen = denom > 0
    safe_denom = torch.where(seen, denom, torch.ones_like(denom))
    out = (weights @ v) / safe_denom
    lse = torch.where(seen, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)
