"""Fused NSA decode attention (Triton): the branches of a few new queries over a KV cache, split over keys.

A decode step reads little (at 64k tokens: 4k compressed keys, ``n`` selected blocks and the window per kv
head) but the gather-based path (:func:`nsa_decode` with ``use_kernel=False``) spends it in dozens of small
kernels that copy keys into new tensors, rotate them and multiply badly shaped matrices. Five kernels replace
that. The two attention kernels work flash-decoding style: one program per (sequence, kv head, new token, key
split), the ``G`` query heads of the group as the rows of one tensor-core tile, each program writing a softmax
*partial* (row max ``m``, sum ``l`` and ``sum p v`` relative to ``m``; :func:`merge` combines them in torch).

* :func:`compressed_partials`: splits of the cached compressed keys ``c`` with ``c*d + l - 1 <= t``; it also
  writes the scaled logits, from which block scoring forms the probabilities.
* :func:`choose_blocks`: ``score_kernel`` merges a token's compressed partials into the group's log-sum-exps,
  forms the probabilities from the logits and folds their group sum into selection-block scores (the banded
  overlap weights), one program per (token, chunk of blocks); ``choose_kernel`` takes the top ``n`` of a
  token's scores with the forced blocks first, ranked by the same int64 keys as :mod:`.block_topk` (ties toward
  the lower block); at most :data:`MAX_BLOCKS` blocks (``nsa_decode`` falls back to the torch ranking beyond);
* :func:`sparse_partials`: the first splits take the selected blocks (their tokens ``<= t``), the others the
  tiles of the window ``t - w < j <= t``, a few key tiles per program; keys are read in place from the cache
  rows (a selection block is contiguous), already rotated with RoPE (the cache stores them so: rotating them
  here took 16 of the kernel's 41 us at 64k tokens, batch 16, for the sine and cosine of every key element).
* :func:`combine`: one program per (token, chunk of value columns) merges the three branches' partials and
  applies the gates (in a CUDA graph, inductor had spent about 40 us of a 64k step in the small kernels of
  those merges, the probabilities and the gating).

All are custom ops (``nsa_flex::decode_*``) so that ``torch.compile`` traces them. Without triton this module
defines no kernels, and :func:`supported` says no.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .block_topk import FORCED_KEY, INDEX_BITS, band, next_pow2

try:
    import triton
    import triton.language as tl

    from .block_topk import block_index, ranking_keys
except ImportError:  # CPU-only installs: nsa_decode never asks for the kernels there
    triton = None

# Launch settings, measured on an H100 (64k tokens, paper config, batch 16, CUDA graphs; bench.decode_sweep
# times a step per setting and each kernel in it). The compressed kernel is within 10% over tiles of 64/128 keys,
# 4/8 warps, 2-3 stages and 256-2048 programs (55-65 us); about 256 programs leave 4 splits per token, whose
# partials the merge reads in 7.6 us instead of 10.4 at 1024. The sparse kernel (keys rotated in the cache) took
# 29 us at one tile per program and 25 us at four, where four tiles leave 384 programs; 2 stages were 1 us faster
# than 3; at batch 1 (96 programs at one tile) one tile per program was fastest.
_TARGET_PROGRAMS = 256
_COMPRESSED_TILE = 64  # compressed keys per loop step
_COMPRESSED_WARPS = 4
_COMPRESSED_STAGES = 2
_SPARSE_WARPS = 8
_SPARSE_STAGES = 2
_SPARSE_PROGRAMS = 384
# Block scoring and the merge run one program per token and chunk (of selection blocks, of value columns): one
# program per token alone left most of the GPU idle (64 programs at batch 16: 250 us to score 64k tokens' blocks).
# Swept at 64k tokens, batch 16 and 1, each kernel timed alone: scoring is fastest with about 512 programs
# (chunks of 16-256 blocks), the merge with 16 columns, one warp once there are a few hundred programs and 4
# warps below. Folding the choice (top-n) and the merge into the scoring and sparse kernels, the last program of
# a token doing them (arrival counters), was slower: 18.7 us for scoring and choice (13.5 + 5.4 apart), 44-50 us
# for sparse and merge (25 + 7.6 apart), as those last programs run one per token, after the rest.
_SCORE_PROGRAMS = 512
_COMBINE_COLUMNS = 16
MAX_BLOCKS = 4096  # selection blocks a choose_blocks program ranks in registers (256k tokens at l' = 64)


def unsupported(q: Tensor, k_cache: Tensor, selection_block_size: int) -> Optional[str]:
    """Why the kernels cannot take this decode step (``None`` if they can), device aside: they take fp16/bf16/fp32,
    a selection block of 16-128 tokens that is a power of two (it is the key tile), at most 128 query heads per
    kv head, a head row of at most 256 bytes and caches under ``2**31`` elements (int32 offsets)."""
    sel = selection_block_size
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"inputs must be float16, bfloat16 or float32, got {q.dtype}"
    if not 16 <= sel <= 128 or sel & (sel - 1):
        return f"selection_block_size must be a power of two in [16, 128], got {sel}"
    if q.shape[1] // k_cache.shape[1] > 128:
        return f"at most 128 query heads per kv head, got {q.shape[1] // k_cache.shape[1]}"
    if q.shape[-1] * q.element_size() > 256:
        return f"head rows of at most 256 bytes, got {q.shape[-1]} x {q.element_size()}"
    if k_cache.numel() >= 1 << 31:
        return f"caches of fewer than 2**31 elements, got {k_cache.numel()}"
    return None


def supported(q: Tensor, k_cache: Tensor, selection_block_size: int) -> bool:
    """Whether :func:`nsa_decode` takes the kernels by default: CUDA, triton, and nothing :func:`unsupported`."""
    return triton is not None and q.is_cuda and unsupported(q, k_cache, selection_block_size) is None


def merge(m: Float[Tensor, "... P G"], lsum: Float[Tensor, "... P G"], acc: Float[Tensor, "... P G Dv"]):
    """Combine softmax partials over the split dim ``P``: ``(o [..., G, Dv], lse [..., G])``; rows that saw no
    key give ``o = 0`` and ``lse = -inf``."""
    top = m.amax(dim=-2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(m - top)  # 0 for empty splits (m = -inf)
    total = (lsum * weight).sum(dim=-2)
    o = (acc * weight.unsqueeze(-1)).sum(dim=-3) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return o, total.log() + top.squeeze(-2)


def compressed_partials(q: Float[Tensor, "B Hq T D"], k_cmp: Float[Tensor, "B Hkv C D"],
                        v_cmp: Float[Tensor, "B Hkv C Dv"], positions: Int[Tensor, "B T"], scale: float,
                        block_size: int, stride: int, wrap=lambda kernel: kernel):
    """``(logits [B, Hkv, G, T, C], m, lsum [B, Hkv, T, P, G], acc [B, Hkv, T, P, G, Dv])`` (float32).

    ``logits`` are ``scale * q . k_cmp`` where key ``c`` is visible (``c*d + l - 1 <= t``); entries of invisible
    keys are unspecified (mask them). ``P`` splits of the compressed keys. ``wrap`` is for the custom op.
    """
    B, Hq, T, D = q.shape
    Hkv, C, Dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    G = Hq // Hkv
    tiles = max(1, math.ceil(C / _COMPRESSED_TILE))
    per_split = next_pow2(max(1, math.ceil(tiles * B * Hkv * T / _TARGET_PROGRAMS)))
    P = math.ceil(tiles / per_split)
    dev, f32 = q.device, torch.float32
    logits = torch.empty(B, Hkv, G, T, C, device=dev, dtype=f32)
    m = torch.empty(B, Hkv, T, P, G, device=dev, dtype=f32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, Hkv, T, P, G, Dv, device=dev, dtype=f32)
    if m.numel() == 0:
        return logits, m, lsum, acc
    wrap(compressed_kernel)[(B * Hkv * T, P)](
        q, k_cmp, v_cmp, positions, logits, m, lsum, acc,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *positions.stride(),
        T, C, Hkv, scale,
        G=G, GP=max(16, next_pow2(G)), D=D, DP=max(16, next_pow2(D)), DV=Dv, DVP=max(16, next_pow2(Dv)),
        STRIDE=stride, BLOCK=block_size, BC=_COMPRESSED_TILE, TILES=per_split, P=P,
        IEEE=q.dtype == torch.float32, num_warps=_COMPRESSED_WARPS, num_stages=_COMPRESSED_STAGES,
    )
    return logits, m, lsum, acc


def choose_blocks(logits: Float[Tensor, "B Hkv G T C"], m: Float[Tensor, "B Hkv T P G"],
                  lsum: Float[Tensor, "B Hkv T P G"], positions: Int[Tensor, "B T"],
                  num_blocks: int, block_size: int, stride: int, selection_block_size: int, num_selected: int,
                  num_initial: int, num_local: int, wrap=lambda kernel: kernel) -> Int[Tensor, "B Hkv T n"]:
    """Top-``n`` of ``num_blocks`` selection blocks (int64, ``-1`` padded, best first) as :func:`top_blocks`
    chooses from :func:`block_scores`, straight from :func:`compressed_partials`' outputs, in two kernels:
    ``score_kernel`` (one program per token and chunk of blocks, about :data:`_SCORE_PROGRAMS` in all) merges
    the token's split partials into the group's log-sum-exps, forms the compressed probabilities of the visible
    keys from the logits, sums them over the group and folds them into block scores (no probability tensor);
    ``choose_kernel`` (one program per token) ranks them. The overlap weights of :func:`overlap_pattern` are
    computed in the kernel. Takes ``num_blocks <= 4096`` (callers fall back to those two beyond)."""
    B, Hkv, G, T, C = logits.shape
    P = m.shape[3]
    out = torch.empty(B, Hkv, T, num_selected, dtype=torch.long, device=logits.device)
    if out.numel() == 0:
        return out
    scores = torch.empty(B, Hkv, T, num_blocks, dtype=torch.float32, device=logits.device)
    r, L = band(block_size, stride, selection_block_size)
    chunk = min(256, max(16, next_pow2(math.ceil(num_blocks * B * Hkv * T / _SCORE_PROGRAMS))))
    wrap(score_kernel)[(B * Hkv * T, math.ceil(num_blocks / chunk))](
        logits, m, lsum, positions, scores, *positions.stride(), T, Hkv, C, num_blocks,
        G=G, GP=max(2, next_pow2(G)), P=P, PP=max(2, next_pow2(P)), STRIDE=stride, BLOCK=block_size,
        SEL=selection_block_size, SB=chunk, R=r, M=r + L, MP=next_pow2(r + L), num_warps=8 if chunk >= 128 else 4,
    )
    wrap(choose_kernel)[(B * Hkv * T,)](
        scores, positions, out, *positions.stride(), *out.stride(), T, Hkv, num_blocks,
        SP=next_pow2(max(num_blocks, num_selected, 16)), SEL=selection_block_size,
        N=num_selected, NP=max(2, next_pow2(num_selected)), NUM_INITIAL=num_initial, NUM_LOCAL=num_local,
        INDEX_BITS=INDEX_BITS, FORCED=FORCED_KEY, num_warps=4,
    )
    return out


def combine(m_cmp: Float[Tensor, "B Hkv T P G"], lsum_cmp: Float[Tensor, "B Hkv T P G"],
            acc_cmp: Float[Tensor, "B Hkv T P G Dv"], m_sparse: Float[Tensor, "B Hkv T Q G"],
            lsum_sparse: Float[Tensor, "B Hkv T Q G"], acc_sparse: Float[Tensor, "B Hkv T Q G Dv"],
            gates: Float[Tensor, "B Hq T 3"], selected_splits: int, wrap=lambda kernel: kernel
            ) -> Float[Tensor, "B Hq T Dv"]:
    """The gated NSA output in ``gates``' dtype: per row, :func:`merge` of the compressed splits, of the
    sparse splits ``< selected_splits`` (selected) and of the others (window), weighted by the three gates."""
    B, Hkv, T, P, G = m_cmp.shape
    Q, Dv = m_sparse.shape[3], acc_cmp.shape[-1]
    out = torch.empty(B, Hkv * G, T, Dv, device=gates.device, dtype=gates.dtype)
    if out.numel() == 0:
        return out
    programs = (B * Hkv * T, math.ceil(Dv / _COMBINE_COLUMNS))
    wrap(combine_kernel)[programs](
        m_cmp, lsum_cmp, acc_cmp, m_sparse, lsum_sparse, acc_sparse, gates, out,
        *gates.stride(), *out.stride(), T, Hkv,
        P=P, PP=max(2, next_pow2(P)), Q=Q, QP=max(2, next_pow2(Q)), N=selected_splits,
        G=G, GP=max(2, next_pow2(G)), DV=Dv, DVC=_COMBINE_COLUMNS,
        num_warps=1 if programs[0] * programs[1] >= 256 else 4,
    )
    return out


def sparse_tiles_per_split(rows: int, num_selected: int, window_size: int, selection_block_size: int) -> int:
    """Key tiles that one :func:`sparse_partials` program takes for ``rows = B * Hkv * T`` token rows: up to 4,
    while at least :data:`_SPARSE_PROGRAMS` programs remain (fewer splits, fewer partials to merge)."""
    W = math.ceil(window_size / selection_block_size)
    tiles = 1
    while tiles < 4 and rows * (math.ceil(num_selected / (2 * tiles)) + math.ceil(W / (2 * tiles))) >= _SPARSE_PROGRAMS:
        tiles *= 2
    return tiles


def sparse_partials(q: Float[Tensor, "B Hq T D"], k_cache: Float[Tensor, "B Hkv L D"],
                    v_cache: Float[Tensor, "B Hkv L Dv"], positions: Int[Tensor, "B T"],
                    block_indices: Int[Tensor, "B Hkv T n"], inv_freq: Optional[Float[Tensor, "D2"]], scale: float,
                    selection_block_size: int, window_size: int, wrap=lambda kernel: kernel):
    """``(m, lsum [B, Hkv, T, Q, G], acc [B, Hkv, T, Q, G, Dv])`` (float32) over ``Q = ceil(n / k) + ceil(W / k)``
    splits of ``k =`` :func:`sparse_tiles_per_split` key tiles each: the first ``ceil(n / k)`` take the selected
    blocks (``-1``: empty), the others the ``W = ceil(w / l')`` tiles of the window.

    ``k_cache`` holds the keys as the branches attend with them (rotated, with RoPE); ``q`` is rotated here at
    its position with ``inv_freq`` (:func:`rotary_at`'s frequencies and arithmetic) unless that is None.
    """
    B, Hq, T, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    G, n = Hq // Hkv, block_indices.shape[-1]
    W = math.ceil(window_size / selection_block_size)
    tiles = sparse_tiles_per_split(B * Hkv * T, n, window_size, selection_block_size)
    splits_sel = math.ceil(n / tiles)
    Q = splits_sel + math.ceil(W / tiles)
    dev, f32 = q.device, torch.float32
    m = torch.empty(B, Hkv, T, Q, G, device=dev, dtype=f32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, Hkv, T, Q, G, Dv, device=dev, dtype=f32)
    if m.numel() == 0:
        return m, lsum, acc
    rotary = inv_freq is not None
    half = D // 2 if rotary else D  # without rotary the "first half" is the whole row
    wrap(sparse_kernel)[(B * Hkv * T, Q)](
        q, k_cache, v_cache, positions, block_indices, inv_freq if rotary else q, m, lsum, acc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *positions.stride(), *block_indices.stride(),
        T, Hkv, n, W, window_size, scale,
        G=G, GP=max(16, next_pow2(G)), HALF=half, HP=max(16, next_pow2(half)), ROTARY=rotary,
        DV=Dv, DVP=max(16, next_pow2(Dv)),
        SEL=selection_block_size, TILES=tiles, SPLITS_SEL=splits_sel,
        IEEE=q.dtype == torch.float32, num_warps=_SPARSE_WARPS, num_stages=_SPARSE_STAGES,
    )
    return m, lsum, acc


if triton is not None:
    @torch.library.triton_op("nsa_flex::decode_compressed_partials", mutates_args={})
    def compressed_partials_op(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, positions: Tensor, scale: float,
                               block_size: int, stride: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return compressed_partials(q, k_cmp, v_cmp, positions, scale, block_size, stride,
                                   wrap=torch.library.wrap_triton)

    @torch.library.triton_op("nsa_flex::decode_choose_blocks", mutates_args={})
    def choose_blocks_op(logits: Tensor, m: Tensor, lsum: Tensor, positions: Tensor, num_blocks: int,
                         block_size: int, stride: int, selection_block_size: int, num_selected: int,
                         num_initial: int, num_local: int) -> Tensor:
        return choose_blocks(logits, m, lsum, positions, num_blocks, block_size, stride, selection_block_size,
                             num_selected, num_initial, num_local, wrap=torch.library.wrap_triton)

    @torch.library.triton_op("nsa_flex::decode_combine", mutates_args={})
    def combine_op(m_cmp: Tensor, lsum_cmp: Tensor, acc_cmp: Tensor, m_sparse: Tensor, lsum_sparse: Tensor,
                   acc_sparse: Tensor, gates: Tensor, selected_splits: int) -> Tensor:
        return combine(m_cmp, lsum_cmp, acc_cmp, m_sparse, lsum_sparse, acc_sparse, gates, selected_splits,
                       wrap=torch.library.wrap_triton)

    @torch.library.triton_op("nsa_flex::decode_sparse_partials", mutates_args={})
    def sparse_partials_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                           block_indices: Tensor, inv_freq: Optional[Tensor], scale: float,
                           selection_block_size: int, window_size: int) -> tuple[Tensor, Tensor, Tensor]:
        return sparse_partials(q, k_cache, v_cache, positions, block_indices, inv_freq, scale,
                               selection_block_size, window_size, wrap=torch.library.wrap_triton)

    @triton.jit
    def _token(POS, spb, spt, T, Hkv):
        """This program's (sequence b, kv head h, new token t) from axis 0, and t's position (as int32, from
        positions of any integer dtype: callers pass the cache's int64 ones without a conversion kernel)."""
        row = tl.program_id(0)
        t = row % T
        h = (row // T) % Hkv
        b = row // (T * Hkv)
        return row, b, h, t, tl.load(POS + b * spb + t * spt).to(tl.int32)

    @triton.jit
    def _dot_t(a, b, IEEE: tl.constexpr):
        """``a @ b.T`` (float32 accumulation; exact float32 products for float32 inputs)."""
        if IEEE:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        return tl.dot(a, tl.trans(b))

    @triton.jit
    def _online(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
        """One step of the online softmax: logits ``s [GP, K]`` (``-inf`` masked), values ``v [K, DVP]``."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _store_partial(M, LSUM, ACC, row, split, P, m_i, l_i, acc,
                       G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
        g = tl.arange(0, GP)
        dv = tl.arange(0, DVP)
        base = (row * P + split) * G
        tl.store(M + base + g, m_i, mask=g < G)
        tl.store(LSUM + base + g, l_i, mask=g < G)
        tl.store(ACC + (base + g)[:, None] * DV + dv[None, :], acc, mask=(g < G)[:, None] & (dv < DV)[None, :])

    @triton.jit
    def compressed_kernel(
        Q, K, V, POS, LOGITS, M, LSUM, ACC,
        sqb, sqh, sqt, sqd, skb, skh, skc, skd, svb, svh, svc, svd, spb, spt,
        T, C, Hkv, scale,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
        DVP: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr, BC: tl.constexpr, TILES: tl.constexpr,
        P: tl.constexpr, IEEE: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        row, b, h, t, pos = _token(POS, spb, spt, T, Hkv)
        split = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + t * sqt + d[None, :] * sqd,
                    mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DVP), tl.float32)
        # compressed keys visible to this token: c*d + l - 1 <= pos; tiles past them are skipped
        visible = tl.where(pos + 1 >= BLOCK, (pos + 1 - BLOCK) // STRIDE + 1, 0)
        visible = tl.minimum(visible, C)
        lo = split * TILES * BC
        hi = tl.minimum(lo + TILES * BC, visible)
        for start in range(lo, hi, BC):
            c = start + tl.arange(0, BC)
            ok = c < hi
            k = tl.load(K + b * skb + h * skh + c[:, None] * skc + d[None, :] * skd,
                        mask=ok[:, None] & (d < D)[None, :], other=0.0)
            v = tl.load(V + b * svb + h * svh + c[:, None] * svc + dv[None, :] * svd,
                        mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
            s = tl.where(ok[None, :], _dot_t(q, k, IEEE) * scale, float("-inf"))
            tl.store(LOGITS + (((b * Hkv + h) * G + g)[:, None] * T + t) * C + c[None, :], s,
                     mask=(g < G)[:, None] & ok[None, :])
            m_i, l_i, acc = _online(s, v, m_i, l_i, acc, IEEE)
        _store_partial(M, LSUM, ACC, row, split, P, m_i, l_i, acc, G, GP, DV, DVP)

    @triton.jit
    def sparse_kernel(
        Q, K, V, POS, IDX, INV_FREQ, M, LSUM, ACC,
        sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, spb, spt, sib, sih, sit, sij,
        T, Hkv, N, NW, window, scale,
        G: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr, ROTARY: tl.constexpr,
        DV: tl.constexpr, DVP: tl.constexpr, SEL: tl.constexpr, TILES: tl.constexpr, SPLITS_SEL: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        row, b, h, t, pos = _token(POS, spb, spt, T, Hkv)
        split = tl.program_id(1)
        is_sel = split < SPLITS_SEL  # else window tiles
        first = tl.where(is_sel, split, split - SPLITS_SEL) * TILES
        count = tl.where(is_sel, N, NW)
        g = tl.arange(0, GP)
        e = tl.arange(0, HP)
        dv = tl.arange(0, DVP)
        q_rows = Q + b * sqb + (h * G + g)[:, None] * sqh + t * sqt
        q_ok = (g < G)[:, None] & (e < HALF)[None, :]
        q1 = tl.load(q_rows + e[None, :] * sqd, mask=q_ok, other=0.0)
        if ROTARY:  # "rotate half" at the token's position: (q1, q2) -> (q1 cos - q2 sin, q2 cos + q1 sin)
            q2 = tl.load(q_rows + (e + HALF)[None, :] * sqd, mask=q_ok, other=0.0)
            angle = pos.to(tl.float32) * tl.load(INV_FREQ + e, mask=e < HALF, other=0.0)
            cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
            q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
            q1 = (q1f * cos - q2f * sin).to(q2.dtype)
            q2 = (q2f * cos + q1f * sin).to(q2.dtype)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DVP), tl.float32)
        for i in range(TILES):  # selected block (first + i) or window tile (first + i) of this token
            j = first + i
            block = tl.load(IDX + b * sib + h * sih + t * sit + tl.minimum(j, N - 1) * sij).to(tl.int32)
            start = tl.where(is_sel, block * SEL, pos - window + 1 + j * SEL)
            tok = start + tl.arange(0, SEL)
            ok = (j < count) & (tok >= 0) & (tok <= pos) & tl.where(is_sel, block >= 0, tok > pos - window)
            k_rows = K + b * skb + h * skh + tok[:, None] * skl
            k_ok = ok[:, None] & (e < HALF)[None, :]
            k1 = tl.load(k_rows + e[None, :] * skd, mask=k_ok, other=0.0)
            v = tl.load(V + b * svb + h * svh + tok[:, None] * svl + dv[None, :] * svd,
                        mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
            s = _dot_t(q1, k1, IEEE)
            if ROTARY:
                s += _dot_t(q2, tl.load(k_rows + (e + HALF)[None, :] * skd, mask=k_ok, other=0.0), IEEE)
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            m_i, l_i, acc = _online(s, v, m_i, l_i, acc, IEEE)
        _store_partial(M, LSUM, ACC, row, split, tl.num_programs(1), m_i, l_i, acc, G, GP, DV, DVP)

    @triton.jit
    def _merge_splits(M, LSUM, ACC, row, dv, lo, hi, NS: tl.constexpr, NSP: tl.constexpr, G: tl.constexpr,
                      GP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr):
        """:func:`merge` of splits ``[lo, hi)`` of row ``row`` (of ``NS`` splits), value columns ``dv``, in
        registers: ``[GP, DVC]``. The partials are read in chunks of 16 splits: a loop over single splits
        is a chain of dependent loads (20 us for 64 splits)."""
        sp = tl.arange(0, NSP)
        g = tl.arange(0, GP)
        ok = ((sp >= lo) & (sp < hi))[:, None] & (g < G)[None, :]
        m = tl.load(M + (row * NS + sp[:, None]) * G + g[None, :], mask=ok, other=float("-inf"))
        lsum = tl.load(LSUM + (row * NS + sp[:, None]) * G + g[None, :], mask=ok, other=0.0)
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(lsum * tl.exp(m - top[None, :]), axis=0)  # empty splits (m = -inf) weigh 0
        acc = tl.zeros((GP, DVC), tl.float32)
        CHUNK: tl.constexpr = 16
        for first in range(lo, hi, CHUNK):
            i = first + tl.arange(0, CHUNK)
            i_ok = (i < hi)[:, None] & (g < G)[None, :]
            split = (row * NS + i[:, None]) * G + g[None, :]  # [CHUNK, GP]
            w = tl.exp(tl.load(M + split, mask=i_ok, other=float("-inf")) - top[None, :])
            a = tl.load(ACC + split[:, :, None] * DV + dv[None, None, :],
                        mask=i_ok[:, :, None] & (dv < DV)[None, None, :], other=0.0)
            acc += tl.sum(w[:, :, None] * a, axis=0)
        return acc / tl.where(total > 0, total, 1.0)[:, None]

    @triton.jit
    def combine_kernel(
        MC, LC, AC, MS, LS, AS, GATES, OUT, sgb, sgh, sgt, sgk, sob, soh, sot, sod, T, Hkv,
        P: tl.constexpr, PP: tl.constexpr, Q: tl.constexpr, QP: tl.constexpr, N: tl.constexpr,
        G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, DVC: tl.constexpr,
    ):
        row = tl.program_id(0)
        t = row % T
        h = (row // T) % Hkv
        b = row // (T * Hkv)
        g = tl.arange(0, GP)
        dv = tl.program_id(1) * DVC + tl.arange(0, DVC)
        o_cmp = _merge_splits(MC, LC, AC, row, dv, 0, P, P, PP, G, GP, DV, DVC)
        o_sel = _merge_splits(MS, LS, AS, row, dv, 0, N, Q, QP, G, GP, DV, DVC)
        o_win = _merge_splits(MS, LS, AS, row, dv, N, Q, Q, QP, G, GP, DV, DVC)
        gate = GATES + b * sgb + (h * G + g) * sgh + t * sgt
        g_cmp = tl.load(gate, mask=g < G, other=0.0).to(tl.float32)
        g_sel = tl.load(gate + sgk, mask=g < G, other=0.0).to(tl.float32)
        g_win = tl.load(gate + 2 * sgk, mask=g < G, other=0.0).to(tl.float32)
        out = g_cmp[:, None] * o_cmp + g_sel[:, None] * o_sel + g_win[:, None] * o_win
        tl.store(OUT + b * sob + (h * G + g)[:, None] * soh + t * sot + dv[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=(g < G)[:, None] & (dv < DV)[None, :])

    @triton.jit
    def score_kernel(
        LOGITS, MC, LC, POS, SCORES, sqb, sqt, T, Hkv, C, S,
        G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, STRIDE: tl.constexpr,
        BLOCK: tl.constexpr, SEL: tl.constexpr, SB: tl.constexpr, R: tl.constexpr, M: tl.constexpr,
        MP: tl.constexpr,
    ):
        row, b, h, t, pos = _token(POS, sqb, sqt, T, Hkv)
        # the group's log-sum-exps from the compressed split partials (+inf where a head saw nothing: p = 0)
        sp = tl.arange(0, PP)
        g = tl.arange(0, GP)
        ok = (sp < P)[:, None] & (g < G)[None, :]
        m = tl.load(MC + (row * P + sp[:, None]) * G + g[None, :], mask=ok, other=float("-inf"))
        lsum = tl.load(LC + (row * P + sp[:, None]) * G + g[None, :], mask=ok, other=0.0)
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(lsum * tl.exp(m - top[None, :]), axis=0)
        lse = tl.where(total > 0, tl.log(total) + top, float("inf"))
        visible = tl.where(pos + 1 >= BLOCK, (pos + 1 - BLOCK) // STRIDE + 1, 0)  # keys c*d + l - 1 <= pos
        visible = tl.minimum(visible, C)
        s = tl.program_id(1) * SB + tl.arange(0, SB)
        j = tl.arange(0, MP)
        # score[s] = sum_j w[j] p[s*R + j - L], L = M - R (the compressed blocks before s reaching into it),
        # p[c] = sum over the group of exp(logit - lse)
        c = s[:, None] * R + j[None, :] - (M - R)
        c_ok = (c >= 0) & (c < visible) & (j < M)[None, :] & (s < S)[:, None]
        p = tl.zeros((SB, MP), tl.float32)
        for gi in tl.static_range(G):  # unrolled: the heads' loads are independent (15.3 -> 13.5 us)
            lse_g = tl.sum(tl.where(g == gi, lse, 0.0))
            logit = tl.load(LOGITS + ((row // T * G + gi) * T + t) * C + c, mask=c_ok, other=float("-inf"))
            p += tl.exp(logit - lse_g)
        # w[j]: tokens that compressed block j (starting (j - L) * d tokens after the selection block's start)
        # shares with the selection block, overlap_pattern's integers
        first = (j - (M - R)) * STRIDE
        w = tl.maximum(tl.minimum(first + BLOCK, SEL) - tl.maximum(first, 0), 0)
        score = tl.sum(p * tl.where(j < M, w, 0).to(tl.float32)[None, :], axis=1)
        tl.store(SCORES + row * S + s, score, mask=s < S)

    @triton.jit
    def choose_kernel(
        SCORES, POS, OUT, sqb, sqt, sob, soh, sot, son, T, Hkv, S,
        SP: tl.constexpr, SEL: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, NUM_INITIAL: tl.constexpr,
        NUM_LOCAL: tl.constexpr, INDEX_BITS: tl.constexpr, FORCED: tl.constexpr,
    ):
        row, b, h, t, pos = _token(POS, sqb, sqt, T, Hkv)
        s = tl.arange(0, SP)
        score = tl.load(SCORES + row * S + s, mask=s < S, other=0.0)
        key = ranking_keys(score, s, pos // SEL, S, NUM_INITIAL, NUM_LOCAL, INDEX_BITS, FORCED)
        top = tl.topk(key[None, :], NP)  # NP >= 2: a top-1 reduces to a scalar inside tl.topk (Triton 3.6)
        n = tl.arange(0, NP)[None, :]
        index = block_index(top, S, INDEX_BITS)
        tl.store(OUT + b * sob + h * soh + t * sot + n * son, index, mask=n < N)
