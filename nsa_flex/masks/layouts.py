"""Block-layout sparsity patterns (Sparse Transformer / DeepSpeed sparse attention) as :class:`Mask` objects.

A *layout* is a bool matrix over blocks of ``block_size`` tokens: ``layout[r, c]`` says whether the queries of
block ``r`` may attend to the keys of block ``c``. :func:`block_layout` turns any such matrix (one shared by all
heads, ``[num_q_blocks, num_kv_blocks]``, or one per head, ``[H, num_q_blocks, num_kv_blocks]``) into a mask:
query ``t`` of head ``h`` sees key ``j`` iff ``layout[(h,) t // block_size, j // block_size]``.

The generators build the layouts of DeepSpeed's ``sparsity_config`` classes and wrap them:

* :func:`fixed` - OpenAI Sparse Transformer "fixed" pattern (``FixedSparsityConfig``): local windows of
  ``num_local_blocks`` blocks, plus the last ``num_global_blocks`` blocks of every window seen by everyone;
* :func:`variable` - ``VariableSparsityConfig``: local windows of listed sizes, listed global blocks and random
  blocks;
* :func:`bigbird` - ``BigBirdSparsityConfig``: random + sliding-window + leading global blocks;
* :func:`longformer` - ``BSLongformerSparsityConfig`` (block-sparse Longformer): sliding window + listed global
  blocks.

Conventions (where this module deliberately differs from DeepSpeed, it says so):

* ``seq_len`` need not be a multiple of ``block_size``: the layout has ``ceil(seq_len / block_size)`` blocks and
  the last one is partial. The mask is defined for ``q_len == kv_len <= num_blocks * block_size`` (the generated
  patterns are self-attention patterns; :func:`block_layout` itself also accepts rectangular layouts and
  ``q_len != kv_len``).
* ``attention="unidirectional"``: the layout is made block-causal (lower triangular; DeepSpeed's fixed/variable
  patterns can leave blocks above the diagonal, e.g. with ``num_global_blocks > 1``), random blocks are drawn
  only among the blocks at or before the query's block (so each row still gets ``min(num_random_blocks,
  row + 1)`` random blocks), and the returned mask is ``block_layout(...) & causal()``: exactly causal at token
  level, ``j <= t`` always holds.
* Randomness is drawn from a ``torch.Generator`` seeded with ``seed`` (CPU): the same arguments give the same
  layout on every run and machine. With ``different_layout_per_head=True`` each head draws its own random
  blocks (and, for :func:`fixed`, heads cycle through ``num_different_global_patterns`` global patterns); the
  mask then depends on ``h`` and is defined for exactly ``num_heads`` heads. Otherwise one layout serves every
  head and the mask works with any number of heads.
* ``device=`` puts the layout where the mask will be evaluated (e.g. ``"cuda"``: compiled kernels cannot read a
  CPU tensor); it is left out of ``repr``.

The ``*_layout`` functions return the bool layout tensor ``[H or 1, num_blocks, num_blocks]`` (block-causal
for unidirectional attention) without wrapping it, for inspection and plotting.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .._checks import device as check_device, positive_int, seed as check_seed, tensor
from .mask import Extent, Mask, same_length
from .static import causal

_ATTENTION = ("bidirectional", "unidirectional")

__all__ = [
    "bigbird",
    "bigbird_layout",
    "block_layout",
    "fixed",
    "fixed_layout",
    "longformer",
    "longformer_layout",
    "variable",
    "variable_layout",
]


# -- the general wrapper ---------------------------------------------------------------------------------
def block_layout(layout: Union[Bool[Tensor, "*H nq nkv"], Int[Tensor, "*H nq nkv"]], block_size: int) -> Mask:
    """Mask from a block layout: query ``t`` (head ``h``) sees key ``j`` iff ``layout[(h,) t // bs, j // bs]``.

    ``layout`` is a bool or integer tensor (nonzero = attend), ``[num_q_blocks, num_kv_blocks]`` for every head
    or ``[H, num_q_blocks, num_kv_blocks]`` per head (the mask is then defined for exactly ``H`` heads). It is
    copied, so later changes to the caller's tensor do not change the mask. Defined for
    ``q_len <= num_q_blocks * block_size`` and ``kv_len <= num_kv_blocks * block_size``.
    """
    lay = tensor("layout", layout)
    if lay.dtype.is_floating_point or lay.dtype.is_complex:
        raise TypeError(f"layout must have a bool or integer dtype, got {lay.dtype}")
    if lay.ndim not in (2, 3):
        raise ValueError(f"layout must have shape [num_q_blocks, num_kv_blocks] or [H, num_q_blocks, num_kv_blocks], "
                         f"got {list(lay.shape)}")
    if lay.numel() == 0:
        raise ValueError(f"layout must have at least one head and one block in each dimension, got {list(lay.shape)}")
    bs = positive_int("block_size", block_size)
    lay = lay.detach().to(torch.bool).clone().contiguous()
    name = f"block_layout(<layout {list(lay.shape)}>, block_size={bs})"
    return _wrap_layout(lay, bs, name, self_attention=False)


def _wrap_layout(lay: Tensor, bs: int, name: str, self_attention: bool) -> Mask:
    """``lay`` is a bool tensor of rank 2 or 3, already validated and owned by us."""
    nq, nkv = lay.shape[-2:]

    def within_layout(q_len: int, kv_len: int) -> None:
        if q_len > nq * bs or kv_len > nkv * bs:
            raise ValueError(
                f"{name} covers q_len <= {nq * bs} and kv_len <= {nkv * bs} ({nq} x {nkv} blocks of {bs}), "
                f"got q_len={q_len}, kv_len={kv_len}"
            )

    checks = (same_length(name), within_layout) if self_attention else (within_layout,)
    if lay.ndim == 2:

        def block_layout(b, h, q_idx, kv_idx):
            return lay[q_idx // bs, kv_idx // bs]

        extent = Extent(checks=checks, device=lay.device)
    else:

        def block_layout(b, h, q_idx, kv_idx):  # noqa: F811 - one closure per branch, same name
            return lay[h, q_idx // bs, kv_idx // bs]

        extent = Extent(heads=lay.shape[0], checks=checks, device=lay.device)
    return Mask(block_layout, name, extent)


def _pattern_mask(lay: Tensor, bs: int, attention: str, name: str, device, per_head: bool = False) -> Mask:
    """Wrap a generated (self-attention) layout; unidirectional patterns are also causal at token level.
    A per-head layout keeps its head dimension (even of size 1): the mask is then defined for that many heads."""
    if not per_head:
        lay = lay[0]
    if device is not None:
        lay = lay.to(device)
    mask = _wrap_layout(lay, bs, name, self_attention=True)
    if attention == "unidirectional":
        mask = mask & causal()
    # Rename so that repr reads like the call that made the mask.
    return Mask(mask.fn, name, mask.extent)


# -- argument checks ---------------------------------------------------------------------------------------
def _attention(attention) -> str:
    if not isinstance(attention, str):
        raise TypeError(f"attention must be 'bidirectional' or 'unidirectional', got {type(attention).__name__}")
    if attention not in _ATTENTION:
        raise ValueError(f"attention must be 'bidirectional' or 'unidirectional', got {attention!r}")
    return attention


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _int_list(name: str, value, *, minimum: int, allow_empty: bool) -> list[int]:
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of ints, got {type(value).__name__} {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}[{i}] must be an int >= {minimum}, got {type(v).__name__} {v!r}")
        if v < minimum:
            raise ValueError(f"{name}[{i}] must be an int >= {minimum}, got {v}")
        out.append(v)
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def _num_blocks(seq_len, block_size) -> tuple[int, int, int]:
    T = positive_int("seq_len", seq_len)
    bs = positive_int("block_size", block_size)
    return T, bs, math.ceil(T / bs)


def _at_most_blocks(name: str, value: int, nb: int, T: int, bs: int) -> None:
    if value > nb:
        raise ValueError(
            f"{name} must be <= the number of blocks, {nb} (seq_len={T} / block_size={bs}), got {value}"
        )


def _global_ranges(starts: list[int], ends: Optional[list[int]]) -> list[tuple[int, int]]:
    """Global blocks as ``[start, end)`` ranges; without end indices each start is one block."""
    if ends is None:
        return [(s, s + 1) for s in starts]
    if len(ends) != len(starts):
        raise ValueError(
            f"global_block_end_indices must have as many entries as global_block_indices ({len(starts)}), "
            f"got {len(ends)}"
        )
    for i, (s, e) in enumerate(zip(starts, ends)):
        if s >= e:
            raise ValueError(
                f"global_block_end_indices[{i}] must be > global_block_indices[{i}] = {s}, got {e}"
            )
    return list(zip(starts, ends))


def _layout_mask(layout_fn, name: str, call: dict) -> Mask:
    """The Mask of a DeepSpeed-style pattern: ``layout_fn``'s layout for the generator's arguments ``call``
    (its ``locals()``: the layout's parameters plus ``device``), named ``name(seq_len, k=v, ...)`` with only the
    keywords that differ from their defaults (the defaults are ``layout_fn``'s, so they are written once)."""
    device = check_device("device", call["device"])  # before the layout is built
    params = inspect.signature(layout_fn).parameters
    args = {k: call[k] for k in params}
    layout = layout_fn(**args)

    def plain(value):  # sequences print as lists, whatever the caller passed
        return list(value) if isinstance(value, (list, tuple)) else value

    shown = [f"{k}={plain(v)!r}" for k, v in args.items()
             if k != "seq_len" and plain(v) != plain(params[k].default)]
    per_head = args.get("different_layout_per_head") is True
    return _pattern_mask(layout, args["block_size"], args["attention"],
                         f"{name}({', '.join([repr(args['seq_len']), *shown])})", device, per_head)


# -- layout pieces -----------------------------------------------------------------------------------------
def _block_grid(nb: int) -> tuple[Tensor, Tensor]:
    r = torch.arange(nb).view(nb, 1)
    c = torch.arange(nb).view(1, nb)
    return r, c


def _windows(nb: int, sizes: list[int], unidirectional: bool) -> Tensor:
    """Disjoint local windows of the given sizes (the last size repeats), full inside (or lower triangular)."""
    window_id = torch.empty(nb, dtype=torch.long)
    start, k = 0, 0
    while start < nb:
        size = sizes[min(k, len(sizes) - 1)]
        window_id[start : start + size] = k
        start += size
        k += 1
    r, c = _block_grid(nb)
    lay = window_id.view(nb, 1) == window_id.view(1, nb)
    return lay & (c <= r) if unidirectional else lay


def _sliding(nb: int, num_window_blocks: int) -> Tensor:
    """DeepSpeed's block sliding window: ``|r - c| <= num_window_blocks // 2``."""
    r, c = _block_grid(nb)
    return (r - c).abs() <= num_window_blocks // 2


def _random(nb: int, num_random: int, unidirectional: bool, gen: torch.Generator) -> Tensor:
    """Each block row gets ``num_random`` distinct random key blocks (among blocks ``<= row`` if unidirectional,
    then ``min(num_random, row + 1)`` of them)."""
    scores = torch.rand(nb, nb, generator=gen)
    r, c = _block_grid(nb)
    if unidirectional:
        scores = torch.where(c <= r, scores, torch.full_like(scores, -1.0))  # never among the chosen
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < num_random if num_random else torch.zeros(nb, nb, dtype=torch.bool)


def _finish(layouts: list[Tensor], unidirectional: bool) -> Tensor:
    lay = torch.stack(layouts)
    return lay.tril() if unidirectional else lay


# -- fixed ---------------------------------------------------------------------------------------------------
def _fixed_args(seq_len, block_size, num_local_blocks, num_global_blocks, attention, num_heads,
                different_layout_per_head, horizontal_global_attention, num_different_global_patterns):
    T, bs, nb = _num_blocks(seq_len, block_size)
    L = positive_int("num_local_blocks", num_local_blocks)
    G = positive_int("num_global_blocks", num_global_blocks)
    if L % G:
        raise ValueError(
            f"num_local_blocks must be a multiple of num_global_blocks, got num_local_blocks={L}, "
            f"num_global_blocks={G}"
        )
    attention = _attention(attention)
    H = positive_int("num_heads", num_heads)
    per_head = _flag("different_layout_per_head", different_layout_per_head)
    horizontal = _flag("horizontal_global_attention", horizontal_global_attention)
    if horizontal and attention != "bidirectional":
        raise ValueError("horizontal_global_attention=True needs attention='bidirectional'")
    P = positive_int("num_different_global_patterns", num_different_global_patterns)
    if P > 1 and not per_head:
        raise ValueError(
            f"num_different_global_patterns={P} > 1 needs different_layout_per_head=True (one layout serves all heads)"
        )
    if P > L // G:
        raise ValueError(
            f"num_different_global_patterns must be <= num_local_blocks // num_global_blocks = {L // G}, got {P}"
        )
    return T, bs, nb, L, G, attention, H, per_head, horizontal, P


def fixed_layout(
    seq_len: int,
    block_size: int = 16,
    num_local_blocks: int = 4,
    num_global_blocks: int = 1,
    attention: str = "bidirectional",
    num_heads: int = 1,
    different_layout_per_head: bool = False,
    *,
    horizontal_global_attention: bool = False,
    num_different_global_patterns: int = 1,
) -> Bool[Tensor, "H nb nb"]:
    """The layout of :func:`fixed`, ``[num_heads if different_layout_per_head else 1, nb, nb]``."""
    T, bs, nb, L, G, attention, H, per_head, horizontal, P = _fixed_args(
        seq_len, block_size, num_local_blocks, num_global_blocks, attention, num_heads,
        different_layout_per_head, horizontal_global_attention, num_different_global_patterns,
    )
    uni = attention == "unidirectional"
    local = _windows(nb, [L], uni)
    r, c = _block_grid(nb)
    layouts = []
    for h in range(H if per_head else 1):
        # Global representatives: the last G blocks of each window (head h: the (h % P + 1)-th group from the end).
        first = L - (1 + h % P) * G
        cols = torch.zeros(nb, dtype=torch.bool)
        end = nb - nb % L  # the complete windows
        for i in range(first, end, L):
            cols[i : i + G] = True
        if end < nb:  # a short last window: the same offset, moved left so that it fits
            start = max(0, min(end + first, nb - G))
            cols[start : start + G] = True
        vertical = cols.view(1, nb) & (c <= r if uni else True)
        lay = local | vertical
        if horizontal:
            lay = lay | cols.view(nb, 1)
        layouts.append(lay)
    return _finish(layouts, uni)


def fixed(
    seq_len: int,
    block_size: int = 16,
    num_local_blocks: int = 4,
    num_global_blocks: int = 1,
    attention: str = "bidirectional",
    num_heads: int = 1,
    different_layout_per_head: bool = False,
    *,
    horizontal_global_attention: bool = False,
    num_different_global_patterns: int = 1,
    device: Union[str, torch.device, None] = None,
) -> Mask:
    """OpenAI Sparse Transformer "fixed" pattern, as DeepSpeed's ``FixedSparsityConfig``.

    Blocks are grouped into windows of ``num_local_blocks``; a block sees every block of its own window
    (unidirectional: those at or before it). The last ``num_global_blocks`` blocks of every window (of the
    short last window too) are global: every block sees them (unidirectional: every later block). With
    ``horizontal_global_attention`` (bidirectional only) the global blocks also see every block. With
    ``different_layout_per_head`` head ``h`` uses the ``(h % num_different_global_patterns + 1)``-th group of
    ``num_global_blocks`` from the end of each window as its global blocks.
    """
    return _layout_mask(fixed_layout, "fixed", locals())


# -- variable ------------------------------------------------------------------------------------------------
def variable_layout(
    seq_len: int,
    block_size: int = 16,
    num_random_blocks: int = 0,
    local_window_blocks: Sequence[int] = (4,),
    global_block_indices: Sequence[int] = (0,),
    attention: str = "bidirectional",
    seed: int = 0,
    *,
    global_block_end_indices: Optional[Sequence[int]] = None,
    horizontal_global_attention: bool = False,
    num_heads: int = 1,
    different_layout_per_head: bool = False,
) -> Bool[Tensor, "H nb nb"]:
    """The layout of :func:`variable`, ``[num_heads if different_layout_per_head else 1, nb, nb]``."""
    T, bs, nb = _num_blocks(seq_len, block_size)
    R = positive_int("num_random_blocks", num_random_blocks, minimum=0)
    windows = _int_list("local_window_blocks", local_window_blocks, minimum=1, allow_empty=False)
    starts = _int_list("global_block_indices", global_block_indices, minimum=0, allow_empty=True)
    ends = None
    if global_block_end_indices is not None:
        ends = _int_list("global_block_end_indices", global_block_end_indices, minimum=1, allow_empty=True)
    ranges = _global_ranges(starts, ends)
    attention = _attention(attention)
    horizontal = _flag("horizontal_global_attention", horizontal_global_attention)
    if horizontal and attention != "bidirectional":
        raise ValueError("horizontal_global_attention=True needs attention='bidirectional'")
    H = positive_int("num_heads", num_heads)
    per_head = _flag("different_layout_per_head", different_layout_per_head)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    _at_most_blocks("num_random_blocks", R, nb, T, bs)

    uni = attention == "unidirectional"
    r, c = _block_grid(nb)
    cols = torch.zeros(nb, dtype=torch.bool)
    for s, e in ranges:  # global blocks beyond the sequence are ignored, as in DeepSpeed
        cols[min(s, nb) : min(e, nb)] = True
    fixed_part = _windows(nb, windows, uni) | (cols.view(1, nb) & (c <= r if uni else True))
    if horizontal:
        fixed_part = fixed_part | cols.view(nb, 1)
    layouts = [_random(nb, R, uni, gen) | fixed_part for _ in range(H if per_head else 1)]
    return _finish(layouts, uni)


def variable(
    seq_len: int,
    block_size: int = 16,
    num_random_blocks: int = 0,
    local_window_blocks: Sequence[int] = (4,),
    global_block_indices: Sequence[int] = (0,),
    attention: str = "bidirectional",
    seed: int = 0,
    *,
    global_block_end_indices: Optional[Sequence[int]] = None,
    horizontal_global_attention: bool = False,
    num_heads: int = 1,
    different_layout_per_head: bool = False,
    device: Union[str, torch.device, None] = None,
) -> Mask:
    """DeepSpeed's ``VariableSparsityConfig``: local windows of varying sizes, global and random blocks.

    * local: consecutive windows of ``local_window_blocks[0], local_window_blocks[1], ...`` blocks, the last size
      repeating to the end; a block sees its whole window (unidirectional: the blocks at or before it);
    * global: every block sees the blocks in ``global_block_indices`` (unidirectional: every block at or after
      them); with ``global_block_end_indices`` the global blocks are the ranges ``[start_i, end_i)``; indices
      past the sequence are ignored. ``horizontal_global_attention`` (bidirectional only): global blocks also
      see every block;
    * random: each block row sees ``num_random_blocks`` distinct random blocks (seeded by ``seed``).
    """
    return _layout_mask(variable_layout, "variable", locals())


# -- bigbird -------------------------------------------------------------------------------------------------
def bigbird_layout(
    seq_len: int,
    block_size: int = 16,
    num_random_blocks: int = 1,
    num_sliding_window_blocks: int = 3,
    num_global_blocks: int = 1,
    attention: str = "bidirectional",
    num_heads: int = 1,
    different_layout_per_head: bool = False,
    seed: int = 0,
) -> Bool[Tensor, "H nb nb"]:
    """The layout of :func:`bigbird`, ``[num_heads if different_layout_per_head else 1, nb, nb]``."""
    T, bs, nb = _num_blocks(seq_len, block_size)
    R = positive_int("num_random_blocks", num_random_blocks, minimum=0)
    W = positive_int("num_sliding_window_blocks", num_sliding_window_blocks)
    G = positive_int("num_global_blocks", num_global_blocks, minimum=0)
    attention = _attention(attention)
    H = positive_int("num_heads", num_heads)
    per_head = _flag("different_layout_per_head", different_layout_per_head)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    for name, value in (("num_random_blocks", R), ("num_sliding_window_blocks", W), ("num_global_blocks", G)):
        _at_most_blocks(name, value, nb, T, bs)

    uni = attention == "unidirectional"
    r, c = _block_grid(nb)
    fixed_part = _sliding(nb, W) | (r < G) | (c < G)
    layouts = [_random(nb, R, uni, gen) | fixed_part for _ in range(H if per_head else 1)]
    return _finish(layouts, uni)


def bigbird(
    seq_len: int,
    block_size: int = 16,
    num_random_blocks: int = 1,
    num_sliding_window_blocks: int = 3,
    num_global_blocks: int = 1,
    attention: str = "bidirectional",
    num_heads: int = 1,
    different_layout_per_head: bool = False,
    seed: int = 0,
    *,
    device: Union[str, torch.device, None] = None,
) -> Mask:
    """BigBird (DeepSpeed's ``BigBirdSparsityConfig``): random, sliding-window and global blocks.

    Block ``r`` sees block ``c`` iff ``|r - c| <= num_sliding_window_blocks // 2``, or either is among the
    first ``num_global_blocks`` blocks, or ``c`` is one of ``r``'s ``num_random_blocks`` random blocks
    (seeded by ``seed``; per head with ``different_layout_per_head``). Unidirectional: only ``c <= r``.
    """
    return _layout_mask(bigbird_layout, "bigbird", locals())


# -- longformer ----------------------------------------------------------------------------------------------
def longformer_layout(
    seq_len: int,
    block_size: int = 16,
    num_sliding_window_blocks: int = 3,
    global_block_indices: Sequence[int] = (0,),
    attention: str = "bidirectional",
    *,
    global_block_end_indices: Optional[Sequence[int]] = None,
) -> Bool[Tensor, "1 nb nb"]:
    """The layout of :func:`longformer`, ``[1, nb, nb]``."""
    T, bs, nb = _num_blocks(seq_len, block_size)
    W = positive_int("num_sliding_window_blocks", num_sliding_window_blocks)
    starts = _int_list("global_block_indices", global_block_indices, minimum=0, allow_empty=True)
    ends = None
    if global_block_end_indices is not None:
        ends = _int_list("global_block_end_indices", global_block_end_indices, minimum=1, allow_empty=True)
    ranges = _global_ranges(starts, ends)
    attention = _attention(attention)
    _at_most_blocks("num_sliding_window_blocks", W, nb, T, bs)

    glob = torch.zeros(nb, dtype=torch.bool)
    for s, e in ranges:
        glob[min(s, nb) : min(e, nb)] = True
    lay = _sliding(nb, W) | glob.view(nb, 1) | glob.view(1, nb)
    return _finish([lay], attention == "unidirectional")


def longformer(
    seq_len: int,
    block_size: int = 16,
    num_sliding_window_blocks: int = 3,
    global_block_indices: Sequence[int] = (0,),
    attention: str = "bidirectional",
    *,
    global_block_end_indices: Optional[Sequence[int]] = None,
    device: Union[str, torch.device, None] = None,
) -> Mask:
    """Block-sparse Longformer (DeepSpeed's ``BSLongformerSparsityConfig``): sliding window + global blocks.

    Block ``r`` sees block ``c`` iff ``|r - c| <= num_sliding_window_blocks // 2`` or either is a global block
    (``global_block_indices``, or the ranges ``[start_i, end_i)`` with ``global_block_end_indices``; indices past
    the sequence are ignored). Unidirectional: only ``c <= r``.
    """
    return _layout_mask(longformer_layout, "longformer", locals())
