"""The three NSA attention branches: sliding window, compressed keys, selected blocks.

Every function takes FlexAttention's layout ``[B, H, T, D]`` with ``Hq`` query heads and ``Hkv`` key/value
heads (GQA, ``Hq % Hkv == 0``). Each branch is defined by one of our masks and runs, by default, as a
FlexAttention call with it; on CUDA, faster paths take over where they apply: the window as one banded cuDNN
attention (:mod:`.window_cudnn`, with cudnn-frontend), the compressed branch in fp16/bf16 as one causal cuDNN
attention (:mod:`.compressed_sdpa`), the selected branch as Triton kernels (:mod:`.selected_kernel`). Where
FlexAttention cannot give gradients (the CPU), the same mask drives the exact dense path of
:mod:`nsa_flex.functional.dense`. Every path is tested against the float64 reference.
"""

from __future__ import annotations

import collections
import math
from typing import Optional, Union

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .. import masks
from ..masks.compressed import compressed_causal_mod
from ..masks.mask import build_block_mask
from ..masks.static import sliding_window_mod
from .._checks import attention_scale, check_qkv, positive_int, tensor
from .dense import dense_masked_attention, mask_rows
from . import compressed_sdpa, selected_kernel, window_cudnn
from .flex import flex, needs_dense_path

# FlexAttention tile for the static (window, compressed) masks; 128 has valid forward and backward kernels.
STATIC_BLOCK = 128
# Query rows per tile of the selection branch's FlexAttention path: whole tokens' G heads, at least 16 rows
# (tl.dot's smallest tile).
SELECTION_TILE_ROWS = 16


_BLOCK_MASKS: "collections.OrderedDict[tuple, BlockMask]" = collections.OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64


def _static_block_mask(key: tuple, mask_mod, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """A window/compressed BlockMask, cached per (mask, shape, device); built in-graph inside torch.compile."""
    if torch.compiler.is_compiling():
        # Traced into the caller's graph (fused, no Q x KV tensor); Python-side caches can't be traced.
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, BLOCK_SIZE=STATIC_BLOCK)
    full_key = (*key, q_len, kv_len, str(device))
    if full_key not in _BLOCK_MASKS:
        _BLOCK_MASKS[full_key] = build_block_mask(mask_mod, q_len, kv_len, None, None, device, (STATIC_BLOCK,) * 2)
        if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.popitem(last=False)
    _BLOCK_MASKS.move_to_end(full_key)
    return _BLOCK_MASKS[full_key]


def _attend(q, k, v, mask_mod, block_mask_fn, scale, return_lse):
    """Run one branch: the dense path when CPU gradients are needed, FlexAttention otherwise."""
    if needs_dense_path(q, k, v):
        rows = mask_rows(mask_mod, q.shape[0], q.shape[1], k.shape[2], q.device)
        return dense_masked_attention(q, k, v, rows, scale=scale, return_lse=return_lse)
    return flex(q, k, v, block_mask=block_mask_fn(), scale=scale, return_lse=return_lse)


def sliding_window_attention(
    q: Float[Tensor, "B Hq T D"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    window_size: int,
    scale: Optional[float] = None,
) -> Float[Tensor, "B Hq T Dv"]:
    """Causal sliding-window attention: query ``t`` sees keys ``t - w < j <= t``.

    On CUDA with cudnn-frontend installed (fp16/bf16, see :func:`.window_cudnn.supported`) one banded cuDNN
    attention; otherwise FlexAttention over the window mask, or on CPU with gradients the dense path.
    """
    _, _, _, T = check_qkv(q, k, v)
    positive_int("window_size", window_size)
    cudnn_scale = attention_scale(scale, q.shape[-1])  # also checks a given scale for the other paths
    if window_cudnn.supported(q, k, v, window_size, cudnn_scale):
        return window_cudnn.sliding_window_attention_cudnn(q, k, v, window_size, cudnn_scale)
    mod = sliding_window_mod(window_size)
    return _attend(q, k, v, mod, lambda: _static_block_mask(("window", window_size), mod, T, T, q.device), scale, False)


def compressed_attention(
    q: Float[Tensor, "B Hq T D"],
    k_cmp: Float[Tensor, "B Hkv Tc D"],
    v_cmp: Float[Tensor, "B Hkv Tc Dv"],
    block_size: int,
    stride: int,
    scale: Optional[float] = None,
    return_lse: bool = False,
    return_query: bool = False,
) -> Union[Tensor, tuple[Tensor, ...]]:
    """Attention over compressed keys: query ``t`` sees compressed key ``c`` iff ``c*stride + block_size - 1 <= t``.

    ``Tc`` may be 0 (``T < block_size``): the output is then all zeros (and ``lse = -inf``). Rows that see no
    compressed key yet (``t < block_size - 1``) give exactly 0. Returns ``out`` or ``(out, lse [B, Hq, T])``,
    with ``return_query`` one more item, ``q``: on the cuDNN path a view whose gradient (from other attention
    given it) the backward adds its own ``dq`` into in place, as :func:`selected_attention`'s; elsewhere ``q``.

    On CUDA in fp16/bf16 (see :func:`.compressed_sdpa.supported`) the stride is folded into the heads and the
    branch is one causal cuDNN attention (:mod:`.compressed_sdpa`); otherwise FlexAttention over the
    compressed mask, or on CPU with gradients the dense path.
    """
    B, Hq, _, T = check_qkv(q, k_cmp, v_cmp, same_length=False)
    masks.compressed.check_compression(block_size, stride)
    cudnn_scale = attention_scale(scale, q.shape[-1])  # also checks a given scale for the other paths
    Tc = k_cmp.shape[2]
    if Tc == 0:
        # No compressed key at all; keep the graph connected so gradients are zeros, not None.
        out = q.new_zeros(B, Hq, T, v_cmp.shape[-1]) + 0 * (q.sum() + k_cmp.sum() + v_cmp.sum())
        lse = q.new_full((B, Hq, T), float("-inf"))
    elif compressed_sdpa.supported(q, k_cmp, v_cmp, block_size, stride):
        out, lse, *passed = compressed_sdpa.compressed_attention_cudnn(q, k_cmp, v_cmp, block_size, stride,
                                                                       cudnn_scale, return_query)
        q = passed[0] if return_query else q
    else:
        mod = compressed_causal_mod(block_size, stride)
        key = ("compressed", block_size, stride)
        res = _attend(q, k_cmp, v_cmp, mod, lambda: _static_block_mask(key, mod, T, Tc, q.device), scale, return_lse)
        out, lse = res if return_lse else (res, None)
    extra = ((lse,) if return_lse else ()) + ((q,) if return_query else ())
    return (out, *extra) if extra else out


def selected_attention(
    q: Float[Tensor, "B Hq T D"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    block_indices: Int[Tensor, "B Hkv T n"],
    block_size: int,
    scale: Optional[float] = None,
    return_query: bool = False,
    gate: Optional[Float[Tensor, "B Hq T"]] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over each token's selected key blocks (all ``G`` query heads of a kv head share them).

    Query ``t`` sees key ``j`` iff ``j // block_size`` is in ``block_indices[b, kv_head, t]`` and ``j <= t``
    (``-1`` = unused slot). Gradients flow to ``q, k, v``; the indices are not differentiable. Returns
    ``out [B, Hq, T, Dv]``, or with ``return_query`` ``(out, q)``: where the kernels run, that ``q`` is a view
    whose gradient (from other attention given it) the kernels' backward adds into their own ``dq`` in
    place, sparing autograd a sum over a q-sized tensor; elsewhere it is ``q`` itself. With ``gate`` the output
    is ``gate[..., None] * out`` (NSA's gating; gradients to the gate as well), which the kernels fuse: their
    backward reads the gated output's gradient and never writes the ungated one's.

    On CUDA (see :func:`.selected_kernel.supported`) Triton kernels walk each token's block list; otherwise
    FlexAttention runs over a BlockMask built from the indices (GQA folded into query rows), or on CPU a
    dense masked attention.
    """
    B, Hq, Hkv, T = check_qkv(q, k, v)
    tensor("block_indices", block_indices, ndim=4, integer=True, shape=(B, Hkv, T, None))
    if gate is not None:
        tensor("gate", gate, ndim=3, floating=True, shape=(B, Hq, T))
    scale = attention_scale(scale, q.shape[-1])
    if selected_kernel.supported(q, k, v, block_size):
        return selected_kernel.selected_attention_kernel(q, k, v, block_indices, block_size, scale, return_query,
                                                         gate)
    out = _selected_attention_reference(q, k, v, block_indices, block_size, scale)
    if gate is not None:
        out = gate[..., None].to(out.dtype) * out
    return (out, q) if return_query else out


def selection_tile_rows(G: int) -> int:
    """Query rows per tile of the selection BlockMask: :data:`SELECTION_TILE_ROWS` rounded up to whole tokens."""
    return G * math.ceil(SELECTION_TILE_ROWS / G)


def selection_block_mask(block_indices: Int[Tensor, "B Hkv T n"], G: int, block_size: int,
                         compute_q_blocks: bool = True) -> BlockMask:
    """The selection branch's BlockMask (its FlexAttention path): GQA folded into query rows (row ``t*G + g``), so
    each selected KV block is loaded once for the ``G`` heads sharing it, in tiles of
    :func:`selection_tile_rows` rows, which cover few tokens and so union few selections."""
    T = block_indices.shape[2]
    return masks.block_mask_from_indices(block_indices, T * G, T, block_size, selection_tile_rows(G),
                                         compute_q_blocks=compute_q_blocks, rows_per_token=G)


def _selected_attention_reference(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int,
                                  scale: float) -> Tensor:
    """:func:`selected_attention` without the kernels: dense on CPU with gradients, FlexAttention otherwise."""
    B, Hq, T = q.shape[:3]
    G = Hq // k.shape[1]
    if needs_dense_path(q, k, v):
        mask = masks.fine_selection(block_indices, block_size, G)
        mask.check(T, T)
        rows = mask_rows(mask, B, Hq, T, q.device)
        return dense_masked_attention(q, k, v, rows, scale=scale)
    q_rows = rearrange(q, "b (h g) t d -> b h (t g) d", g=G)
    block_mask = selection_block_mask(block_indices, G, block_size, compute_q_blocks=torch.is_grad_enabled())
    out = flex(q_rows, k, v, block_mask=block_mask, scale=scale)
    return rearrange(out, "b h (t g) d -> b (h g) t d", g=G)
