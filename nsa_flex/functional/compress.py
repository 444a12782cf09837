"""Cutting a sequence into NSA's overlapping compression blocks, and the parameter-free mean compressor.

Compressed key ``c`` summarizes tokens ``[c*d, c*d + l)``; there are ``Tc = max(0, (T - l) // d + 1)`` of them
(a trailing partial block is not compressed until it completes).
"""

from __future__ import annotations

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
    """Mean of each compression block: the parameter-free compressor (``compress="mean"``)."""
    return compression_blocks(x, block_size, stride).mean(dim=-2)
