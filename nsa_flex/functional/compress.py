"""Cutting a sequence into NSA's overlapping compression blocks, and the parameter-free mean compressor.

Compressed key ``c`` summarizes tokens ``[c*d, c*d + l)``; there are ``Tc = max(0, (T - l) // d + 1)`` of them
(a trailing partial block is not compressed until it completes).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .._checks import tensor
from ..masks.compressed import num_compressed_blocks


def compression_blocks(
    x: Float[Tensor, "B H T D"], block_size: int, stride: int
) -> Float[Tensor, "B H Tc l D"]:
    """The ``Tc`` blocks of ``l = block_size`` tokens, ``stride`` apart, as a (strided, copy-free) view."""
    B, H, T, D = tensor("x", x, ndim=4).shape
    Tc = num_compressed_blocks(T, block_size, stride)  # also validates block_size and stride
    if Tc == 0:  # an empty view of x, so autograd still connects compressors to x
        return x[:, :, :0].unsqueeze(3).expand(B, H, 0, block_size, D)
    return x.unfold(2, block_size, stride).transpose(-1, -2)


def mean_pool(x: Float[Tensor, "B H T D"], block_size: int, stride: int) -> Float[Tensor, "B H Tc D"]:
    """Mean of each compression block: the parameter-free compressor (``compress="mean"``).

    When the stride divides the block size (NSA's ``l = 32, d = 16``), as sums of whole strides, each summed
    once in (at least) float32 and added ``l / d`` at a time: the backward is then a broadcast, where the mean
    over the overlapping unfolded view had torch's ``unfold_backward`` (0.37 ms for each of k and v at 64k
    tokens, paper configuration, H100). ``x`` must be floating (a mean of integers would come back int64)."""
    tensor("x", x, ndim=4, floating=True)
    Tc = num_compressed_blocks(x.shape[2], block_size, stride)  # also validates block_size and stride
    if Tc == 0 or block_size % stride:
        return compression_blocks(x, block_size, stride).mean(dim=-2)
    per_block = block_size // stride
    sums = _StrideSums.apply(x, stride, Tc + per_block - 1)
    total = sums[:, :, :Tc]
    for j in range(1, per_block):
        total = total + sums[:, :, j:j + Tc]
    return (total / block_size).to(x.dtype)


class _StrideSums(torch.autograd.Function):
    """``[B, H, T, D] -> [B, H, count, D]``: the sums of the first ``count`` whole strides of ``x``, in at least
    float32. The gradient comes back in ``x``'s layout (torch's slice backward allocates it ``[B, H, T, D]``-
    contiguous), so autograd adds it to the other branches' gradients of the keys and values, which have that
    layout, with a vectorized kernel instead of a strided one."""

    @staticmethod
    def forward(ctx, x, stride, count):
        ctx.stride = stride
        ctx.layout = (x.shape, torch.empty_like(x, device="meta").stride(), x.dtype)  # x's, made dense
        acc = torch.promote_types(x.dtype, torch.float32)
        return x[:, :, :count * stride].unflatten(2, (count, stride)).sum(3, dtype=acc)

    @staticmethod
    def backward(ctx, grad):
        shape, strides, dtype = ctx.layout
        stride = ctx.stride
        dx = torch.empty_strided(shape, strides, dtype=dtype, device=grad.device)
        B, H, count, D = grad.shape
        dx[:, :, :count * stride].unflatten(2, (count, stride)).copy_(grad.unsqueeze(3).expand(B, H, count, stride, D))
        dx[:, :, count * stride:].zero_()
        return dx, None, None
