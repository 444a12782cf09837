"""Per-layer KV caches for decoding: :class:`KVCache` (dense / window layers) and :class:`NSACache` (NSA).

A cache is preallocated for ``max_len`` tokens per sequence (no re-allocation while decoding) and holds a batch
of sequences of different lengths: ``lengths [B]`` counts the tokens cached for each sequence, and the next
token of sequence ``b`` goes to slot ``lengths[b]``. Exceeding ``max_len`` raises ``ValueError``; nothing is
ever truncated silently.

* :class:`KVCache`: keys (as the layer attends with them, i.e. rotary-embedded) and values ``[B, Hkv, L, D]``.
* :class:`NSACache`: keys and values ``[B, Hkv, L, D]`` for the selected and window branches (keys rotated
  at their positions when the layer uses RoPE, so that decoding reads them as they are), plus compressed keys
  and values ``[B, Hkv, C + 1, D]`` with ``C = max(0, (L - l) // d + 1)``, the last slot being scratch. A new
  compressed key appears exactly when a compression block completes: at token ``t`` with ``t + 1 >= l`` and
  ``(t + 1 - l) % d == 0``, i.e. every ``d`` tokens once the first ``l`` are in. The compressor takes
  position-free keys, so a cache of rotated keys also keeps the last ``l`` raw keys in a ring ``[B, Hkv, l, D]``.

The layer fills a cache in one parallel call (``layer(x, cache=cache, lengths=lengths)`` on an empty cache:
the prefill; ``x`` holds the prompts left-aligned, ``lengths`` their lengths) and then appends a few tokens per
call (``layer(x_new, cache=cache)``). Positions ``>= lengths[b]`` written by a padded prefill are overwritten
before any query can see them.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import functional as F
from .._checks import block_and_stride, device as check_device, number, positive_int, tensor

__all__ = ["KVCache", "NSACache"]


class KVCache:
    """Preallocated keys/values ``[B, Hkv, max_len, D]`` and per-sequence ``lengths [B]`` (int64).

    ``filled`` is the host-side maximum of ``lengths`` (kept so that the bound check needs no device sync).
    """

    def __init__(self, batch_size: int, kv_heads: int, dim_head: int, max_len: int,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 dim_value: Optional[int] = None):
        positive_int("batch_size", batch_size)
        positive_int("kv_heads", kv_heads)
        positive_int("dim_head", dim_head)
        positive_int("max_len", max_len)
        dim_value = dim_head if dim_value is None else positive_int("dim_value", dim_value)
        device = check_device("device", device)
        self.batch_size, self.kv_heads, self.dim_head, self.max_len = batch_size, kv_heads, dim_head, max_len
        self.k = torch.zeros(batch_size, kv_heads, max_len, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, kv_heads, max_len, dim_value, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = 0
        self._started = False

    @property
    def is_empty(self) -> bool:
        """True until a prefill or a decode step has written to the cache."""
        return not self._started

    def reset(self) -> None:
        """Forget every sequence (the buffers stay allocated)."""
        self.lengths.zero_()
        self.filled = 0
        self._started = False

    def check_batch(self, x: Tensor) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, got an input of batch size {x.shape[0]}")

    def check_room(self, num_new: int) -> None:
        """ValueError unless every sequence has room for ``num_new`` more tokens."""
        if self.filled + num_new > self.max_len:
            raise ValueError(f"KV cache overflow: a sequence holds {self.filled} tokens and {num_new} more would "
                             f"exceed the cache's max_len={self.max_len} (allocate a larger cache)")

    def prefill_lengths(self, T: int, lengths: Optional[Tensor]) -> Tensor:
        """Validate a prefill of ``T`` (padded) tokens with per-sequence ``lengths`` (default all ``T``)."""
        if not self.is_empty:
            raise ValueError("prefill needs an empty cache (call reset() first)")
        if T > self.max_len:
            raise ValueError(f"KV cache overflow: a prefill of {T} tokens exceeds the cache's max_len={self.max_len}")
        if lengths is None:
            return torch.full((self.batch_size,), T, dtype=torch.long, device=self.lengths.device)
        tensor("lengths", lengths, ndim=1, integer=True, shape=(self.batch_size,))
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must be in [0, {T}] (the prefill's length), got min {lo}, max {hi}")
        return lengths.to(device=self.lengths.device, dtype=torch.long)

    def start(self, lengths: Tensor) -> None:
        """Record the prefill's lengths (after its keys/values are stored)."""
        self.lengths.copy_(lengths)
        self.filled = int(lengths.max()) if lengths.numel() else 0
        self._started = True

    def positions(self, num_new: int) -> Tensor:
        """Absolute positions ``[B, num_new]`` of the next ``num_new`` tokens of each sequence."""
        return self.lengths.unsqueeze(1) + torch.arange(num_new, device=self.lengths.device)

    rotary_base: Optional[float] = None  # keys are stored as given (a KVCache's are already rotated)

    def write(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Store ``k, v [B, Hkv, T, D]`` at ``positions [B, T]`` (in place), the keys rotated on the way in
        with ``rotary_base`` if the cache has one (:class:`NSACache`)."""
        F.write_cache(self.k, self.v, k, v, positions, rotary_base=self.rotary_base)

    def store_prefill(self, k: Tensor, v: Tensor) -> None:
        T = k.shape[2]
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v

    def advance(self, num_new: int) -> None:
        self.lengths += num_new
        self.advance_host(num_new)

    def advance_host(self, num_new: int) -> None:
        """The host-side half of :meth:`advance` (``filled``), for a decode step replayed from a CUDA graph,
        which holds the device half (``lengths += num_new``)."""
        self.filled += num_new
        self._started = True

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, kv_heads={self.kv_heads}, "
                f"dim_head={self.dim_head}, max_len={self.max_len}, filled={self.filled}{self._extra_repr()})")

    def _extra_repr(self) -> str:
        return ""


class NSACache(KVCache):
    """:class:`KVCache` for NSA plus compressed keys/values ``k_cmp, v_cmp [B, Hkv, C + 1, D]``.

    ``num_compressed = C = max(0, (max_len - l) // d + 1)``; slot ``C`` is scratch for decode steps that
    complete no block. Compressed slot ``c`` holds block ``c`` once token ``c*d + l - 1`` has been cached.
    With ``rotary_base``, ``k`` holds keys rotated at their positions (RoPE with that base) and ``k_ring
    [B, Hkv, l, D]`` the last ``l`` raw keys of each sequence (token ``j`` at slot ``j % l``), which the
    compressor reads; without, ``k`` holds position-free keys and ``k_ring`` is None. The methods take raw
    keys and rotate them on the way in.
    """

    def __init__(self, batch_size: int, kv_heads: int, dim_head: int, max_len: int, compress_block_size: int,
                 compress_stride: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 dim_value: Optional[int] = None, rotary_base: Optional[float] = None):
        block_and_stride(compress_block_size, compress_stride, "compress_block_size", "compress_stride")
        super().__init__(batch_size, kv_heads, dim_head, max_len, device, dtype, dim_value)
        self.compress_block_size, self.compress_stride = compress_block_size, compress_stride
        self.num_compressed = F.num_compressed_blocks(max_len, compress_block_size, compress_stride)
        C1 = self.num_compressed + 1
        self.k_cmp = torch.zeros(batch_size, kv_heads, C1, dim_head, device=device, dtype=dtype)
        self.v_cmp = torch.zeros(batch_size, kv_heads, C1, self.v.shape[-1], device=device, dtype=dtype)
        self.k_ring: Optional[Tensor] = None
        self.set_rotary_base(rotary_base)

    def set_rotary_base(self, rotary_base: Optional[float]) -> None:
        """Hold rotated keys (RoPE with this base) or, with None, position-free ones; only while empty (a
        layer's prefill sets its own on the cache)."""
        if rotary_base is not None:
            number("rotary_base", rotary_base, greater_than=1)
            if self.dim_head % 2:
                raise ValueError(f"rotary_base needs an even dim_head, got dim_head={self.dim_head}")
        if not self.is_empty and rotary_base != self.rotary_base:
            raise ValueError(f"the cache holds keys rotated with rotary_base={self.rotary_base}; it cannot change "
                             f"to {rotary_base} before reset()")
        self.rotary_base = None if rotary_base is None else float(rotary_base)
        if rotary_base is None:
            self.k_ring = None
        elif self.k_ring is None:
            self.k_ring = self.k.new_zeros(self.batch_size, self.kv_heads, self.compress_block_size, self.dim_head)

    def append(self, k: Tensor, v: Tensor, positions: Tensor, k_compress: Union[str, Callable[[Tensor], Tensor]],
               v_compress: Union[str, Callable[[Tensor], Tensor]]) -> None:
        """A decode step's cache update (:func:`nsa_flex.functional.append_to_cache`): :meth:`write` the new
        tokens' raw keys and values at ``positions`` (consecutive per sequence, from :meth:`positions`), then
        compress the blocks they complete with ``k_compress, v_compress`` (compressors or ``"mean"``)."""
        F.append_to_cache(self.k, self.v, self.k_cmp, self.v_cmp, k, v, positions, k_compress, v_compress,
                          self.compress_block_size, self.compress_stride, self.rotary_base, self.k_ring)

    def store_prefill(self, k: Tensor, v: Tensor, k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None,
                      lengths: Optional[Tensor] = None, k_rotated: Optional[Tensor] = None) -> None:
        """Store a prefill's raw keys and values ``[B, Hkv, T, D]`` (the keys rotated, or ``k_rotated`` if the
        caller has them), its compressed keys/values, and (with ``rotary_base``) the last ``l`` raw keys of
        each sequence, ``lengths [B]`` tokens long (default ``T``), in the ring."""
        T = k.shape[2]
        if self.rotary_base is not None and k_rotated is None:
            k_rotated = F.rotary_at(k, torch.arange(T, device=k.device).expand(k.shape[0], T), self.rotary_base)
        super().store_prefill(k if self.rotary_base is None else k_rotated, v)
        if k_cmp is not None:
            Tc = k_cmp.shape[2]
            self.k_cmp[:, :, :Tc] = k_cmp
            self.v_cmp[:, :, :Tc] = v_cmp
        if self.k_ring is not None:
            l = self.compress_block_size
            n = torch.full((k.shape[0],), T, device=k.device) if lengths is None else lengths.to(k.device)
            slot = torch.arange(l, device=k.device)
            tok = n.view(-1, 1) - l + (slot - n.view(-1, 1)) % l  # in [n - l, n), token j at slot j % l
            idx = tok.clamp(0, max(T - 1, 0)).view(k.shape[0], 1, l, 1).expand(-1, k.shape[1], -1, k.shape[-1])
            if T > 0:  # tokens before 0 (prompts shorter than l) are never read
                self.k_ring.copy_(k.gather(2, idx))

    def compressed(self) -> tuple[Tensor, Tensor]:
        """The ``C`` compressed slots (without scratch); valid for blocks completed by each sequence."""
        C = self.num_compressed
        return self.k_cmp[:, :, :C], self.v_cmp[:, :, :C]

    def _extra_repr(self) -> str:
        return "" if self.rotary_base is None else f", rotary_base={self.rotary_base}"
