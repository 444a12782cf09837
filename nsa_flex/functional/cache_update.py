"""Triton kernels for the cache bookkeeping of a decode step: write the new keys/values, cut the blocks they
complete, store those blocks' compressed keys/values.

Each replaces a handful of torch ops (``scatter_``/``gather`` per tensor plus the index arithmetic) by one
launch for keys and values together: on an H100 at 64k tokens and batch 16 those small ops took about 50 us
of a 240 us decode step, most of it launch latency, since each moves only a few rows. One program per
(sequence, kv head, new token) copies that token's rows; offsets are 64-bit (caches beyond ``2**31`` elements
are fine). :func:`.decode.write_cache` and :func:`.decode.update_compressed` call these on CUDA and fall back
to torch ops elsewhere; the tests also run them under Triton's interpreter.

A cache may hold its keys rotated (RoPE at their positions, as the selected and window branches attend with
them: rotating once at the write saves the decode kernels a sine and cosine per key element), while the
compressor needs them position-free. Such a cache keeps the last ``l`` raw keys in a ring (token ``j`` at slot
``j % l``); blocks are then cut from the ring and the step's new raw keys.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .block_topk import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers never ask for the kernels there
    triton = None

# Where _copy_rows_kernel puts row (b, h, t): at its position, in the compressed slot of the block it
# completes, or in a ring slot (position mod the ring's length).
_AT_POSITION, _COMPRESSED_SLOT, _RING = 0, 1, 2


def supported(cache: Tensor) -> bool:
    """Whether the callers take the kernels by default: triton importable and a CUDA cache."""
    return triton is not None and cache.is_cuda


def _copy_rows(k: Tensor, v: Optional[Tensor], k_dst: Tensor, v_dst: Optional[Tensor], positions: Tensor,
               where: int, inv_freq: Optional[Tensor] = None, block_size: int = 0, stride: int = 0) -> None:
    B, H, T, D = k.shape
    if k.numel() == 0:
        return
    pair = v is not None
    v, v_dst = (v, v_dst) if pair else (k, k_dst)  # a placeholder the kernel never touches
    Dv = v.shape[-1]
    _copy_rows_kernel[(B * H * T,)](
        k, v, k_dst, v_dst, positions, k if inv_freq is None else inv_freq,
        *k.stride(), *v.stride(), *k_dst.stride(), *v_dst.stride(), *positions.stride(),
        T, H, block_size, stride, k_dst.shape[2],
        D=D, DP=next_pow2(D), HP=next_pow2(max(1, D // 2)), DV=Dv, DVP=next_pow2(Dv), WHERE=where,
        ROTARY=inv_freq is not None, PAIR=pair,
    )


def write_rows(k_cache: Float[Tensor, "B H L D"], v_cache: Float[Tensor, "B H L Dv"], k: Float[Tensor, "B H T D"],
               v: Float[Tensor, "B H T Dv"], positions: Int[Tensor, "B T"],
               inv_freq: Optional[Float[Tensor, "D2"]] = None) -> None:
    """In place: ``k_cache[b, h, positions[b, t]] = k[b, h, t]`` (cast to the cache's dtype), and the same for
    ``v``; a position outside ``[0, L)`` writes nothing. With ``inv_freq`` (:func:`.decode.rotary_frequencies`)
    the keys are stored rotated at their positions (RoPE, "rotate half", :func:`.decode.rotary_at`'s arithmetic)."""
    _copy_rows(k, v, k_cache, v_cache, positions, _AT_POSITION, inv_freq)


def write_ring(ring: Float[Tensor, "B H R D"], k: Float[Tensor, "B H T D"], positions: Int[Tensor, "B T"]) -> None:
    """In place: ``ring[b, h, positions[b, t] % R] = k[b, h, t]`` for the last ``R`` of the ``T`` tokens (the
    earlier ones would be overwritten; positions are consecutive, so the last ``R`` take distinct slots)."""
    _copy_rows(k, None, ring, None, positions, _RING)


def store_compressed(k_cmp: Float[Tensor, "B H C1 D"], v_cmp: Float[Tensor, "B H C1 Dv"],
                     k_new: Float[Tensor, "B H T D"], v_new: Float[Tensor, "B H T Dv"], positions: Int[Tensor, "B T"],
                     block_size: int, stride: int) -> None:
    """In place: the compressed key/value of the block that token ``positions[b, t]`` completes goes to its slot
    ``(t + 1 - l) / d``; tokens that complete none write the scratch slot ``C1 - 1`` (so do slots past it)."""
    _copy_rows(k_new, v_new, k_cmp, v_cmp, positions, _COMPRESSED_SLOT, block_size=block_size, stride=stride)


def completed_blocks(k_source: Float[Tensor, "B H L D"], v_cache: Float[Tensor, "B H L Dv"],
                     positions: Int[Tensor, "B T"], block_size: int, k_new: Optional[Float[Tensor, "B H T D"]] = None):
    """``(k [B, H, T, l, D], v [B, H, T, l, Dv])``: the ``l`` cached tokens ending at each position (token
    indices clamped into ``[0, L - 1]``: a position before ``l - 1`` gets a block that no slot keeps). Keys come
    from the cache ``k_source``, or, with ``k_new``, from the ring ``k_source [B, H, l, D]`` (tokens before
    ``positions[b, 0]``) and ``k_new`` (the tokens from there on)."""
    B, H, L, Dv = v_cache.shape
    T, D = positions.shape[1], k_source.shape[-1]
    k = torch.empty(B, H, T, block_size, D, device=v_cache.device, dtype=k_source.dtype)
    v = torch.empty(B, H, T, block_size, Dv, device=v_cache.device, dtype=v_cache.dtype)
    if k.numel() == 0:
        return k, v
    from_ring = k_new is not None
    k_new = k_new if from_ring else k_source  # a placeholder the kernel never touches
    _block_rows_kernel[(B * H * T,)](
        k_source, v_cache, positions, k_new, k, v, *k_source.stride(), *v_cache.stride(), *positions.stride(),
        *k_new.stride(), T, H, L, BLOCK=block_size, BP=next_pow2(block_size), D=D, DP=next_pow2(D), DV=Dv,
        DVP=next_pow2(Dv), FROM_RING=from_ring,
    )
    return k, v


def append_mean(k_cache: Float[Tensor, "B H L D"], v_cache: Float[Tensor, "B H L Dv"],
                k_cmp: Float[Tensor, "B H C1 D"], v_cmp: Float[Tensor, "B H C1 Dv"], k: Float[Tensor, "B H T D"],
                v: Float[Tensor, "B H T Dv"], positions: Int[Tensor, "B T"], block_size: int, stride: int,
                inv_freq: Optional[Float[Tensor, "D2"]] = None, k_ring: Optional[Float[Tensor, "B H l D"]] = None
                ) -> None:
    """A decode step's cache update in one launch, for the ``"mean"`` compressor: :func:`write_rows` (keys
    rotated with ``inv_freq``), the mean of the block each new token completes into its compressed slot (as
    :func:`store_compressed`; summed in float32), and, with ``k_ring``, the ring moved on to the last ``l`` raw
    keys. Blocks read older tokens from the ring (else the cache) and the new ones from ``k, v`` (cast to the
    cache's dtype, as if stored first); positions are consecutive per sequence. One program per (sequence,
    head) takes the ``T`` tokens in order, so no program reads what another writes."""
    B, H, T, D = k.shape
    if k.numel() == 0:
        return
    old = k_cache if k_ring is None else k_ring  # where the blocks' older keys are
    Dv = v.shape[-1]
    _append_mean_kernel[(B * H,)](
        k, v, k_cache, v_cache, k_cmp, v_cmp, old, positions, k if inv_freq is None else inv_freq,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *k_cmp.stride(), *v_cmp.stride(),
        *old.stride(), *positions.stride(), T, H, k_cache.shape[2], k_cmp.shape[2], stride,
        BLOCK=block_size, BP=next_pow2(block_size), D=D, DP=next_pow2(D), HP=next_pow2(max(1, D // 2)), DV=Dv,
        DVP=next_pow2(Dv), ROTARY=inv_freq is not None, FROM_RING=k_ring is not None,
    )


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
    def _compressed_slot(pos, BLOCK, STRIDE, ROWS):
        """The slot of the block that the token at ``pos`` completes, else the scratch slot ``ROWS - 1``."""
        start = pos + 1 - BLOCK
        slot = tl.where((start >= 0) & (start % STRIDE == 0), start // STRIDE, ROWS - 1)
        return tl.minimum(slot, ROWS - 1)

    @triton.jit
    def _put_key(SRC, ssd, DST, sdd, pos, inside, INV_FREQ, D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
                 ROTARY: tl.constexpr):
        """Copy the key row at ``SRC`` to ``DST`` (if ``inside``), cast to ``DST``'s dtype; ``ROTARY`` rotates it
        at ``pos`` on the way ("rotate half": (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), angles as
        :func:`.decode.rotary_at`'s, in ``INV_FREQ``'s precision, from the key as the cache would hold it)."""
        if ROTARY:
            HALF: tl.constexpr = D // 2
            e = tl.arange(0, HP)
            ok = e < HALF
            work = INV_FREQ.dtype.element_ty  # float32, float64 for a float64 cache
            x1 = tl.load(SRC + e * ssd, mask=ok).to(DST.dtype.element_ty).to(work)
            x2 = tl.load(SRC + (e + HALF) * ssd, mask=ok).to(DST.dtype.element_ty).to(work)
            angle = pos.to(work) * tl.load(INV_FREQ + e, mask=ok)
            cos, sin = tl.cos(angle), tl.sin(angle)
            tl.store(DST + e * sdd, (x1 * cos - x2 * sin).to(DST.dtype.element_ty), mask=ok & inside)
            tl.store(DST + (e + HALF) * sdd, (x2 * cos + x1 * sin).to(DST.dtype.element_ty), mask=ok & inside)
        else:
            d = tl.arange(0, DP)
            x = tl.load(SRC + d * ssd, mask=d < D)
            tl.store(DST + d * sdd, x.to(DST.dtype.element_ty), mask=(d < D) & inside)

    @triton.jit
    def _copy_rows_kernel(
        K, V, KD, VD, POS, INV_FREQ, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdl, sdd,
        seb, seh, sel, sed, spb, spt, T, H, BLOCK, STRIDE, ROWS,
        D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
        WHERE: tl.constexpr, ROTARY: tl.constexpr, PAIR: tl.constexpr,
    ):
        """Row ``(b, h, t)`` of ``K`` (and ``V`` if ``PAIR``) to row ``dst < ROWS`` of ``KD`` (``VD``), where
        ``WHERE`` says (module constants); ``ROTARY`` rotates the key at its position on the way."""
        row, b, h, t, pos = _row(POS, spb, spt, T, H)
        if WHERE == 0:  # _AT_POSITION: none outside [0, ROWS)
            dst = pos
            inside = (dst >= 0) & (dst < ROWS)
        elif WHERE == 1:  # _COMPRESSED_SLOT
            dst = _compressed_slot(pos, BLOCK, STRIDE, ROWS)
            inside = dst >= 0  # always
        else:  # _RING: only the last ROWS tokens (earlier ones share their slots)
            dst = pos % ROWS
            inside = t >= T - ROWS
        _put_key(K + b * skb + h * skh + t * skt, skd, KD + b * sdb + h * sdh + dst * sdl, sdd, pos, inside,
                 INV_FREQ, D, DP, HP, ROTARY)
        if PAIR:
            dv = tl.arange(0, DVP)
            x = tl.load(V + b * svb + h * svh + t * svt + dv * svd, mask=dv < DV)
            tl.store(VD + b * seb + h * seh + dst * sel + dv * sed, x.to(VD.dtype.element_ty),
                     mask=(dv < DV) & inside)

    @triton.jit
    def _block_of(OLD, sol, sod, NEW, snt, snd, tok, first, in_block, C: tl.constexpr, CP: tl.constexpr, L,
                  BLOCK: tl.constexpr, OLD_IN_RING: tl.constexpr, NEW_APART: tl.constexpr):
        """Rows ``[BP, CP]`` of the block's tokens ``tok``: from ``OLD`` (a ring: slot ``tok % BLOCK``; else a
        cache: row ``tok``, clamped into ``[0, L)``), or, with ``NEW_APART``, those from the step's first new
        token ``first`` on from ``NEW`` (row ``tok - first``, cast to ``OLD``'s dtype as if stored there)."""
        c = tl.arange(0, CP)
        cols = (c < C)[None, :]
        if OLD_IN_RING:
            old_row = tok % BLOCK
        else:
            old_row = tl.minimum(tok, L - 1)
        if NEW_APART:
            new = tok >= first
            x = tl.load(OLD + old_row[:, None] * sol + c[None, :] * sod, mask=(in_block & ~new)[:, None] & cols,
                        other=0.0)
            fresh = tl.load(NEW + (tok - first)[:, None] * snt + c[None, :] * snd,
                            mask=(in_block & new)[:, None] & cols, other=0.0)
            return tl.where(new[:, None], fresh.to(OLD.dtype.element_ty), x)
        return tl.load(OLD + old_row[:, None] * sol + c[None, :] * sod, mask=in_block[:, None] & cols, other=0.0)

    @triton.jit
    def _block_rows_kernel(
        KS, VC, POS, KN, KO, VO, skb, skh, skl, skd, svb, svh, svl, svd, spb, spt, snb, snh, snt, snd, T, H, L,
        BLOCK: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
        DVP: tl.constexpr, FROM_RING: tl.constexpr,
    ):
        """The ``BLOCK`` tokens ending at token ``(b, h, t)``'s position, to rows ``(row, j)`` of ``KO, VO``:
        keys from the cache ``KS`` (or the ring ``KS`` and the new keys ``KN``), values from ``VC``."""
        row, b, h, t, pos = _row(POS, spb, spt, T, H)
        j = tl.arange(0, BP)
        tok = tl.maximum(pos + 1 - BLOCK, 0) + j
        in_block = j < BLOCK
        first = tl.load(POS + b * spb).to(tl.int64)  # the step's first new token
        k = _block_of(KS + b * skb + h * skh, skl, skd, KN + b * snb + h * snh, snt, snd, tok, first, in_block,
                      D, DP, L, BLOCK, FROM_RING, FROM_RING)
        v = _block_of(VC + b * svb + h * svh, svl, svd, VC, 0, 0, tok, first, in_block, DV, DVP, L, BLOCK,
                      False, False)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        out = row * BLOCK + j[:, None]
        tl.store(KO + out * D + d[None, :], k, mask=in_block[:, None] & (d < D)[None, :])
        tl.store(VO + out * DV + dv[None, :], v, mask=in_block[:, None] & (dv < DV)[None, :])

    @triton.jit
    def _append_mean_kernel(
        K, V, KC, VC, KM, VM, OLD, POS, INV_FREQ, skb, skh, skt, skd, svb, svh, svt, svd,
        scb, sch, scl, scd, swb, swh, swl, swd, smb, smh, sml, smd, sub, suh, sul, sud, srb, srh, srl, srd,
        spb, spt, T, H, L, ROWS, STRIDE,
        BLOCK: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
        DV: tl.constexpr, DVP: tl.constexpr, ROTARY: tl.constexpr, FROM_RING: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        h = bh % H
        b = bh // H
        k_in, v_in = K + b * skb + h * skh, V + b * svb + h * svh
        k_cache, v_cache = KC + b * scb + h * sch, VC + b * swb + h * swh
        old = OLD + b * srb + h * srh  # the blocks' older keys: the raw-key ring (FROM_RING) or the cache
        first = tl.load(POS + b * spb).to(tl.int64)  # positions are consecutive: first + t
        j = tl.arange(0, BP)
        in_block = j < BLOCK
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        for t in range(T):
            pos = first + t
            # the new rows (older rows, which the blocks read, are never written here)
            _put_key(k_in + t * skt, skd, k_cache + pos * scl, scd, pos, (pos >= 0) & (pos < L), INV_FREQ, D, DP,
                     HP, ROTARY)
            x = tl.load(v_in + t * svt + dv * svd, mask=dv < DV)
            tl.store(v_cache + pos * swl + dv * swd, x.to(VC.dtype.element_ty), mask=(dv < DV) & (pos >= 0) & (pos < L))
            # the block ending at pos: older tokens from the ring (raw keys) or the cache, new ones from k, v
            tok = tl.maximum(pos + 1 - BLOCK, 0) + j
            k = _block_of(old, srl, srd, k_in, skt, skd, tok, first, in_block, D, DP, L, BLOCK, FROM_RING, True)
            v = _block_of(v_cache, swl, swd, v_in, svt, svd, tok, first, in_block, DV, DVP, L, BLOCK, False, True)
            slot = _compressed_slot(pos, BLOCK, STRIDE, ROWS)
            tl.store(KM + b * smb + h * smh + slot * sml + d * smd,
                     (tl.sum(k.to(tl.float32), axis=0) / BLOCK).to(KM.dtype.element_ty), mask=d < D)
            tl.store(VM + b * sub + h * suh + slot * sul + dv * sud,
                     (tl.sum(v.to(tl.float32), axis=0) / BLOCK).to(VM.dtype.element_ty), mask=dv < DV)
        if FROM_RING:  # after every block has read the ring: its slots move on to the last BLOCK raw keys
            tl.debug_barrier()
            for t in range(tl.maximum(T - BLOCK, 0), T):
                x = tl.load(k_in + t * skt + d * skd, mask=d < D)
                tl.store(old + ((first + t) % BLOCK) * srl + d * srd, x.to(OLD.dtype.element_ty), mask=d < D)
