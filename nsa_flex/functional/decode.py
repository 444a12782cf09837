"""NSA decoding: attention of a few new tokens over a KV cache, reading only what they attend to (never ``T x T``).

For each new query at absolute position ``t`` (per sequence, so a batch may hold sequences of different
lengths) :func:`nsa_decode` computes exactly what :func:`nsa_attention` computes at row ``t`` of the full
sequence:

* compressed branch: softmax over the cached compressed keys ``c`` with ``c*d + l - 1 <= t``;
* block scoring + top-n from those probabilities with :func:`select_blocks`' semantics (overlap weights, forced
  initial/own/previous blocks first, blocks after ``t``'s excluded, ties toward the lower index, ``-1`` padding);
* selected branch: the chosen blocks' keys ``j <= t``;
* window branch: the ``w`` keys ``t - w < j <= t``;
* gating ``g_cmp * o_cmp + g_sel * o_sel + g_win * o_win``.

On CUDA the branches' attention and the block choice run in the Triton kernels of :mod:`.fused_decode`
(keys read in place from the cache); elsewhere torch ops gather the keys. Either way the shapes are fixed by
the cache size (no data-dependent shapes, no host syncs), so a step can be captured in a CUDA graph
(``TransformerLM.generate`` does; :func:`compiled_nsa_decode` wraps it in
``torch.compile(mode="reduce-overhead")`` on CUDA). :func:`update_compressed` appends the compressed keys of
blocks that the new tokens complete; :func:`cached_attention` is the dense / sliding-window decode step.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import attention_scale, block_and_stride, index_range, number, positive_int, tensor
from . import cache_update, fused_decode
from .selection import block_scores, check_selection, static_overlap_pattern, top_blocks

__all__ = ["append_to_cache", "cached_attention", "compiled_nsa_decode", "nsa_decode", "rotary_at", "update_compressed",
           "write_cache"]


def rotary_at(x: Float[Tensor, "B H T D"], positions: Int[Tensor, "B T"], base: float = 10000.0) -> Tensor:
    """RoPE of :func:`nsa_flex.modules.rotary.apply_rotary` ("rotate half"), at per-sequence positions.

    ``positions [B, T]`` (or ``[B, H, T]``, integer) gives each row's absolute position; the arithmetic is the same
    as ``apply_rotary``'s (angles ``float(p) * base**(-2i/D)`` in float32, float64 for float64 input). ``D`` must
    be even and ``base > 1`` (``RotaryEmbedding``'s conditions).
    """
    B, H, T, D = tensor("x", x, ndim=4, floating=True).shape
    if D % 2:
        raise ValueError(f"x must have an even head dim (RoPE pairs features i and i + D/2), got shape {list(x.shape)}")
    # exact shapes: a [1, T] position tensor broadcast over B sequences would give them all the same positions
    tensor("positions", positions, integer=True)
    tensor("positions", positions, shape=(B, H, T) if positions.ndim == 3 else (B, T))
    number("base", base, greater_than=1)
    work = _work_dtype(x.dtype)
    inv_freq = rotary_frequencies(D, base, x.device, work)
    pos = positions.to(work)
    if pos.ndim == 2:  # [B, T] -> [B, 1, T]
        pos = pos.unsqueeze(1)
    angles = pos.unsqueeze(-1) * inv_freq  # [B, 1 or H, T, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_frequencies(D: int, base: float, device=None, dtype=torch.float32) -> Float[Tensor, "D2"]:
    """``base ** (-2i / D)`` for ``i < D/2``: the angle of position ``p`` in pair ``i`` is ``p * inv_freq[i]``."""
    return base ** (-torch.arange(0, D, 2, device=device, dtype=dtype) / D)


@functools.lru_cache(maxsize=None)
def _frequencies(D: int, base: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`rotary_frequencies`, made once (a cache write outside a compiled graph would recompute them)."""
    return rotary_frequencies(D, base, device, dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of rotary arithmetic for ``dtype`` tensors (:func:`rotary_at`'s)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(cache: Tensor, idx: Tensor) -> Tensor:
    """``cache [B, H, L, D]``, ``idx [B, H or 1, T, K]`` (valid, in range) -> ``[B, H, T, K, D]``."""
    B, H, L, D = cache.shape
    idx = idx.expand(B, H, *idx.shape[2:])
    flat = idx.reshape(B, H, -1, 1).expand(-1, -1, -1, D)
    return cache.gather(2, flat).view(B, H, idx.shape[2], idx.shape[3], D)


def _masked_softmax(logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim of the ``valid`` entries; rows with none give ``p = 0`` and ``lse = -inf``."""
    logits = logits.masked_fill(~valid, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    s = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(s > 0, s, torch.ones_like(s))
    return p, (s.log() + m).squeeze(-1)


def _check_positions(positions: Tensor, B: int, T: int, L: Optional[int] = None) -> None:
    """``positions [B, T]``, integer; with the cache length ``L``, also in ``[0, L)``, but only where that costs no
    host sync: on CPU tensors outside a compiled graph (a decode step's positions live on the GPU, where the
    callers' caches check room on the host instead)."""
    tensor("positions", positions, ndim=2, integer=True, shape=(B, T))
    if L is not None:
        index_range("positions", positions, L, "the cache's length")


def cached_attention(
    q: Float[Tensor, "B Hq T D"],
    k_cache: Float[Tensor, "B Hkv L D"],
    v_cache: Float[Tensor, "B Hkv L Dv"],
    positions: Int[Tensor, "B T"],
    window_size: Optional[int] = None,
    scale: Optional[float] = None,
) -> Float[Tensor, "B Hq T Dv"]:
    """Causal (``window_size=None``) or sliding-window attention of new queries over a KV cache.

    Query ``(b, i)`` sits at ``positions[b, i]`` and sees cached keys ``j <= t`` (and ``j > t - w`` with a
    window). The cache must already hold the new tokens' keys. Dense: one masked pass over all ``L`` slots;
    window: ``w`` gathered keys.

    Positions must lie in ``[0, L)``. That is checked (ValueError) for CPU tensors only: on CUDA the check would
    need a host sync in every decode step (the modules' caches check room on the host before writing). There a
    negative position sees no key and gives zeros, and one ``>= L`` gives a meaningless row (dense: that of
    ``L - 1``; window: the last slot read in place of the missing keys).
    """
    B, Hq, T, D = tensor("q", q, ndim=4, floating=True).shape
    tensor("k_cache", k_cache, ndim=4, floating=True, shape=(B, None, None, D))
    tensor("v_cache", v_cache, ndim=4, floating=True, shape=(B, k_cache.shape[1], k_cache.shape[2], None))
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    _check_positions(positions, B, T, L)
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads, got Hq={Hq}, Hkv={Hkv}")
    G = Hq // Hkv
    scale = attention_scale(scale, D)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.view(B, Hkv, G, T, D)  # matmuls in the input dtype, softmax in fp32 (fp64 for fp64)
    if window_size is None:
        logits = torch.einsum("bhgtd,bhld->bhgtl", qg, k_cache).to(work) * scale
        j = torch.arange(L, device=q.device)
        valid = (j.view(1, 1, -1) <= positions.unsqueeze(-1)).view(B, 1, 1, T, L)
        p, _ = _masked_softmax(logits, valid)
        out = torch.einsum("bhgtl,bhld->bhgtd", p.to(v_cache.dtype), v_cache)
    else:
        positive_int("window_size", window_size)
        tok = positions.unsqueeze(-1) - window_size + 1 + torch.arange(window_size, device=q.device)
        valid = (tok >= 0).view(B, 1, 1, T, window_size)
        idx = tok.clamp(0, L - 1).unsqueeze(1)
        k, v = _gather(k_cache, idx), _gather(v_cache, idx)
        logits = torch.einsum("bhgtd,bhtkd->bhgtk", qg, k).to(work) * scale
        p, _ = _masked_softmax(logits, valid)
        out = torch.einsum("bhgtk,bhtkd->bhgtd", p.to(v.dtype), v)
    return out.reshape(B, Hq, T, -1).to(q.dtype)


def nsa_decode(
    q: Float[Tensor, "B Hq T D"],
    k_cache: Float[Tensor, "B Hkv L D"],
    v_cache: Float[Tensor, "B Hkv L Dv"],
    k_cmp: Float[Tensor, "B Hkv C D"],
    v_cmp: Float[Tensor, "B Hkv C Dv"],
    positions: Int[Tensor, "B T"],
    gates: Float[Tensor, "B Hq T 3"],
    compress_block_size: int = 32,
    compress_stride: int = 16,
    selection_block_size: int = 64,
    num_selected: int = 16,
    num_initial: int = 1,
    num_local: int = 2,
    window_size: int = 512,
    scale: Optional[float] = None,
    rotary_base: Optional[float] = None,
    return_branches: bool = False,
    use_kernel: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, dict]]:
    """NSA output of ``T`` new queries (a few; typically 1) over a cache (module docstring).

    Args:
        q: new queries, position-free (as :func:`nsa_attention`'s ``q``), ``[B, Hq, T, D]``.
        k_cache, v_cache: cached keys and values ``[B, Hkv, L, D]``, the keys as the selected and window
            branches attend with them: rotated at their positions with ``rotary_base`` (what
            ``write_cache(..., rotary_base=...)`` stores), else position-free. Slots ``<= t`` must be filled
            for every query ``t`` (including the new tokens' own). Slots beyond are ignored.
        k_cmp, v_cmp: cached compressed keys/values ``[B, Hkv, C, D]``; slot ``c`` must hold block ``c`` for
            every ``c`` with ``c*d + l - 1 <= t``; others are ignored (any finite value).
        positions: absolute position of each query, ``[B, T]`` (int), in ``[0, L)``: checked (ValueError) for
            CPU tensors only, as in :func:`cached_attention` (on CUDA the check would need a host sync every
            step). Outside that range the output is meaningless, not an error (a negative position sees no key;
            one ``>= L`` sees the whole cache, the scratch compressed slot included).
        gates: ``[B, Hq, T, 3]`` in the order (compressed, selected, window).
        rotary_base: if given, the selected and window branches use RoPE (this base): ``q`` is rotated at
            its positions and ``k_cache`` holds rotated keys, like ``nsa_attention(..., fine_qk=rotary(q, k))``.
        return_branches: also return ``{"compressed", "selected", "window", "block_indices"}``.
        use_kernel: ``None`` (default) runs the attention of the three branches in the fused Triton kernels
            of :mod:`.fused_decode` where they apply (CUDA, see its ``supported``), else gathers keys with
            torch ops; ``False`` always gathers; ``True`` always takes the kernels (they also run under
            Triton's interpreter on CPU tensors, which the tests use). Block choices are the same code either way.

    Returns ``o [B, Hq, T, Dv]`` (or ``(o, branches)``); ``block_indices [B, Hkv, T, n]`` equal
    :func:`select_blocks` on the full sequence at those rows (order within ``n`` aside).
    """
    B, Hq, T, D = tensor("q", q, ndim=4, floating=True).shape
    tensor("k_cache", k_cache, ndim=4, floating=True, shape=(B, None, None, D))
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    tensor("v_cache", v_cache, ndim=4, floating=True, shape=(B, Hkv, L, None))
    Dv = v_cache.shape[-1]
    tensor("k_cmp", k_cmp, ndim=4, floating=True, shape=(B, Hkv, None, D))
    tensor("v_cmp", v_cmp, ndim=4, floating=True, shape=(B, Hkv, k_cmp.shape[2], Dv))
    _check_positions(positions, B, T, L)
    tensor("gates", gates, ndim=4, floating=True, shape=(B, Hq, T, 3))
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    check_selection(compress_block_size, compress_stride, selection_block_size, num_selected, num_initial, num_local)
    positive_int("window_size", window_size)
    if rotary_base is not None:
        number("rotary_base", rotary_base, greater_than=1)
        if D % 2:
            raise ValueError(f"rotary_base needs an even head dim, got q of shape {list(q.shape)}")
    l, d, ls, n = compress_block_size, compress_stride, selection_block_size, num_selected
    G, C = Hq // Hkv, k_cmp.shape[2]
    S = math.ceil(L / ls)
    scale = attention_scale(scale, D)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    qg = q.view(B, Hkv, G, T, D)  # matmuls in the input dtype (fp32 accumulation on GPU), softmax in fp32
    pos = positions.to(torch.long)

    if use_kernel is None:
        use_kernel = fused_decode.supported(q, k_cache, ls)
    elif use_kernel and fused_decode.triton is None:
        raise ValueError("use_kernel=True needs triton (pip install triton), which is not importable")
    elif use_kernel and fused_decode.unsupported(q, k_cache, ls):
        raise ValueError(f"use_kernel=True: {fused_decode.unsupported(q, k_cache, ls)}")
    # On CUDA the kernels go through their custom ops, which torch.compile traces; elsewhere (Triton's
    # interpreter) they are launched directly.
    kernels = use_kernel and q.is_cuda

    def compressed_visible() -> Tensor:
        """``[B, 1, 1, T, C]``: the compressed branch sees the cached compressed keys ``c*d + l - 1 <= t``."""
        c = torch.arange(C, device=dev)
        return (c.view(1, 1, -1) * d + (l - 1) <= pos.unsqueeze(-1)).view(B, 1, 1, T, C)

    S_all = max(S, 1)

    def rank_blocks(p_cmp: Tensor) -> Tensor:
        """Block choices exactly as select_blocks: banded overlap sums of the group's probabilities, then
        top-n (the torch ranking; the kernels' choose_blocks is the same)."""
        scores = block_scores(p_cmp.sum(dim=2), static_overlap_pattern(l, d, ls, dev, work), ls // d, S_all)
        chosen = top_blocks(scores, pos.view(B, 1, T), n, ls, num_initial, num_local, G * l)
        if chosen.shape[-1] < n:
            chosen = torch.cat([chosen, chosen.new_full((B, Hkv, T, n - S_all), -1)], dim=-1)
        return chosen

    if use_kernel:
        # Split partials of the compressed keys; block choice from their logits; the selected blocks and window
        # tiles as the splits of one kernel; one kernel merges and gates.
        op = lambda name: getattr(fused_decode, name + ("_op" if kernels else ""))  # noqa: E731
        logits, m_cmp, lsum_cmp, acc_cmp = op("compressed_partials")(q, k_cmp, v_cmp, pos, scale, l, d)
        if S_all <= fused_decode.MAX_BLOCKS:
            block_indices = op("choose_blocks")(logits, m_cmp, lsum_cmp, pos, S_all, l, d, ls, n, num_initial,
                                                num_local)
        else:
            _, lse = fused_decode.merge(m_cmp, lsum_cmp, acc_cmp)
            p_cmp = torch.exp(logits - lse.transpose(2, 3).unsqueeze(-1))
            block_indices = rank_blocks(torch.where(compressed_visible(), p_cmp, 0.0))
        # q is rotated in the kernel (an inductor kernel took 5 us for it at batch 16)
        inv_freq = None if rotary_base is None else rotary_frequencies(D, rotary_base, dev)
        m_sp, lsum_sp, acc_sp = op("sparse_partials")(q, k_cache, v_cache, pos, block_indices, inv_freq, scale, ls,
                                                      window_size)
        ns = math.ceil(n / fused_decode.sparse_tiles_per_split(B * Hkv * T, n, window_size, ls))  # selected splits
        out = op("combine")(m_cmp, lsum_cmp, acc_cmp, m_sp, lsum_sp, acc_sp, gates, ns).to(q.dtype)
        if not return_branches:
            return out
        # The branches for inspection, merged again in torch ([B, Hkv, T, G, Dv] -> [B, Hq, T, Dv]).
        parts = {"compressed": (m_cmp, lsum_cmp, acc_cmp), "selected": (m_sp[..., :ns, :], lsum_sp[..., :ns, :],
                 acc_sp[..., :ns, :, :]), "window": (m_sp[..., ns:, :], lsum_sp[..., ns:, :], acc_sp[..., ns:, :, :])}
        branches = {name: fused_decode.merge(*x)[0].transpose(2, 3).reshape(B, Hq, T, Dv).to(q.dtype)
                    for name, x in parts.items()}
        branches["block_indices"] = block_indices
        return out, branches

    logits = torch.einsum("bhgtd,bhcd->bhgtc", qg, k_cmp).to(work) * scale
    p_cmp, _ = _masked_softmax(logits, compressed_visible())
    o_cmp = torch.einsum("bhgtc,bhcd->bhgtd", p_cmp.to(v_cmp.dtype), v_cmp).to(work)
    block_indices = rank_blocks(p_cmp)
    q_fine = (q if rotary_base is None else rotary_at(q, pos, rotary_base)).view(B, Hkv, G, T, D)

    def fine(tok: Tensor, valid: Tensor) -> Tensor:
        """Attention over gathered key slots ``tok [B, Hkv or 1, T, K]`` (``valid`` same shape)."""
        idx = tok.clamp(0, L - 1)
        k, v = _gather(k_cache, idx), _gather(v_cache, idx)
        lg = torch.einsum("bhgtd,bhtkd->bhgtk", q_fine, k).to(work) * scale
        p, _ = _masked_softmax(lg, valid.unsqueeze(2))
        return torch.einsum("bhgtk,bhtkd->bhgtd", p.to(v.dtype), v).to(work)

    # Selected branch: the n blocks' tokens j <= t.
    tok = (block_indices.unsqueeze(-1) * ls + torch.arange(ls, device=dev)).flatten(-2)  # [B, Hkv, T, n*ls]
    valid = ((block_indices.unsqueeze(-1) >= 0).expand(-1, -1, -1, -1, ls).flatten(-2)
             & (tok <= pos.view(B, 1, T, 1)))
    o_sel = fine(tok, valid)

    # Window branch: t - w < j <= t.
    tok = (pos.unsqueeze(-1) - window_size + 1 + torch.arange(window_size, device=dev)).unsqueeze(1)
    o_win = fine(tok, tok >= 0)

    g = gates.to(work).view(B, Hkv, G, T, 3)
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win
    out = out.reshape(B, Hq, T, Dv).to(q.dtype)
    if return_branches:
        branches = {name: x.reshape(B, Hq, T, Dv).to(q.dtype)
                    for name, x in (("compressed", o_cmp), ("selected", o_sel), ("window", o_win))}
        branches["block_indices"] = block_indices
        return out, branches
    return out


def _use_cache_kernels(cache: Tensor, use_kernel: Optional[bool]) -> bool:
    if use_kernel is None:
        return cache_update.supported(cache)
    if use_kernel and cache_update.triton is None:
        raise ValueError("use_kernel=True needs triton (pip install triton), which is not importable")
    return use_kernel


def write_cache(
    k_cache: Float[Tensor, "B Hkv L D"],
    v_cache: Float[Tensor, "B Hkv L Dv"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    positions: Int[Tensor, "B T"],
    use_kernel: Optional[bool] = None,
    rotary_base: Optional[float] = None,
) -> None:
    """In place: store the new tokens' keys and values at their ``positions`` (cast to the cache dtype).

    ``rotary_base``: store the keys rotated at their positions (:func:`rotary_at`'s arithmetic), as
    :func:`nsa_decode` and :func:`cached_attention` read them. ``use_kernel``: ``None`` takes
    :mod:`.cache_update`'s kernel on CUDA (one launch for both, the rotation included), torch ops elsewhere;
    ``True``/``False`` force either. Positions must lie in ``[0, L)`` (the modules' caches check room before
    writing); the check is not repeated here because it would need a host sync (``scatter_`` fails on one
    outside; the kernel skips it rather than write out of bounds).
    """
    _check_write(k_cache, v_cache, k, v, positions, rotary_base)
    _write(k_cache, v_cache, k, v, positions, use_kernel, rotary_base)


def _write(k_cache, v_cache, k, v, positions, use_kernel, rotary_base) -> None:
    """:func:`write_cache` on checked arguments."""
    B, H, T = k.shape[:3]
    if _use_cache_kernels(k_cache, use_kernel):
        cache_update.write_rows(k_cache, v_cache, k, v, positions, _cache_frequencies(k_cache, rotary_base))
        return
    if rotary_base is not None:  # in the cache's precision, as the kernel
        k = rotary_at(k.to(k_cache.dtype), positions, rotary_base)
    idx = positions.view(B, 1, T, 1)
    k_cache.scatter_(2, idx.expand(B, H, T, k_cache.shape[-1]), k.to(k_cache.dtype))
    v_cache.scatter_(2, idx.expand(B, H, T, v_cache.shape[-1]), v.to(v_cache.dtype))


def _check_caches(k_cache, v_cache) -> tuple[int, int, int, int]:
    """``k_cache [B, H, L, D]`` and ``v_cache [B, H, L, Dv]``; returns ``(B, H, L, D)``."""
    B, H, L, D = tensor("k_cache", k_cache, ndim=4, floating=True).shape
    tensor("v_cache", v_cache, ndim=4, floating=True, shape=(B, H, L, None))
    return B, H, L, D


def _check_write(k_cache, v_cache, k, v, positions, rotary_base) -> None:
    B, H, L, D = _check_caches(k_cache, v_cache)
    T = tensor("k", k, ndim=4, floating=True, shape=(B, H, None, D)).shape[2]
    tensor("v", v, ndim=4, floating=True, shape=(B, H, T, v_cache.shape[-1]))
    # in range before either cache is written (a bad position had failed the second scatter after the first)
    _check_positions(positions, B, T, L)
    if rotary_base is not None and D % 2:
        raise ValueError(f"rotary_base needs an even head dim, got k_cache of shape {list(k_cache.shape)}")


def _cache_frequencies(k_cache: Tensor, rotary_base: Optional[float]) -> Optional[Tensor]:
    """The kernels' ``inv_freq`` for rotating keys into ``k_cache`` (None without RoPE)."""
    if rotary_base is None:
        return None
    return _frequencies(k_cache.shape[-1], float(rotary_base), k_cache.device, _work_dtype(k_cache.dtype))


def append_to_cache(
    k_cache: Float[Tensor, "B Hkv L D"],
    v_cache: Float[Tensor, "B Hkv L Dv"],
    k_cmp: Float[Tensor, "B Hkv C1 D"],
    v_cmp: Float[Tensor, "B Hkv C1 Dv"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    positions: Int[Tensor, "B T"],
    k_compress: Union[str, Callable[[Tensor], Tensor]],
    v_compress: Union[str, Callable[[Tensor], Tensor]],
    block_size: int,
    stride: int,
    rotary_base: Optional[float] = None,
    k_ring: Optional[Float[Tensor, "B Hkv l D"]] = None,
    use_kernel: Optional[bool] = None,
) -> None:
    """In place: a decode step's whole cache update, :func:`write_cache` then :func:`update_compressed`.

    ``k, v`` are the new tokens' raw (position-free) keys and values at ``positions`` (consecutive per
    sequence, as a cache hands them out). With ``rotary_base`` the cache holds rotated keys and ``k_ring``
    (required then) the last ``l`` raw ones, which the compressor reads (:func:`update_compressed`). On CUDA
    with both compressors ``"mean"`` all of it is one kernel launch (:func:`.cache_update.append_mean`): a
    decode step's bookkeeping had been four launches, each a few microseconds in a CUDA graph.
    """
    _check_write(k_cache, v_cache, k, v, positions, rotary_base)
    if (rotary_base is None) != (k_ring is None):
        raise ValueError("a cache of rotated keys (rotary_base) needs k_ring, the raw keys for the compressor, and "
                         f"k_ring goes with rotary_base; got rotary_base={rotary_base!r} and "
                         f"k_ring={'None' if k_ring is None else 'a tensor'}")
    _check_compression(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, block_size, stride, k_ring,
                       None if k_ring is None else k)
    if _use_cache_kernels(k_cache, use_kernel) and k_compress == "mean" and v_compress == "mean":
        cache_update.append_mean(k_cache, v_cache, k_cmp, v_cmp, k, v, positions, block_size, stride,
                                 _cache_frequencies(k_cache, rotary_base), k_ring)
        return
    _write(k_cache, v_cache, k, v, positions, use_kernel, rotary_base)
    _update_compressed(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, block_size, stride,
                       use_kernel, k_ring, None if k_ring is None else k)


def _check_compression(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, block_size, stride,
                       k_ring, k_new) -> None:
    """The compression half of a cache update (caches and positions already checked), before any state changes."""
    block_and_stride(block_size, stride)
    B, Hkv, _, D = k_cache.shape
    tensor("k_cmp", k_cmp, ndim=4, floating=True, shape=(B, Hkv, None, D))
    if k_cmp.shape[2] < 1:
        raise ValueError(f"k_cmp needs at least its scratch slot (allocate C + 1 slots), got shape {list(k_cmp.shape)}")
    tensor("v_cmp", v_cmp, ndim=4, floating=True, shape=(B, Hkv, k_cmp.shape[2], v_cache.shape[-1]))
    if (k_ring is None) != (k_new is None):
        raise ValueError("k_ring and k_new go together (the raw keys of a cache of rotated keys), got only "
                         + ("k_ring" if k_new is None else "k_new"))
    if k_ring is not None:
        tensor("k_ring", k_ring, ndim=4, floating=True, shape=(B, Hkv, block_size, D))
        tensor("k_new", k_new, ndim=4, floating=True, shape=(B, Hkv, positions.shape[1], D))
    for name, comp in (("k_compress", k_compress), ("v_compress", v_compress)):
        if isinstance(comp, str) and comp != "mean":
            raise ValueError(f"{name} must be a compressor or \"mean\", got {comp!r}")


def update_compressed(
    k_cache: Float[Tensor, "B Hkv L D"],
    v_cache: Float[Tensor, "B Hkv L Dv"],
    k_cmp: Float[Tensor, "B Hkv C1 D"],
    v_cmp: Float[Tensor, "B Hkv C1 Dv"],
    positions: Int[Tensor, "B T"],
    k_compress: Union[str, Callable[[Tensor], Tensor]],
    v_compress: Union[str, Callable[[Tensor], Tensor]],
    block_size: int,
    stride: int,
    use_kernel: Optional[bool] = None,
    k_ring: Optional[Float[Tensor, "B Hkv l D"]] = None,
    k_new: Optional[Float[Tensor, "B Hkv T D"]] = None,
) -> None:
    """In place: compress every block that the tokens at ``positions`` complete and store it in ``k_cmp, v_cmp``.

    Token ``t`` completes block ``c = (t + 1 - l) / d`` when ``t + 1 >= l`` and ``(t + 1 - l) % d == 0``. The
    block's ``l`` tokens are read from the (already updated) caches and compressed with the compressor's
    ``compress_blocks([B, H, T, l, D])`` (or the compressor itself on each ``[B, H, l, D]``), or averaged for
    ``"mean"`` (:func:`append_to_cache` does the whole step in one launch for ``"mean"``). Rows whose
    token completes nothing write into the last slot of ``k_cmp, v_cmp``, a scratch slot (allocate ``C + 1``),
    so the update has no data-dependent control flow. ``use_kernel`` as in :func:`write_cache`.

    A cache of rotated keys (``write_cache(..., rotary_base=...)``) cannot feed the compressor, which takes
    position-free keys: pass ``k_ring [B, Hkv, l, D]``, the ``l`` raw keys before this step's tokens (token
    ``j`` at slot ``j % l``), and ``k_new``, this step's raw keys (positions consecutive per sequence, as a
    cache hands them out). The key blocks are then cut from those two, and ``k_ring`` moves on to the ``l``
    raw keys ending at the last new token.
    """
    B = _check_caches(k_cache, v_cache)[0]
    tensor("positions", positions, ndim=2, integer=True, shape=(B, None))
    _check_compression(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, block_size, stride, k_ring,
                       k_new)
    _update_compressed(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, block_size, stride,
                       use_kernel, k_ring, k_new)


def _update_compressed(k_cache, v_cache, k_cmp, v_cmp, positions, k_compress, v_compress, l, stride, use_kernel,
                       k_ring, k_new) -> None:
    """:func:`update_compressed` on checked arguments."""
    B, Hkv, L, D = k_cache.shape
    T = positions.shape[1]
    if T == 0:
        return
    kernels = _use_cache_kernels(k_cache, use_kernel)
    if kernels:
        k_blocks, v_blocks = cache_update.completed_blocks(k_cache if k_ring is None else k_ring, v_cache,
                                                           positions, l, k_new)
    else:
        k_blocks, v_blocks = _completed_blocks(k_cache, v_cache, positions, l, k_ring, k_new)
    k_out, v_out = _compress(k_compress, k_blocks), _compress(v_compress, v_blocks)
    if kernels:
        cache_update.store_compressed(k_cmp, v_cmp, k_out, v_out, positions, l, stride)
    else:
        _store_compressed(k_cmp, v_cmp, k_out, v_out, positions, l, stride)
    if k_ring is None:
        return
    if kernels:
        cache_update.write_ring(k_ring, k_new, positions)
        return
    last = min(T, l)  # earlier tokens of a long step would share slots with these
    idx = (positions[:, T - last:] % l).view(B, 1, last, 1).expand(B, Hkv, last, D)
    k_ring.scatter_(2, idx, k_new[:, :, T - last:].to(k_ring.dtype))


def _completed_blocks(k_cache, v_cache, positions, l, k_ring, k_new):
    """Torch ops of :func:`.cache_update.completed_blocks`: ``([B, H, T, l, D], [B, H, T, l, Dv])``."""
    B, T, L = positions.shape[0], positions.shape[1], k_cache.shape[2]
    start = positions.to(torch.long) + 1 - l
    tok = start.clamp(min=0).unsqueeze(-1) + torch.arange(l, device=k_cache.device)  # [B, T, l]
    v_blocks = _gather(v_cache, tok.clamp(max=L - 1).unsqueeze(1))
    if k_ring is None:
        return _gather(k_cache, tok.clamp(max=L - 1).unsqueeze(1)), v_blocks
    first = positions[:, :1].to(torch.long).unsqueeze(-1)  # [B, 1, 1]: the step's first new token
    old = _gather(k_ring, (tok % l).unsqueeze(1))
    fresh = _gather(k_new.to(k_ring.dtype), (tok - first).clamp(0, T - 1).unsqueeze(1))  # as if stored first
    return torch.where((tok >= first).view(B, 1, T, l, 1), fresh, old), v_blocks


def _compress(comp, blocks: Tensor) -> Tensor:
    """``[B, H, T, l, D] -> [B, H, T, D]`` with a compressor, or ``"mean"``."""
    if isinstance(comp, str):
        return blocks.mean(dim=-2)
    if hasattr(comp, "compress_blocks"):
        return comp.compress_blocks(blocks)
    T = blocks.shape[2]
    parts = [comp(blocks[:, :, i]) for i in range(T)]
    return parts[0] if T == 1 else torch.cat(parts, dim=2)  # a cat of one tensor would copy it


def _store_compressed(k_cmp, v_cmp, k_new, v_new, positions, l, stride):
    """Torch ops of :func:`.cache_update.store_compressed`."""
    B, Hkv, T = k_new.shape[:3]
    scratch = k_cmp.shape[2] - 1
    start = positions.to(torch.long) + 1 - l
    complete = (start >= 0) & (start % stride == 0)
    slot = torch.where(complete, torch.div(start, stride, rounding_mode="floor"), scratch).clamp(max=scratch)
    for i in range(T):  # one token at a time: those completing nothing share the scratch slot
        for out, new in ((k_cmp, k_new), (v_cmp, v_new)):
            index = slot[:, i].view(B, 1, 1, 1).expand(B, Hkv, 1, out.shape[-1])
            out.scatter_(2, index, new[:, :, i:i + 1].to(out.dtype))


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable:
    return torch.compile(nsa_decode, mode="reduce-overhead", dynamic=False)


def compiled_nsa_decode() -> Callable:
    """:func:`nsa_decode` under ``torch.compile(mode="reduce-overhead", dynamic=False)`` (CUDA graphs).

    Same arguments. The cache tensors (arguments 2-5) are marked as static addresses, so CUDA graphs read the
    preallocated caches in place instead of copying them into graph-owned buffers every step. The callers keep
    every host-side check (cache bounds) outside it. On CPU, inductor compiles it (checked: same outputs, no
    graph break); the CUDA-graph path itself is not verified yet (tests marked ``gpu``).
    """
    compiled = _compiled()

    def decode(q, k_cache, v_cache, k_cmp, v_cmp, *args, **kwargs):
        if k_cache.is_cuda:
            for t in (k_cache, v_cache, k_cmp, v_cmp):
                if not hasattr(t, "_dynamo_static_input_type"):
                    torch._dynamo.mark_static_address(t, guard=False)
        return compiled(q, k_cache, v_cache, k_cmp, v_cmp, *args, **kwargs)

    return decode
