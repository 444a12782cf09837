"""Hypothesis strategies for property-testing masks: attention shapes, random mask compositions, NSA block indices,
and small NSA problems (``nsa_cases``).

Needs ``hypothesis`` (the ``test`` extra). Typical use::

    from hypothesis import given, strategies as st
    from nsa_flex.testing import assert_matches_dense, strategies as nst

    @given(nst.shapes(same_length=True), st.data())
    def test_my_mask(shape, data):
        mask = data.draw(nst.masks(shape.q_len, batch=shape.batch, heads=shape.heads))
        assert_matches_dense(mask, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads,
                             kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size)

Drawn sizes are kept small (lengths <= 300 by default) so eager FlexAttention on CPU stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
from hypothesis import strategies as st

from .. import masks as M

__all__ = ["Shape", "block_indices", "block_sizes", "lengths", "masks", "neighborhoods", "nsa_cases", "shapes"]

BLOCK_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem: ``q [batch, heads, q_len, head_dim]``, ``k, v [batch, kv_heads, kv_len, head_dim]``,
    BlockMask blocks of ``(q_block_size, kv_block_size)``."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    q_block_size: int
    kv_block_size: int

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA ratio)."""
        return self.heads // self.kv_heads

    @property
    def block_size(self) -> tuple[int, int]:
        """``(q_block_size, kv_block_size)``, as ``Mask.to_block_mask`` and ``assert_matches_dense`` take it."""
        return (self.q_block_size, self.kv_block_size)


def block_sizes(sizes: Sequence[int] = BLOCK_SIZES) -> st.SearchStrategy[int]:
    """A FlexAttention block size (a power of two from 16 to 128 by default)."""
    return st.sampled_from(tuple(sizes))


def lengths(min_len: int = 1, max_len: int = 300) -> st.SearchStrategy[int]:
    """A sequence length, often odd or just off a multiple of a block size (where block edge cases live)."""
    near_blocks = [n + d for n in (16, 32, 64, 128, 256) for d in (-1, 0, 1)]
    near_blocks = [n for n in near_blocks if min_len <= n <= max_len]
    options = [st.integers(min_len, max_len)]
    if min_len < max_len or min_len % 2:  # the range holds an odd length
        options.append(st.integers(min_len // 2, (max_len - 1) // 2).map(lambda k: 2 * k + 1)
                       .filter(lambda n: n >= min_len))
    if near_blocks:
        options.append(st.sampled_from(near_blocks))
    return st.one_of(*options)


@st.composite
def shapes(
    draw,
    *,
    min_len: int = 1,
    max_len: int = 300,
    same_length: bool = False,
    max_batch: int = 2,
    max_kv_heads: int = 2,
    max_group: int = 4,
    head_dims: Sequence[int] = (8, 16, 32),
    sizes: Sequence[int] = BLOCK_SIZES,
    square_blocks: bool = False,
) -> Shape:
    """A :class:`Shape`: ``heads = kv_heads * G`` with GQA ratios ``G`` up to ``max_group``; ``q_len`` and
    ``kv_len`` independent unless ``same_length``; block sizes independent for q and kv unless ``square_blocks``."""
    batch = draw(st.integers(1, max_batch))
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8) if g <= max_group] or [1]))
    q_len = draw(lengths(min_len, max_len))
    kv_len = q_len if same_length else draw(lengths(min_len, max_len))
    head_dim = draw(st.sampled_from(tuple(head_dims)))
    q_block = draw(block_sizes(sizes))
    kv_block = q_block if square_blocks else draw(block_sizes(sizes))
    return Shape(batch, kv_heads * group, kv_heads, q_len, kv_len, head_dim, q_block, kv_block)


@st.composite
def block_indices(draw, B: int, Hkv: int, T: int, n: int, num_kv_blocks: int) -> torch.Tensor:
    """NSA selection indices: int64 ``[B, Hkv, T, n]`` in ``[-1, num_kv_blocks)``, with unused slots (``-1``),
    duplicates within a token's ``n`` and, sometimes, rows with nothing selected.

    Values are drawn by a seeded ``torch.Generator`` (the seed and the rates come from Hypothesis), so large
    tensors stay cheap to draw.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    p_unused = draw(st.sampled_from([0.0, 0.1, 0.3, 0.9]))
    p_duplicate = draw(st.sampled_from([0.0, 0.2, 0.5]))
    p_empty_row = draw(st.sampled_from([0.0, 0.05]))
    recent = draw(st.booleans())  # bias choices toward blocks near the token, like real NSA selections
    gen = torch.Generator().manual_seed(seed)
    shape = (B, Hkv, T, n)
    idx = torch.randint(0, num_kv_blocks, shape, generator=gen)
    if recent:
        # Blocks at or just before token t's position, spread over the key blocks proportionally.
        t_block = (torch.arange(T) * num_kv_blocks // max(T, 1)).view(1, 1, T, 1)
        back = torch.randint(0, 3, shape, generator=gen)
        near = (t_block - back).clamp(0, num_kv_blocks - 1)
        idx = torch.where(torch.rand(shape, generator=gen) < 0.7, near, idx)
    if n > 1 and p_duplicate:
        src = torch.randint(0, n, shape, generator=gen)
        dup = torch.rand(shape, generator=gen) < p_duplicate
        idx = torch.where(dup, idx.gather(-1, src), idx)
    idx = idx.masked_fill(torch.rand(shape, generator=gen) < p_unused, -1)
    idx = idx.masked_fill(torch.rand(B, Hkv, T, 1, generator=gen) < p_empty_row, -1)
    return idx.to(torch.int64)


@st.composite
def nsa_cases(draw, max_len: int = 140) -> dict:
    """A small NSA problem: ``dict(B, Hq, Hkv, T, D, cfg, seed)``, ``cfg`` the keyword arguments of
    ``nsa_attention`` / ``reference_nsa`` (mean compression) and ``seed`` one for drawing the inputs.

    GQA ratios 1 to 16 (3 and 6 too), compression blocks ``l`` from ``d`` to ``2d`` (``l % d != 0`` too). In
    three draws of four (where ``max_len`` leaves room) the last token has at least two selection blocks
    beyond its forced ones and ``num_selected`` leaves it a choice among them, so that scores, not only the
    forced blocks and the ``-1`` padding, decide; the other draws have any ``T`` up to ``max_len`` (half of
    them within one compression block: few or no compressed keys) and ``num_selected`` up to 12, often past
    the blocks there are.
    """
    G = draw(st.sampled_from([1, 2, 3, 4, 6, 16]))
    Hkv = draw(st.integers(1, 2)) if G < 16 else 1
    stride = draw(st.sampled_from([4, 8]))
    block = draw(st.one_of(st.sampled_from([stride, 2 * stride]), st.integers(stride + 1, 2 * stride - 1)))
    num_initial, num_local = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    # Room for the forced blocks and two more: T > (num_initial + num_local + 1) selection blocks.
    roomy = [r for r in (1, 2, 4) if (num_initial + num_local + 1) * stride * r < max_len]
    ranked = bool(roomy) and draw(st.sampled_from([True, True, True, False]))
    sel = stride * draw(st.sampled_from(roomy if ranked else [1, 2, 4]))
    if ranked:
        # Hypothesis favours bounds: counted down from max_len, T is often long (many blocks to choose from).
        T = max_len - draw(st.integers(0, max_len - max(block, (num_initial + num_local + 1) * sel + 1)))
        own = (T - 1) // sel
        forced = len({s for s in [*range(num_initial), *range(own - num_local + 1, own + 1)] if s >= 0})
        num_selected = forced + draw(st.integers(1, own - forced))  # own + 1 - forced to choose from: not all
    else:
        T = draw(st.integers(1, block) | st.integers(1, max_len))
        num_selected = draw(st.integers(1, 12))
    return dict(
        B=draw(st.integers(1, 2)),
        Hq=G * Hkv,
        Hkv=Hkv,
        T=T,
        D=draw(st.sampled_from([4, 8])),
        cfg=dict(
            compress_block_size=block,
            compress_stride=stride,
            selection_block_size=sel,
            num_selected=num_selected,
            num_initial=num_initial,
            num_local=num_local,
            window_size=draw(st.integers(1, 40)),
        ),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout_leaves(seq_len: int, heads: Optional[int], device) -> list[st.SearchStrategy[M.Mask]]:
    """Block-layout patterns for a self-attention sequence of ``seq_len`` tokens."""

    @st.composite
    def pattern(draw):
        bs = draw(st.sampled_from([8, 16, 32, 64]))
        nb = math.ceil(seq_len / bs)
        attention = draw(st.sampled_from(["bidirectional", "unidirectional"]))
        per_head = heads is not None and draw(st.booleans())
        H = heads if per_head else 1
        seed = draw(st.integers(0, 1000))
        kind = draw(st.sampled_from(["fixed", "variable", "bigbird", "longformer", "block_layout"]))
        if kind == "fixed":
            L = draw(st.integers(1, 4))
            G = draw(st.sampled_from([g for g in (1, 2, 4) if L % g == 0]))
            P = draw(st.integers(1, L // G)) if per_head else 1
            horizontal = attention == "bidirectional" and draw(st.booleans())
            return M.fixed(seq_len, bs, L, G, attention, H, per_head, horizontal_global_attention=horizontal,
                           num_different_global_patterns=P, device=device)
        if kind == "variable":
            windows = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
            starts = draw(st.lists(st.integers(0, nb + 1), max_size=3))
            ends = None
            if starts and draw(st.booleans()):
                ends = [s + draw(st.integers(1, 3)) for s in starts]
            horizontal = attention == "bidirectional" and draw(st.booleans())
            return M.variable(seq_len, bs, draw(st.integers(0, min(nb, 3))), windows, starts, attention, seed,
                              global_block_end_indices=ends, horizontal_global_attention=horizontal,
                              num_heads=H, different_layout_per_head=per_head, device=device)
        if kind == "bigbird":
            return M.bigbird(seq_len, bs, draw(st.integers(0, min(nb, 3))), draw(st.integers(1, min(nb, 5))),
                             draw(st.integers(0, min(nb, 2))), attention, H, per_head, seed, device=device)
        if kind == "longformer":
            starts = draw(st.lists(st.integers(0, nb + 1), max_size=3))
            return M.longformer(seq_len, bs, draw(st.integers(1, min(nb, 5))), starts, attention, device=device)
        gen = torch.Generator().manual_seed(seed)
        density = draw(st.sampled_from([0.1, 0.5, 0.9]))
        lay = torch.rand((H, nb, nb) if per_head else (nb, nb), generator=gen) < density
        return M.block_layout(lay.to(device or "cpu"), bs)

    return [pattern()]


def masks(
    seq_len: Optional[int] = None,
    *,
    batch: Optional[int] = None,
    heads: Optional[int] = None,
    layouts: bool = True,
    max_leaves: int = 4,
    device: Union[str, torch.device, None] = None,
) -> st.SearchStrategy[M.Mask]:
    """Random :class:`~nsa_flex.masks.Mask` compositions (``&``, ``|``, ``~``) of the generators.

    Without ``seq_len`` only length-independent generators are used, so the mask is defined for any
    ``(q_len, kv_len)``. With ``seq_len`` the mask may also use data sized for it (``document`` ids, the image
    of ``neighborhood``; block layouts, which need ``q_len == kv_len == seq_len``). ``batch`` adds per-sequence
    masks (``prefix_lm`` with a length per sequence, ``document`` with ``[B, T]`` ids; with ``heads`` also
    ``fine_selection``), ``heads`` adds per-head masks (per-head layouts, ``fine_selection`` with a GQA group);
    the result is then defined for exactly that batch / that many heads when it uses them. ``device`` is where the data-dependent masks keep
    their tensors (``"cuda"`` for compiled kernels); default CPU.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    leaves: list[st.SearchStrategy[M.Mask]] = [
        st.just(M.causal()),
        st.just(M.full()),
        st.integers(1, 80).map(M.sliding_window),
        st.integers(1, 70).map(M.chunked),
        st.builds(M.dilated, st.integers(1, 10), st.integers(1, 6)),
        st.integers(1, 20).map(M.global_tokens),
        st.integers(0, 100).map(M.prefix_lm),
        st.integers(1, 5).flatmap(
            lambda d: st.integers(d, 4 * d).map(lambda l: M.compressed_causal(block_size=l, stride=d))
        ),
    ]
    if batch is not None:
        leaves.append(
            st.integers(0, 2**31 - 1).map(
                lambda s: M.prefix_lm(
                    torch.randint(0, 120, (batch,), generator=torch.Generator().manual_seed(s)).to(dev)
                )
            )
        )
    if seq_len is not None:
        leaves.append(_document(seq_len, None, dev))
        leaves.append(neighborhoods(seq_len))
        if batch is not None:
            leaves.append(_document(seq_len, batch, dev))
        if layouts:
            leaves.extend(_layout_leaves(seq_len, heads, dev))
        if batch is not None and heads is not None:
            leaves.append(_selection(seq_len, batch, heads, dev))

    base = st.one_of(*leaves)

    def extend(children: st.SearchStrategy[M.Mask]) -> st.SearchStrategy[M.Mask]:
        return st.one_of(
            st.tuples(children, children).map(lambda ab: ab[0] & ab[1]),
            st.tuples(children, children).map(lambda ab: ab[0] | ab[1]),
            children.map(lambda a: ~a),
        )

    return st.recursive(base, extend, max_leaves=max_leaves)


@st.composite
def neighborhoods(draw, num_tokens: int) -> M.Mask:
    """``neighborhood`` over an image with a pixel for each of ``num_tokens`` tokens (up to two rows to spare),
    any width up to 32, any dilation and window that fit (no dilation half the time)."""
    W = draw(st.integers(1, 32))
    H = -(-num_tokens // W) + draw(st.integers(0, 2))
    dh, dw = draw(st.just((1, 1)) | st.tuples(st.integers(1, H), st.integers(1, W)))
    kernel = (draw(st.integers(1, H // dh)), draw(st.integers(1, W // dw)))
    return M.neighborhood(H, W, kernel, (dh, dw))


def _document(seq_len: int, batch: Optional[int], device) -> st.SearchStrategy[M.Mask]:
    """``document`` with sorted ids (packed sequences) of ``seq_len`` tokens, ``[T]`` or ``[batch, T]``."""

    @st.composite
    def document(draw):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        num_docs = draw(st.integers(1, 6))
        shape = (seq_len,) if batch is None else (batch, seq_len)
        ids = torch.randint(0, num_docs, shape, generator=gen).sort(dim=-1).values
        return M.document(ids.to(device))

    return document()


def _selection(seq_len: int, batch: int, heads: int, device) -> st.SearchStrategy[M.Mask]:
    @st.composite
    def selection(draw):
        group = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
        bs = draw(st.sampled_from([16, 32, 64]))
        n = draw(st.integers(1, 4))
        idx = draw(block_indices(batch, heads // group, seq_len, n, math.ceil(seq_len / bs)))
        return M.fine_selection(idx.to(device), block_size=bs, group_size=group)

    return selection()
