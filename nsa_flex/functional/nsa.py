"""Native Sparse Attention (DeepSeek, 2025): three branches mixed by learned gates.

``o = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win`` where ``o_cmp`` attends to compressed blocks,
``o_sel`` to each token's top-n selected blocks (chosen from the compressed branch's probabilities) and
``o_win`` to a causal sliding window.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .._checks import check_qkv, number, positive_int, tensor
from .branches import compressed_attention, selected_attention, sliding_window_attention
from .compress import mean_pool, num_compressed_blocks
from .flex import RECOMPILE_LIMIT
from .selection import check_selection, select_blocks

Compressor = Callable[[Tensor], Tensor]  # [B, H, T, D] -> [B, H, Tc, D]
CompressSpec = Union[str, Compressor, tuple[Compressor, Compressor]]


def resolve_compressors(compress: CompressSpec, block_size: int, stride: int) -> tuple[Compressor, Compressor]:
    """``"mean"``, one callable for keys and values, or a ``(key_compressor, value_compressor)`` pair."""
    if compress == "mean":
        def mean(x: Tensor) -> Tensor:
            return mean_pool(x, block_size, stride)

        return mean, mean
    if isinstance(compress, str):
        raise ValueError(f"compress must be 'mean', a module/callable or a (key, value) pair of them, got {compress!r}")
    if isinstance(compress, tuple):
        if len(compress) != 2 or not all(callable(c) for c in compress):
            raise TypeError(f"compress as a tuple must be (key_compressor, value_compressor), got {compress!r}")
        return compress
    if not callable(compress):
        raise TypeError("compress must be 'mean' or callable [B, H, T, D] -> [B, H, Tc, D], got "
                        f"{type(compress).__name__}")
    return compress, compress


def check_nsa_arguments(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, compress_block_size: int, compress_stride: int,
                        selection_block_size: int, num_selected: int, num_initial: int, num_local: int,
                        window_size: int, scale: Optional[float], fine_qk: Optional[tuple[Tensor, Tensor]], *,
                        same_dtype: bool = True) -> tuple[int, int, int]:
    """Validate :func:`nsa_attention`'s arguments (its float64 reference shares this, with ``same_dtype=False``);
    returns ``(B, Hq, T)``."""
    B, Hq, _, T = check_qkv(q, k, v, same_dtype=same_dtype)
    tensor("gates", gates, ndim=4, floating=True, shape=(B, Hq, T, 3))
    check_selection(compress_block_size, compress_stride, selection_block_size, num_selected, num_initial, num_local)
    positive_int("window_size", window_size)
    if scale is not None:
        number("scale", scale, greater_than=0)
    if fine_qk is not None:
        pair = isinstance(fine_qk, (tuple, list))
        if not pair or len(fine_qk) != 2:
            got = f"a {type(fine_qk).__name__} of length {len(fine_qk)}" if pair else type(fine_qk).__name__
            raise TypeError(f"fine_qk must be a pair (q', k') of tensors shaped as q and k, got {got}")
        for name, x, like in (("fine_qk[0]", fine_qk[0], q), ("fine_qk[1]", fine_qk[1], k)):
            tensor(name, x, floating=True, shape=like.shape)
    return B, Hq, T


def nsa_attention(
    q: Float[Tensor, "B Hq T D"],
    k: Float[Tensor, "B Hkv T D"],
    v: Float[Tensor, "B Hkv T Dv"],
    gates: Float[Tensor, "B Hq T 3"],
    compress: CompressSpec = "mean",
    compress_block_size: int = 32,
    compress_stride: int = 16,
    selection_block_size: int = 64,
    num_selected: int = 16,
    num_initial: int = 1,
    num_local: int = 2,
    window_size: int = 512,
    scale: Optional[float] = None,
    fine_qk: Optional[tuple[Tensor, Tensor]] = None,
    return_branches: bool = False,
) -> Union[Tensor, tuple[Tensor, dict]]:
    """NSA attention. ``gates[..., i]`` weighs (compressed, selected, window); typically a sigmoid, in ``[0, 1]``.

    ``compress`` maps ``[B, Hkv, T, D] -> [B, Hkv, Tc, D]`` with ``Tc = max(0, (T - l) // d + 1)``.
    ``fine_qk = (q', k')``, if given, replaces ``q, k`` in the selected and window branches only (e.g. rotary-
    embedded copies; compression and block scoring keep the position-free ``q, k``, as in the paper).
    Returns ``o [B, Hq, T, Dv]``, or ``(o, branches)`` with the dict ``{"compressed", "selected", "window",
    "block_indices"}`` when ``return_branches``.
    """
    B, Hq, T = check_nsa_arguments(q, k, v, gates, compress_block_size, compress_stride, selection_block_size,
                                   num_selected, num_initial, num_local, window_size, scale, fine_qk)
    if T == 0:  # no token, nothing to attend; kept in the graph, so the gradients are (empty) zeros, not None
        out = q.new_zeros(B, Hq, 0, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum() + gates.sum())
        if return_branches:
            none = q.new_zeros(B, k.shape[1], 0, num_selected, dtype=torch.long)
            return out, {"compressed": out, "selected": out, "window": out, "block_indices": none}
        return out
    k_compress, v_compress = resolve_compressors(compress, compress_block_size, compress_stride)

    k_cmp, v_cmp = k_compress(k), v_compress(v)
    Tc = num_compressed_blocks(T, compress_block_size, compress_stride)
    for name, x in (("compressed keys", k_cmp), ("compressed values", v_cmp)):
        expected = (B, k.shape[1], Tc)
        if x.ndim != 4 or tuple(x.shape[:3]) != expected:
            raise ValueError(f"compress must return [B, Hkv, Tc, D] = [{B}, {k.shape[1]}, {Tc}, *] for {name}, "
                             f"got {list(x.shape)}")

    # q goes from branch to branch (compressed -> selected -> window) as each one's passed-on view, so in the
    # backward each branch adds its gradient of q into the next one's instead of autograd summing them
    o_cmp, lse, q_next = compressed_attention(q, k_cmp, v_cmp, compress_block_size, compress_stride, scale,
                                              return_lse=True, return_query=True)
    block_indices = select_blocks(q, k_cmp, compress_block_size, compress_stride, selection_block_size,
                                  num_selected, num_initial, num_local, scale, lse=lse.detach())
    q_fine, k_fine = (q_next, k) if fine_qk is None else fine_qk
    # The selected branch applies its own gate (fused into its kernels) unless its ungated output is asked for
    gate_selected = not return_branches
    o_sel, q_win = selected_attention(q_fine, k_fine, v, block_indices, selection_block_size, scale,
                                      return_query=True, gate=gates[..., 1] if gate_selected else None)
    o_win = sliding_window_attention(q_win, k_fine, v, window_size, scale)
    out = gate(gates, o_cmp, o_sel, o_win, selected_gated=gate_selected)
    if return_branches:
        return out, {"compressed": o_cmp, "selected": o_sel, "window": o_win, "block_indices": block_indices}
    return out


def gate(gates: Float[Tensor, "B Hq T 3"], o_cmp: Float[Tensor, "B Hq T Dv"], o_sel: Float[Tensor, "B Hq T Dv"],
         o_win: Float[Tensor, "B Hq T Dv"], selected_gated: bool = False) -> Float[Tensor, "B Hq T Dv"]:
    """``g_cmp * o_cmp + g_sel * o_sel + g_win * o_win``, in the branches' dtype; with ``selected_gated``,
    ``o_sel`` is already ``g_sel * o_sel`` (``selected_attention(..., gate=g_sel)``) and is added as it is.

    Called eagerly on CUDA it runs as two compiled kernels, one each way (64k tokens, paper config, H100: the
    five elementwise passes over ``[B, Hq, T, Dv]`` tensors and their backward took the forward from 82.1 to
    77.4 ms and forward+backward from 275 to 262 ms), writing into tensors laid out as ``o_cmp``: the output,
    and each branch's gradient as its branch output, so the cuDNN compressed backward gets its gradient
    token-major without a copy (left to the compiler, the gradients came out ``[B, H, T, D]``-contiguous).
    """
    if o_cmp.is_cuda and not torch.compiler.is_compiling():
        return _Gate.apply(gates, o_cmp, o_sel, o_win, selected_gated)
    return _gate(gates, o_cmp, o_sel, o_win, selected_gated)


def _gate(gates: Tensor, o_cmp: Tensor, o_sel: Tensor, o_win: Tensor, selected_gated: bool) -> Tensor:
    g = gates.to(o_cmp.dtype)
    sel = o_sel if selected_gated else g[..., 1:2] * o_sel
    return g[..., 0:1] * o_cmp + sel + g[..., 2:3] * o_win


def _gate_into(out: Tensor, gates: Tensor, o_cmp: Tensor, o_sel: Tensor, o_win: Tensor, selected_gated: bool) -> None:
    out.copy_(_gate(gates, o_cmp, o_sel, o_win, selected_gated))


def _gate_backward_into(grads: list[Tensor], gates: Tensor, outputs: list[Tensor], columns: tuple[int, ...],
                        dy: Tensor) -> Tensor:
    """Writes ``g_i * dy`` into ``grads`` for the gate columns ``columns`` (their branch outputs ``outputs``);
    returns the gates' gradient, zero in the other column."""
    g = gates.to(dy.dtype)
    dg = [torch.zeros_like(gates[..., 0], dtype=torch.float32)] * 3
    for d, o, i in zip(grads, outputs, columns):
        d.copy_(g[..., i:i + 1] * dy)
        dg[i] = (dy.float() * o.float()).sum(-1)
    return torch.stack(dg, dim=-1).to(gates.dtype)


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, o_cmp, o_sel, o_win, selected_gated):
        out = torch.empty_like(o_cmp)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):  # one compile per shape, as flex
            _compiled(_gate_into)(out, gates, o_cmp, o_sel, o_win, selected_gated)
        ctx.selected_gated = selected_gated
        # a gated selected output needs nothing saved: its gradient is dy (the gate's is the branch's business)
        ctx.save_for_backward(gates, o_cmp, o_win, *(() if selected_gated else (o_sel,)))
        return out

    @staticmethod
    def backward(ctx, dy):
        gates, o_cmp, o_win, *o_sel = ctx.saved_tensors
        columns = (0, 2) if ctx.selected_gated else (0, 2, 1)
        outputs = [o_cmp, o_win, *o_sel]
        grads = [torch.empty_like(o) for o in outputs]
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            dg = _compiled(_gate_backward_into)(grads, gates, outputs, columns, dy)
        d_cmp, d_win, *d_sel = grads
        return dg, d_cmp, dy if ctx.selected_gated else d_sel[0], d_win, None


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)
