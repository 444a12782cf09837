"""Mask generators that depend only on positions (and, for ``document``/``prefix_lm``, on small per-batch data).

Every generator returns a :class:`~nsa_flex.masks.Mask` whose closure has the generator's name, so
``repr`` prints the call that made it. ``t`` is the query position and ``j`` the key position, both 0-based.
"""

from __future__ import annotations

from typing import Union

from jaxtyping import Int
from torch import Tensor

from .._checks import INT64_MAX, positive_int, tensor
from .mask import Extent, Mask


def full() -> Mask:
    """Every query sees every key."""

    def full(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    return Mask(full, "full()")


def causal() -> Mask:
    """Causal: ``j <= t`` (top-left aligned when Q_LEN != KV_LEN)."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return Mask(causal, "causal()")


def sliding_window(window_size: int) -> Mask:
    """Causal sliding window of ``w`` keys including the query's own: ``t - w < j <= t``.

    Same as flash-attn ``window_size=(w - 1, 0)``.
    """
    w = positive_int("window_size", window_size)
    return Mask(sliding_window_mod(w), f"sliding_window({w})")


def sliding_window_mod(w: int):
    """The bare mask_mod of :func:`sliding_window` (traceable by torch.compile; no checks)."""

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < w)

    return sliding_window


def chunked(chunk_size: int) -> Mask:
    """Block-diagonal chunks: ``t // c == j // c`` (combine with ``causal()`` for chunked causal attention)."""
    c = positive_int("chunk_size", chunk_size)

    def chunked(b, h, q_idx, kv_idx):
        return q_idx // c == kv_idx // c

    return Mask(chunked, f"chunked({c})")


def dilated(window_size: int, dilation: int) -> Mask:
    """Causal dilated window (Longformer): ``t - j`` in ``{0, d, 2d, ..., (w - 1) d}``."""
    w = positive_int("window_size", window_size)
    d = positive_int("dilation", dilation)
    # the farthest key, (w - 1) d back; capped at int64's range, which no sequence reaches
    reach = min((w - 1) * d, INT64_MAX)

    def dilated(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff <= reach) & (diff % d == 0)

    return Mask(dilated, f"dilated({w}, {d})")


def global_tokens(num_global: int) -> Mask:
    """The first ``g`` tokens are global: they see every key and every query sees them (``t < g or j < g``)."""
    g = positive_int("num_global", num_global)

    def global_tokens(b, h, q_idx, kv_idx):
        return (q_idx < g) | (kv_idx < g)

    return Mask(global_tokens, f"global_tokens({g})")


def prefix_lm(prefix_len: Union[int, Int[Tensor, " B"]]) -> Mask:
    """Prefix LM: bidirectional over the first ``p`` keys, causal after: ``j < p or j <= t``.

    ``prefix_len`` is an int, or an integer tensor ``[B]`` with one prefix length per sequence.
    """
    if isinstance(prefix_len, Tensor):
        lengths = tensor("prefix_len", prefix_len, ndim=1, integer=True)
        if not lengths.numel():
            raise ValueError("prefix_len as a tensor needs one length per sequence, got an empty tensor")
        if (lengths < 0).any():
            raise ValueError(f"prefix_len must be >= 0, got {lengths.tolist()}")

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) | (kv_idx <= q_idx)

        extent = Extent(batch=lengths.shape[0], device=lengths.device)
        return Mask(prefix_lm, f"prefix_lm(<tensor of {lengths.shape[0]}>)", extent)
    p = positive_int("prefix_len", prefix_len, minimum=0)

    def prefix_lm(b, h, q_idx, kv_idx):  # noqa: F811 - one closure per branch, same name for repr
        return (kv_idx < p) | (kv_idx <= q_idx)

    return Mask(prefix_lm, f"prefix_lm({p})")


def document(document_ids: Int[Tensor, "*B T"]) -> Mask:
    """Packed sequences: query and key must belong to the same document, ``doc[b, t] == doc[b, j]``.

    ``document_ids`` is ``[T]`` (shared by the batch) or ``[B, T]``; queries and keys index the same tokens,
    so both lengths must be at most ``T``. Combine with ``causal()`` for causal packed training.
    """
    ids = tensor("document_ids", document_ids, integer=True)
    if ids.ndim not in (1, 2):
        raise ValueError(f"document_ids must have shape [T] or [B, T], got {list(ids.shape)}")
    if 0 in ids.shape:
        raise ValueError(f"document_ids must not be empty, got shape {list(ids.shape)}")
    seq_len = ids.shape[-1]

    def within_ids(q_len: int, kv_len: int) -> None:
        if max(q_len, kv_len) > seq_len:
            raise ValueError(
                f"document(...) has ids for {seq_len} tokens, got q_len={q_len}, kv_len={kv_len}"
            )

    if ids.ndim == 1:

        def document(b, h, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]

        extent = Extent(checks=(within_ids,), device=ids.device)
    else:

        def document(b, h, q_idx, kv_idx):  # noqa: F811
            return ids[b, q_idx] == ids[b, kv_idx]

        extent = Extent(batch=ids.shape[0], checks=(within_ids,), device=ids.device)
    return Mask(document, f"document(<ids {list(ids.shape)}>)", extent)

