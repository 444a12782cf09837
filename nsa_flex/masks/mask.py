"""`Mask`: a FlexAttention ``mask_mod`` with algebra, a readable repr and ways to materialize itself.

A mask_mod is a function ``(b, h, q_idx, kv_idx) -> bool tensor`` saying whether query ``q_idx`` of batch
``b`` and head ``h`` may attend to key ``kv_idx``. FlexAttention evaluates it under ``vmap`` and inside
``torch.compile``, so it must be written with tensor ops only (``&``, ``|``, ``torch.where``; no Python
``and``/``if`` on tensors, no ``.item()``).

A :class:`Mask` *is* such a function (it is callable with that signature), so it can be passed anywhere
torch expects a mask_mod. On top of that it

* composes: ``a & b`` (both allow), ``a | b`` (either allows), ``~a`` (complement), also with plain functions;
* prints the expression it was built from: ``causal() & sliding_window(256)``;
* knows the shapes it is defined for (batch size, heads, maximal lengths of data-dependent masks, whether
  queries and keys must index the same sequence) and checks them before it is materialized;
* materializes itself: :meth:`Mask.to_dense` (bool ``[B, H, Q, KV]``, for checking) and
  :meth:`Mask.to_block_mask` (a torch ``BlockMask`` for ``flex_attention``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Union

import torch
from jaxtyping import Bool
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from .._checks import device as check_device, positive_int

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# A check receives (q_len, kv_len) and raises ValueError when the mask is not defined for them.
LengthCheck = Callable[[int, int], None]

# Operator precedence as in Python, used to parenthesize repr: ~ binds tighter than &, & tighter than |.
_PRECEDENCE = {"|": 1, "&": 2, "~": 3, "atom": 4}


@dataclasses.dataclass(frozen=True)
class Extent:
    """What a mask is defined for. ``None`` means "any"; composition requires agreement."""

    batch: Optional[int] = None  # the mask depends on b and is defined for exactly this batch size
    heads: Optional[int] = None  # the mask depends on h and is defined for exactly this many heads
    checks: tuple[LengthCheck, ...] = ()
    device: Optional[torch.device] = None  # where the tensors a data-dependent mask reads from live

    def merge(self, other: "Extent") -> "Extent":
        return Extent(
            batch=_agree("batch", self.batch, other.batch),
            heads=_agree("heads", self.heads, other.heads),
            checks=self.checks + other.checks,
            device=_agree("device", self.device, other.device),
        )


def _agree(what, a, b):
    if a is not None and b is not None and a != b:
        raise ValueError(f"cannot combine masks defined for {what}={a} and {what}={b}")
    return a if a is not None else b


class Mask:
    """A mask_mod with algebra. Wrap any ``(b, h, q_idx, kv_idx) -> bool`` function: ``Mask(fn)``.

    Args:
        fn: the mask_mod.
        name: the expression shown by ``repr``; defaults to ``fn.__name__``.
        extent: the batch/head sizes and length checks the mask is defined for (see :class:`Extent`).
    """

    def __init__(self, fn: MaskMod, name: Optional[str] = None, extent: Extent = Extent(), *, _op: str = "atom"):
        if isinstance(fn, Mask):  # a rename, and the caller's extent on top of the mask's own
            fn, name, extent, _op = fn.fn, name or fn.name, fn.extent.merge(extent), fn._op
        if not callable(fn):
            raise TypeError(f"Mask(fn): fn must be callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self.extent = extent
        self._op = _op

    # -- the mask_mod itself ------------------------------------------------------------------------
    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    # -- algebra --------------------------------------------------------------------------------------
    def __and__(self, other: Union["Mask", MaskMod]) -> "Mask":
        return _binary("&", self, as_mask(other))

    def __rand__(self, other: MaskMod) -> "Mask":
        return _binary("&", as_mask(other), self)

    def __or__(self, other: Union["Mask", MaskMod]) -> "Mask":
        return _binary("|", self, as_mask(other))

    def __ror__(self, other: MaskMod) -> "Mask":
        return _binary("|", as_mask(other), self)

    def __invert__(self) -> "Mask":
        inner = self

        def not_mask(b, h, q_idx, kv_idx):
            return ~inner(b, h, q_idx, kv_idx)

        return Mask(not_mask, f"~{_wrap(self, _PRECEDENCE['~'])}", self.extent, _op="~")

    def __repr__(self) -> str:
        return self.name

    # -- shapes ---------------------------------------------------------------------------------------
    def check(self, q_len: int, kv_len: int, B: Optional[int] = None, H: Optional[int] = None) -> None:
        """Raise ValueError if this mask is not defined for these lengths / batch / heads (TypeError for
        lengths or sizes that are not ints)."""
        positive_int("q_len", q_len)
        positive_int("kv_len", kv_len)
        for arg, value, own in (("B", B, self.extent.batch), ("H", H, self.extent.heads)):
            if value is None:
                continue
            positive_int(arg, value)
            if own is not None and value not in (own,):
                raise ValueError(f"{self!r} is defined for {arg}={own}, got {arg}={value}")
        for length_check in self.extent.checks:
            length_check(q_len, kv_len)

    def _sizes(self, B: Optional[int], H: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        return (B if B is not None else self.extent.batch, H if H is not None else self.extent.heads)

    # -- materialization ------------------------------------------------------------------------------
    def to_dense(
        self, q_len: int, kv_len: int, B: Optional[int] = None, H: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
    ) -> Bool[Tensor, "B H q_len kv_len"]:
        """The mask as a bool tensor ``[B, H, q_len, kv_len]`` (True = may attend). O(B*H*Q*KV) memory.

        B and H default to the sizes the mask depends on, else 1. A mask_mod must return bool, as FlexAttention's
        contract says: one returning anything else (``q_idx - kv_idx``, a forgotten comparison) raises TypeError
        rather than being read as "nonzero attends", which would hide the bug.
        """
        self.check(q_len, kv_len, B, H)
        B, H = self._sizes(B, H)
        device = self._device(device)
        dense = create_mask(self, B or 1, H or 1, q_len, kv_len, device=device)
        if dense.dtype != torch.bool:
            raise TypeError(f"mask_mod {self!r} must return a bool tensor (True = may attend), got {dense.dtype}")
        return dense

    def to_block_mask(
        self,
        q_len: int,
        kv_len: int,
        B: Optional[int] = None,
        H: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        block_size: Union[int, tuple[int, int]] = 128,
    ) -> BlockMask:
        """A torch ``BlockMask`` for ``flex_attention`` with blocks of ``block_size`` (int or ``(q, kv)``).

        B and H default to the sizes the mask depends on; ``None`` broadcasts over that dimension.
        On CUDA the mask is evaluated by a compiled kernel (no ``Q x KV`` tensor is built) above
        :data:`EAGER_BLOCK_MASK_ENTRIES` entries ``B * H * q_len * kv_len`` (about 2k x 2k), and eagerly, in
        milliseconds instead of a compile of 8-40 s, below; on CPU it is evaluated eagerly (inductor's CPU
        codegen fails for Q != KV).
        """
        self.check(q_len, kv_len, B, H)
        B, H = self._sizes(B, H)
        return build_block_mask(self, q_len, kv_len, B, H, self._device(device), _block_pair(block_size))

    def _device(self, device) -> torch.device:
        """The device of the tensors the mask holds, which a ``device`` the caller names must agree with (the
        mask_mod reads those tensors there); the CPU for masks that hold none."""
        own = self.extent.device
        if device is None:
            return own or torch.device("cpu")
        device = check_device("device", device)
        if own is not None and (own.type != device.type or None not in (own.index, device.index)
                                and own.index != device.index):
            raise ValueError(f"device={str(device)!r} but {self!r} holds its tensors on {own}: move them, or "
                             "leave device unset")
        return device


# (batch, head, query, key) entries up to which a CUDA BlockMask is built eagerly, the whole boolean mask
# evaluated at once (4 MiB, and 32 MiB for each int64 intermediate of the mask_mod; milliseconds): compiling
# create_block_mask took 8-43 s for each new mask and shape (H100, torch 2.11, seven processes compiling side
# by side; 10.6 s for a (128, 128) BlockMask at 300 tokens, 42.4 s with (16, 16) blocks, 8-9 s for the same
# mask at a new length), which GPU tests and short inputs paid for every mask they built.
EAGER_BLOCK_MASK_ENTRIES = 1 << 22


def build_block_mask(
    mask_mod: MaskMod, q_len: int, kv_len: int, B: Optional[int], H: Optional[int], device, block: tuple[int, int]
) -> BlockMask:
    """``create_block_mask`` the way every nsa_flex mask is built: on CUDA compiled (no Q x KV tensor) above
    :data:`EAGER_BLOCK_MASK_ENTRIES` entries ``B * H * q_len * kv_len`` (``None`` counts 1), eager below; eager
    on CPU (inductor's CPU codegen fails for Q != KV)."""
    entries = (B or 1) * (H or 1) * q_len * kv_len
    compile_it = (torch.device(device).type == "cuda" and not torch.compiler.is_compiling()
                  and entries > EAGER_BLOCK_MASK_ENTRIES)
    with warnings.catch_warnings():
        # torch >= 2.11 suggests torch.compile(create_block_mask) instead; the flag still does exactly that.
        warnings.filterwarnings("ignore", message=".*_compile flag on create_block_mask.*")
        return create_block_mask(mask_mod, B, H, q_len, kv_len, device=device, BLOCK_SIZE=block, _compile=compile_it)


def same_length(name: str) -> LengthCheck:
    """A length check for masks whose queries and keys index the same sequence (block layouts)."""

    def check_same_length(q_len: int, kv_len: int) -> None:
        if q_len != kv_len:
            raise ValueError(f"{name} needs q_len == kv_len (self-attention), got q_len={q_len}, kv_len={kv_len}")

    return check_same_length


def _block_pair(block_size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    want = "a positive int or a pair (q, kv) of positive ints"
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)):
        pair = tuple(block_size)
    else:
        raise TypeError(f"block_size must be {want}, got {type(block_size).__name__} {block_size!r}")
    if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in pair):
        raise TypeError(f"block_size must be {want}, got {block_size!r}")
    if min(pair) < 1:
        raise ValueError(f"block_size must be {want}, got {block_size!r}")
    return pair  # type: ignore[return-value]


def as_mask(fn: Union[Mask, MaskMod]) -> Mask:
    """A :class:`Mask` for ``fn`` (returned unchanged if it already is one)."""
    return fn if isinstance(fn, Mask) else Mask(fn)


def _wrap(mask: Mask, precedence: int) -> str:
    return f"({mask.name})" if _PRECEDENCE[mask._op] < precedence else mask.name


def _binary(op: str, left: Mask, right: Mask) -> Mask:
    extent = left.extent.merge(right.extent)
    if op == "&":

        def and_mask(b, h, q_idx, kv_idx):
            return left(b, h, q_idx, kv_idx) & right(b, h, q_idx, kv_idx)

        fn = and_mask
    else:

        def or_mask(b, h, q_idx, kv_idx):
            return left(b, h, q_idx, kv_idx) | right(b, h, q_idx, kv_idx)

        fn = or_mask
    p = _PRECEDENCE[op]
    # Left-associative: an equal-precedence left operand needs no parentheses, a right one does.
    left_s = _wrap(left, p)
    right_s = f"({right.name})" if _PRECEDENCE[right._op] <= p else right.name
    return Mask(fn, f"{left_s} {op} {right_s}", extent, _op=op)
