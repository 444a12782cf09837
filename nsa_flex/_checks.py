"""Argument checks shared by every layer: each raises ValueError/TypeError naming the argument,
what was expected and what was received. A leaf module: it imports nothing of ours."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int >= minimum, else TypeError (not an int) / ValueError (too small)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    integer: bool = False,
    floating: bool = False,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> Tensor:
    """Check ``value`` is a tensor of the given rank / dtype kind / shape (None entries match anything)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if shape is not None:
        if len(shape) != value.ndim or any(e is not None and e != s for e, s in zip(shape, value.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(value.shape)}")
    return value
