"""score_mod generators (softcap, ALiBi, relative bias) and their composition.

A score_mod is a function ``(score, b, h, q_idx, kv_idx) -> score`` that FlexAttention applies to every
pre-softmax score (``q . k * scale``). It is evaluated under ``vmap`` (scalar index tensors), inside
``torch.compile`` and, for dense references, with broadcastable index tensors ``[B,1,1,1]``, ``[1,H,1,1]``,
``[1,1,Q,1]``, ``[1,1,1,KV]``; so every mod here is written with elementwise tensor ops only.

Each generator returns a :class:`ScoreMod`: callable with that signature (pass it as ``score_mod=``), with a
``repr`` that reads like the call that made it, e.g. ``compose(alibi(8), softcap(30.0))``. A leaf module: it
imports nothing of ours except the argument checks.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from ._checks import number, positive_int, tensor

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "as_score_mod", "compose", "relative_bias", "softcap"]


class ScoreMod:
    """A score_mod with a readable repr. Wrap any ``(score, b, h, q_idx, kv_idx) -> score``: ``ScoreMod(fn)``.

    Args:
        fn: the score_mod.
        name: what ``repr`` shows; defaults to ``fn.__name__``.
        num_heads: the number of heads the mod is defined for (it indexes per-head data), else ``None``.
    """

    def __init__(self, fn: ScoreModFn, name: Optional[str] = None, num_heads: Optional[int] = None):
        if isinstance(fn, ScoreMod):
            fn, name, num_heads = fn.fn, name or fn.name, num_heads or fn.num_heads
        if not callable(fn):
            raise TypeError(
                f"ScoreMod(fn): fn must be callable (score, b, h, q_idx, kv_idx) -> score, got {type(fn).__name__}"
            )
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.num_heads = num_heads

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(score, b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return self.name


def as_score_mod(fn: Union[ScoreMod, ScoreModFn]) -> ScoreMod:
    """A :class:`ScoreMod` for ``fn`` (returned unchanged if it already is one)."""
    return fn if isinstance(fn, ScoreMod) else ScoreMod(fn)


def softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``, scores squashed smoothly into ``(-cap, cap)``."""
    c = number("cap", cap, greater_than=0)

    def softcap(score, b, h, q_idx, kv_idx):
        return c * torch.tanh(score / c)

    return ScoreMod(softcap, f"softcap({c!r})")


def alibi_slopes(num_heads: int) -> Float[Tensor, " H"]:
    """ALiBi head slopes (Press et al. 2022), float32 ``[num_heads]``.

    For ``n`` a power of two: ``2^(-8 i / n)`` for ``i = 1..n``. Otherwise, with ``c`` the largest power of two
    below ``n``: the ``c`` slopes for ``c`` heads, then every other slope of ``2c`` heads (the odd-numbered ones,
    ``2^(-8 (2i - 1) / 2c)``) for the remaining ``n - c`` heads, as in the paper's reference code.
    """
    n = positive_int("num_heads", num_heads)
    return _slope(torch.arange(n), 1 << (n.bit_length() - 1))


def _slope(h: Tensor, c: int) -> Tensor:
    """Slope of head ``h`` (any shape of int tensor) in closed form, so a score_mod needs no captured tensor."""
    # heads < c: 2^(-8 (h + 1) / c); heads >= c: 2^(-8 (2 (h - c) + 1) / (2c)) = 2^(-8 (h - c + 0.5) / c)
    exponent = torch.where(h < c, h + 1.0, h - c + 0.5)
    return torch.exp2(exponent * (-8.0 / c)).to(torch.float32)


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi: ``score + slope[h] * (kv_idx - q_idx)`` with the slopes of :func:`alibi_slopes`.

    Keys in the past get a penalty growing linearly with distance (``kv_idx - q_idx <= 0``). Defined for
    ``h < num_heads``. The slope is computed from ``h`` with tensor ops, so the mod works on any device.
    """
    n = positive_int("num_heads", num_heads)
    c = 1 << (n.bit_length() - 1)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + _slope(h, c) * (kv_idx - q_idx)

    return ScoreMod(alibi, f"alibi({n})", num_heads=n)


def relative_bias(table: Union[Float[Tensor, "H R"], Float[Tensor, " R"]]) -> ScoreMod:
    """Learned relative-position bias: ``score + table[(h,) clamp(kv_idx - q_idx, -(M-1), M-1) + M - 1]``.

    ``table`` is a floating tensor ``[2*M - 1]`` (shared by all heads) or ``[H, 2*M - 1]`` (per head), entry
    ``M - 1`` being distance 0; distances beyond ``M - 1`` use the outermost entries. The tensor is used as
    is (not copied), so an ``nn.Parameter`` stays learnable and in-place updates are seen.
    """
    tab = tensor("table", table, floating=True)
    if tab.ndim not in (1, 2):
        raise ValueError(f"table must have shape [2*max_distance - 1] or [H, 2*max_distance - 1], got {list(tab.shape)}")
    size = tab.shape[-1]
    if size % 2 == 0 or (tab.ndim == 2 and tab.shape[0] == 0):
        raise ValueError(
            f"table's last dimension must be odd, 2*max_distance - 1 (entry max_distance - 1 is distance 0), "
            f"got shape {list(tab.shape)}"
        )
    m = (size - 1) // 2  # the largest distance with its own entry

    if tab.ndim == 1:

        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + tab[(kv_idx - q_idx).clamp(-m, m) + m]

        return ScoreMod(relative_bias, f"relative_bias(<table [{size}]>)")

    def relative_bias(score, b, h, q_idx, kv_idx):  # noqa: F811 - one closure per branch, same name
        return score + tab[h, (kv_idx - q_idx).clamp(-m, m) + m]

    return ScoreMod(relative_bias, f"relative_bias(<table {list(tab.shape)}>)", num_heads=tab.shape[0])


def compose(*mods: Union[ScoreMod, ScoreModFn]) -> ScoreMod:
    """Apply score_mods in order: ``compose(f, g)(s, ...) == g(f(s, ...), ...)``.

    E.g. ``compose(alibi(8), softcap(30.0))`` adds the bias, then caps. With no mods it is the identity.
    """
    parts = []
    for i, mod in enumerate(mods):
        if not callable(mod):
            raise TypeError(f"compose: argument {i} must be a score_mod (callable), got {type(mod).__name__}")
        parts.append(as_score_mod(mod))
    heads = {p.num_heads for p in parts if p.num_heads is not None}
    if len(heads) > 1:
        raise ValueError(f"compose: score_mods are defined for different numbers of heads {sorted(heads)}")
    fns = tuple(p.fn for p in parts)

    def compose(score, b, h, q_idx, kv_idx):
        for fn in fns:
            score = fn(score, b, h, q_idx, kv_idx)
        return score

    name = "compose(" + ", ".join(p.name for p in parts) + ")"
    return ScoreMod(compose, name, num_heads=heads.pop() if heads else None)
