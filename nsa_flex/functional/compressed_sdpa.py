"""Compressed attention as one causal cuDNN attention call, the stride folded into the heads.

Query ``t`` sees compressed key ``c`` iff ``c*d + l - 1 <= t`` (block size ``l``, stride ``d``). Write the
tokens that see any key as ``t = l - 1 + i*d + r`` with ``0 <= r < d``: then ``t`` sees exactly the keys
``c <= i``, for every ``r``. So the tokens of offset ``r`` form an ordinary causal attention over the
compressed keys, query row ``i`` against keys ``0..i``. With ``q`` stored ``[B, T, H, D]`` (as a projection
gives it), the ``d`` offsets of a row are ``d * H`` consecutive head vectors: a plain *view* of ``q`` with
``d * H`` heads and one row per group of ``d`` tokens, head ``r*H + h`` on kv head ``r*Hkv + h // G`` (keys
repeated ``d`` times, small: ``T / d`` rows). cuDNN runs it as one causal GQA attention and writes its output
in the same layout, which is again the tokens in order. Around that: tokens ``t < l - 1`` see nothing
(``o = 0``, ``lse = -inf``), and the last ``(T - l + 1) % d`` tokens (a partial group) see every key: a
second, non-causal cuDNN call of a few rows (until the twelfth session a float32 torch path of about ten
kernels each way, a fixed cost that showed at short contexts).

cuDNN runs this at the rate of dense causal attention; FlexAttention over the compressed mask was about half
as fast, and its dk/dv backward had only ``Tc / 128`` tiles per kv head to spread over the GPU (64k tokens,
paper configuration, H100, in a whole NSA step: cuDNN's kernels 7.3 ms forward and 20.5 ms backward, where
FlexAttention's took about 12 and 32.6 ms; ``docs/results/compressed_cudnn_ab_h100_session10.log``). The private
``aten._scaled_dot_product_cudnn_attention`` (and its backward) is called because it returns the
log-sum-exp, which block selection needs. Forward and backward are custom ops (``nsa_flex::
compressed_cudnn``, ``..._backward``), so compiled models call them as they are: no compiler sees the
strided views, whose layouts torch's fake kernels describe only approximately. Where cudnn-frontend is
installed (the ``cudnn`` extra), the folded forward runs as one of its graphs instead (:mod:`.cudnn_graph`),
which writes straight into the output's folded view (:func:`_folded_forward`).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from . import cudnn_graph
from .cudnn_graph import cudnn
from .query_passing import add_into, gradient_to_add_into


def supported(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, stride: int) -> bool:
    """Whether :func:`compressed_attention_cudnn` can run on cuDNN: CUDA with cuDNN attention enabled
    (sm80 or newer) and deterministic algorithms not required (cuDNN's attention is not deterministic; torch's
    SDPA avoids it then too), fp16/bf16, equal q/k and v head dims of at most 128 that are multiples of 8, and the
    ``Tc = ceil((T - l + 1) / d)`` compressed keys that NSA's compressors give (other ``Tc`` keep the flex path)."""
    T = q.shape[2]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v_cmp.shape[-1]
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0 and T >= block_size
            and k_cmp.shape[2] == -(-(T - block_size + 1) // stride) and cudnn_attention_ready(q.device.index))


@torch._dynamo.assume_constant_result  # evaluated once while tracing, not traced into
def cudnn_attention_ready(device_index: Optional[int]) -> bool:
    return (torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.is_available()
            and not (torch.are_deterministic_algorithms_enabled()
                     and not torch.is_deterministic_algorithms_warn_only_enabled())
            and torch.cuda.get_device_capability(device_index) >= (8, 0))


def compressed_attention_cudnn(
    q: Float[Tensor, "B Hq T D"],
    k_cmp: Float[Tensor, "B Hkv Tc D"],
    v_cmp: Float[Tensor, "B Hkv Tc Dv"],
    block_size: int,
    stride: int,
    scale: float,
    return_query: bool = False,
) -> tuple[Tensor, ...]:
    """``(out, lse)`` of the compressed-causal attention through the fold above (``T >= block_size``,
    ``Tc = ceil((T - l + 1) / d)``; gradients to q, k, v; ``lse`` float32, not differentiable). ``q`` is
    copied to ``[B, T, H, D]`` storage unless it has it; ``out`` and the gradient of ``q`` have that storage.

    With ``return_query``, ``(out, lse, q_view)``: called eagerly, ``q_view`` is ``q`` as an output of this
    branch's autograd node, so the gradient of ``q`` from attention given ``q_view`` comes back here and the
    backward adds cuDNN's ``dq`` into it in place, where it would copy that ``dq`` into a fresh tensor and
    autograd would then sum the two (two passes over q-sized tensors fewer: 1 GiB each at 64k tokens, paper
    configuration; :mod:`.query_passing`). Inside ``torch.compile`` it is ``q`` (the compiler fuses the sum)."""
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if not return_query:
        return torch.ops.nsa_flex.compressed_cudnn(q, k_cmp, v_cmp, block_size, stride, scale)
    if torch.compiler.is_compiling():
        return (*torch.ops.nsa_flex.compressed_cudnn(q, k_cmp, v_cmp, block_size, stride, scale), q)
    return _CompressedPassingQuery.apply(q, k_cmp, v_cmp, block_size, stride, scale)


def _groups(T: int, block_size: int, stride: int) -> tuple[int, int, int]:
    """(first token that sees a key ``l - 1``, whole groups of ``d`` tokens after it, tokens in a last partial
    group)."""
    start = block_size - 1
    return start, (T - start) // stride, (T - start) % stride


def _fold_rows(x_t: Tensor, start: int, full: int, stride: int) -> Tensor:
    """``[B, T, H, E]`` -> ``[B, d*H, full, E]``: row ``i`` of head ``r*H + h`` is token ``start + i*d + r``; a
    view when ``x_t`` is contiguous (always so here: a copy only if a compiler handed the op other strides)."""
    B, _, H, E = x_t.shape
    return x_t[:, start:start + full * stride].reshape(B, full, stride * H, E).transpose(1, 2)


def _unfold_rows(x: Tensor, stride: int) -> Tensor:
    """The inverse of :func:`_fold_rows`: ``[B, d*H, full, E] -> [B, full*d, H, E]`` (a view where cuDNN kept
    the layout, a copy otherwise)."""
    B, dH, full, E = x.shape
    return x.transpose(1, 2).reshape(B, full * stride, dH // stride, E)


def _repeat_keys(x: Tensor, rows: int, stride: int) -> Tensor:
    """``[B, Hkv, Tc, E] -> [B, d*Hkv, rows, E]``, kv head ``r*Hkv + j`` = ``x[:, j, :rows]`` for each offset ``r``."""
    B, Hkv, _, E = x.shape
    return x[:, :, :rows].unsqueeze(1).expand(B, stride, Hkv, rows, E).reshape(B, stride * Hkv, rows, E)


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """GQA attention on cuDNN, top-left causal (square) or full: ``(out, lse [B, H, L, 1] float32)``."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _cudnn_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                    causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    seed = offset = torch.empty((), dtype=torch.long, device=q.device)  # no dropout: never read
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, offset, None, None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale)


# The attention calls (the folded causal one and the partial group's full one); tests replace these with
# float64 math (``nsa_flex.testing.reference.attention_math``) to check everything around them on CPU.
attention_forward, attention_backward = _cudnn_forward, _cudnn_backward
# the causal mask as cudnn-frontend's graphs take it (top-left aligned: query row i sees keys 0..i)
_CAUSAL = {} if cudnn is None else dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                                        diagonal_band_right_bound=0)


def _folded_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float) -> Tensor:
    """The folded causal attention, written into ``out`` (the branch output's folded view); returns its float32
    log-sum-exp ``[B, d*H, full, 1]``. Through cudnn-frontend where it is installed and builds the graph: cuDNN
    then writes the view itself, where torch's cuDNN attention allocates its own output, which is copied in
    (1 GiB, 0.7 ms at 64k tokens, paper configuration, H100)."""
    if _frontend_builds(q, k, v, out, scale):
        stats = cudnn_graph.stats_like(q)
        cudnn_graph.execute(_frontend_graph(q, k, v, out, stats, scale), (q, k, v, out, stats), q.device)
        return stats
    o, lse = attention_forward(q, k, v, scale, causal=True)
    out.copy_(o)
    return lse


_FRONTEND: dict[tuple, bool] = {}  # each layout's verdict: whether cudnn-frontend builds its graph


def _frontend_graph(q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, scale: float):
    return cudnn_graph.forward_graph(q, k, v, out, stats, scale, q.device.index, **_CAUSAL)


def _frontend_builds(q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float) -> bool:
    if cudnn is None or not q.is_cuda or attention_forward is not _cudnn_forward:  # (tests swap the math in)
        return False
    return cudnn_graph.builds(
        _FRONTEND, (cudnn_graph.layout(q, k, v, out), str(q.dtype), scale, q.device.index),
        lambda: _frontend_graph(q, k, v, out, cudnn_graph.stats_like(q), scale),
        lambda: f"cudnn-frontend could not build the compressed attention graph for q {list(q.shape)}; torch's cuDNN "
        f"attention runs it, with a copy of its output")


@torch.library.custom_op("nsa_flex::compressed_cudnn", mutates_args=())
def _compressed_cudnn(q: Tensor, k: Tensor, v: Tensor, block_size: int, stride: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    B, H, T, _ = q.shape
    d, Dv = stride, v.shape[-1]
    s, full, tail = _groups(T, block_size, d)
    q_t = q.transpose(1, 2)
    out = q.new_empty(B, T, H, Dv)
    lse = q.new_empty(B, H, T, dtype=torch.promote_types(q.dtype, torch.float32))
    out[:, :s] = 0
    lse[:, :, :s] = float("-inf")
    if full:
        lse_m = _folded_forward(_fold_rows(q_t, s, full, d), _repeat_keys(k, full, d), _repeat_keys(v, full, d),
                                _fold_rows(out, s, full, d), scale)
        lse[:, :, s:s + full * d] = _unfold_rows(lse_m.reshape(B, d * H, full, 1), d).squeeze(-1).transpose(1, 2)
    if tail:
        # a few rows, given to cuDNN contiguous here and in the backward: as strided views of [B, T, H, D]
        # storage its backward returned wrong dv for them (H100, torch 2.11; out, lse, dq, dk were right, and
        # the folded call's views are fine)
        o_t, lse_t = attention_forward(q[:, :, T - tail:].contiguous(), k, v, scale, causal=False)
        out[:, T - tail:] = o_t.transpose(1, 2)
        lse[:, :, T - tail:] = lse_t.squeeze(-1)
    return out.transpose(1, 2), lse


@_compressed_cudnn.register_fake
def _(q, k, v, block_size, stride, scale):
    B, H, T, _ = q.shape
    return (q.new_empty(B, T, H, v.shape[-1]).transpose(1, 2),
            q.new_empty(B, H, T, dtype=torch.promote_types(q.dtype, torch.float32)))


@torch.library.custom_op("nsa_flex::compressed_cudnn_backward", mutates_args=())
def _compressed_cudnn_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               block_size: int, stride: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, out, lse, block_size, stride, scale)


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_size: int, stride: int,
              scale: float, dq_into: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``; with ``dq_into`` (q's shape and dtype, ``[B, T, H, D]``-contiguous storage) the
    gradient of ``q`` is added into it, which is returned as ``dq``."""
    B, H, T, D = q.shape
    d = stride
    s, full, tail = _groups(T, block_size, d)
    q_t, out_t, do_t = (x.transpose(1, 2) for x in (q, out, do))
    acc = torch.promote_types(k.dtype, torch.float32)
    dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    add = dq_into is not None
    dq = dq_into.transpose(1, 2) if add else None
    if full:
        # do is copied unless it already has out's [B, T, H, Dv] storage: cuDNN then gets it folded with out's
        # strides
        folded = [_fold_rows(x, s, full, d) for x in (do_t.contiguous(), q_t, out_t)]
        lse_m = _fold_rows(lse.transpose(1, 2).unsqueeze(-1), s, full, d)  # cuDNN's [B, d*H, full, 1]
        keys = [_repeat_keys(x, full, d) for x in (k, v)]
        # The offsets in `parts` calls: cuDNN's float32 workspace (twice q's size for one call) and its dq
        # scale with the call, and this backward holds a training step's peak memory (64k tokens, paper
        # configuration, H100: the step's peak 9.47 -> 8.21 GiB with two calls; dq is allocated after the
        # first returns).
        parts = 2 if d % 2 == 0 else 1
        qh, kh = d * H // parts, d * k.shape[1] // parts
        for part in range(parts):
            rows, kv = slice(part * qh, (part + 1) * qh), slice(part * kh, (part + 1) * kh)
            dq_p, dk_p, dv_p = attention_backward(*(x[:, rows] for x in folded[:2]), *(x[:, kv] for x in keys),
                                                  folded[2][:, rows], lse_m[:, rows].contiguous(), scale, causal=True)
            dk[:, :, :full] += dk_p.unflatten(1, (d // parts, -1)).sum(1, dtype=acc)
            dv[:, :, :full] += dv_p.unflatten(1, (d // parts, -1)).sum(1, dtype=acc)
            if dq is None:
                dq = q.new_empty(B, T, H, D)
            _write(_fold_rows(dq, s, full, d)[:, rows], dq_p, add)  # a view of dq's contiguous storage
            del dq_p
        del folded  # with it the copy of do, if one was made
    if dq is None:
        dq = q.new_empty(B, T, H, D)
    if not add:
        dq[:, :s] = 0
    if tail:
        rows = slice(T - tail, T)
        dq_t, dk_t, dv_t = attention_backward(*(x[:, :, rows].contiguous() for x in (do, q)), k, v,
                                              out[:, :, rows].contiguous(), lse[:, :, rows, None].contiguous(),
                                              scale, causal=False)
        _write(dq[:, rows], dq_t.transpose(1, 2), add)
        dk += dk_t
        dv += dv_t
    return dq.transpose(1, 2), dk.to(k.dtype), dv.to(v.dtype)


def _write(into: Tensor, x: Tensor, add: bool) -> None:
    """``into += x`` or ``into[...] = x``."""
    if add:
        add_into(into, x)
    else:
        into.copy_(x)


@_compressed_cudnn_backward.register_fake
def _(do, q, k, v, out, lse, block_size, stride, scale):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.block_size, ctx.stride, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*torch.ops.nsa_flex.compressed_cudnn_backward(do, q, k, v, out, lse, ctx.block_size, ctx.stride,
                                                          ctx.scale), None, None, None)


_compressed_cudnn.register_autograd(_op_backward, setup_context=_setup_context)


class _CompressedPassingQuery(torch.autograd.Function):
    """The op above, eagerly, with ``q`` passed on as an output (see :func:`compressed_attention_cudnn`)."""

    @staticmethod
    def forward(ctx, q, k, v, block_size, stride, scale):
        out, lse = torch.ops.nsa_flex.compressed_cudnn(q, k, v, block_size, stride, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (block_size, stride, scale)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse, q

    @staticmethod
    def backward(ctx, do, _dlse, dq_other):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:  # only the passed-on q was used
            return dq_other, None, None, None, None, None
        dq_other = gradient_to_add_into(dq_other, q)  # with q's strides: the [B, T, H, D] storage _backward needs
        return (*_backward(do, q, k, v, out, lse, *ctx.args, dq_into=dq_other), None, None, None)
