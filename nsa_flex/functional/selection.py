"""NSA block selection (paper eq. 8-10): score selection blocks from compressed-attention probabilities, top-n.

For token ``t`` and kv head ``h``:

* ``p[c]`` = compressed-attention probability of compressed key ``c``, summed over the ``G`` query heads of ``h``;
* selection block ``s`` (tokens ``[s*l', (s+1)*l')``) scores ``sum_c p[c] * |[c*d, c*d+l) ∩ [s*l', (s+1)*l')|``;
* blocks after ``t``'s block are excluded;
* forced blocks come first and count toward ``n``: the ``num_initial`` first blocks, then ``t``'s block, then the
  ``num_local - 1`` blocks before it (truncated to ``n``); the rest are the highest scores, ties toward the lower
  block index; fewer than ``n`` available blocks are padded with ``-1``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import positive_int
from ..masks.compressed import check_compression
from .branches import check_qkv

# Bound on the [B, Hq, chunk, Tc] probability tile scored at once.
_TILE_ELEMENTS = 1 << 25


def check_selection(block_size: int, stride: int, selection_block_size: int, num_selected: int,
                    num_initial: int, num_local: int) -> None:
    """Validate an NSA selection configuration (ValueError/TypeError naming the argument)."""
    check_compression(block_size, stride)
    positive_int("selection_block_size", selection_block_size)
    if selection_block_size % stride:
        raise ValueError(
            f"selection_block_size must be a multiple of the compression stride, got "
            f"selection_block_size={selection_block_size}, stride={stride}"
        )
    positive_int("num_selected", num_selected)
    positive_int("num_initial", num_initial, minimum=0)
    positive_int("num_local", num_local, minimum=0)


def overlap_weights(num_cmp: int, num_sel: int, block_size: int, stride: int, selection_block_size: int,
                    device=None, dtype=torch.float32) -> Float[Tensor, "Tc S"]:
    """``W[c, s]`` = number of tokens compressed block ``c`` shares with selection block ``s``."""
    c = torch.arange(num_cmp, device=device).view(-1, 1)
    s = torch.arange(num_sel, device=device).view(1, -1)
    lo = torch.maximum(c * stride, s * selection_block_size)
    hi = torch.minimum(c * stride + block_size, (s + 1) * selection_block_size)
    return (hi - lo).clamp(min=0).to(dtype)


def forced_rank(q_pos: Tensor, num_sel: int, selection_block_size: int, num_initial: int, num_local: int) -> Tensor:
    """``rank[t, s]``: position of block ``s`` in ``t``'s forced list (initial, own, previous), else a large value."""
    K = num_initial + num_local
    own = (q_pos // selection_block_size).view(-1, 1)
    candidates = [torch.full_like(own, i) for i in range(num_initial)]
    candidates += [own - i for i in range(num_local)]
    rank = torch.full((q_pos.numel(), num_sel), K, dtype=torch.long, device=q_pos.device)
    for r, block in enumerate(candidates):
        ok = (block >= 0) & (block <= own) & (block < num_sel)
        src = torch.where(ok, torch.full_like(block, r), torch.full_like(block, K))
        rank.scatter_reduce_(1, block.clamp(0, num_sel - 1), src, reduce="amin")
    return rank


@torch.no_grad()
def select_blocks(
    q: Float[Tensor, "B Hq T D"],
    k_cmp: Float[Tensor, "B Hkv Tc D"],
    block_size: int,
    stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial: int = 1,
    num_local: int = 2,
    scale: Optional[float] = None,
    lse: Optional[Float[Tensor, "B Hq T"]] = None,
) -> Int[Tensor, "B Hkv T n"]:
    """Top-``num_selected`` selection blocks per token and kv head (see module docstring); int64, ``-1`` padded.

    ``lse``, the compressed branch's log-sum-exp, saves recomputing the softmax normalizer when given.
    Works a chunk of queries at a time: memory ``O(chunk * Tc)`` per head, never ``[B, Hq, T, Tc]``.
    """
    B, Hq, Hkv, T = check_qkv(q, k_cmp, k_cmp, same_length=False)
    check_selection(block_size, stride, selection_block_size, num_selected, num_initial, num_local)
    G = Hq // Hkv
    Tc = k_cmp.shape[2]
    S = math.ceil(T / selection_block_size)
    n = num_selected
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    W = overlap_weights(Tc, S, block_size, stride, selection_block_size, q.device, work)
    big = float(G * block_size + 1)  # above any score (probabilities sum to <= 1 per head, overlap <= l)
    K = num_initial + num_local
    out = torch.full((B, Hkv, T, n), -1, dtype=torch.long, device=q.device)
    chunk = max(1, min(T, _TILE_ELEMENTS // max(1, B * Hq * max(Tc, S))))
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        pos = torch.arange(start, stop, device=q.device)
        scores = _block_scores(q[:, :, start:stop], k_cmp, pos, W, block_size, stride, scale, G,
                               None if lse is None else lse[:, :, start:stop], work)
        rank = forced_rank(pos, S, selection_block_size, num_initial, num_local)
        own = (pos // selection_block_size).view(-1, 1)
        s = torch.arange(S, device=q.device).view(1, -1)
        key = torch.where(rank < K, big + (K - rank).to(work), torch.where(s <= own, scores, -1.0))
        order = key.sort(dim=-1, descending=True, stable=True)
        top = order.indices[..., :n]
        top = torch.where(order.values[..., :n] >= 0, top, -1)
        out[:, :, start:stop, : top.shape[-1]] = top
    return out


def _block_scores(q, k_cmp, pos, W, block_size, stride, scale, G, lse, work) -> Tensor:
    """Overlap-weighted importance ``[B, Hkv, chunk, S]`` of each selection block for the chunk's queries."""
    B, Hq, C, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    S = W.shape[1]
    if Tc == 0:
        return q.new_zeros(B, Hkv, C, S, dtype=work)
    logits = torch.einsum("bhgcd,bhtd->bhgct", q.view(B, Hkv, G, C, D).to(work), k_cmp.to(work)) * scale
    visible = torch.arange(Tc, device=q.device).view(1, -1) * stride + (block_size - 1) <= pos.view(-1, 1)
    logits = logits.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = logits.logsumexp(dim=-1)
    else:
        lse = lse.view(B, Hkv, G, C).to(work)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows seeing nothing: all p = 0
    p = torch.exp(logits - lse.unsqueeze(-1)).sum(dim=2)  # [B, Hkv, C, Tc], summed over the group
    return p @ W
