"""Argument checks shared by every layer: each raises ValueError/TypeError naming the argument,
what was expected and what was received. A leaf module: it imports nothing of ours."""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch
from torch import Tensor


# The largest int torch indexes and seeds with (int64): a larger one would overflow later, inside torch.
INT64_MAX = (1 << 63) - 1


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int in ``[minimum, INT64_MAX]``, else TypeError (not an int) / ValueError (out of range)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be an int <= 2**63 - 1 (int64), got {value}")
    return value


def seed(name: str, value) -> int:
    """A random seed: an int in ``[0, 2**63 - 1]``, else TypeError / ValueError (``torch.manual_seed`` would
    fail later, or overflow, without naming the argument)."""
    return positive_int(name, value, minimum=0)


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


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool = True,
              same_dtype: bool = True) -> tuple[int, int, int, int]:
    """Validate ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]``, ``v [B, Hkv, S, Dv]`` (floating; one dtype unless
    ``same_dtype=False``, for references that compute in float64 anyway); return (B, Hq, Hkv, T)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor(name, x, ndim=4, floating=True)
    B, Hq, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same [B, Hkv, S], got {list(k.shape)} and {list(v.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {k.shape[-1]}")
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    if same_length and k.shape[2] != T:
        raise ValueError(f"q and k must have the same length T (self-attention), got {T} and {k.shape[2]}")
    if same_dtype and not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hq, Hkv, T


def number(name: str, value, *, greater_than: Optional[float] = None, at_least: Optional[float] = None) -> float:
    """``value`` (a real number such as an int, float or NumPy scalar; not a bool) as a finite float,
    ``> greater_than`` / ``>= at_least`` if given; else TypeError (not a number) / ValueError (out of range or not
    finite)."""
    if greater_than is not None:
        want = f"a finite number > {greater_than:g}"
    elif at_least is not None:
        want = f"a finite number >= {at_least:g}"
    else:
        want = "a finite number"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (greater_than is not None and not value > greater_than) or (
            at_least is not None and not value >= at_least):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def attention_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else ``scale`` as a finite float > 0 (a NaN or a
    non-positive scale had run, giving meaningless attention and block selections)."""
    return head_dim ** -0.5 if scale is None else number("scale", scale, greater_than=0)


def block_and_stride(block_size: int, stride: int, block_name: str = "block_size",
                     stride_name: str = "stride") -> tuple[int, int]:
    """A compression (block size, stride) pair: both positive ints, the stride at most the block size (a larger
    stride skips tokens). The names are the caller's arguments (``compress_block_size``, ...)."""
    positive_int(block_name, block_size)
    positive_int(stride_name, stride)
    if stride > block_size:
        raise ValueError(f"{stride_name} must be <= {block_name} (a larger stride skips tokens), got "
                         f"{stride_name}={stride}, {block_name}={block_size}")
    return block_size, stride


def device(name: str, value) -> Optional[torch.device]:
    """``value`` (None, a device string or a ``torch.device``) as a ``torch.device`` that this torch can use:
    ValueError for a malformed string, or a device (CUDA, XPU, MPS, ...) this torch or machine does not have
    (torch itself fails later, with an AssertionError from its lazy init or a compiler error)."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a device string such as 'cpu' or 'cuda', or a torch.device, got "
                        f"{type(value).__name__} {value!r}")
    try:
        dev = torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{name} must be a valid device string such as 'cpu' or 'cuda:0', got {value!r} ({err})") \
            from None
    if dev.type not in ("cpu", "cuda", "meta"):  # xpu, mps, ...: torch's module for it says if it can be used
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if not (callable(is_available) and is_available()):
            raise ValueError(f"{name}={value!r} but this torch cannot use {dev.type} devices "
                             f"(torch {torch.__version__})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r} but CUDA is not available (torch {torch.__version__}, "
                             f"{'no CUDA build' if torch.version.cuda is None else 'no CUDA device visible'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={value!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def floating_dtype(name: str, value) -> torch.dtype:
    """``value`` as a floating-point ``torch.dtype``, else TypeError."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.float32, got {value!r}")
    return value


def score_mod_heads(name: str, score_mod, heads: int) -> None:
    """ValueError when ``score_mod`` is defined for a number of heads (its ``num_heads``, as the mods of
    :mod:`nsa_flex.scores` that index per-head data have) other than ``heads``: past its heads a per-head table
    is indexed out of range, and ALiBi's slopes are those of another head count."""
    own = getattr(score_mod, "num_heads", None)
    if own is not None and own != heads:
        raise ValueError(f"{name} {score_mod!r} is defined for {own} heads, got {heads} query heads")


def index_range(name: str, value: Tensor, high: int, bound: str, noun: str = "") -> None:
    """ValueError unless the integer tensor ``value`` lies in ``[0, high)`` (``bound`` says what ``high`` is,
    ``noun`` what the entries are), checked only where that costs no host sync: on CPU tensors outside a
    compiled graph. Elsewhere a no-op; the callers' docstrings say what an entry out of range does there."""
    if value.device.type != "cpu" or value.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(value.min()), int(value.max())
    if lo < 0 or hi >= high:
        raise ValueError(f"{name} must be {noun + ' ' if noun else ''}in [0, {high}) ({bound}), got min {lo}, "
                         f"max {hi}")
