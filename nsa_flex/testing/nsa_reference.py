"""A slow, obviously-correct float64 NSA: explicit loops and dense masks, no FlexAttention, no shared code
with :mod:`nsa_flex.functional` beyond the float64 masked softmax of :func:`dense_attention`.

Written straight from docs/design.md "Exact semantics"; the fast paths are tested against it. (The argument checks
are :func:`nsa_attention`'s own, so both refuse the same inputs.)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..functional.nsa import CompressSpec, check_nsa_arguments
from .reference import dense_attention


def reference_mean_pool(x: Tensor, block_size: int, stride: int) -> Tensor:
    """Compressed key ``c`` = mean of tokens ``[c*d, c*d + l)``, one block at a time."""
    B, H, T, D = x.shape
    num = max(0, (T - block_size) // stride + 1)
    blocks = [x[:, :, c * stride : c * stride + block_size].mean(dim=2) for c in range(num)]
    return torch.stack(blocks, dim=2) if blocks else x.new_zeros(B, H, 0, D)


def reference_select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    block_size: int,
    stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial: int = 1,
    num_local: int = 2,
    scale: Optional[float] = None,
) -> Tensor:
    """Token by token: probabilities, group sum, overlap-weighted block scores, forced blocks, ranked rest."""
    B, Hq, T, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    l, d, ls, n = block_size, stride, selection_block_size, num_selected
    out = torch.full((B, Hkv, T, n), -1, dtype=torch.long)
    qd, kd = q.double().cpu(), k_cmp.double().cpu()
    S = -(-T // ls)
    overlap = torch.zeros(Tc, S, dtype=torch.float64)  # tokens compressed block c shares with selection block s
    for c in range(Tc):
        for s in range(S):
            overlap[c, s] = max(0, min(c * d + l, (s + 1) * ls) - max(c * d, s * ls))
    visible_at = torch.tensor([c * d + l - 1 for c in range(Tc)], dtype=torch.long)  # first t that sees c
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                visible = visible_at <= t
                importance = torch.zeros(Tc, dtype=torch.float64)
                if visible.any():
                    logits = qd[b, h * G : (h + 1) * G, t] @ kd[b, h, visible].T * scale  # [G, visible]
                    importance[visible] = torch.softmax(logits, dim=-1).sum(dim=0)
                own = t // ls
                score = (importance @ overlap[:, : own + 1]).tolist()
                chosen: list[int] = []
                forced = list(range(num_initial)) + [own - i for i in range(num_local)]
                for s in forced:
                    if 0 <= s <= own and s not in chosen:
                        chosen.append(s)
                chosen = chosen[:n]
                rest = sorted((s for s in range(own + 1) if s not in chosen), key=lambda s: (-score[s], s))
                chosen += rest[: n - len(chosen)]
                out[b, h, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


def _dense(T: int, KV: int, allowed) -> Tensor:
    rows = [[bool(allowed(t, j)) for j in range(KV)] for t in range(T)]
    return torch.tensor(rows, dtype=torch.bool).view(1, 1, T, KV)


def reference_nsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    compress: CompressSpec = "mean",
    compress_block_size: int = 32,
    compress_stride: int = 16,
    selection_block_size: int = 64,
    num_selected: int = 16,
    num_initial: int = 1,
    num_local: int = 2,
    window_size: int = 512,
    scale: Optional[float] = None,
    fine_qk: Optional[tuple[Tensor, Tensor]] = None,
    return_branches: bool = False,
) -> Union[Tensor, tuple[Tensor, dict]]:
    """Float64 NSA with the signature of :func:`nsa_flex.functional.nsa_attention` (CPU; tiny sizes only).

    ``compress`` is ``"mean"``, a callable, or a ``(key, value)`` pair of callables.
    Differentiable with respect to ``q, k, v, gates`` and compressor parameters. Arguments are validated as
    :func:`nsa_attention` validates them (any floating dtypes: the arithmetic is float64).
    """
    B, Hq, T = check_nsa_arguments(q, k, v, gates, compress_block_size, compress_stride, selection_block_size,
                                   num_selected, num_initial, num_local, window_size, scale, fine_qk, same_dtype=False)
    l, d, ls, w = compress_block_size, compress_stride, selection_block_size, window_size
    if compress == "mean":
        k_cmp, v_cmp = reference_mean_pool(k, l, d), reference_mean_pool(v, l, d)
    else:
        kc, vc = compress if isinstance(compress, tuple) else (compress, compress)
        k_cmp, v_cmp = kc(k), vc(v)
    Tc = k_cmp.shape[2]
    q_fine, k_fine = (q, k) if fine_qk is None else fine_qk

    o_cmp = dense_attention(q, k_cmp, v_cmp, _dense(T, Tc, lambda t, c: c * d + l - 1 <= t), scale=scale)
    indices = reference_select_blocks(q, k_cmp, l, d, ls, num_selected, num_initial, num_local, scale)
    G = Hq // k.shape[1]
    sel_mask = torch.zeros(B, Hq, T, T, dtype=torch.bool)
    for b in range(B):
        for hq in range(Hq):
            for t in range(T):
                for s in indices[b, hq // G, t].tolist():
                    if s >= 0:
                        sel_mask[b, hq, t, s * ls : min((s + 1) * ls, t + 1)] = True
    o_sel = dense_attention(q_fine, k_fine, v, sel_mask, scale=scale)
    o_win = dense_attention(q_fine, k_fine, v, _dense(T, T, lambda t, j: t - w < j <= t), scale=scale)
    g = gates.double()
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win
    if return_branches:
        return out, {"compressed": o_cmp, "selected": o_sel, "window": o_win, "block_indices": indices}
    return out


__all__ = ["reference_mean_pool", "reference_nsa", "reference_select_blocks"]
