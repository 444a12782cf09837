"""Neighborhood attention on an image (NATTEN): tokens are the pixels of an ``height x width`` grid, row-major.

Token ``t`` is the pixel ``(t // W, t % W)``. Each query pixel sees a ``kh x kw`` window of key pixels around it,
moved inward at the borders so that it stays inside the image: every query sees exactly ``kh * kw`` keys, as in
NATTEN's neighborhood attention (Hassani et al., 2023) and attention-gym's ``natten`` example. With a dilation
``d`` (DiNAT, Hassani and Shi, 2022) the window takes every ``d``-th pixel: each axis splits into ``d``
interleaved sub-grids, and a query's window lies in its own.
"""

from __future__ import annotations

from typing import Union

import torch

from .._checks import positive_int
from .mask import Extent, Mask

Pair = Union[int, tuple[int, int], list[int]]


def neighborhood(height: int, width: int, kernel_size: Pair, dilation: Pair = 1) -> Mask:
    """2D (dilated) neighborhood attention over an ``height x width`` image whose pixels are the tokens, row-major.

    Per axis (rows: size ``H``, kernel ``kh``, dilation ``dh``; columns likewise), with query coordinate ``r``
    and key coordinate ``r'``: the query's sub-grid is ``g = r % dh``, holding ``n = ceil((H - g) / dh)``
    coordinates; its window starts at ``s = clamp(r // dh - kh // 2, 0, n - kh)``; the key is in the window iff
    ``r' % dh == g`` and ``s <= r' // dh < s + kh``. Query ``t = (t // W, t % W)`` sees key ``j`` iff it is in the
    window along both axes. Without dilation that is a window centred on the query for odd sizes, shifted inward
    at the image's borders (even sizes reach one pixel further before the query than after it); every query sees
    exactly ``kh * kw`` keys. ``kernel_size`` and ``dilation`` are ints or ``(rows, columns)`` pairs, with
    ``kernel * dilation`` at most the image's size on each axis. Both lengths must be at most ``H * W`` (queries
    and keys index the same image; shorter lengths take its first rows of pixels).
    """
    H = positive_int("height", height)
    W = positive_int("width", width)
    kh, kw = _pair("kernel_size", kernel_size)
    dh, dw = _pair("dilation", dilation)
    if kh * dh > H or kw * dw > W:
        raise ValueError(f"kernel_size * dilation must fit in the image ({H} x {W}), got kernel {kh} x {kw}, "
                         f"dilation {dh} x {dw}")

    def within_image(q_len: int, kv_len: int) -> None:
        if max(q_len, kv_len) > H * W:
            raise ValueError(f"neighborhood(...) is defined for the {H * W} pixels of a {H} x {W} image, got "
                             f"q_len={q_len}, kv_len={kv_len}")

    def neighborhood(b, h, q_idx, kv_idx):
        rows = _in_window(q_idx // W, kv_idx // W, H, kh, dh)
        return rows & _in_window(q_idx % W, kv_idx % W, W, kw, dw)

    name = f"neighborhood({H}, {W}, {_show(kh, kw)}" + ("" if dh == dw == 1 else f", dilation={_show(dh, dw)}")
    return Mask(neighborhood, name + ")", Extent(checks=(within_image,)))


def _in_window(q: torch.Tensor, k: torch.Tensor, size: int, kernel: int, dilation: int) -> torch.Tensor:
    """Along one axis: whether key coordinate ``k`` is in the window of query coordinate ``q``."""
    group = q % dilation
    count = (size - group + dilation - 1) // dilation  # coordinates in the query's sub-grid
    start = torch.minimum((q // dilation - kernel // 2).clamp(min=0), count - kernel)
    return (k % dilation == group) & (k // dilation >= start) & (k // dilation < start + kernel)


def _pair(name: str, value: Pair) -> tuple[int, int]:
    """An int or a (rows, columns) pair of positive ints, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (rows, columns) pair, got {value!r}")
        return positive_int(f"{name}[0]", value[0]), positive_int(f"{name}[1]", value[1])
    value = positive_int(name, value)
    return value, value


def _show(rows: int, cols: int) -> str:
    return f"{rows}" if rows == cols else f"({rows}, {cols})"
