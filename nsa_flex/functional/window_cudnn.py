"""The sliding window as one banded cuDNN attention, through cudnn-frontend's graph API (where it is installed).

Query ``t`` sees keys ``t - w < j <= t``: cuDNN's diagonal band aligned top-left, left bound ``w`` (cuDNN's left
bound is exclusive, keys ``j > t - w``) and right bound 0. cuDNN visits only the tiles the band touches and runs
them at its dense-attention rate. torch's SDPA has no window argument for cuDNN, hence the frontend
(``pip install nvidia-cudnn-frontend``, the ``cudnn`` extra; version 1.16 has no further dependencies); where it
is missing or cuDNN cannot build the graph, the window stays on FlexAttention (:func:`supported`).

64k tokens, paper configuration (64 query heads, 4 kv heads, w = 512), bf16, H100, in one process on the same
inputs, the branch alone: forward 4.65 -> 3.16 ms, forward+backward 16.63 -> 14.20 ms against FlexAttention; the
NSA training step 118-120 -> 115 ms (``docs/results/window_cudnn_h100_session17.log``).

The backward runs a few query heads at a time (:func:`_backward_chunks`): cuDNN's GQA backward computes ``dk, dv``
for every query head in float32 workspace and then sums each group (``fmha_reduce_head``), so one call over all
64 heads at 64k held 6.17 GiB where FlexAttention's branch held 2.16; per kv head (16 query heads) it holds 3.16
and is as fast (14.20 against 14.22 ms); per 8 or 4 query heads it was slower (15.3, 16.5 ms).

Graphs are built once per shape, layout and device and cached; the forward and backward are custom ops
(``nsa_flex::window_cudnn(_backward)``) so compiled models call them as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from . import cudnn_graph
from .compressed_sdpa import cudnn_attention_ready
from .cudnn_graph import cudnn
from .layout import in_layout_of, rows_like

# Query heads per backward call: a divisor of the group. None: the most whose float32 dk and dv (cuDNN's GQA
# workspace, 4 * B * T * (D + Dv) bytes a head) fit in q's own size, or where that is more, in twice q's size up
# to _SMALL_WORKSPACE bytes, or in _NEVER_SPLIT bytes (a quarter of the heads when D = Dv and the workspace is
# large).
BACKWARD_HEADS: Optional[int] = None
# A workspace this small is not split: the LM of bench.train_lm (batch 16 x 4096 tokens, 8 heads of 64 on 2 kv
# heads, window 128) took 84.2 ms a step with 2 of a group's 4 heads a call (128 MiB would have exceeded q's
# 64 MiB) and 81.9 with all 4 (FlexAttention's window: 81.6; docs/results/lm_window_cudnn_h100_session18.log).
# Twice q's size at most: with 256 MiB for any q, 16 query heads on one kv head at 16k tokens held 1.82x SDPA's
# peak memory in a step (a 256 MiB workspace beside a 64 MiB q).
_SMALL_WORKSPACE = 256 << 20
_NEVER_SPLIT = 64 << 20  # a split below this saves little memory for its extra calls and the sum of their parts
_SUPPORT: dict[tuple, bool] = {}  # each signature's verdict: its graphs are checked once, not on every call


def supported(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float) -> bool:
    """Whether :func:`sliding_window_attention_cudnn` runs: cudnn-frontend importable, CUDA with cuDNN attention
    enabled and not excluded by deterministic algorithms (as :func:`.compressed_sdpa.supported`), fp16/bf16,
    more than one token (cuDNN refuses one query against one key), equal q/k and v head dims of at most 128
    that are multiples of 8, and cuDNN builds the graphs for this shape
    (if it cannot, a warning says so once per shape and FlexAttention runs the window)."""
    if not (cudnn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] > 1
            and q.shape[-1] == v.shape[-1] and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
            and cudnn_attention_ready(q.device.index)):
        return False
    return _graphs_build(_signature(q, k, v, window_size, scale))


def _signature(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float) -> tuple:
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return (tuple(q.shape), tuple(k.shape), tuple(q.stride()), tuple(k.stride()), tuple(v.stride()),
            str(q.dtype), int(window_size), float(scale), index)


@torch._dynamo.assume_constant_result  # evaluated once while tracing (it builds graphs), not traced into
def _graphs_build(signature: tuple) -> bool:
    """Build (and cache) the forward and backward graphs for the layouts the ops will use; ``False`` with a
    warning if cuDNN refuses them. The verdict is remembered per signature."""
    q_shape, k_shape, *_, dtype, window_size, _, _ = signature
    return cudnn_graph.builds(
        _SUPPORT, signature, lambda: _build_graphs(signature),
        lambda: f"cuDNN could not build the sliding-window attention graph for q {list(q_shape)}, k {list(k_shape)}, "
        f"{dtype}, window {window_size}; the window branch runs on FlexAttention")


def _build_graphs(signature: tuple) -> None:
    q_shape, k_shape, q_stride, k_stride, v_stride, dtype, window_size, scale, index = signature
    with torch.device("meta"):  # shapes and strides only: nothing is allocated or run
        dtype = getattr(torch, dtype.split(".")[-1])
        q = torch.empty_strided(q_shape, q_stride, dtype=dtype)
        k = torch.empty_strided(k_shape, k_stride, dtype=dtype)
        v = torch.empty_strided(k_shape, v_stride, dtype=dtype)
        out, stats = rows_like(q, q_shape[-1]), cudnn_graph.stats_like(q)
    _forward_graph(q, k, v, out, stats, scale, window_size, index)
    chunks = _backward_chunks(q, v)
    qs, ks = _head_slices(chunks[0], q.shape[1] // k.shape[1])  # every chunk has the same shape and strides
    _backward_graph(q[:, qs], k[:, ks], v[:, ks], out[:, qs], out[:, qs], stats[:, qs], q[:, qs],
                    *_key_grads(k, v, ks, len(chunks) > k.shape[1]), scale, window_size, index)


def sliding_window_attention_cudnn(q: Float[Tensor, "B Hq T D"], k: Float[Tensor, "B Hkv T D"],
                                   v: Float[Tensor, "B Hkv T D"], window_size: int,
                                   scale: float) -> Float[Tensor, "B Hq T D"]:
    """Causal sliding-window attention (keys ``t - w < j <= t``) on cuDNN; gradients to ``q, k, v``. The output
    is stored token-major when ``q`` is (:func:`.layout.rows_like`). Check :func:`supported` first."""
    return torch.ops.nsa_flex.window_cudnn(q, k, v, int(window_size), float(scale))[0]


def _backward_chunks(q: Tensor, v: Tensor) -> list[range]:
    """The query heads of each backward call, :data:`BACKWARD_HEADS` of a group at a time (64k tokens, H100: the
    paper configuration's 16 heads a call took its step to 8.24 GiB, 1.34x SDPA's, where 4 heads were 1.9 ms
    slower; with 16 query heads on one kv head, 16 a call held 2.81 GiB, 1.83x SDPA's, and 4 a call 2.18, 1.41x;
    ``docs/results/window_cudnn_workspace_h100_session17.log``)."""
    B, Hq, T, D = q.shape
    G = Hq // v.shape[1]
    per_head = 4 * B * T * (D + v.shape[-1])
    q_bytes = q.numel() * q.element_size()
    budget = max(q_bytes, min(2 * q_bytes, _SMALL_WORKSPACE), _NEVER_SPLIT)
    fits = [h for h in range(1, G + 1) if G % h == 0 and (h == 1 or h * per_head <= budget)]
    per_call = max(fits) if BACKWARD_HEADS is None else BACKWARD_HEADS
    if per_call <= 0 or G % per_call:
        raise ValueError(f"BACKWARD_HEADS must divide the group of {G} query heads, got {per_call}")
    return [range(h, h + per_call) for h in range(0, Hq, per_call)]


def _head_slices(heads: range, G: int) -> tuple[slice, slice]:
    """Query heads ``heads`` (within one group) and their kv head, as slices."""
    kv = heads.start // G
    return slice(heads.start, heads.stop), slice(kv, kv + 1)


def _key_grads(dk: Tensor, dv: Tensor, ks: slice, partial: bool) -> tuple[Tensor, Tensor]:
    """Where a backward call writes kv head ``ks``'s gradients: ``dk, dv`` themselves, or (``partial``: the head's
    group split over several calls) fresh buffers, summed afterwards."""
    if partial:
        return torch.empty_like(dk[:, ks]), torch.empty_like(dv[:, ks])
    return dk[:, ks], dv[:, ks]


def _band(window_size: int) -> dict:
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=window_size,
                diagonal_band_right_bound=0)


def _forward_graph(q, k, v, out, stats, scale, window_size, index):
    return cudnn_graph.forward_graph(q, k, v, out, stats, scale, index, **_band(window_size))


def _backward_graph(q, k, v, out, do, stats, dq, dk, dv, scale, window_size, index):
    return cudnn_graph.backward_graph(q, k, v, out, do, stats, dq, dk, dv, scale, index, **_band(window_size))


@torch.library.custom_op("nsa_flex::window_cudnn", mutates_args=())
def _window(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float) -> tuple[Tensor, Tensor]:
    out, stats = rows_like(q, v.shape[-1]), cudnn_graph.stats_like(q)
    index = q.device.index
    cudnn_graph.execute(_forward_graph(q, k, v, out, stats, scale, window_size, index), (q, k, v, out, stats),
                        q.device)
    return out, stats


@_window.register_fake
def _(q, k, v, window_size, scale):
    return rows_like(q, v.shape[-1]), cudnn_graph.stats_like(q)


@torch.library.custom_op("nsa_flex::window_cudnn_backward", mutates_args=())
def _window_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, window_size: int,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    do = in_layout_of(do, out)  # the graphs take do in out's layout (the gate's backward writes it so)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    G = q.shape[1] // k.shape[1]
    chunks = _backward_chunks(q, v)
    partial = len(chunks) > k.shape[1]  # several calls per kv head: their dk, dv parts are summed here
    parts = []
    for heads in chunks:
        qs, ks = _head_slices(heads, G)
        dk_c, dv_c = _key_grads(dk, dv, ks, partial)
        xs = (q[:, qs], k[:, ks], v[:, ks], out[:, qs], do[:, qs], stats[:, qs], dq[:, qs], dk_c, dv_c)
        cudnn_graph.execute(_backward_graph(*xs, scale, window_size, q.device.index), xs, q.device)
        parts.append((ks, dk_c, dv_c))
    if partial:
        for grad, i in ((dk, 1), (dv, 2)):
            acc = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
            for part in parts:
                acc[:, part[0]] += part[i]
            grad.copy_(acc)
    return dq, dk, dv


@_window_backward.register_fake
def _(do, q, k, v, out, stats, window_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.window_size, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, do, _dstats):
    q, k, v, out, stats = ctx.saved_tensors
    return (*torch.ops.nsa_flex.window_cudnn_backward(do, q, k, v, out, stats, ctx.window_size, ctx.scale),
            None, None)


_window.register_autograd(_op_backward, setup_context=_setup_context)
