"""Token-major storage: ``[B, T, H, ...]`` in memory, viewed ``[B, H, T, ...]``, as an attention layer's projections
give ``q``. Kernels then read and write a token's heads as one contiguous run, and the branches' outputs and
gradients, all allocated here alike, sum without layout changes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def rows_like(q: Tensor, width: Optional[int], dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty ``[B, H, T, width]`` (``[B, H, T]`` for ``None``) stored token-major when ``q [B, H, T, D]`` is,
    ``[B, H, T, ...]``-contiguous otherwise."""
    B, H, T = q.shape[:3]
    tail = () if width is None else (width,)
    dtype = q.dtype if dtype is None else dtype
    if q.stride(1) < q.stride(2):
        return q.new_empty(B, T, H, *tail, dtype=dtype).transpose(1, 2)
    return q.new_empty(B, H, T, *tail, dtype=dtype)
