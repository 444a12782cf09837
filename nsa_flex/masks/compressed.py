"""The NSA compressed branch's mask: queries over compressed-block keys (``Q_LEN != KV_LEN``).

Compressed key ``c`` summarizes tokens ``[c*d, c*d + l)`` (block size ``l``, stride ``d``). It may be seen
by query ``t`` only once its whole block is in the past: ``c*d + l - 1 <= t``.
"""

from __future__ import annotations

import torch

from .._checks import block_and_stride, positive_int
from .mask import Mask


def num_compressed_blocks(seq_len: int, block_size: int, stride: int) -> int:
    """Number of compressed keys for ``seq_len >= 0`` tokens: ``max(0, (T - l) // d + 1)`` (``block_size`` and
    ``stride`` as :func:`check_compression` wants them)."""
    check_compression(block_size, stride)
    # A length taken from a tensor's shape inside a dynamic-shape torch.compile is a SymInt, not an int: it is a
    # tensor's dimension, so it cannot be negative.
    if not isinstance(seq_len, torch.SymInt):
        positive_int("seq_len", seq_len, minimum=0)
    return max(0, (seq_len - block_size) // stride + 1)


def check_compression(block_size: int, stride: int) -> tuple[int, int]:
    """Validate a (block_size, stride) pair: both positive, ``stride <= block_size`` so no token is skipped."""
    return block_and_stride(block_size, stride)


def compressed_causal(block_size: int = 32, stride: int = 16) -> Mask:
    """Query ``t`` sees compressed key ``c`` iff ``c*stride + block_size - 1 <= t``."""
    l, d = check_compression(block_size, stride)
    return Mask(compressed_causal_mod(l, d), f"compressed_causal(block_size={l}, stride={d})")


def compressed_causal_mod(block_size: int, stride: int):
    """The bare mask_mod of :func:`compressed_causal` (traceable by torch.compile; no checks)."""

    def compressed_causal(b, h, q_idx, kv_idx):
        return kv_idx * stride + (block_size - 1) <= q_idx

    return compressed_causal
