"""Triton kernels for the cache bookkeeping of a decode step: write the new keys/values, cut the blocks they
complete, store those blocks' compressed keys/values.

Each replaces a handful of torch ops (``scatter_``/``gather`` per tensor plus the index arithmetic) by one
launch for keys and values together: on an H100 at 64k tokens and batch 16 those small ops took about 50 us
of a 240 us decode step, most of it launch latency, since each moves only a few rows. One program per
(sequence, kv head, new token) copies that token's rows; offsets are 64-bit (caches beyond ``2**31`` elements
are fine). :func:`.decode.write_cache` and :func:`.decode.update_compressed` call these on CUDA and fall back
to torch ops elsewhere; the tests also run them under Triton's interpreter.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .block_topk import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers never ask for the kernels there
    triton = None


def supported(cache: Tensor) -> bool:
    """Whether the callers take the kernels by default: triton importable and a CUDA cache."""
    return triton is not None and cache.is_cuda


def write_rows(k_cache: Float[Tensor, "B H L D"], v_cache: Float[Tensor, "B H L Dv"], k: Float[Tensor, "B H T D"],
               v: Float[Tensor, "B H T Dv"], positions: Int[Tensor, "B T"]) -> None:
    """In place: ``k_cache[b, h, positions[b, t]] = k[b, h, t]`` (cast to the cache's dtype), and the same for
    ``v``; a position outside ``[0, L)`` writes nothing."""
    B, H, T, D = k.shape
    if k.numel() == 0:
        return
    _copy_rows_kernel[(B * H * T,)](
        k, v, k_cache, v_cache, positions, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *positions.stride(), T, H, 0, 0, k_cache.shape[2],
        D=D, DP=next_pow2(D), DV=v.shape[-1], DVP=next_pow2(v.shape[-1]), INTO_CACHE=True,
    )


def store_compressed(k_cmp: Float[Tensor, "B H C1 D"], v_cmp: Float[Tensor, "B H C1 Dv"],
                     k_new: Float[Tensor, "B H T D"], v_new: Float[Tensor, "B H T Dv"], positions: Int[Tensor, "B T"],
                     block_size: int, stride: int) -> None:
    """In place: the compressed key/value of the block that token ``positions[b, t]`` completes goes to its slot
    ``(t + 1 - l) / d``; tokens that complete none write the scratch slot ``C1 - 1`` (so do slots past it)."""
    B, H, T, D = k_new.shape
    if k_new.numel() == 0:
        return
    _copy_rows_kernel[(B * H * T,)](
        k_new, v_new, k_cmp, v_cmp, positions, *k_new.stride(), *v_new.stride(), *k_cmp.stride(),
        *v_cmp.stride(), *positions.stride(), T, H, block_size, stride, k_cmp.shape[2],
        D=D, DP=next_pow2(D), DV=v_new.shape[-1], DVP=next_pow2(v_new.shape[-1]), INTO_CACHE=False,
    )


def completed_blocks(k_cache: Float[Tensor, "B H L D"], v_cache: Float[Tensor, "B H L Dv"],
                     positions: Int[Tensor, "B T"], block_size: int):
    """``(k [B, H, T, l, D], v [B, H, T, l, Dv])``: the ``l`` cached tokens ending at each position (token
    indices clamped into ``[0, L - 1]``: a position before ``l - 1`` gets a block that no slot keeps)."""
    B, H, L, D = k_cache.shape
    T, Dv = positions.shape[1], v_cache.shape[-1]
    k = torch.empty(B, H, T, block_size, D, device=k_cache.device, dtype=k_cache.dtype)
    v = torch.empty(B, H, T, block_size, Dv, device=v_cache.device, dtype=v_cache.dtype)
    if k.numel() == 0:
        return k, v
    _block_rows_kernel[(B * H * T,)](
        k_cache, v_cache, positions, k, v, *k_cache.stride(), *v_cache.stride(), *positions.stride(), T, H, L,
        BLOCK=block_size, BP=next_pow2(block_size), D=D, DP=next_pow2(D), DV=Dv, DVP=next_pow2(Dv),
    )
    return k, v


if triton is not None:
    @triton.jit
    def _row(POS, spb, spt, T, H):
        """This program's (sequence b, head h, new token t) as int64, and t's position."""
        row = tl.program_id(0).to(tl.int64)
        t = row % T
        h = (row // T) % H
        b = row // (T * H)
        return row, b, h, t, tl.load(POS + b * spb + t * spt).to(tl.int64)

    @triton.jit
    def _copy_rows_kernel(
        K, V, KD, VD, POS, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdl, sdd, seb, seh, sel, sed,
        spb, spt, T, H, BLOCK, STRIDE, ROWS,
        D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, INTO_CACHE: tl.constexpr,
    ):
        """Row ``(b, h, t)`` of ``K, V`` to row ``dst < ROWS`` of ``KD, VD``: the position itself (``INTO_CACHE``;
        none outside ``[0, ROWS)``) or the compressed slot of the block it completes (else the scratch slot,
        the last)."""
        row, b, h, t, pos = _row(POS, spb, spt, T, H)
        if INTO_CACHE:
            dst = pos
        else:
            start = pos + 1 - BLOCK
            dst = tl.where((start >= 0) & (start % STRIDE == 0), start // STRIDE, ROWS - 1)
            dst = tl.minimum(dst, ROWS - 1)
        inside = (dst >= 0) & (dst < ROWS)
        d = tl.arange(0, DP)
        x = tl.load(K + b * skb + h * skh + t * skt + d * skd, mask=d < D)
        tl.store(KD + b * sdb + h * sdh + dst * sdl + d * sdd, x.to(KD.dtype.element_ty), mask=(d < D) & inside)
        dv = tl.arange(0, DVP)
        x = tl.load(V + b * svb + h * svh + t * svt + dv * svd, mask=dv < DV)
        tl.store(VD + b * seb + h * seh + dst * sel + dv * sed, x.to(VD.dtype.element_ty), mask=(dv < DV) & inside)

    @triton.jit
    def _block_rows_kernel(
        KC, VC, POS, KO, VO, skb, skh, skl, skd, svb, svh, svl, svd, spb, spt, T, H, L,
        BLOCK: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
        DVP: tl.constexpr,
    ):
        row, b, h, t, pos = _row(POS, spb, spt, T, H)
        j = tl.arange(0, BP)
        tok = tl.minimum(tl.maximum(pos + 1 - BLOCK, 0) + j, L - 1)
        d = tl.arange(0, DP)
        ok = (j < BLOCK)[:, None] & (d < D)[None, :]
        x = tl.load(KC + b * skb + h * skh + tok[:, None] * skl + d[None, :] * skd, mask=ok)
        tl.store(KO + (row * BLOCK + j[:, None]) * D + d[None, :], x, mask=ok)
        dv = tl.arange(0, DVP)
        ok = (j < BLOCK)[:, None] & (dv < DV)[None, :]
        x = tl.load(VC + b * svb + h * svh + tok[:, None] * svl + dv[None, :] * svd, mask=ok)
        tl.store(VO + (row * BLOCK + j[:, None]) * DV + dv[None, :], x, mask=ok)
