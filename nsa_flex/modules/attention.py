"""``SparseAttention``: a Native Sparse Attention layer (DeepSeek, 2025) on :func:`nsa_flex.functional.nsa_attention`.

Constructor names follow lucidrains' ``native-sparse-attention-pytorch`` ``SparseAttention`` so that its users
feel at home; the semantics (block boundaries, scoring, forced blocks, window) are those of docs/design.md
("Exact semantics").
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Union

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .. import functional as F
from .._checks import block_and_stride, number, positive_int, tensor
from .cache import NSACache
from .compression import COMPRESSORS, Compressor, MeanPool, get_compressor
from .rotary import layer_rotary

__all__ = ["SparseAttention"]

CompressorLike = Callable[[Tensor], Tensor]
CompressSpec = Union[None, str, nn.Module, tuple[CompressorLike, CompressorLike]]

# Compressor kinds whose hidden width ``compress_mlp_expand_factor`` sets.
_MLP_KINDS = ("mlp", "grouped_mlp")


def check_head_layout(dim: int, dim_head: int, heads: int, kv_heads: Optional[int], use_rotary: bool,
                      scale: Optional[float]) -> int:
    """Validate an attention layer's head layout (shared by every attention module); returns ``kv_heads``."""
    positive_int("dim", dim)
    positive_int("dim_head", dim_head)
    positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads must divide heads (GQA), got heads={heads}, kv_heads={kv_heads}")
    if use_rotary and dim_head % 2:
        raise ValueError(f"use_rotary needs an even dim_head, got dim_head={dim_head}")
    if scale is not None:
        number("scale", scale, greater_than=0)
    return kv_heads


class SparseAttention(nn.Module):
    """NSA self-attention layer: ``x [B, T, dim] -> [B, T, dim]`` (causal).

    ``o = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win`` per query head, with sigmoid gates from a linear of
    the (normed) input, followed by an output projection. Keys/values use ``kv_heads`` heads (GQA).

    Args:
        dim: model width (last dim of ``x``).
        dim_head: ``D``, per-head width.
        heads: query heads ``Hq``.
        kv_heads: key/value heads ``Hkv`` (default ``heads``); must divide ``heads``.
        sliding_window_size: ``w``, the window branch sees keys ``t - w < j <= t``.
        compress_block_size: ``l``, tokens per compressed key.
        compress_block_sliding_stride: ``d``, stride between compressed blocks (``d <= l``).
        selection_block_size: ``l'``, tokens per selection block; a multiple of ``d``.
        num_selected_blocks: ``n``, selection blocks per token (forced initial/local blocks included).
        compress_mlp: the key/value compressors, each ``[B, Hkv, T, D] -> [B, Hkv, Tc, D]``:

            * ``None`` (default): ``"mlp"``, i.e. :class:`~nsa_flex.modules.compression.MLPCompress`, the
              paper's ``phi`` (learned intra-block position embedding, flatten ``l`` tokens, MLP
              ``l*D -> l*D*compress_mlp_expand_factor -> D``), as lucidrains' default;
            * a name of :data:`~nsa_flex.modules.compression.COMPRESSORS` (``"mean"``, ``"conv"``, ...),
              built for ``Hkv`` heads;
            * a module: the key compressor, and a deep copy of it the value compressor (``TransformerLM``
              gives each layer its own copies);
            * a ``(key_compressor, value_compressor)`` pair, used as given.

            Unlike lucidrains, a compressor receives the whole sequence ``[B, H, T, D]``, not cut blocks.
        compress_mlp_expand_factor: hidden width factor of the ``"mlp"``/``"grouped_mlp"`` compressors.
        num_initial_blocks: selection blocks forced at the start of the sequence (attention sink).
        num_local_blocks: forced selection blocks ending at the query's own block.
        use_rotary: rotary embedding on queries/keys of the window and selection branches only; compression
            and block scoring stay position-free (as in the paper and lucidrains).
        rotary_base: RoPE base.
        norm: RMSNorm of the input first (as lucidrains).
        qkv_bias: bias in the qkv projection.
        strategy_combine_mlp: module ``[B, T, dim] -> [B, T, 3*heads]`` giving gate logits per head in the
            order (compressed, selected, window); default ``Linear(dim, 3*heads)`` with zero weights and
            biases ``(-2, -2, 2)``, so training starts leaning on the sliding window (as lucidrains).
        scale: attention scale, default ``dim_head ** -0.5``.

    Attributes: ``norm``, ``to_qkv``, ``k_compress``, ``v_compress``, ``rotary_emb`` (or None),
    ``to_strategy_combine``, ``combine_heads``.
    """

    def __init__(
        self,
        dim: int,
        dim_head: int,
        heads: int,
        kv_heads: Optional[int] = None,
        sliding_window_size: int = 512,
        compress_block_size: int = 32,
        compress_block_sliding_stride: int = 16,
        selection_block_size: int = 64,
        num_selected_blocks: int = 16,
        compress_mlp: CompressSpec = None,
        compress_mlp_expand_factor: float = 1.0,
        num_initial_blocks: int = 1,
        num_local_blocks: int = 2,
        use_rotary: bool = True,
        rotary_base: float = 10000.0,
        norm: bool = True,
        qkv_bias: bool = False,
        strategy_combine_mlp: Optional[nn.Module] = None,
        scale: Optional[float] = None,
    ):
        super().__init__()
        kv_heads = check_head_layout(dim, dim_head, heads, kv_heads, use_rotary, scale)
        positive_int("sliding_window_size", sliding_window_size)
        block_and_stride(compress_block_size, compress_block_sliding_stride, "compress_block_size",
                         "compress_block_sliding_stride")
        positive_int("selection_block_size", selection_block_size)
        if selection_block_size % compress_block_sliding_stride:
            raise ValueError(
                "selection_block_size must be a multiple of compress_block_sliding_stride, got "
                f"selection_block_size={selection_block_size}, compress_block_sliding_stride={compress_block_sliding_stride}"
            )
        positive_int("num_selected_blocks", num_selected_blocks)
        positive_int("num_initial_blocks", num_initial_blocks, minimum=0)
        positive_int("num_local_blocks", num_local_blocks, minimum=0)
        if strategy_combine_mlp is not None and not callable(strategy_combine_mlp):
            raise TypeError(f"strategy_combine_mlp must be None or a module [B, T, dim] -> [B, T, 3*heads], got "
                            f"{type(strategy_combine_mlp).__name__} {strategy_combine_mlp!r}")

        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.sliding_window_size = sliding_window_size
        self.compress_block_size = compress_block_size
        self.compress_block_sliding_stride = compress_block_sliding_stride
        self.selection_block_size = selection_block_size
        self.num_selected_blocks = num_selected_blocks
        self.num_initial_blocks = num_initial_blocks
        self.num_local_blocks = num_local_blocks
        self.use_rotary = use_rotary
        self.scale = scale

        self.norm = nn.RMSNorm(dim) if norm else nn.Identity()
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=qkv_bias)
        self.k_compress, self.v_compress = self._build_compressors(compress_mlp, compress_mlp_expand_factor)
        self.rotary_emb = layer_rotary(dim_head, use_rotary, rotary_base)
        if strategy_combine_mlp is None:
            strategy_combine_mlp = nn.Linear(dim, 3 * heads)
            nn.init.zeros_(strategy_combine_mlp.weight)
            with torch.no_grad():
                strategy_combine_mlp.bias.copy_(torch.tensor([-2.0, -2.0, 2.0]).repeat(heads))
        self.to_strategy_combine = strategy_combine_mlp
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)
        # Decode steps through torch.compile(mode="reduce-overhead") (CUDA graphs) when True and on CUDA.
        self.compile_decode = False

    def _build_compressors(self, spec: CompressSpec, expand_factor: float) -> tuple[Any, Any]:
        if isinstance(spec, tuple):
            if len(spec) != 2 or not all(callable(c) for c in spec):
                raise TypeError(f"compress_mlp as a tuple must be (key_compressor, value_compressor), got {spec!r}")
            return self._check_compressor_blocks(spec)
        if spec is None or isinstance(spec, str):
            name = "mlp" if spec is None else spec
            if name not in COMPRESSORS:
                raise ValueError(f"compress_mlp must be None, one of {sorted(COMPRESSORS)}, a module or a "
                                 f"(key, value) pair, got {spec!r}")
            kwargs = dict(block_size=self.compress_block_size, stride=self.compress_block_sliding_stride,
                          head_dim=self.dim_head, num_heads=self.kv_heads)
            if name in _MLP_KINDS:
                kwargs["expand_factor"] = expand_factor
            return get_compressor(name, **kwargs), get_compressor(name, **kwargs)
        if not callable(spec):
            raise TypeError(f"compress_mlp must be None, a name, a module or a (key, value) pair, "
                            f"got {type(spec).__name__}")
        return self._check_compressor_blocks((spec, copy.deepcopy(spec)))

    def _check_compressor_blocks(self, pair: tuple[Any, Any]) -> tuple[Any, Any]:
        """A :class:`~.compression.Compressor` must cut the layer's blocks: the forward would refuse other ones
        (``compress`` must return ``Tc`` keys), but decoding, which cuts the newest block itself, would not."""
        layer = (self.compress_block_size, self.compress_block_sliding_stride)
        for role, compressor in zip(("key", "value"), pair):
            own = (getattr(compressor, "block_size", None), getattr(compressor, "stride", None))
            if isinstance(compressor, Compressor) and own != layer:
                raise ValueError(f"compress_mlp's {role} compressor cuts blocks of {own[0]} with stride {own[1]}, "
                                 f"the layer's are compress_block_size={layer[0]}, "
                                 f"compress_block_sliding_stride={layer[1]}")
        return pair

    # --- pieces of forward, kept separate so that a KV-cache path can reuse them ---

    def check_input(self, x: Tensor) -> None:
        """``x`` must be a floating ``[B, T, dim]`` tensor of the layer's parameters' dtype (the projections
        would fail on another, or autocast casts it before it gets here)."""
        tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, seq_len, dim={self.dim}], got shape {list(x.shape)} "
                             f"(last dim {x.shape[-1]} != dim {self.dim})")
        params = self.to_qkv.weight.dtype
        if x.dtype != params and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the layer's parameter dtype {params} (cast the input or the layer with "
                            f".to(dtype)), got {x.dtype}")

    def project_qkv(self, h: Float[Tensor, "B T dim"]) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input -> ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` (no rotary)."""
        q, k, v = self.to_qkv(h).split(self.qkv_split, dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", d=self.dim_head)
        k = rearrange(k, "b t (h d) -> b h t d", d=self.dim_head)
        v = rearrange(v, "b t (h d) -> b h t d", d=self.dim_head)
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> Optional[tuple[Tensor, Tensor]]:
        """Rotary-embedded ``(q, k)`` for positions starting at ``offset``; None without rotary."""
        if self.rotary_emb is None:
            return None
        return self.rotary_emb(q, offset), self.rotary_emb(k, offset)

    def compute_gates(self, h: Float[Tensor, "B T dim"]) -> Float[Tensor, "B Hq T 3"]:
        """Per-head sigmoid gates ``[B, Hq, T, 3]`` in the order (compressed, selected, window)."""
        logits = self.to_strategy_combine(h)
        return rearrange(logits, "b t (h s) -> b h t s", s=3).sigmoid()

    def nsa_config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`nsa_flex.functional.nsa_attention` for this layer."""
        return dict(
            compress=(self.k_compress, self.v_compress),
            compress_block_size=self.compress_block_size,
            compress_stride=self.compress_block_sliding_stride,
            selection_block_size=self.selection_block_size,
            num_selected=self.num_selected_blocks,
            num_initial=self.num_initial_blocks,
            num_local=self.num_local_blocks,
            window_size=self.sliding_window_size,
            scale=self.scale,
        )

    def project_out(self, o: Float[Tensor, "B Hq T D"]) -> Float[Tensor, "B T dim"]:
        """Merge heads and apply the output projection."""
        return self.combine_heads(rearrange(o, "b h t d -> b t (h d)"))

    def init_cache(self, batch_size: int, max_len: int, device: Union[str, torch.device, None] = None,
                   dtype: Optional[torch.dtype] = None) -> NSACache:
        """An empty :class:`~nsa_flex.modules.cache.NSACache` for ``batch_size`` sequences of up to ``max_len``."""
        p = self.to_qkv.weight
        return NSACache(batch_size, self.kv_heads, self.dim_head, max_len, self.compress_block_size,
                        self.compress_block_sliding_stride, device=p.device if device is None else device,
                        dtype=p.dtype if dtype is None else dtype, rotary_base=self._rotary_base())

    def _rotary_base(self) -> Optional[float]:
        return None if self.rotary_emb is None else self.rotary_emb.base

    def forward(self, x: Float[Tensor, "B T dim"], cache: Optional[NSACache] = None, return_cache: bool = False,
                lengths: Optional[Tensor] = None):
        """Causal NSA: ``x [B, T, dim] -> [B, T, dim]`` (``(out, cache)`` with ``return_cache``).

        Without a cache: the whole sequence. With an empty ``cache`` (:meth:`init_cache`; or ``cache=None,
        return_cache=True``, which allocates one of exactly ``T`` tokens): the prefill, one parallel call over
        the prompts ``x`` (left-aligned, ``lengths [B]`` tokens each, default ``T``) that fills the cache. With
        a filled cache: a decode step, ``x`` holds the next ``T`` tokens of every sequence (positions
        ``cache.lengths[b] + i``; rotary uses them), attended by :func:`nsa_flex.functional.nsa_decode`.
        """
        self.check_input(x)
        if cache is None and not return_cache:
            if lengths is not None:
                raise ValueError("lengths is only used with a cache (the prefill's prompt lengths)")
            h = self.norm(x)
            q, k, v = self.project_qkv(h)
            gates = self.compute_gates(h)
            o = F.nsa_attention(q, k, v, gates, fine_qk=self.rotate(q, k), **self.nsa_config())
            return self.project_out(o)
        if cache is None:
            cache = self.init_cache(x.shape[0], x.shape[1], x.device, x.dtype)
        if not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an NSACache (from init_cache), got {type(cache).__name__}")
        if (cache.kv_heads, cache.dim_head, cache.compress_block_size, cache.compress_stride) != (
                self.kv_heads, self.dim_head, self.compress_block_size, self.compress_block_sliding_stride) or (
                not cache.is_empty and cache.rotary_base != self._rotary_base()):
            raise ValueError(f"cache {cache!r} was not made for this layer ({self.extra_repr()})")
        cache.check_batch(x)
        if cache.is_empty:  # an empty cache takes this layer's RoPE: rotated keys (and the raw-key ring) or not
            cache.set_rotary_base(self._rotary_base())
        out = self._prefill(x, cache, lengths) if cache.is_empty else self._decode(x, cache, lengths)
        return (out, cache) if return_cache else out

    def _prefill(self, x: Tensor, cache: NSACache, lengths: Optional[Tensor]) -> Tensor:
        lengths = cache.prefill_lengths(x.shape[1], lengths)
        h = self.norm(x)
        q, k, v = self.project_qkv(h)
        gates = self.compute_gates(h)
        k_cmp, v_cmp = self.k_compress(k), self.v_compress(v)
        config = self.nsa_config()
        config["compress"] = (lambda _: k_cmp, lambda _: v_cmp)  # computed once, also stored in the cache
        fine_qk = self.rotate(q, k)
        o = F.nsa_attention(q, k, v, gates, fine_qk=fine_qk, **config)
        cache.store_prefill(k, v, k_cmp, v_cmp, lengths=lengths, k_rotated=None if fine_qk is None else fine_qk[1])
        cache.start(lengths)
        return self.project_out(o)

    def _decode(self, x: Tensor, cache: NSACache, lengths: Optional[Tensor]) -> Tensor:
        if lengths is not None:
            raise ValueError("lengths is only for the prefill (an empty cache); decode steps append to every sequence")
        T = x.shape[1]
        cache.check_room(T)
        positions = cache.positions(T)
        h = self.norm(x)
        q, k, v = self.project_qkv(h)
        gates = self.compute_gates(h)
        # the parameter-free compressor as "mean": the cache kernels cut, average and store blocks in one launch
        mean = lambda c: "mean" if type(c) is MeanPool else c  # noqa: E731
        cache.append(k, v, positions, mean(self.k_compress), mean(self.v_compress))
        decode = F.compiled_nsa_decode() if (self.compile_decode and x.is_cuda) else F.nsa_decode
        o = decode(q, cache.k, cache.v, cache.k_cmp, cache.v_cmp, positions, gates,
                   compress_block_size=self.compress_block_size, compress_stride=self.compress_block_sliding_stride,
                   selection_block_size=self.selection_block_size, num_selected=self.num_selected_blocks,
                   num_initial=self.num_initial_blocks, num_local=self.num_local_blocks,
                   window_size=self.sliding_window_size, scale=self.scale,
                   rotary_base=self._rotary_base())
        cache.advance(T)
        return self.project_out(o)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, dim_head={self.dim_head}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"sliding_window_size={self.sliding_window_size}, compress_block_size={self.compress_block_size}, "
                f"compress_block_sliding_stride={self.compress_block_sliding_stride}, "
                f"selection_block_size={self.selection_block_size}, num_selected_blocks={self.num_selected_blocks}, "
                f"num_initial_blocks={self.num_initial_blocks}, num_local_blocks={self.num_local_blocks}, "
                f"use_rotary={self.use_rotary}")
