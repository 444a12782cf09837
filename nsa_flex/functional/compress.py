"""Cutting a sequence into NSA's overlapping compression blocks, and the parameter-free mean compressor.

Compressed key ``c`` summarizes tokens ``[c*d, c*d + l)``; there are ``Tc = max(0, (T - l) // d + 1)`` of them
(a trailing partial block is not compressed until it completes).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..masks.compressed import check_compression, num_compressed_blocks


def compression_blocks(
    x: Float[Tensor, "B H T D"], block_size: int, stride: int
) -> Float[Tensor, "B H Tc l D"]:
    """The ``Tc`` blocks of ``l = block_size`` tokens, ``stride`` apart, as a (strided, copy-free) view."""
    check_compression(block_size, stride)
    B, H, T, D = x.shape
    Tc = num_compressed_blocks(T, block_size, stride)
    if Tc == 0:  # an empty view of x, so autograd still connects compressors to x
        return x[:, :, :0].unsqueeze(3).expand(B, H, 0, block_size, D)
    return x.unfold(2, block_size, stride).transpose(-1, -2)


def mean_pool(x: Float[Tensor, "B H T D"], block_size: int, stride: int) -> Float[Tensor, "B H Tc D"]:
    """Mean of each compression block: the parameter-free compressor (``compress="mean"``).

    When the stride divides the block size (NSA's ``l = 32, d = 16``), as sums of whole strides, each summed
    once in (at least) float32 and added ``l / d`` at a time: the backward is then a broadcast, where the mean
    over the overlapping unfolded view had torch's ``unfold_backward`` (0.37 ms for each of k and v at 64k
    tokens, paper configuration, H100)."""
    check_compression(block_size, stride)
    Tc = num_compressed_blocks(x.shape[2], block_size, stride)
    if Tc == 0 or block_size % stride:
        return compression_blocks(x, block_size, stride).mean(dim=-2)
    per_block = block_size // stride
    strides = Tc + per_block - 1
    acc = torch.promote_types(x.dtype, torch.float32)
    sums = x[:, :, :strides * stride].unflatten(2, (strides, stride)).sum(3, dtype=acc)
    total = sums[:, :, :Tc]
    for j in range(1, per_block):
        total = total + sums[:, :, j:j + Tc]
    return (total / block_size).to(x.dtype)
