"""The three NSA attention branches, each one FlexAttention call with one of our masks.

Every function takes FlexAttention's layout ``[B, H, T, D]`` with ``Hq`` query heads and ``Hkv`` key/value
heads (GQA, ``Hq % Hkv == 0``). Where FlexAttention cannot give gradients (the CPU), the same mask drives the
exact dense path of :mod:`nsa_flex.functional.dense`; forward results of both paths agree.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .. import masks
from .._checks import positive_int, tensor
from .dense import dense_masked_attention, mask_rows
from .flex import flex, needs_dense_path

# FlexAttention tile for the static (window, compressed) masks; 128 has valid forward and backward kernels.
STATIC_BLOCK = 128


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool = True) -> tuple[int, int, int, int]:
    """Validate ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]``, ``v [B, Hkv, S, Dv]``; return (B, Hq, Hkv, T)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor(name, x, ndim=4, floating=True)
    B, Hq, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same [B, Hkv, S], got {list(k.shape)} and {list(v.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {k.shape[-1]}")
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    if same_length and k.shape[2] != T:
        raise ValueError(f"q and k must have the same length T (self-attention), got {T} and {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hq, Hkv, T


@functools.lru_cache(maxsize=64)
def _static_block_mask(mask: masks.Mask, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    return mask.to_block_mask(q_len, kv_len, device=device, block_size=STATIC_BLOCK)


@functools.lru_cache(maxsize=None)
def _window_mask(window_size: int) -> masks.Mask:
    return masks.sliding_window(window_size)


@functools.lru_cache(maxsize=None)
def _compressed_mask(block_size: int, stride: int) -> masks.Mask:
    return masks.compressed_causal(block_size, stride)


def _attend(q, k, v, mask: masks.Mask, block_mask_fn, scale, return_lse):
    """Run one branch: the dense path when CPU gradients are needed, FlexAttention otherwise."""
    if needs_dense_path(q, k, v):
        rows = mask_rows(mask, q.shape[0], q.shape[1], k.shape[2], q.device)
        return dense_masked_attention(q, k, v, rows, scale=scale, return_lse=return_lse)
    return flex(q, k, v, block_mask=block_mask_fn(), scale=scale, return_lse=return_lse)


def sliding_window_attention(
    q: Float[Tensor, "B Hq T D"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    window_size: int,
    scale: Optional[float] = None,
) -> Float[Tensor, "B Hq T Dv"]:
    """Causal sliding-window attention: query ``t`` sees keys ``t - w < j <= t``."""
    _, _, _, T = check_qkv(q, k, v)
    positive_int("window_size", window_size)
    mask = _window_mask(window_size)
    return _attend(q, k, v, mask, lambda: _static_block_mask(mask, T, T, q.device), scale, False)


def compressed_attention(
    q: Float[Tensor, "B Hq T D"],
    k_cmp: Float[Tensor, "B Hkv Tc D"],
    v_cmp: Float[Tensor, "B Hkv Tc Dv"],
    block_size: int,
    stride: int,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention over compressed keys: query ``t`` sees compressed key ``c`` iff ``c*stride + block_size - 1 <= t``.

    ``Tc`` may be 0 (``T < block_size``): the output is then all zeros (and ``lse = -inf``). Rows that see no
    compressed key yet (``t < block_size - 1``) give exactly 0. Returns ``out`` or ``(out, lse [B, Hq, T])``.
    """
    B, Hq, _, T = check_qkv(q, k_cmp, v_cmp, same_length=False)
    masks.compressed.check_compression(block_size, stride)
    Tc = k_cmp.shape[2]
    if Tc == 0:
        # No compressed key at all; keep the graph connected so gradients are zeros, not None.
        out = q.new_zeros(B, Hq, T, v_cmp.shape[-1]) + 0 * q.sum() + 0 * v_cmp.sum()
        lse = q.new_full((B, Hq, T), float("-inf"))
        return (out, lse) if return_lse else out
    mask = _compressed_mask(block_size, stride)
    return _attend(q, k_cmp, v_cmp, mask, lambda: _static_block_mask(mask, T, Tc, q.device), scale, return_lse)


def selected_attention(
    q: Float[Tensor, "B Hq T D"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    block_indices: Int[Tensor, "B Hkv T n"],
    block_size: int,
    scale: Optional[float] = None,
) -> Float[Tensor, "B Hq T Dv"]:
    """Attention over each token's selected key blocks (all ``G`` query heads of a kv head share them).

    Query ``t`` sees key ``j`` iff ``j // block_size`` is in ``block_indices[b, kv_head, t]`` and ``j <= t``
    (``-1`` = unused slot). Gradients flow to ``q, k, v``; the indices are not differentiable.
    """
    B, Hq, Hkv, T = check_qkv(q, k, v)
    tensor("block_indices", block_indices, ndim=4, integer=True, shape=(B, Hkv, T, None))
    mask = masks.fine_selection(block_indices, block_size, Hq // Hkv)
    mask.check(T, T)

    def block_mask() -> BlockMask:
        return masks.block_mask_from_indices(
            block_indices, T, T, block_size, group_size=Hq // Hkv, compute_q_blocks=torch.is_grad_enabled()
        )

    return _attend(q, k, v, mask, block_mask, scale, False)
