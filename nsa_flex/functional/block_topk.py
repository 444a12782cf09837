"""Fused block scoring + top-n (Triton): :func:`select_blocks`' choices without materializing any scores.

One program takes ``BT`` tokens of one kv head, the ``G`` query heads of the group folded into ``BT * G`` rows,
and walks the selection blocks left to right, ``CH`` at a time (``CH * r`` compressed keys, ``r = l' / d``):

1. ``p = exp(scale * q . k_cmp - lse)`` for the chunk's compressed keys (``lse`` from the compressed branch, so
   the probabilities are recomputed, never stored), zero where a compressed block is not yet complete; the
   dot takes the keys as its rows and the query rows as its columns, which leaves a token's heads mostly in
   one thread for the next step (64k tokens, paper configuration, H100: 9.2 -> 8.0 ms against query rows,
   128 of them);
2. summed over the group's ``G`` rows, then through a small per-program scratch row (this step's sums after
   the previous step's last selection block) folded into selection-block scores with the banded overlap
   weights ``w`` (:func:`overlap_pattern`): each selection block's own ``r`` compressed blocks, plus the ``L``
   before it, which belong to the previous block (read from the row shifted by one selection block);
3. ranked as int64 keys (forced blocks above every score, then score bits, then the reversed block index, so ties
   go to the lower block as in :func:`select_blocks`) and merged into a running top-``n`` held in registers
   (the step's keys sorted, folded into the ascending running list by an elementwise maximum, which leaves a
   bitonic sequence of the ``n`` largest, then one bitonic merge).

Memory is the ``[B, Hkv, T, n]`` output and the scratch rows (both linear in ``T``); HBM traffic is reading
``q``, ``k_cmp`` and ``lse`` (the unfused path wrote and re-read ``[B, Hq, T, Tc]`` float32 logits). The kernel
is registered as the custom op ``nsa_flex::block_topk`` so that ``torch.compile`` keeps it in the graph without
breaking it. It is an opaque op there, launched as in eager mode: a ``triton_op`` would have inductor compile the
kernel again, and torch's analysis of what a kernel writes stops at the inline assembly of ``cta_barrier``
(it then takes every input as written, with a warning and its traceback at each compile). Without triton (CPU
installs) this module defines only :func:`supported`, which then says no.
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
# Query rows (tokens x padded group) per program: as many as keep a step's logits tile at 64 x 256 float32 (the
# accumulator of 4 warps), two programs per SM (255 registers a thread, 100 KiB of shared memory each), their key
# tiles double-buffered by Triton's pipeliner (three buffers would leave one program per SM). Steps of 64 keys
# (the paper's l'/d * 16) on 16-bit inputs take 128 rows instead, three programs per SM under a cap of 160
# registers (64 KiB of shared memory each, no spills): 64k tokens, paper configuration, H100, 6.36-6.43 ms against
# 6.60-6.73 for 256 rows (docs/results/block_topk_three_per_sm_h100_session22.log; ncu: 2 or 3 warps per
# scheduler, tensor and MUFU pipes each about 34% busy, the warps mostly waiting on dependencies and barriers).
# The cap spills wider steps (n = 32 or l' = 128: 128 keys a step, 7.4 -> 13.0 ms) and the float32 kernel (50 ->
# 56 ms), which keep the two-program form. Before the loads were pipelined the kernel took 7.10-7.32 ms; 8 warps
# were 8.4 at 128 rows, 6.3-7.2 at 256 under a cap of 128 (block_topk_pipelined_h100_session21.log). With n = 32,
# 256 rows were 21.7 (block_topk_transposed_h100_session15.log).
_LOGITS = 64 * 256
_MAX_ROWS = 256
_LAUNCH = dict(num_warps=4, num_stages=2)
_THREE_PER_SM = dict(keys=64, rows=128, maxnreg=160)  # the cap is NVIDIA's launch option: none elsewhere
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
           selection_block_size: int, num_selected: int, num_initial: int, num_local: int) -> Tensor:
    """Run the kernel (the custom op's body; tests on Triton's interpreter call it directly). Arguments as in
    :func:`block_topk`."""
    B, Hq, T, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    S = math.ceil(T / selection_block_size)
    r, L = band(block_size, stride, selection_block_size)
    out = torch.empty((B, Hkv, T, num_selected), dtype=torch.long, device=q.device)
    if T == 0:
        return out
    nvidia_compiled = _nvidia_compiled()
    GP = next_pow2(G)
    NP = next_pow2(num_selected)
    CH = max(_MIN_CHUNK, NP)
    three = CH * r == _THREE_PER_SM["keys"] and q.element_size() == 2
    BT = max(1, (_THREE_PER_SM["rows"] if three else min(_MAX_ROWS, _LOGITS // (CH * r))) // GP)
    cap = {"maxnreg": _THREE_PER_SM["maxnreg"]} if three and nvidia_compiled else {}
    grid = (math.ceil(T / BT), B * Hkv)
    # per program, BT rows of [previous step's last r sums | this step's CH * r sums]: linear in T (68 MiB at 64k)
    scratch = torch.empty(grid[0] * grid[1] * BT * (r + CH * r), dtype=torch.float32, device=q.device)
    block_topk_kernel[grid](
        q, k_cmp, lse, w, out, scratch,
        *q.stride(), *k_cmp.stride(), *lse.stride(), *out.stride(),
        T, Tc, S, Hkv, scale,
        G=G, GP=GP, BT=BT, D=D, DP=max(16, next_pow2(D)), STRIDE=stride, BLOCK=block_size,
        SEL=selection_block_size, R=r, L=L, CH=CH, N=num_selected, NP=NP,
        NUM_INITIAL=num_initial, NUM_LOCAL=num_local, INDEX_BITS=INDEX_BITS, FORCED=FORCED_KEY,
        IEEE=q.dtype == torch.float32, LOG2E=LOG2E, ASM_BARRIER=nvidia_compiled,
        **_LAUNCH, **cap,
    )
    return out


def _nvidia_compiled() -> bool:
    """Whether the kernel is compiled for NVIDIA: ``cta_barrier`` may then be PTX and the launch may cap
    registers. Not on ROCm (which reports its GPUs as CUDA too), nor under Triton's interpreter
    (``TRITON_INTERPRET=1``), which has no inline assembly."""
    from triton.runtime.interpreter import InterpretedFunction

    return torch.version.hip is None and not isinstance(block_topk_kernel, InterpretedFunction)


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (Triton block shapes must be powers of two)."""
    return 1 << max(0, (x - 1).bit_length())


if triton is not None:
    @torch.library.custom_op("nsa_flex::block_topk", mutates_args=())
    def block_topk_op(q: Tensor, k_cmp: Tensor, lse: Tensor, w: Tensor, scale: float, block_size: int,
                      stride: int, selection_block_size: int, num_selected: int, num_initial: int,
                      num_local: int) -> Tensor:
        return launch(q, k_cmp, lse, w, scale, block_size, stride, selection_block_size, num_selected,
                      num_initial, num_local)

    @block_topk_op.register_fake
    def _(q, k_cmp, lse, w, scale, block_size, stride, selection_block_size, num_selected, num_initial, num_local):
        return q.new_empty((q.shape[0], k_cmp.shape[1], q.shape[2], num_selected), dtype=torch.long)

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

    @triton.constexpr_function
    def _log2(x):
        return x.bit_length() - 1

    @triton.constexpr_function
    def _hypercube(rows, log):
        return [rows] + [2] * log

    @triton.constexpr_function
    def _axis_indicator(log, i):
        return [1] * (1 + i) + [2] + [1] * (log - 1 - i)

    @triton.jit
    def block_sum(x, R: tl.constexpr):
        """``[rows, m * R] -> [rows, m]``: sums of ``R`` adjacent columns as a tree of adjacent pairs, the order in
        which a reduction over the dot's accumulator layout adds them (within a thread, then across lanes), so
        the scores have the same float32 bits whichever layout they are folded in."""
        for _ in tl.static_range(_log2(R)):
            x = tl.sum(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)), axis=2)
        return x

    @triton.jit
    def bitonic_merge(x, NP: tl.constexpr):
        """Sort each row of ``x`` (``[rows, NP]``, every row bitonic) ascending: ``log2(NP)`` compare-exchange
        rounds at halving distances, on the row viewed as a hypercube (the trick of ``tl.sort``)."""
        LOG: tl.constexpr = _log2(NP)
        h = tl.reshape(x, _hypercube(x.shape[0], LOG))
        for i in tl.static_range(LOG):
            # partner along axis 1 + i (distance NP >> (i + 1)): the xor of the pair, xor-ed back out
            other = h ^ tl.xor_sum(h, 1 + i, keep_dims=True)
            right = tl.reshape(tl.arange(0, 2), _axis_indicator(LOG, i)) == 1
            h = tl.where((h > other) != right, other, h)  # the smaller of the pair on the left
        return tl.reshape(h, x.shape)

    @triton.jit
    def cta_barrier(token, ASM: tl.constexpr):
        """``bar.sync 0``: every thread of the program waits here, and its earlier memory writes are visible to
        the others after it. ``tl.debug_barrier`` does the same, but Triton 3.6's software pipeliner leaves a
        loop holding one unpipelined, so each step's key tile was loaded synchronously; inline assembly with side
        effects keeps its place among the loads and stores around it and lets the pipeliner work. ``token``
        threads the barriers' order through the loop. ``ASM`` false (:func:`_nvidia_compiled`): ``tl.debug_barrier``."""
        if ASM:
            token = tl.inline_asm_elementwise("bar.sync 0; mov.b32 $0, $1;", "=r,r", [token], dtype=tl.int32,
                                              is_pure=False, pack=1)
        else:
            tl.debug_barrier()
        return token

    @triton.jit
    def block_topk_kernel(
        Q, K, LSE, W, OUT, SCRATCH,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, slb, slh, slt, sob, soh, sot, son,
        T, Tc, S, Hkv, scale,
        G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        STRIDE: tl.constexpr, BLOCK: tl.constexpr, SEL: tl.constexpr, R: tl.constexpr, L: tl.constexpr,
        CH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, NUM_INITIAL: tl.constexpr, NUM_LOCAL: tl.constexpr,
        INDEX_BITS: tl.constexpr, FORCED: tl.constexpr, IEEE: tl.constexpr, LOG2E: tl.constexpr,
        ASM_BARRIER: tl.constexpr,
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
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        qk_scale = scale * LOG2E
        tok = tl.arange(0, BT)
        pos = pid_t * BT + tok
        own = pos // SEL

        # overlap weights per compressed key of a step: own = w[L + i] for compressed block i of its selection
        # block, halo = w[i - (R - L)] (the last L compressed blocks of a selection block reach into the next)
        col = tl.arange(0, BC)
        w_own = tl.load(W + L + col % R)
        w_halo = tl.load(W + col % R - (R - L), mask=col % R >= R - L, other=0.0)

        # The group sums come out of the reduction replicated across the threads that held the group's rows;
        # folding and ranking them there cost more than a round trip through the program's scratch rows, which
        # hand them back compact. A row holds the previous step's last selection block, then this step's sums,
        # so the halo of each block's predecessor is the same row read R columns to the left.
        scr = SCRATCH + ((tl.program_id(1) * tl.num_programs(0) + pid_t) * BT + tok[:, None]) * (R + BC)
        scr_t = tl.trans(scr)  # the same rows, as the transposed sums come
        tl.store(scr + tl.arange(0, R)[None, :], tl.zeros((BT, R), tl.float32))
        s_local = tl.arange(0, CH)
        top = tl.full((BT, NP), -1, tl.int64)  # running top-n keys, ascending
        last = pid_t * BT + BT - 1
        last = tl.where(last < T, last, T - 1)
        num_chunks = (last // SEL) // CH + 1
        # chunks before this one hold only compressed blocks complete before the program's first token
        first_masked = ((pid_t * BT - BLOCK + 1) // STRIDE + 1) // BC
        k_ptr = K + b * skb + h * skh + col[:, None] * skt + d[None, :] * skd
        sync = tl.zeros((1,), tl.int32)
        for chunk in range(0, num_chunks):
            c = chunk * BC + col
            k = tl.load(k_ptr + chunk * BC * skt, mask=(c < Tc)[:, None] & (d < D)[None, :], other=0.0)
            # keys as the dot's rows: a thread then holds several of a token's G heads, so most of the group
            # sum stays inside it (rows of query heads needed 3 shuffle rounds per value)
            if IEEE:
                logits = tl.dot(k, tl.trans(q), input_precision="ieee")
            else:
                logits = tl.dot(k, tl.trans(q))
            p = tl.exp2(logits * qk_scale - lse[None, :])
            if chunk >= first_masked:
                p = tl.where(c[:, None] * STRIDE + (BLOCK - 1) <= row_pos[None, :], p, 0.0)
            p = tl.sum(tl.reshape(p, (BC, BT, GP)), axis=2)  # [BC, BT], summed over the group
            tl.store(scr_t + R + col[:, None], p)
            # the sums, and the previous step's last block, visible to the whole program
            sync = cta_barrier(sync, ASM_BARRIER)
            p = tl.load(scr + R + col[None, :])
            before = tl.load(scr + col[None, :])  # shifted one selection block: the predecessor's sums
            scores = block_sum(p * w_own[None, :], R) + block_sum(before * w_halo[None, :], R)
            s = chunk * CH + s_local
            key = ranking_keys(scores, s[None, :], own[:, None], S, NUM_INITIAL, NUM_LOCAL, INDEX_BITS, FORCED)
            # the step's n largest keys, descending, against the ascending running list: the pairwise maxima are
            # the n largest of both, in bitonic order
            top = bitonic_merge(tl.maximum(top, tl.topk(key, NP)), NP)
            # every row read before the last selection block moves to the front
            sync = cta_barrier(sync, ASM_BARRIER)
            tl.store(scr + col[None, :] - (BC - R), p, mask=col[None, :] >= BC - R)

        index = block_index(tl.sort(top, descending=True), S, INDEX_BITS)
        n = tl.arange(0, NP)
        tl.store(OUT + b * sob + h * soh + pos[:, None] * sot + n[None, :] * son, index,
                 mask=(pos < T)[:, None] & (n < N)[None, :])
