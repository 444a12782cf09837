"""The NSA selection branch's mask, from top-k block indices, and its BlockMask built without T x T work.

``block_indices[b, kv_head, t]`` lists the ``n`` key blocks (of ``block_size`` tokens) that token ``t``
selected; ``-1`` marks an unused slot and duplicates count once. Query ``t`` of kv head ``h`` sees key ``j`` iff
``j // block_size`` is among them and ``j <= t``.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .._checks import positive_int, tensor
from .mask import Extent, Mask


def materialize(x: Tensor) -> Tensor:
    """A copy of ``x`` that inductor must store as a real buffer (an opaque op has a fixed memory layout).

    Inside ``torch.compile``, a tensor computed in the graph (top-k block indices) and captured by a mask_mod is
    otherwise a fusible buffer of undecided layout, and torch 2.11's FlexAttention lowering then fails with
    "convert FlexibleLayout to FixedLayout first" (pytorch/pytorch#163300). The copy is ``T*n`` integers.
    Outside ``torch.compile`` it is a plain copy (same values, dtype and strides).
    """
    return _materialize(tensor("x", x))


@torch.library.custom_op("nsa_flex::materialize", mutates_args=())
def _materialize(x: Tensor) -> Tensor:
    return x.clone()


@_materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _check_indices(block_indices: Tensor) -> Tensor:
    idx = tensor("block_indices", block_indices, ndim=4, integer=True)
    if idx.numel() and int(idx.min()) < -1:
        raise ValueError(f"block_indices must be >= -1 (-1 marks an unused slot), got minimum {int(idx.min())}")
    return idx


def _check_kv_range(idx: Tensor, block_size: int, kv_len: int) -> None:
    num_kv_blocks = math.ceil(kv_len / block_size)
    if idx.numel() and int(idx.max()) >= num_kv_blocks:
        raise ValueError(
            f"block_indices must be < {num_kv_blocks} (the number of key blocks of size {block_size} in "
            f"kv_len={kv_len}), got maximum {int(idx.max())}"
        )


def fine_selection_mod(idx: Tensor, block_size: int, group_size: int = 1, rows_per_token: int = 1):
    """The bare mask_mod of :func:`fine_selection` (no checks, no Mask wrapper: traceable by torch.compile).

    ``rows_per_token = G`` is the GQA-folded layout: query row ``r`` is token ``r // G`` (its ``G`` query heads
    stacked as consecutive rows) and ``h`` is the kv head.
    """
    n = idx.shape[-1]

    def fine_selection(b, h, q_idx, kv_idx):
        t = q_idx // rows_per_token
        chosen = idx[b, h // group_size, t]
        kv_block = kv_idx // block_size
        # An unrolled OR over the n slots keeps the mask_mod elementwise, which compiled kernels need.
        hit = chosen[..., 0] == kv_block
        for i in range(1, n):
            hit = hit | (chosen[..., i] == kv_block)
        return hit & (kv_idx <= t)

    return fine_selection


def fine_selection(block_indices: Int[Tensor, "B Hkv T n"], block_size: int = 64, group_size: int = 1) -> Mask:
    """Mask of NSA's selected blocks. ``h`` is the query head; its kv head is ``h // group_size``.

    Defined for batch ``B``, ``Hkv * group_size`` heads, ``q_len <= T`` and keys covered by the indices.
    """
    idx = _check_indices(block_indices)
    bs = positive_int("block_size", block_size)
    g = positive_int("group_size", group_size)
    B, Hkv, T, n = idx.shape
    if 0 in (B, Hkv, n):
        raise ValueError(f"block_indices must have a sequence, a kv head and a slot (B, Hkv, n >= 1), got shape "
                         f"{list(idx.shape)}")

    def fits(q_len: int, kv_len: int) -> None:
        if q_len > T:
            raise ValueError(f"fine_selection has block_indices for {T} queries, got q_len={q_len}")
        _check_kv_range(idx, bs, kv_len)

    extent = Extent(batch=B, heads=Hkv * g, checks=(fits,), device=idx.device)
    name = f"fine_selection(<indices {list(idx.shape)}>, block_size={bs}" + (f", group_size={g})" if g > 1 else ")")
    return Mask(fine_selection_mod(idx, bs, g), name, extent)


def block_mask_from_indices(
    block_indices: Int[Tensor, "B Hkv T n"],
    q_len: int,
    kv_len: int,
    block_size: int = 64,
    q_block_size: int = 128,
    group_size: int = 1,
    compute_q_blocks: bool = True,
    rows_per_token: int = 1,
) -> BlockMask:
    """The BlockMask of ``fine_selection(block_indices, block_size, group_size)`` without evaluating it densely.

    Equal block for block to ``create_block_mask(fine_selection(...), B, Hkv*group_size, q_len, kv_len,
    BLOCK_SIZE=(q_block_size, block_size))``: the same partial and full blocks in the same (ascending) order.
    A key block is *full* for a query tile when every row of the tile selected it and all its keys are at or
    before the tile's first row; otherwise, if any row can see a key of it, it is partial (the mask_mod runs).

    Work: a sort of the ``q_block_size * n`` candidates of each query tile, O(T*n log(q_block_size*n)), and for
    the transposed indices one sort of the O(T*n) (tile, block) pairs; no ``T x T`` tensor. The index tensors have torch's fixed layout, ``ceil(q_len/q_block_size) x
    ceil(kv_len/block_size)`` entries per head, which is below ``T*n`` while ``kv_len <= q_block_size*n*block_size``.
    ``compute_q_blocks=False`` skips the transposed (query-side) indices that only the backward pass reads.

    ``rows_per_token = G`` builds the GQA-folded mask (docs/design.md, "functional"): queries are laid out
    ``[B, Hkv, T*G, D]`` with token ``t``'s ``G`` heads as rows ``t*G .. t*G+G-1``, so a query tile of
    ``q_block_size`` rows covers ``q_block_size / G`` tokens and each selected KV block is loaded once for all
    ``G`` heads. Then ``q_len`` counts rows (``T*G``) and ``group_size`` must be 1.
    """
    r = rows_per_token
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile: no data-dependent checks (they would break the graph), bare mask_mod.
        block_indices = materialize(block_indices)
        mask_mod = fine_selection_mod(block_indices, block_size, group_size, r)
    else:
        positive_int("q_len", q_len)
        positive_int("kv_len", kv_len)
        positive_int("q_block_size", q_block_size)
        positive_int("rows_per_token", r)
        if r > 1 and (group_size != 1 or q_len % r or q_block_size % r):
            raise ValueError(
                f"rows_per_token={r} needs group_size=1 and q_len, q_block_size multiples of it, got "
                f"group_size={group_size}, q_len={q_len}, q_block_size={q_block_size}"
            )
        mask = fine_selection(block_indices, block_size, group_size)
        mask.check(q_len // r, kv_len)
        mask_mod = mask if r == 1 else fine_selection_mod(block_indices, block_size, 1, r)
    q_tokens = q_len // r
    idx = block_indices[:, :, :q_tokens]
    B, Hkv, _, n = idx.shape
    bs, tpt = block_size, q_block_size // r  # tpt: tokens per query tile
    num_kv = math.ceil(kv_len / bs)
    num_q = math.ceil(q_tokens / tpt)
    device = idx.device

    # A slot counts if it names a block with at least one key <= t. Anything else becomes the sentinel num_kv.
    t = torch.arange(q_tokens, device=device).view(1, 1, q_tokens, 1)
    idx = idx.long()
    sentinel = num_kv
    vals = torch.where((idx >= 0) & (idx * bs <= t), idx, sentinel)
    # Duplicates within one token must count once toward "every row selected it".
    vals, _ = vals.sort(dim=-1)
    vals[..., 1:].masked_fill_(vals[..., 1:] == vals[..., :-1], sentinel)
    pad_tokens = num_q * tpt - q_tokens
    if pad_tokens:
        vals = torch.nn.functional.pad(vals, (0, 0, 0, pad_tokens), value=sentinel)
    tiles = vals.view(B, Hkv, num_q, tpt * n).sort(dim=-1).values  # each tile's candidates, ascending

    m = tiles.shape[-1]
    first = torch.ones_like(tiles, dtype=torch.bool)
    first[..., 1:] = tiles[..., 1:] != tiles[..., :-1]
    # Run length of each value = (start of the next run) - (own start); the next start comes from a reverse cummin.
    pos = torch.arange(m, device=device).expand_as(tiles)
    starts = torch.where(first, pos, m)
    next_start = torch.cat([starts[..., 1:], torch.full_like(starts[..., :1], m)], dim=-1)
    next_start = next_start.flip(-1).cummin(dim=-1).values.flip(-1)
    run = next_start - pos

    present = first & (tiles < sentinel)
    q_start = (torch.arange(num_q, device=device) * tpt).view(1, 1, num_q, 1)  # first token of each tile
    block_end = (tiles + 1) * bs  # one past the block's last key
    full = present & (run == tpt) & (block_end - 1 <= q_start) & (block_end <= kv_len)
    partial = present & ~full

    def ordered(keep: Tensor) -> tuple[Tensor, Tensor]:
        counts = keep.sum(dim=-1, dtype=torch.int32)
        chosen = torch.where(keep, tiles, sentinel).sort(dim=-1).values
        width = min(m, num_kv)
        chosen = chosen[..., :width].clamp_(max=num_kv - 1)  # unused tail entries must still be valid indices
        if width < num_kv:
            chosen = torch.nn.functional.pad(chosen, (0, num_kv - width), value=0)
        return counts, chosen.to(torch.int32)

    def transposed(keep: Tensor) -> tuple[Tensor, Tensor]:
        # The query tiles of each key block, ascending (what backward reads), from the O(T*n) (tile, block)
        # pairs: one sort of their keys. Torch's from_kv_blocks instead argsorts a dense [num_kv, num_q] matrix
        # per head; with 16-row tiles that was 268M entries and 36 ms of sorting per step at 64k tokens.
        # Static shapes throughout (dropped pairs sort last and land in a spare slot) so it traces in compile.
        segments, total = B * Hkv * num_kv, B * Hkv * num_kv * num_q
        head = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1)
        tile = torch.arange(num_q, device=device).view(1, 1, num_q, 1)
        key = torch.where(keep, (head * num_kv + tiles) * num_q + tile, total).flatten().sort().values
        valid = key < total
        segment = torch.where(valid, key // num_q, segments)
        counts = torch.zeros(segments + 1, dtype=torch.long, device=device).scatter_add_(
            0, segment, torch.ones_like(segment))
        slot = torch.arange(key.numel(), device=device) - (counts.cumsum(0) - counts)[segment]
        dest = torch.where(valid, segment * num_q + slot, total)
        indices = torch.zeros(total + 1, dtype=torch.int32, device=device).scatter_(0, dest, (key % num_q).int())
        return counts[:-1].view(B, Hkv, num_kv).int(), indices[:-1].view(B, Hkv, num_kv, num_q)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    none = (None, None)
    q_num, q_idx = transposed(partial) if compute_q_blocks else none
    full_q_num, full_q_idx = transposed(full) if compute_q_blocks else none
    fields = [kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx]
    if group_size > 1:
        fields = [None if x is None else x.repeat_interleave(group_size, dim=1) for x in fields]
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = (
        None if x is None else x.contiguous() for x in fields
    )
    return BlockMask(
        seq_lengths=(q_len, kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(q_block_size, bs),
        mask_mod=mask_mod,
    )
