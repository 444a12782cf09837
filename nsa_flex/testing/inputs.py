"""NSA inputs for tests and benchmarks: independent random tokens, or tokens with local structure.

``random`` makes every token's block selection independent of its neighbours' (the worst case for
block-sparse kernels); ``structured`` adds a slowly varying random walk along the sequence, so neighbouring
tokens attend alike, as in trained models.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .._checks import device as check_device, floating_dtype, positive_int, seed as check_seed

KINDS = ("random", "structured")


def nsa_inputs(
    T: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    kind: str = "random",
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``q [B, heads, T, D]``, ``k, v [B, kv_heads, T, D]`` and ``gates [B, heads, T, 3]`` (uniform in [0, 1)).

    The same ``seed`` gives the same values on every device (drawn on the CPU, then moved).
    """
    for name, value in (("T", T), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("batch", batch)):
        positive_int(name, value)
    if heads % kv_heads:
        raise ValueError(f"heads must be a multiple of kv_heads (GQA), got heads={heads}, kv_heads={kv_heads}")
    device = check_device("device", device)
    floating_dtype("dtype", dtype)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    gen = torch.Generator(device="cpu").manual_seed(check_seed("seed", seed))

    def draw(h: int) -> Tensor:
        x = torch.randn(batch, h, T, head_dim, generator=gen)
        if kind == "structured":  # a random walk along T (local correlation) plus noise
            drift = torch.randn(batch, h, T, head_dim, generator=gen).cumsum(dim=2) / (T**0.5) * 4
            x = 0.5 * x + drift
        return x.to(device=device, dtype=dtype)

    q, k, v = draw(heads), draw(kv_heads), draw(kv_heads)
    gates = torch.rand(batch, heads, T, 3, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, gates
