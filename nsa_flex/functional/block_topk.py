"""Fused block scoring + top-n (Triton): :func:`select_blocks`' choices without materializing any scores.

One program takes ``BT`` tokens of one kv head, the ``G`` query heads of the group folded into ``BT * G`` rows,
and walks the selection blocks left to right, ``CH`` at a time (``CH * r`` compressed keys, ``r = l' / d``):

1. ``p = exp(scale * q . k_cmp - lse)`` for the chunk's compressed keys (``lse`` from the compressed branch, so
   the probabilities are recomputed, never stored), zero where a compressed block is not yet complete;
2. summed over the group's ``G`` rows, then folded into selection-block scores with the banded overlap weights
   ``w`` (:func:`overlap_pattern`): each selection block's own ``r`` compressed blocks, plus the ``L`` before it,
   which belong to the previous block (within the chunk a shift, across chunks a carried column);
3. ranked as int64 keys (forced blocks above every score, then score bits, then the reversed block index, so ties
   go to the lower block as in :func:`select_blocks`) and merged into a running top-``n`` (a bitonic top-k of
   the running list and the step's keys, side by side in a small per-program scratch row).

Memory is the ``[B, Hkv, T, n]`` output and the scratch rows (both linear in ``T``); HBM traffic is reading
``q``, ``k_cmp`` and ``lse`` (the unfused path wrote and re-read ``[B, Hq, T, Tc]`` float32 logits). The kernel
is registered as the custom op ``nsa_flex::block_topk`` so that ``torch.compile`` traces it instead of breaking
the graph; without triton (CPU installs) this module defines only :func:`supported`, which then says no.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: select_blocks never asks for the kernel there
    triton = None

# Keys shared with select_blocks' unfused path (the same ranking, the same ties): float32 score bits above
# INDEX_BITS bits of reversed block index; forced blocks above every score.
INDEX_BITS = 24
FORCED_KEY = 1 << 62
_ROWS = 128  # query rows (tokens x padded group) per program: one tensor-core tile
LOG2E = math.log2(math.e)
_MIN_CHUNK = 16  # selection blocks per step; tl.dot wants >= 16 of each dimension (head_dim is padded to 16)


def band(block_size: int, stride: int, selection_block_size: int) -> tuple[int, int]:
    """``(r, L)`` of the overlap band: ``r = l'/d`` compressed blocks start in each selection block and the
    ``L = ceil(l/d) - 1`` before them reach into it (see :func:`overlap_pattern`)."""
    return selection_block_size // stride, -(-block_size // stride) - 1


def supported(q: Tensor, block_size: int, stride: int, selection_block_size: int, num_selected: int) -> bool:
    """Whether the kernel handles this configuration: CUDA, triton, power-of-two ``r``, ``L <= r``, a query row
    of at most 256 bytes (bf16/fp16 ``D <= 128``, fp32 ``D <= 64``: the q tile and the pipelined key tiles
    must fit in shared memory), and ``q`` under ``2**31`` elements (the kernel's offsets are int32)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.shape[-1] * q.element_size() > 256:
        return False
    if q.numel() >= 1 << 31:
        return False
    r, L = band(block_size, stride, selection_block_size)
    return triton is not None and not r & (r - 1) and L <= r and num_selected <= 256


def block_topk(q: Float[Tensor, "B Hq T D"], k_cmp: Float[Tensor, "B Hkv Tc D"], lse: Float[Tensor, "B Hq T"],
               w: Float[Tensor, "m"], scale: float, block_size: int, stride: int, selection_block_size: int,
               num_selected: int, num_initial: int, num_local: int) -> Int[Tensor, "B Hkv T n"]:
    """:func:`select_blocks`' indices (int64, ``-1`` padded) through the custom op; check :func:`supported` first.

    ``lse`` is the compressed branch's natural-log log-sum-exp (float32), ``w`` the band of
    :func:`overlap_pattern`.
    """
    return block_topk_op(q, k_cmp, lse, w.to(torch.float32), float(scale), block_size, stride,
                         selection_block_size, num_selected, num_initial, num_local)


def launch(q: Tensor, k_cmp: Tensor, lse: Tensor, w: Tensor, scale: float, block_size: int, stride: int,
           selection_block_size: int, num_selected: int, num_initial: int, num_local: int,
           wrap=lambda kernel: kernel) -> Tensor:
    """Run the kernel directly (tests on Triton's interpreter use this; the custom op passes
    ``wrap=torch.library.wrap_triton``). Arguments as in :func:`block_topk`."""
    B, Hq, T, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    S = math.ceil(T / selection_block_size)
    r, L = band(block_size, stride, selection_block_size)
    out = torch.empty((B, Hkv, T, num_selected), dtype=torch.long, device=q.device)
    if T == 0:
        return out
    GP = next_pow2(G)
    BT = max(1, _ROWS // GP)
    NP = next_pow2(num_selected)
    CH = max(_MIN_CHUNK, NP)
    grid = (math.ceil(T / BT), B * Hkv)
    W2 = next_pow2(NP + CH)
    # per program, BT rows of [running top-n | this step's keys | -1 padding]: linear in T (64 MiB at 64k)
    scratch = torch.empty(grid[0] * grid[1] * BT * W2, dtype=torch.long, device=q.device)
    wrap(block_topk_kernel)[grid](
        q, k_cmp, lse, w, out, scratch,
        *q.stride(), *k_cmp.stride(), *lse.stride(), *out.stride(),
        T, Tc, S, Hkv, scale,
        G=G, GP=GP, BT=BT, D=D, DP=max(16, next_pow2(D)), STRIDE=stride, BLOCK=block_size,
        SEL=selection_block_size, R=r, L=L, CH=CH, N=num_selected, NP=NP,
        NUM_INITIAL=num_initial, NUM_LOCAL=num_local, INDEX_BITS=INDEX_BITS, FORCED=FORCED_KEY,
        IEEE=q.dtype == torch.float32, W2=W2, LOG2E=LOG2E,
        num_warps=8 if GP * BT * CH * r >= 128 * 128 else 4,  # 8 once the logits tile reaches 128 x 128
    )
    return out


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (Triton block shapes must be powers of two)."""
    return 1 << max(0, (x - 1).bit_length())


if triton is not None:
    @torch.library.triton_op("nsa_flex::block_topk", mutates_args={})
    def block_topk_op(q: Tensor, k_cmp: Tensor, lse: Tensor, w: Tensor, scale: float, block_size: int,
                      stride: int, selection_block_size: int, num_selected: int, num_initial: int,
                      num_local: int) -> Tensor:
        return launch(q, k_cmp, lse, w, scale, block_size, stride, selection_block_size, num_selected,
                      num_initial, num_local, wrap=torch.library.wrap_triton)

    @triton.jit
    def ranking_keys(score, s, own, S, NUM_INITIAL: tl.constexpr, NUM_LOCAL: tl.constexpr,
                     INDEX_BITS: tl.constexpr, FORCED: tl.constexpr):
        """int64 keys ranking blocks ``s`` (broadcast against the token's own block ``own``) by float32
        ``score``: forced blocks (initial, then own and the ``NUM_LOCAL - 1`` before it) above every score, ties
        toward the lower block, ``-1`` for blocks after the own one (blocks ``>= S`` are among those, since
        ``own < S``). :func:`block_index` reads a block back from a key."""
        KF: tl.constexpr = NUM_INITIAL + NUM_LOCAL
        rev = (S - 1 - s).to(tl.int64)
        key = (score.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) << INDEX_BITS) | rev
        back = own - s  # 0: own block, 1: the one before, ...
        rank = tl.where((back >= 0) & (back < NUM_LOCAL), NUM_INITIAL + back, KF)
        rank = tl.minimum(rank, tl.where(s < NUM_INITIAL, s, KF))
        forced = FORCED + ((KF - rank).to(tl.int64) << INDEX_BITS) | rev
        return tl.where(back >= 0, tl.where(rank < KF, forced, key), -1)

    @triton.jit
    def block_index(key, S, INDEX_BITS: tl.constexpr):
        """The block of a :func:`ranking_keys` key, ``-1`` for a ``-1`` key."""
        return tl.where(key >= 0, S - 1 - (key & ((1 << INDEX_BITS) - 1)), -1)

    @triton.jit
    def block_topk_kernel(
        Q, K, LSE, W, OUT, SCRATCH,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, slb, slh, slt, sob, soh, sot, son,
        T, Tc, S, Hkv, scale,
        G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        STRIDE: tl.constexpr, BLOCK: tl.constexpr, SEL: tl.constexpr, R: tl.constexpr, L: tl.constexpr,
        CH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, NUM_INITIAL: tl.constexpr, NUM_LOCAL: tl.constexpr,
        INDEX_BITS: tl.constexpr, FORCED: tl.constexpr, IEEE: tl.constexpr, W2: tl.constexpr,
        LOG2E: tl.constexpr,
    ):
        BC: tl.constexpr = CH * R  # compressed keys per step
        pid_t = tl.program_id(0)
        b = tl.program_id(1) // Hkv
        h = tl.program_id(1) % Hkv

        # rows: token-major, group-minor (padded to GP); per-row and per-token views of the positions
        rows = tl.arange(0, BT * GP)
        row_pos = pid_t * BT + rows // GP
        row_g = rows % GP
        row_ok = (row_pos < T) & (row_g < G)
        d = tl.arange(0, DP)
        q = tl.load(Q + b * sqb + (h * G + row_g)[:, None] * sqh + row_pos[:, None] * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        # base-2 exponent: p = exp2(logits * scale * log2(e) - lse * log2(e)); rows seeing nothing, and padding
        # rows, get lse = +inf, so p = 0 without a mask
        lse = tl.load(LSE + b * slb + (h * G + row_g) * slh + row_pos * slt, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        qk_scale = scale * LOG2E
        pos = pid_t * BT + tl.arange(0, BT)
        own = pos // SEL

        # overlap weights: own[i] = w[L + i] (compressed block i of the selection block), halo[i] = w[i - (R - L)]
        # (the last L compressed blocks of a selection block reach into the next one)
        i = tl.arange(0, R)
        w_own = tl.load(W + L + i)
        w_halo = tl.load(W + i - (R - L), mask=i >= R - L, other=0.0)
        shift = (tl.arange(0, CH)[:, None] + 1) == tl.arange(0, CH)[None, :]  # [from, to]: to = from + 1

        n = tl.arange(0, NP)
        tok = tl.arange(0, BT)
        scr = SCRATCH + ((tl.program_id(1) * tl.num_programs(0) + pid_t) * BT + tok[:, None]) * W2
        tl.store(scr + tl.arange(0, W2)[None, :], tl.full((BT, W2), -1, tl.int64))
        carry = tl.zeros((BT,), tl.float32)
        last = pid_t * BT + BT - 1
        last = tl.where(last < T, last, T - 1)
        num_chunks = (last // SEL) // CH + 1
        # chunks before this one hold only compressed blocks complete before the program's first token
        first_masked = ((pid_t * BT - BLOCK + 1) // STRIDE + 1) // BC
        for chunk in range(0, num_chunks):
            c = chunk * BC + tl.arange(0, BC)
            k = tl.load(K + b * skb + h * skh + c[:, None] * skt + d[None, :] * skd,
                        mask=(c < Tc)[:, None] & (d < D)[None, :], other=0.0)
            if IEEE:
                logits = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                logits = tl.dot(q, tl.trans(k))
            # float32 throughout (inductor may pass `scale` as a double)
            p = tl.exp2((logits * qk_scale).to(tl.float32) - lse[:, None])
            if chunk >= first_masked:
                p = tl.where(c[None, :] * STRIDE + (BLOCK - 1) <= row_pos[:, None], p, 0.0)
            p = tl.sum(tl.reshape(p, (BT, GP, BC)), axis=1)  # [BT, BC], summed over the group
            p = tl.reshape(p, (BT, CH, R))
            own_part = tl.sum(p * w_own[None, None, :], axis=2)  # [BT, CH]
            halo = tl.sum(p * w_halo[None, None, :], axis=2)  # goes to the next selection block
            moved = tl.sum(halo[:, :, None] * shift[None, :, :].to(tl.float32), axis=1)
            s_local = tl.arange(0, CH)
            scores = own_part + moved + tl.where(s_local[None, :] == 0, carry[:, None], 0.0)
            carry = tl.sum(tl.where(s_local[None, :] == CH - 1, halo, 0.0), axis=1)

            s = chunk * CH + s_local
            key = ranking_keys(scores, s[None, :], own[:, None], S, NUM_INITIAL, NUM_LOCAL, INDEX_BITS, FORCED)
            # The running top-n and this step's keys side by side in the program's scratch rows, one bitonic
            # top-k of both. (Kept in registers, the loop-carried top-n made Triton 3.6's layout pass fail to
            # compile the sort; picking n maxima one at a time compiled but was 5x slower at 64k.)
            tl.store(scr + NP + s_local[None, :], key)
            tl.debug_barrier()
            both = tl.load(scr + tl.arange(0, W2)[None, :])
            tl.debug_barrier()
            tl.store(scr + n[None, :], tl.topk(both, NP))
        tl.debug_barrier()
        top = tl.load(scr + n[None, :])

        index = block_index(top, S, INDEX_BITS)
        tl.store(OUT + b * sob + h * soh + pos[:, None] * sot + n[None, :] * son, index,
                 mask=(pos < T)[:, None] & (n < N)[None, :])
