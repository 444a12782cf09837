"""Rotary position embedding (RoPE, "rotate half" / GPT-NeoX layout), without parameters or cached tables.

Feature pair ``(i, i + D/2)`` of the token at position ``p`` is rotated by the angle ``p * base**(-2i/D)``.
The angles are computed on the fly in float32 (float64 for float64 inputs), so casting the module to bf16 does
not round them, and ``offset`` shifts the positions (a decoding step's first position).

The ``[T, D/2]`` cosine and sine table is made by a custom op (``nsa_flex::rotary_table``), which
``torch.compile`` keeps whole: traced as plain torch ops, inductor inlined the angles, ``pow``, ``sin`` and
``cos`` into the rotation kernel and computed them for every element of ``q`` and ``k``. At ``[16, 8, 4096,
64]`` in bf16 on an H100 that kernel took 0.62 ms, and 0.09 ms with the table as an input.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .._checks import number, positive_int, tensor
from ..functional.decode import rotary_frequencies

__all__ = ["RotaryEmbedding", "apply_rotary"]


@torch.library.custom_op("nsa_flex::rotary_table", mutates_args=())
def rotary_table(T: int, D: int, offset: int, base: float, device: torch.device,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin) [T, D/2]`` of the angles ``(offset + t) * base**(-2i/D)``, computed in ``dtype``."""
    pos = torch.arange(T, device=device, dtype=dtype) + offset
    angles = pos[:, None] * rotary_frequencies(D, base, device, dtype)[None, :]
    return angles.cos(), angles.sin()


@rotary_table.register_fake
def _(T, D, offset, base, device, dtype):
    return (torch.empty(T, D // 2, device=device, dtype=dtype), torch.empty(T, D // 2, device=device, dtype=dtype))


def apply_rotary(x: Float[Tensor, "B H T D"], offset: int = 0, base: float = 10000.0) -> Float[Tensor, "B H T D"]:
    """Rotate ``x [B, H, T, D]`` (``D`` even) for positions ``offset, ..., offset + T - 1``."""
    tensor("x", x, ndim=4, floating=True)
    T, D = x.shape[-2], x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got x of shape {list(x.shape)}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rotary_table(T, D, int(offset), float(base), x.device, work)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """``RotaryEmbedding(dim_head)(x, offset=0)``: :func:`apply_rotary` as a module (no parameters)."""

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        positive_int("dim_head", dim_head)
        if dim_head % 2:
            raise ValueError(f"rotary embedding needs an even dim_head, got {dim_head}")
        self.dim_head = dim_head
        self.base = number("base", base, greater_than=1)

    def forward(self, x: Float[Tensor, "B H T D"], offset: int = 0) -> Float[Tensor, "B H T D"]:
        if isinstance(x, Tensor) and x.shape[-1] != self.dim_head:
            raise ValueError(f"x must have head dim {self.dim_head}, got shape {list(x.shape)}")
        return apply_rotary(x, offset, self.base)

    def extra_repr(self) -> str:
        return f"dim_head={self.dim_head}, base={self.base}"


def layer_rotary(dim_head: int, use_rotary: bool, rotary_base: float) -> Optional[RotaryEmbedding]:
    """An attention layer's RoPE, None without it; a bad base is named as the layer's ``rotary_base``."""
    if not use_rotary:
        return None
    number("rotary_base", rotary_base, greater_than=1)
    return RotaryEmbedding(dim_head, rotary_base)
