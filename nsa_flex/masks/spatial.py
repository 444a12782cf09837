"""Neighborhood attention on an image (NATTEN): tokens are the pixels of an ``height x width`` grid, row-major.

Token ``t`` is the pixel ``(t // W, t % W)``. Each query pixel sees a ``kh x kw`` window of key pixels around it,
moved inward at the borders so that it stays inside the image: every query sees exactly ``kh * kw`` keys, as in
NATTEN's neighborhood attention (Hassani et al., 2023) and attention-gym's ``natten`` example.
"""

from __future__ import annotations

from typing import Union

from .._checks import positive_int
from .mask import Extent, Mask


def neighborhood(height: int, width: int, kernel_size: Union[int, tuple[int, int], list[int]]) -> Mask:
    """2D neighborhood attention over an ``height x width`` image whose pixels are the tokens, row-major.

    With ``kernel_size = k`` (or ``(kh, kw)``), query ``t = (r, c)`` sees key ``j = (r', c')`` iff
    ``s_r <= r' < s_r + kh`` and ``s_c <= c' < s_c + kw``, where ``s_r = clamp(r - kh // 2, 0, H - kh)`` and
    ``s_c = clamp(c - kw // 2, 0, W - kw)``: for odd sizes a window centred on the query, shifted inward at the
    image's borders (even sizes reach one pixel further before the query than after it). Both lengths must be at
    most ``H * W`` (queries and keys index the same image; shorter lengths take its first rows of pixels).
    """
    H = positive_int("height", height)
    W = positive_int("width", width)
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be an int or a (height, width) pair, got {kernel_size!r}")
        kh, kw = (positive_int(f"kernel_size[{i}]", k) for i, k in enumerate(kernel_size))
    else:
        kh = kw = positive_int("kernel_size", kernel_size)
    if kh > H or kw > W:
        raise ValueError(f"kernel_size must fit in the image ({H} x {W}), got {kh} x {kw}")

    def within_image(q_len: int, kv_len: int) -> None:
        if max(q_len, kv_len) > H * W:
            raise ValueError(f"neighborhood(...) is defined for the {H * W} pixels of a {H} x {W} image, got "
                             f"q_len={q_len}, kv_len={kv_len}")

    def neighborhood(b, h, q_idx, kv_idx):
        top = (q_idx // W - kh // 2).clamp(0, H - kh)
        left = (q_idx % W - kw // 2).clamp(0, W - kw)
        row, col = kv_idx // W, kv_idx % W
        return (row >= top) & (row < top + kh) & (col >= left) & (col < left + kw)

    kernel = f"{kh}" if kh == kw else f"({kh}, {kw})"
    return Mask(neighborhood, f"neighborhood({H}, {W}, {kernel})", Extent(checks=(within_image,)))
