"""NSA block selection (paper eq. 8-10): score selection blocks from compressed-attention probabilities, top-n.

For token ``t`` and kv head ``h``:

* ``p[c]`` = compressed-attention probability of compressed key ``c``, summed over the ``G`` query heads of ``h``;
* selection block ``s`` (tokens ``[s*l', (s+1)*l')``) scores ``sum_c p[c] * |[c*d, c*d+l) ∩ [s*l', (s+1)*l')|``;
* blocks after ``t``'s block are excluded;
* forced blocks come first and count toward ``n``: the ``num_initial`` first blocks, then ``t``'s block, then the
  ``num_local - 1`` blocks before it (truncated to ``n``); the rest are the highest scores, ties toward the lower
  block index; fewer than ``n`` available blocks are padded with ``-1``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import attention_scale, check_qkv, positive_int, tensor
from ..masks.compressed import check_compression
from . import block_topk
from .flex import RECOMPILE_LIMIT

# Bound on the [B, Hq, chunk, Tc] logits tile scored at once (256 MiB in float32). Smaller tiles mean more
# chunks, and at 16k tokens 32 chunks were bound by per-chunk launch overhead (26 ms for 10 ms of kernels).
_TILE_ELEMENTS = 1 << 26
# float32 scores are ranked as int64 keys (score bits << INDEX_BITS | reversed block index): one exact top-k
# with ties toward the lower block, instead of a stable sort of every block.
_INDEX_BITS, _FORCED_KEY = block_topk.INDEX_BITS, block_topk.FORCED_KEY


def check_selection(block_size: int, stride: int, selection_block_size: int, num_selected: int,
                    num_initial: int, num_local: int) -> None:
    """Validate an NSA selection configuration (ValueError/TypeError naming the argument)."""
    check_band(block_size, stride, selection_block_size)
    positive_int("num_selected", num_selected)
    positive_int("num_initial", num_initial, minimum=0)
    positive_int("num_local", num_local, minimum=0)


def check_band(block_size: int, stride: int, selection_block_size: int) -> None:
    """Validate the sizes that fix the overlap band (:func:`overlap_pattern`): a compression, and selection
    blocks that are whole multiples of its stride."""
    check_compression(block_size, stride)
    positive_int("selection_block_size", selection_block_size)
    if selection_block_size % stride:
        raise ValueError(
            f"selection_block_size must be a multiple of the compression stride, got "
            f"selection_block_size={selection_block_size}, stride={stride}"
        )


def overlap_weights(num_cmp: int, num_sel: int, block_size: int, stride: int, selection_block_size: int,
                    device: Union[str, torch.device, None] = None,
                    dtype: torch.dtype = torch.float32) -> Float[Tensor, "Tc S"]:
    """``W[c, s]`` = number of tokens compressed block ``c`` shares with selection block ``s``."""
    check_compression(block_size, stride)
    positive_int("selection_block_size", selection_block_size)
    positive_int("num_cmp", num_cmp, minimum=0)
    positive_int("num_sel", num_sel, minimum=0)
    c = torch.arange(num_cmp, device=device).view(-1, 1)
    s = torch.arange(num_sel, device=device).view(1, -1)
    lo = torch.maximum(c * stride, s * selection_block_size)
    hi = torch.minimum(c * stride + block_size, (s + 1) * selection_block_size)
    return (hi - lo).clamp(min=0).to(dtype)


def overlap_pattern(block_size: int, stride: int, selection_block_size: int,
                    device: Union[str, torch.device, None] = None,
                    dtype: torch.dtype = torch.float32) -> Float[Tensor, "m"]:
    """``W`` of :func:`overlap_weights` is banded and shift-invariant: ``W[s*r + j - L, s] = w[j]``.

    ``r = selection_block_size // stride`` compressed blocks start in each selection block and the ``L =
    ceil(block_size / stride) - 1`` before them reach into it, so ``m = r + L`` weights describe all of ``W``.
    """
    check_band(block_size, stride, selection_block_size)
    r, L = block_topk.band(block_size, stride, selection_block_size)
    start = (torch.arange(r + L, device=device) - L) * stride  # first token of each compressed block, from s*l'
    lo, hi = start.clamp(min=0), (start + block_size).clamp(max=selection_block_size)
    return (hi - lo).clamp(min=0).to(dtype)


def static_overlap_pattern(block_size: int, stride: int, selection_block_size: int, device: torch.device,
                           dtype: torch.dtype) -> Float[Tensor, "m"]:
    """:func:`overlap_pattern`, built once per configuration, device and dtype (a constant of the model, which
    otherwise cost about ten tiny kernel launches a call). Built afresh, never cached, while torch.compile traces
    (the value belongs in the graph) or a CUDA graph captures (capture records kernels without running them)."""
    device = torch.device(device)
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return overlap_pattern(block_size, stride, selection_block_size, device, dtype)
    return _cached_overlap_pattern(block_size, stride, selection_block_size, device, dtype)


@functools.lru_cache(maxsize=64, typed=True)  # typed: 8.0 must not hit 8's entry, past overlap_pattern's checks
def _cached_overlap_pattern(block_size: int, stride: int, selection_block_size: int, device: torch.device,
                            dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False):  # a plain tensor, usable by later training steps whatever the first call ran in
        return overlap_pattern(block_size, stride, selection_block_size, device, dtype)


def forced_rank(q_pos: Tensor, num_sel: int, selection_block_size: int, num_initial: int, num_local: int) -> Tensor:
    """``rank[t, s]``: position of block ``s`` in ``t``'s forced list (initial, own, previous), else a large value."""
    K = num_initial + num_local
    own = (q_pos // selection_block_size).view(-1, 1)
    candidates = [torch.full_like(own, i) for i in range(num_initial)]
    candidates += [own - i for i in range(num_local)]
    rank = torch.full((q_pos.numel(), num_sel), K, dtype=torch.long, device=q_pos.device)
    for r, block in enumerate(candidates):
        ok = (block >= 0) & (block <= own) & (block < num_sel)
        src = torch.where(ok, torch.full_like(block, r), torch.full_like(block, K))
        rank.scatter_reduce_(1, block.clamp(0, num_sel - 1), src, reduce="amin")
    return rank


@torch.no_grad()
def select_blocks(
    q: Float[Tensor, "B Hq T D"],
    k_cmp: Float[Tensor, "B Hkv Tc D"],
    block_size: int,
    stride: int,
    selection_block_size: int,
    num_selected: int,
    num_initial: int = 1,
    num_local: int = 2,
    scale: Optional[float] = None,
    lse: Optional[Float[Tensor, "B Hq T"]] = None,
) -> Int[Tensor, "B Hkv T n"]:
    """Top-``num_selected`` selection blocks per token and kv head (see module docstring); int64, ``-1`` padded.

    ``lse``, the compressed branch's log-sum-exp, saves recomputing the softmax normalizer when given. On CUDA
    with ``lse`` given (``l'/d`` a power of two as in the paper, ``Tc > 0``) one fused Triton kernel scores
    and ranks (:mod:`.block_topk`; its :func:`~.block_topk.supported` lists the configurations): memory is the
    output and a scratch row per program, both linear in ``T``. Otherwise it works a chunk of queries at a
    time: memory ``O(chunk * Tc)`` per head, never ``[B, Hq, T, Tc]``.
    """
    B, Hq, Hkv, T = check_qkv(q, k_cmp, k_cmp, same_length=False)
    check_selection(block_size, stride, selection_block_size, num_selected, num_initial, num_local)
    if lse is not None:
        tensor("lse", lse, floating=True, shape=(B, Hq, T))
    S = math.ceil(T / selection_block_size)
    if S >= 1 << _INDEX_BITS:
        raise ValueError(f"at most {(1 << _INDEX_BITS) - 1} selection blocks are supported, got {S}")
    scale = attention_scale(scale, q.shape[-1])
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = static_overlap_pattern(block_size, stride, selection_block_size, q.device, work)
    Tc = k_cmp.shape[2]
    if lse is not None and Tc and block_topk.supported(q, block_size, stride, selection_block_size, num_selected):
        return block_topk.block_topk(q, k_cmp, lse.to(torch.float32), w, scale, block_size, stride,
                                     selection_block_size, num_selected, num_initial, num_local)
    config = (block_size, stride, selection_block_size, num_selected, num_initial, num_local, S)
    compiled = q.is_cuda and Tc > 0 and not torch.compiler.is_compiling()
    choose = _compiled_choose() if compiled else _choose
    out = torch.full((B, Hkv, T, num_selected), -1, dtype=torch.long, device=q.device)
    chunk = max(1, min(T, _TILE_ELEMENTS // max(1, B * Hq * max(Tc, S))))
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        logits = _logits(q[:, :, start:stop], k_cmp, work)
        chunk_lse = None if lse is None else lse[:, :, start:stop].view(B, Hkv, -1, stop - start).to(work)
        pos = torch.arange(start, stop, device=q.device)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if compiled else contextlib.nullcontext():
            top = choose(logits, chunk_lse, pos, w, scale, *config)
        out[:, :, start:stop, : top.shape[-1]] = top
    return out


def _logits(q: Tensor, k_cmp: Tensor, work: torch.dtype) -> Float[Tensor, "B Hkv G C Tc"]:
    """Unscaled ``q . k_cmp`` in ``work`` precision, for each of the ``G`` query heads of a kv head.

    Half-precision CUDA inputs multiply on tensor cores with float32 accumulation and output (exact products,
    like a fused kernel's ``dot``); upcasting first would run a float32 GEMM without tensor cores, 10x slower.
    """
    B, Hq, C, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B * Hkv, G * C, D)
    kt = k_cmp.reshape(B * Hkv, Tc, D).transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):  # bmm(out_dtype=) is CUDA-only
        logits = torch.bmm(qg, kt, out_dtype=work)
    else:
        logits = torch.bmm(qg.to(work), kt.to(work))
    return logits.view(B, Hkv, G, C, Tc)


def _choose(logits: Tensor, lse: Optional[Tensor], pos: Tensor, w: Tensor, scale: float, block_size: int,
            stride: int, selection_block_size: int, n: int, num_initial: int, num_local: int, S: int) -> Tensor:
    """Top-``n`` blocks ``[B, Hkv, C, <=n]`` (-1 padded) of a chunk of queries at positions ``pos``, from logits."""
    Tc = logits.shape[-1]
    logits = logits * scale
    visible = torch.arange(Tc, device=pos.device) * stride + (block_size - 1) <= pos.view(-1, 1)
    logits = logits.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = logits.logsumexp(dim=-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows seeing nothing: all p = 0
    p = torch.exp(logits - lse.unsqueeze(-1)).sum(dim=2)  # [B, Hkv, C, Tc], summed over the group
    scores = block_scores(p, w, selection_block_size // stride, S)
    return top_blocks(scores, pos, n, selection_block_size, num_initial, num_local, logits.shape[2] * block_size)


def block_scores(p: Float[Tensor, "... Tc"], w: Float[Tensor, "m"], r: int, S: int) -> Float[Tensor, "... S"]:
    """``scores[s] = sum_c p[c] W[c, s] = sum_j w[j] p[s*r + j - L]`` (``w`` from :func:`overlap_pattern`).

    ``p`` holds the compressed-attention probabilities of each query, summed over its kv head's group; ``r``
    is ``selection_block_size // stride``. Windows of ``m = w.numel()`` blocks, ``r`` apart.
    """
    m = w.numel()
    p = torch.nn.functional.pad(p, (m - r, S * r - p.shape[-1]))  # a negative pad drops slots past the last block
    return (p.unfold(-1, m, r) * w).sum(-1)


def top_blocks(scores: Float[Tensor, "... T S"], pos: Tensor, n: int, selection_block_size: int, num_initial: int,
               num_local: int, score_bound: float) -> Int[Tensor, "... T k"]:
    """The ``k = min(n, S)`` chosen blocks of each query (module docstring), ``-1`` where fewer are available.

    ``pos`` (query positions) broadcasts against ``scores.shape[:-1]``; ``score_bound`` exceeds every score.
    """
    S = scores.shape[-1]
    K = num_initial + num_local
    rank = forced_rank(pos.reshape(-1), S, selection_block_size, num_initial, num_local).view(*pos.shape, S)
    s = torch.arange(S, device=scores.device)
    later = s > (pos // selection_block_size).unsqueeze(-1)  # causal: blocks after the query's own
    n = min(n, S)
    if scores.dtype == torch.float32:
        key = (scores.view(torch.int32).long() << _INDEX_BITS) | (S - 1 - s)  # scores >= 0: bits keep order
        key = torch.where(rank < K, _FORCED_KEY + (K - rank), torch.where(later, -1, key))
        values, top = key.topk(n, dim=-1)
    else:  # float64 scores have no spare bits: a stable sort keeps ties toward the lower block
        big = float(score_bound + 1)
        key = torch.where(rank < K, big + (K - rank).to(scores.dtype), torch.where(later, -1.0, scores))
        values, top = key.sort(dim=-1, descending=True, stable=True)
        values, top = values[..., :n], top[..., :n]
    return torch.where(values >= 0, top, -1)


@functools.lru_cache(maxsize=None)
def _compiled_choose() -> Callable:
    # One fused kernel for the elementwise chain over the [B, Hkv, G, C, Tc] logits (eagerly, each step reads
    # and writes the whole tile). Two static shapes per sequence length (full chunks and the last one), under
    # the package's recompile limit; past it dynamo runs this eagerly: slower, same memory, never T x T.
    return torch.compile(_choose, dynamic=False)
