"""Selected-block attention as Triton kernels that walk the tokens' block lists (no BlockMask).

FlexAttention runs NSA's selection branch over a BlockMask whose index lists torch stores as
``[num_q_tiles, num_kv_blocks]`` per head: with one token's ``G`` heads per 16-row tile that is quadratic in
``T`` (4 GiB at 64k tokens). Here, as in fla's NSA kernels, the forward and dq programs walk block lists: one
program takes one kv head and a tile of query rows, the ``G`` query heads of ``tokens`` consecutive tokens
(:func:`tile_shape`: one token when ``G >= 16``, else as many as fill 16 rows), and loops over the union of
those tokens' selected blocks (:func:`_tile_lists`), each row attending only to its own token's. Loading a
block once for all the tile's tokens that list it moves fewer bytes (the kernels are bound by them), and at
most half the tile's rows are padding (a program of one token at ``G = 4`` left 12 of 16 empty):

* forward: online softmax over each block's keys ``<= t`` (a row's own token ``t``); writes ``o`` and the
  log-sum-exp;
* backward, ``dq``: the same walk, recomputing ``p = exp(s - lse)``;
* backward, ``dk, dv``: one program per (kv block, kv head, chunk of the tokens that selected it) walks those
  tokens, a few at a time with their query rows stacked into one tile (lists from one sort of the O(T*n)
  (block, token) pairs), and accumulates the block's ``dk = ds^T q``,
  ``dv = p^T do`` in registers, added to float32 buffers once per chunk (block 0, which every token selects,
  is split into ``T / 1024`` chunks; atomics per token would serialize on it). The programs are exactly the
  non-empty chunks, listed on the GPU (:func:`_chunks`; 64k tokens, paper configuration, H100: backward
  36.3 -> 34.2 ms against a grid with a program for every block and possible chunk, nearly all empty).

Memory is ``O(T)`` beyond the inputs and gradients. :func:`selected_attention_kernel` is the autograd entry;
without triton this module defines no kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .block_topk import next_pow2
from .layout import rows_like
from .query_passing import gradient_to_add_into

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def supported(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> bool:
    """Whether :func:`selected_attention` takes the kernels: CUDA, triton, fp16/bf16/fp32, a block of 16-128
    keys that is a power of two (the key tile), at most 128 query heads per kv head, q/k and v head rows of
    at most 256 bytes each, and ``q``, ``k``, ``v`` under ``2**31`` elements (the kernels' offsets are int32)."""
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 16 <= block_size <= 128 and not block_size & (block_size - 1) and q.shape[1] // k.shape[1] <= 128
            and max(q.shape[-1], v.shape[-1]) * q.element_size() <= 256
            and max(q.numel(), k.numel(), v.numel()) < 1 << 31)


def _meta(q: Tensor, v: Tensor, k_heads: int, block_size: int) -> dict:
    D, Dv = q.shape[-1], v.shape[-1]
    G = q.shape[1] // k_heads
    rows, tokens = tile_shape(G)
    return dict(G=G, ROWS=rows, TOKENS=tokens, D=D, DP=max(16, next_pow2(D)), DV=Dv, DVP=max(16, next_pow2(Dv)),
                BS=block_size, IEEE=q.dtype == torch.float32)


def tile_shape(G: int) -> tuple[int, int]:
    """``(rows, tokens)`` of a forward / dq program: the ``G`` query heads of ``tokens`` consecutive tokens,
    stacked unpadded into a tile of ``rows`` (a power of two, at least ``tl.dot``'s 16): one token for
    ``G >= 16``, sixteen for ``G = 1``.

    Against one token a program (H100, bf16, 32k tokens, D=128, l'=64, n=16, forward+backward in ms, random /
    structured inputs; ``docs/results/selected_tiles_h100_session23.log``): G = 1 18.4 -> 12.3 / 16.9 -> 4.7,
    G = 2 18.8 -> 15.3 / 17.4 -> 7.0, G = 4 19.8 -> 17.5 / 18.2 -> 10.3, G = 8 21.2 -> 21.2 / 20.1 -> 17.3
    (its forward alone on random inputs, whose neighbours share only the forced blocks, 8.8 -> 9.8: the one
    case that lost); bench.train_lm's step at 4k (G = 4, D = 64, n = 8) 79.3 -> 66.6 ms."""
    rows = max(16, next_pow2(G))
    return rows, rows // G


Tiles = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


def _tile_lists(idx: Tensor, tokens: int) -> Tiles:
    """The block lists the forward and dq programs walk: ``(blocks, members, counts)``. With one token a
    program, the token's own list (``idx``, sorted, ``-1`` in unused slots) and ``None, None``. With more,
    for the tile of tokens ``p * tokens ...``: ``blocks [B, Hkv, P, tokens * n]`` the union of their lists,
    ascending (its first ``counts [B, Hkv, P]`` entries, then ``-1``), and ``members`` the same shape, bit
    ``i`` set where the tile's ``i``-th token lists that block. O(T * n), static shapes: a sort of each
    tile's entries, each run of equal blocks summed into one (a token lists a block at most once, so the sum
    of the runs' bits is their union), a second sort to pack the runs' ends to the front."""
    if tokens == 1:
        return idx, None, None
    B, Hkv, T, n = idx.shape
    P = -(-T // tokens)
    width = tokens * n
    entries = torch.nn.functional.pad(idx, (0, 0, 0, P * tokens - T), value=-1).reshape(B, Hkv, P, width)
    blk, order = entries.sort(dim=-1, stable=True)
    bit = torch.ones_like(order).bitwise_left_shift(order // n)  # the entry's token, as a bit
    starts = torch.ones_like(blk, dtype=torch.bool)
    starts[..., 1:] = blk[..., 1:] != blk[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    pos = torch.arange(width, device=idx.device)
    run_start = torch.where(starts, pos, 0).cummax(dim=-1).values
    total = bit.cumsum(dim=-1)
    members = total - (total - bit).gather(-1, run_start)  # the run's bits so far: all of them at its end
    keep = ends & (blk >= 0)
    packed, order = torch.where(keep, blk, torch.iinfo(blk.dtype).max).sort(dim=-1)
    counts = keep.sum(dim=-1, dtype=torch.int32)
    valid = pos < counts[..., None]
    blocks = torch.where(valid, packed, -1).to(torch.int32)
    members = torch.where(valid, members.gather(-1, order), 0).to(torch.int32)
    return blocks, members, counts


def _tile_strides(tiles: Tiles) -> tuple[int, ...]:
    """The lists' strides (``members`` shares ``blocks``'), then ``counts``' (zeros when there are none)."""
    blocks, _, counts = tiles
    return (*blocks.stride(), *((0, 0, 0) if counts is None else counts.stride()))


def forward(q: Tensor, k: Tensor, v: Tensor, tiles: Tiles, block_size: int, scale: float,
            gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(o [B, Hq, T, Dv], lse [B, Hq, T] float32, gated)`` from the lists of :func:`_tile_lists`; rows that
    see no key give ``o = 0``, ``lse = -inf``. With ``gate [B, Hq, T]``, ``gated = gate[..., None] * o``
    (written by the same kernel), else ``None``."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    o = rows_like(q, v.shape[-1])
    lse = rows_like(q, None, torch.float32)
    gated = None if gate is None else torch.empty_like(o)
    if o.numel():
        selected_fwd_kernel[(tiles[0].shape[2], B * Hkv)](
            q, k, v, *tiles, o, lse, gate, gated, *q.stride(), *k.stride(), *v.stride(), *_tile_strides(tiles),
            *o.stride(), *lse.stride(), *_gate_strides(gate), T, Hkv, tiles[0].shape[-1], scale,
            GATED=gate is not None, **_meta(q, v, Hkv, block_size), **_FWD_LAUNCH)
    return o, lse, gated


def _gate_strides(gate: Optional[Tensor]) -> tuple[int, int, int]:
    return (0, 0, 0) if gate is None else gate.stride()


# Tokens per dk/dv program: 1024 against 256 took the backward at 64k tokens, paper configuration, H100, from
# 34.5 to 32.8 ms on random inputs and 31.9 to 31.6 on structured ones, and was neutral at the LM's shapes
# (docs/results/selected_dkv_chunk_sweep_h100_session14.log).
_CHUNK = 1024
_DKV_ROWS = 64  # query rows per dk/dv step: the G rows of 64 // G tokens, unpadded (G = 4: 16 tokens)
# Launch settings, the best of num_warps in {2, 4, 8} x num_stages in {1, 2, 3} at 64k tokens in the paper
# configuration on an H100 (docs/results/kernel_tune_h100.log): a token's G x block tile needs few warps. The
# dk/dv step's rows and launch: the best of {32, 64, 128} rows x {4, 8} warps x {2, 3} stages
# (docs/results/selected_dkv_rows_h100_session11.log; backward 39.3 ms with one token per step, 36.7 with four).
# Rows were padded to 16 per token until the twelfth session; unpadded, the backward at G = 4 (the LM of
# bench.train_lm, B=16, T=4096) went 4.60 -> 3.60 ms and at G = 1 (B=4, T=8192, 16 heads) 18.0 -> 11.9 ms
# (docs/results/selected_dkv_unpadded_h100_session12.log).
_FWD_LAUNCH = dict(num_warps=2, num_stages=2)
_DQ_LAUNCH = dict(num_warps=2, num_stages=2)
_DKV_LAUNCH = dict(num_warps=4, num_stages=2)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, tiles: Tiles, o: Tensor, lse: Tensor,
             block_size: int, scale: float, dq_other: Optional[Tensor] = None,
             gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dgate)`` in the inputs' dtypes (``dk, dv`` accumulated in float32); ``idx`` the tokens'
    block lists, ``tiles`` the forward's :func:`_tile_lists` of them. ``dq_other``, another
    gradient of ``q`` (q's shape and dtype), is added into by the dq kernel and returned as ``dq``: one pass over
    a q-sized tensor instead of a separate sum. With ``gate``, ``do`` is the gradient of ``gate[..., None] * o``
    and ``dgate = rowsum(do * o)`` (else ``None``): the dq kernel scales the rows it loads; for the dk/dv kernel
    it folds ``|gate|`` into a log-sum-exp it writes (``|gate| p = exp(s - (lse - log|gate|))``), so that kernel
    runs as if ungated (the gate's scaling of its [rows, block] tiles cost it 14.3 -> 15.4 ms at 64k tokens, paper
    configuration, H100), and the rows of negative gates, if the dq kernel saw any, are corrected by a second
    launch."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    meta = _meta(q, v, Hkv, block_size)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty_like(q) if dq_other is None else dq_other
    # laid out as k and v, so that autograd sums them with the other branches' gradients without a layout change
    dk = rows_like(k, k.shape[-1], torch.float32).zero_()
    dv = rows_like(v, v.shape[-1], torch.float32).zero_()
    if q.numel() == 0:
        return dq, dk.to(k.dtype), dv.to(v.dtype), None if gate is None else torch.zeros_like(gate)
    # rowsum(do * o), the softmax backward's correction (with a gate: the gate's gradient, which the correction
    # is scaled by): written by the dq kernel, read by the dk/dv kernel
    delta = rows_like(q, None, torch.float32)
    # with a gate, the dk/dv kernel's log-sum-exp (lse - log|gate|) and the flag of negative gates
    lse_dkv = lse if gate is None else rows_like(q, None, torch.float32)
    negative = None if gate is None else torch.zeros(1, device=q.device, dtype=torch.int32)
    selected_dq_kernel[(tiles[0].shape[2], B * Hkv)](
        q, k, v, *tiles, do, o, lse, delta, dq, gate, lse_dkv, negative, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *lse.stride(), *delta.stride(), *_gate_strides(gate), *o.stride(), *_tile_strides(tiles),
        *dq.stride(), T, Hkv, tiles[0].shape[-1], scale, ADD=dq_other is not None, GATED=gate is not None, **meta,
        **_DQ_LAUNCH)
    offsets, counts, tokens = _token_lists(idx, block_size)
    S = counts.shape[-1]
    work = _chunks(counts.flatten(), tokens.numel(), _CHUNK)
    meta.pop("TOKENS")
    rows = max(_DKV_ROWS, meta.pop("ROWS"))  # the dk/dv tile stacks tokens' G rows unpadded: at least one token
    # With a gate, the pass takes every row's gate as |gate| (folded into lse_dkv); a second launch, whose
    # programs return at once unless some gate is below zero, adds -2x those rows' share (a sign test per row
    # inside the one pass took it from 15.4 to 16.8 ms, 64k tokens, paper configuration, H100).
    passes = (False, True) if gate is not None else (False,)
    for negative_rows in passes if work.shape[1] else ():
        selected_dkv_kernel[(work.shape[1],)](
            q, k, v, do, lse_dkv, delta, gate, negative, dk, dv, offsets, counts, tokens, work, *q.stride(),
            *k.stride(), *v.stride(), *do.stride(), *lse_dkv.stride(), *delta.stride(), *_gate_strides(gate),
            *dk.stride(), *dv.stride(), T, Hkv, S, work.shape[1], scale, CHUNK=_CHUNK, ROWS=rows,
            NEGATIVE_ROWS=negative_rows, **meta, **_DKV_LAUNCH)
    return dq, dk.to(k.dtype), dv.to(v.dtype), None if gate is None else delta.to(gate.dtype)


def _token_lists(idx: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each (sequence, kv head, block): the tokens that selected it and see a key of it, ascending, as
    ``tokens[offsets[i] : offsets[i] + counts[i]]`` (``offsets, counts [B, Hkv, S]``). One sort of the
    O(T*n) pairs; static shapes (invalid pairs sort to the end)."""
    B, Hkv, T, n = idx.shape
    S = -(-T // block_size)
    t = torch.arange(T, device=idx.device).view(1, 1, T, 1)
    blk = idx.long()
    valid = (blk >= 0) & (blk * block_size <= t)
    segment = torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1, 1) * S + blk
    total = B * Hkv * S
    key = torch.where(valid, segment * T + t, total * T).flatten()
    if (total + 1) * T <= 1 << 31:  # int32 keys: half the radix passes of int64 (the usual case: 2**28 at 64k)
        key = key.int()
    key = key.sort().values
    # each segment's run of the sorted keys, found by binary search (counting with a scatter-add serialized on
    # block 0, which every token selects: 0.6 ms at 64k)
    bounds = torch.searchsorted(key, torch.arange(total + 1, device=idx.device, dtype=key.dtype) * T)
    offsets, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    return (offsets.view(B, Hkv, S).to(torch.int32), counts.view(B, Hkv, S).to(torch.int32),
            (key % T).to(torch.int32))


def _chunks(counts: Tensor, pairs: int, chunk: int) -> Tensor:
    """The dk/dv programs' work, ``[2, W]`` int32: (segment, first token of the chunk) of every chunk of at most
    ``chunk`` tokens of every segment's list, in segment order, then ``(-1, 0)`` past the last one. ``W``
    bounds the number of chunks whatever the selection (each of the ``pairs`` (token, block) pairs fills one
    chunk slot, plus one partial chunk per non-empty segment), so it is static: a grid of one program per
    segment and possible chunk launched ``S * T / chunk`` programs, nearly all empty (about a million at 64k)."""
    W = -(-pairs // chunk) + min(counts.numel(), pairs)
    per = (counts.long() + chunk - 1) // chunk
    ends = per.cumsum(0)
    item = torch.arange(W, device=counts.device)
    seg = torch.searchsorted(ends, item, right=True)
    inside = seg < counts.numel()
    seg_ok = seg.clamp(max=counts.numel() - 1)
    first = (item - (ends[seg_ok] - per[seg_ok])) * chunk
    return torch.stack([torch.where(inside, seg, -1), torch.where(inside, first, 0)]).to(torch.int32)


_SET_LAUNCH = dict(ROWS=32, num_warps=1)  # the fastest of 32-256 token lists a program on 1-8 warps (H100)


def block_lists(block_indices: Int[Tensor, "B Hkv T n"], G: int) -> tuple[Tensor, Tiles]:
    """What the kernels walk, from the selection's indices (any order, ``-1`` or repeats in unused slots): each
    token's list sorted, a repeated block replaced by ``-1`` (a list is a set, as in ``fine_selection``), as
    int32, and the forward / dq programs' lists (:func:`_tile_lists`) for a GQA group of ``G``. The kernels'
    counterpart of building a BlockMask: O(T * n).

    On CUDA one kernel builds the sets (:func:`set_lists_kernel`, which says what it saves); elsewhere (CPU
    tests) torch sorts, with the same result to the bit."""
    if block_indices.is_cuda and triton is not None:
        idx = _set_lists(block_indices)
    else:
        idx = block_indices.sort(dim=-1).values
        idx[..., 1:].masked_fill_(idx[..., 1:] == idx[..., :-1], -1)
        idx = idx.to(torch.int32)
    return idx, _tile_lists(idx, tile_shape(G)[1])


def _set_lists(block_indices: Tensor) -> Tensor:
    """:func:`block_lists`' per-token sets from :func:`set_lists_kernel`, contiguous int32."""
    out = torch.empty(block_indices.shape, dtype=torch.int32, device=block_indices.device)
    if out.numel():  # (no rows, or n = 0: nothing to place, and no [-1, 0] view to make)
        n = block_indices.shape[-1]
        rows = block_indices.reshape(-1, n)
        set_lists_kernel[(triton.cdiv(rows.shape[0], _SET_LAUNCH["ROWS"]),)](
            rows, out, rows.shape[0], *rows.stride(), N=n, NP=next_pow2(n), **_SET_LAUNCH)
    return out


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, blocks, members, counts, gate, block_size, scale, pass_query):
        tiles = (blocks, members, counts)
        o, lse, gated = forward(q, k, v, tiles, block_size, scale, gate)
        ctx.save_for_backward(q, k, v, idx, o, lse, gate, *tiles)
        ctx.block_size, ctx.scale = block_size, scale
        out = o if gate is None else gated
        if pass_query:  # q goes out again (as a view): other attention's gradients of it come back here
            ctx.set_materialize_grads(False)
            return out, q
        return out

    @staticmethod
    def backward(ctx, do, dq_other=None):
        q, k, v, idx, o, lse, gate, *tiles = ctx.saved_tensors
        if do is None:  # only the passed-on q was used
            return dq_other, *(None,) * 10
        dq_other = gradient_to_add_into(dq_other, q)
        dq, dk, dv, dgate = backward(do, q, k, v, idx, tiles, o, lse, ctx.block_size, ctx.scale, dq_other, gate)
        return dq, dk, dv, None, None, None, None, dgate, None, None, None


def selected_attention_kernel(q: Float[Tensor, "B Hq T D"], k: Float[Tensor, "B Hkv T D"],
                              v: Float[Tensor, "B Hkv T Dv"], block_indices: Int[Tensor, "B Hkv T n"],
                              block_size: int, scale: float, pass_query: bool = False,
                              gate: Optional[Float[Tensor, "B Hq T"]] = None):
    """:func:`selected_attention`'s output (and gradients) from the kernels; ``block_size`` a power of two >= 16.

    A block listed twice for a token counts once (the list is a set, as in ``fine_selection``). With
    ``pass_query``, returns ``(out, q_view)``: called eagerly, attention that takes ``q_view`` for ``q`` has its
    gradient of ``q`` added in by this branch's dq kernel, in place, where autograd would sum the two in a pass
    of its own (1 GiB read twice and written at 64k tokens, paper configuration; :mod:`.query_passing`).
    Inside ``torch.compile`` ``q_view`` is ``q`` (the compiler fuses the sum). With ``gate``, ``out`` is
    ``gate[..., None] * out``: the forward kernel writes it beside the output it keeps, and the backward
    kernels apply the gate to the incoming gradient themselves (see :func:`backward`; NSA's gating: no gradient of
    the ungated output is ever written, 1 GiB at 64k tokens, paper configuration)."""
    idx, tiles = block_lists(block_indices, q.shape[1] // k.shape[1])
    if pass_query and torch.compiler.is_compiling():
        return _SelectedAttention.apply(q, k, v, idx, *tiles, gate, block_size, float(scale), False), q
    return _SelectedAttention.apply(q, k, v, idx, *tiles, gate, block_size, float(scale), pass_query)


if triton is not None:
    @triton.jit
    def set_lists_kernel(IDX, OUT, R, sir, sin, N: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr):
        """``ROWS`` token lists of ``N`` entries: entry ``i`` goes to its place in the list sorted ascending,
        ``#{j: x_j < x_i} + #{j < i: x_j == x_i}`` (a stable sort's), as ``-1`` where an earlier entry holds the
        same block; written as contiguous int32 rows. The counts take one pass per ``j`` over the rows, entry
        ``j`` read again from memory (L1): 64k tokens, paper configuration, H100, 0.067 ms, where torch's sort,
        its dedup and the cast took 0.352 and reducing a ``[ROWS, n, n]`` comparison 0.141-0.267
        (``docs/results/set_lists_h100_session25.log``)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        i = tl.arange(0, NP)
        row_ok = r < R
        ok = row_ok[:, None] & (i < N)[None, :]
        row = IDX + r.to(tl.int64) * sir
        x = tl.load(row[:, None] + i[None, :] * sin, mask=ok, other=0).to(tl.int32)
        smaller = tl.zeros((ROWS, NP), tl.int32)
        repeats = tl.zeros((ROWS, NP), tl.int32)
        for j in tl.static_range(N):
            x_j = tl.load(row + j * sin, mask=row_ok, other=0).to(tl.int32)[:, None]
            smaller += (x_j < x).to(tl.int32)
            repeats += ((x_j == x) & (j < i)[None, :]).to(tl.int32)
        tl.store(OUT + r[:, None].to(tl.int64) * N + smaller + repeats, tl.where(repeats == 0, x, -1), mask=ok)

    @triton.jit
    def _tile_rows(p, h, T, G: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr):
        """Program ``p``'s query rows (see :func:`tile_shape`): row ``r`` is head ``h * G + r % G`` of token
        ``p * TOKENS + r // G``. Returns the rows' heads, tokens, token slots and validity (padding rows, and
        tokens past ``T``, are not), and the tile's last token."""
        r = tl.arange(0, ROWS)
        slot = r // G
        t = p * TOKENS + slot
        last = tl.minimum(p * TOKENS + TOKENS - 1, T - 1)
        return h * G + r % G, t, slot, (slot < TOKENS) & (t < T), last

    @triton.jit
    def _list_length(COUNTS, b, h, p, scb, sch, scp, N, TOKENS: tl.constexpr):
        """How many entries of the program's list to walk: a token's whole list, or the union's count."""
        if TOKENS == 1:
            length = N
        else:  # (a constexpr branch: with one token COUNTS is None and this is never compiled)
            length = tl.load(COUNTS + b * scb + h * sch + p * scp)
        return length

    @triton.jit
    def _block(KB, VB, IDX, MEMBERS, lists, j, t, slot, row_ok, last, sk_t, sk_d, sv_t, sv_d, si_n,
               BS: tl.constexpr, DP: tl.constexpr, D: tl.constexpr, DVP: tl.constexpr, DV: tl.constexpr,
               TOKENS: tl.constexpr):
        """Entry ``j`` of the program's list (at offset ``lists`` of ``IDX``, and of ``MEMBERS`` for a union;
        ``KB``, ``VB``: this sequence and kv head's keys and values): which keys each query row sees
        (``[ROWS, BS]``: keys ``<= t`` of a block the row's own token lists; none for a ``-1`` entry), and the
        K and V tiles (keys after the tile's last token are not read)."""
        blk = tl.load(IDX + lists + j * si_n)
        tok = blk * BS + tl.arange(0, BS)
        ok = (blk >= 0) & (tok <= last)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        k = tl.load(KB + tok[:, None] * sk_t + d[None, :] * sk_d, mask=ok[:, None] & (d < D)[None, :], other=0.0)
        v = tl.load(VB + tok[:, None] * sv_t + dv[None, :] * sv_d, mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
        visible = ok[None, :] & (tok[None, :] <= t[:, None]) & row_ok[:, None]
        if TOKENS > 1:  # the union of several tokens' lists: which of them list this block
            listed = (tl.load(MEMBERS + lists + j * si_n) >> slot) & 1
            visible = visible & (listed != 0)[:, None]
        return visible, k, v

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def selected_fwd_kernel(
        Q, K, V, IDX, MEMBERS, COUNTS, O, LSE, GATE, OG,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sip, sin, scb, sch, scp,
        sob, soh, sot, sod, slb, slh, slt, sgb, sgh, sgt, T, Hkv, N, scale,
        G: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, GATED: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        p = tl.program_id(0)
        b = tl.program_id(1) // Hkv
        h = tl.program_id(1) % Hkv
        head, t, slot, row_ok, last = _tile_rows(p, h, T, G, ROWS, TOKENS)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        rows = row_ok[:, None]
        q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=rows & (d < D)[None, :], other=0.0)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DVP), tl.float32)
        lists = b * sib + h * sih + p * sip
        for j in range(0, _list_length(COUNTS, b, h, p, scb, sch, scp, N, TOKENS)):
            visible, k, v = _block(K + b * skb + h * skh, V + b * svb + h * svh, IDX, MEMBERS, lists, j,
                                   t, slot, row_ok, last, skt, skd, svt, svd, sin, BS, DP, D, DVP, DV, TOKENS)
            s = tl.where(visible, _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p_ij = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p_ij, axis=1)
            acc = acc * alpha[:, None] + _dot(p_ij.to(v.dtype), v, IEEE)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        o_offsets = b * sob + head[:, None] * soh + t[:, None] * sot + dv[None, :] * sod
        tl.store(O + o_offsets, o.to(O.dtype.element_ty), mask=rows & (dv < DV)[None, :])
        tl.store(LSE + b * slb + head * slh + t * slt, lse, mask=row_ok)
        if GATED:  # the gated output, laid out as o
            gate = tl.load(GATE + b * sgb + head * sgh + t * sgt, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(OG + o_offsets, (o * gate[:, None]).to(OG.dtype.element_ty), mask=rows & (dv < DV)[None, :])

    @triton.jit
    def selected_dq_kernel(
        Q, K, V, IDX, MEMBERS, COUNTS, DO, O, LSE, DELTA, DQ, GATE, LSE_DKV, NEGATIVE,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdoh, sdot, sdod, slb, slh, slt,
        sdlb, sdlh, sdlt, sgb, sgh, sgt, sob, soh, sot, sod, sib, sih, sip, sin, scb, sch, scp,
        sdqb, sdqh, sdqt, sdqd, T, Hkv, N, scale,
        G: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, ADD: tl.constexpr,
        GATED: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        p = tl.program_id(0)
        b = tl.program_id(1) // Hkv
        h = tl.program_id(1) % Hkv
        head, t, slot, row_ok, last = _tile_rows(p, h, T, G, ROWS, TOKENS)
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        rows = row_ok[:, None]
        q, do, lse = _token_rows(Q, DO, LSE, b, head, t, row_ok, sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod,
                                 slb, slh, slt, DP, D, DVP, DV)
        o = tl.load(O + b * sob + head[:, None] * soh + t[:, None] * sot + dv[None, :] * sod,
                    mask=rows & (dv < DV)[None, :], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        row_stats = b * sdlb + head * sdlh + t * sdlt  # delta's layout, which LSE_DKV shares
        tl.store(DELTA + row_stats, delta, mask=row_ok)  # with a gate: also the gate's gradient
        if GATED:  # do is the gradient of gate * o: o's gradient is gate * do
            gate = tl.load(GATE + b * sgb + head * sgh + t * sgt, mask=row_ok, other=0.0).to(tl.float32)
            # for the dk/dv kernel: |gate| folded into its log-sum-exp (a zero gate gives +inf, so p = 0)
            tl.store(LSE_DKV + row_stats, lse - tl.log(tl.abs(gate)), mask=row_ok)
            if tl.min(gate) < 0:
                tl.store(NEGATIVE, 1)
            delta = delta * gate
            do = (do.to(tl.float32) * gate[:, None]).to(do.dtype)
        dq = tl.zeros((ROWS, DP), tl.float32)
        lists = b * sib + h * sih + p * sip
        for j in range(0, _list_length(COUNTS, b, h, p, scb, sch, scp, N, TOKENS)):
            visible, k, v = _block(K + b * skb + h * skh, V + b * svb + h * svh, IDX, MEMBERS, lists, j,
                                   t, slot, row_ok, last, skt, skd, svt, svd, sin, BS, DP, D, DVP, DV, TOKENS)
            _, ds = _probs(q, do, k, v, lse, delta, visible, scale, IEEE)
            dq += _dot(ds.to(k.dtype), k, IEEE) * scale
        dq_ptr = DQ + b * sdqb + head[:, None] * sdqh + t[:, None] * sdqt + d[None, :] * sdqd
        if ADD:  # another branch's gradient of q, summed into in place
            dq += tl.load(dq_ptr, mask=rows & (d < D)[None, :], other=0.0).to(tl.float32)
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=rows & (d < D)[None, :])

    @triton.jit
    def selected_dkv_kernel(
        Q, K, V, DO, LSE, DELTA, GATE, NEGATIVE, DK, DV_, OFFSETS, COUNTS, TOKENS, WORK,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdoh, sdot, sdod, slb, slh, slt,
        sdlb, sdlh, sdlt, sgb, sgh, sgt, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd, T, Hkv, S, W, scale,
        CHUNK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        DV: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, NEGATIVE_ROWS: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as doubles: keep the tiles in float32
        seg = tl.load(WORK + tl.program_id(0))  # (b, h, block), -1 past the last chunk
        if NEGATIVE_ROWS:  # the correction pass has work only if the dq kernel saw a gate below zero
            seg = tl.where(tl.load(NEGATIVE) != 0, seg, -1)
        lo = tl.load(WORK + W + tl.program_id(0))
        if seg >= 0:
            blk = seg % S
            h = (seg // S) % Hkv
            b = seg // (S * Hkv)
            first = tl.load(OFFSETS + seg)
            count = tl.load(COUNTS + seg)
            hi = tl.minimum(lo + CHUNK, count)
            d = tl.arange(0, DP)
            dv = tl.arange(0, DVP)
            tok = blk * BS + tl.arange(0, BS)
            in_seq = tok < T
            k = tl.load(K + b * skb + h * skh + tok[:, None] * skt + d[None, :] * skd,
                        mask=in_seq[:, None] & (d < D)[None, :], other=0.0)
            v = tl.load(V + b * svb + h * svh + tok[:, None] * svt + dv[None, :] * svd,
                        mask=in_seq[:, None] & (dv < DV)[None, :], other=0.0)
            dk = tl.zeros((BS, DP), tl.float32)
            dvb = tl.zeros((BS, DVP), tl.float32)
            # TB tokens per step, their G query rows stacked into one ROWS-row tile with no padding between
            # tokens: a tile of one token's rows (16, or G padded to 16) left the tensor cores mostly idle
            TB: tl.constexpr = ROWS // G
            r = tl.arange(0, ROWS)
            slot = r // G  # the row's token among the step's TB
            head = h * G + r % G
            for i in range(lo, hi, TB):
                row_ok = (slot < TB) & (i + slot < hi)
                t = tl.load(TOKENS + first + i + slot, mask=row_ok, other=0)
                q, do, lse = _token_rows(Q, DO, LSE, b, head, t, row_ok, sqb, sqh, sqt, sqd, sdob, sdoh, sdot,
                                         sdod, slb, slh, slt, DP, D, DVP, DV)
                delta = tl.load(DELTA + b * sdlb + head * sdlh + t * sdlt, mask=row_ok, other=0.0)
                visible = (tok[None, :] <= t[:, None]) & row_ok[:, None]
                # with a gate, LSE is lse - log|gate|: p and ds come out scaled by |gate|
                p, ds = _probs(q, do, k, v, lse, delta, visible, scale, IEEE)
                if NEGATIVE_ROWS:  # the correction: -2x the rows of negative gates, counted + by the main pass
                    gate = tl.load(GATE + b * sgb + head * sgh + t * sgt, mask=row_ok, other=0.0)
                    factor = tl.where(gate < 0, -2.0, 0.0)[:, None]
                    p = p * factor
                    ds = ds * factor
                dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale
                dvb += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            tl.atomic_add(DK + b * sdkb + h * sdkh + tok[:, None] * sdkt + d[None, :] * sdkd, dk,
                          mask=in_seq[:, None] & (d < D)[None, :])
            tl.atomic_add(DV_ + b * sdvb + h * sdvh + tok[:, None] * sdvt + dv[None, :] * sdvd, dvb,
                          mask=in_seq[:, None] & (dv < DV)[None, :])

    @triton.jit
    def _token_rows(Q, DO, LSE, b, head, t, row_ok, sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod, slb, slh, slt,
                    DP: tl.constexpr, D: tl.constexpr, DVP: tl.constexpr, DV: tl.constexpr):
        """The query rows of heads ``head`` at tokens ``t`` (``[R]`` each, or ``t`` one token for all rows):
        q, do and lse (``+inf`` where the row saw nothing or is not ``row_ok``, so its ``p`` is 0)."""
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        rows = row_ok[:, None]
        t = t + tl.zeros_like(head)  # one token for all rows, or one per row
        q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=rows & (d < D)[None, :], other=0.0)
        do = tl.load(DO + b * sdob + head[:, None] * sdoh + t[:, None] * sdot + dv[None, :] * sdod,
                     mask=rows & (dv < DV)[None, :], other=0.0)
        lse = tl.load(LSE + b * slb + head * slh + t * slt, mask=row_ok, other=float("-inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        return q, do, lse

    @triton.jit
    def _probs(q, do, k, v, lse, delta, visible, scale, IEEE: tl.constexpr):
        """``p = exp(s - lse)`` on the visible keys and ``ds = p * (do . v - delta)``, both ``[ROWS, BS]``."""
        s = _dot(q, tl.trans(k), IEEE) * scale
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE).to(tl.float32)
        return p, p * (dp - delta[:, None])
