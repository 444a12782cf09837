"""``TransformerLM``: a small decoder-only language model whose attention is NSA, dense or sliding-window.

Pre-norm blocks ``x + attn(x)``, ``x + mlp(x)`` (the attention layer normalizes its own input with RMSNorm, as
:class:`~nsa_flex.modules.SparseAttention` does), a final RMSNorm and an output head tied to the token embedding.
``attn="nsa"`` uses :class:`~nsa_flex.modules.SparseAttention`; ``"dense"`` causal softmax attention
(``F.scaled_dot_product_attention``) and ``"window"`` sliding-window attention
(:func:`nsa_flex.functional.sliding_window_attention`) use the same qkv / rotary / output layout, so the three
variants differ only in which keys a query sees.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as torch_F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .. import functional as F
from .._checks import index_range, number, positive_int, tensor
from .attention import SparseAttention, check_head_layout
from .cache import KVCache
from .rotary import layer_rotary

__all__ = ["CausalAttention", "TransformerLM"]

ATTENTION_KINDS = ("nsa", "dense", "window")
MLP_KINDS = ("swiglu", "gelu")
# generate() pads its prefill to a power of two, at least this long (see there).
PREFILL_BUCKET = 128

# SparseAttention's own keyword arguments (lucidrains-style names) that TransformerLM passes through.
_NSA_KWARGS = tuple(p for p in inspect.signature(SparseAttention.__init__).parameters
                    if p not in ("self", "dim", "dim_head", "heads", "kv_heads"))
# Those that also configure the dense / window layers; the other NSA-only ones are accepted and ignored there,
# so one config can switch ``attn`` and keep its parameters comparable.
_SHARED_KWARGS = ("sliding_window_size", "use_rotary", "rotary_base", "norm", "qkv_bias", "scale")


class CausalAttention(nn.Module):
    """Causal dense (``window_size=None``) or sliding-window self-attention with SparseAttention's layout.

    Same attribute names as :class:`SparseAttention` (``norm``, ``to_qkv``, ``rotary_emb``, ``combine_heads``)
    and the same seams (``check_input``, ``project_qkv``, ``rotate``, ``project_out``), without compression or
    gates. Dense uses ``F.scaled_dot_product_attention(is_causal=True)``; the window
    :func:`nsa_flex.functional.sliding_window_attention` (query ``t`` sees ``t - w < j <= t``).
    """

    def __init__(self, dim: int, dim_head: int, heads: int, kv_heads: Optional[int] = None,
                 window_size: Optional[int] = None, use_rotary: bool = True, rotary_base: float = 10000.0,
                 norm: bool = True, qkv_bias: bool = False, scale: Optional[float] = None):
        super().__init__()
        kv_heads = check_head_layout(dim, dim_head, heads, kv_heads, use_rotary, scale)
        if window_size is not None:
            positive_int("window_size", window_size)
        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.window_size = window_size
        self.use_rotary = use_rotary
        self.scale = scale
        self.norm = nn.RMSNorm(dim) if norm else nn.Identity()
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=qkv_bias)
        self.rotary_emb = layer_rotary(dim_head, use_rotary, rotary_base)
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    check_input = SparseAttention.check_input
    project_qkv = SparseAttention.project_qkv
    rotate = SparseAttention.rotate
    project_out = SparseAttention.project_out

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal (windowed) attention of rotated ``q [B, Hq, T, D]`` over ``k, v [B, Hkv, T, D]``."""
        if self.window_size is not None:
            return F.sliding_window_attention(q, k, v, self.window_size, self.scale)
        G = self.heads // self.kv_heads
        if G > 1:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        return torch_F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def init_cache(self, batch_size: int, max_len: int, device: Union[str, torch.device, None] = None,
                   dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty :class:`~nsa_flex.modules.cache.KVCache` (rotated keys, values) for ``batch_size`` sequences."""
        p = self.to_qkv.weight
        return KVCache(batch_size, self.kv_heads, self.dim_head, max_len,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    def forward(self, x: Float[Tensor, "B T dim"], cache: Optional[KVCache] = None, return_cache: bool = False,
                lengths: Optional[Tensor] = None):
        """``x [B, T, dim] -> [B, T, dim]``; the cache protocol of :meth:`SparseAttention.forward`."""
        self.check_input(x)
        if cache is None and not return_cache:
            if lengths is not None:
                raise ValueError("lengths is only used with a cache (the prefill's prompt lengths)")
            q, k, v = self.project_qkv(self.norm(x))
            rotated = self.rotate(q, k)
            if rotated is not None:
                q, k = rotated
            return self.project_out(self.attend(q, k, v))
        if cache is None:
            cache = self.init_cache(x.shape[0], x.shape[1], x.device, x.dtype)
        if type(cache) is not KVCache:  # the wrong kind, as SparseAttention says of a cache not an NSACache
            raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")
        if (cache.kv_heads, cache.dim_head) != (self.kv_heads, self.dim_head):
            raise ValueError(f"cache must be a KVCache from this layer's init_cache, got {cache!r}")
        cache.check_batch(x)
        T = x.shape[1]
        q, k, v = self.project_qkv(self.norm(x))
        if cache.is_empty:  # prefill: the whole prompt in one parallel call
            lengths = cache.prefill_lengths(T, lengths)
            rotated = self.rotate(q, k)
            if rotated is not None:
                q, k = rotated
            o = self.attend(q, k, v)
            cache.store_prefill(k, v)
            cache.start(lengths)
        else:
            if lengths is not None:
                raise ValueError("lengths is only for the prefill (an empty cache); "
                                 "decode steps append to every sequence")
            cache.check_room(T)
            positions = cache.positions(T)
            if self.rotary_emb is not None:
                q = F.rotary_at(q, positions, self.rotary_emb.base)
                k = F.rotary_at(k, positions, self.rotary_emb.base)
            cache.write(k, v, positions)
            o = F.cached_attention(q, cache.k, cache.v, positions, self.window_size, self.scale)
            cache.advance(T)
        out = self.project_out(o)
        return (out, cache) if return_cache else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, dim_head={self.dim_head}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"window_size={self.window_size}, use_rotary={self.use_rotary}")


class FeedForward(nn.Module):
    """Pre-norm MLP: SwiGLU (``W2 (silu(W1 x) * W3 x)``) or GELU (``W2 gelu(W1 x)``), hidden ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4, kind: str = "swiglu"):
        super().__init__()
        self.kind = kind
        hidden = mult * dim
        self.norm = nn.RMSNorm(dim)
        self.w_in = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(self.norm(x))
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = torch_F.silu(a) * b
        else:
            h = torch_F.gelu(h)
        return self.w_out(h)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: Tensor, **attn_kwargs: Any) -> Tensor:
        x = x + self.attn(x, **attn_kwargs)
        return x + self.mlp(x)


class TransformerLM(nn.Module):
    """Decoder-only LM: ``ids [B, T] (int) -> logits [B, T, vocab_size]``.

    Args:
        vocab_size: tokens (256 = bytes).
        dim: model width.
        depth: number of blocks.
        heads: query heads.
        dim_head: per-head width, default ``dim // heads``.
        kv_heads: key/value heads (GQA), default ``heads``.
        attn: ``"nsa"`` (:class:`SparseAttention`), ``"dense"`` (causal SDPA) or ``"window"`` (sliding window
            of ``sliding_window_size`` keys).
        mlp: ``"swiglu"`` or ``"gelu"``.
        mlp_mult: MLP hidden width is ``mlp_mult * dim``.
        max_seq_len: longest sequence ``forward`` accepts (and the largest KV cache ``generate`` builds).
        **nsa_kwargs: :class:`SparseAttention` keyword arguments (``sliding_window_size``,
            ``compress_block_size``, ``compress_block_sliding_stride``, ``selection_block_size``,
            ``num_selected_blocks``, ``compress_mlp``, ...). With ``attn="dense"``/``"window"`` only
            ``sliding_window_size`` (window), ``use_rotary``, ``rotary_base``, ``norm``, ``qkv_bias`` and
            ``scale`` apply; the NSA-only ones are accepted and ignored, so one config can switch ``attn``.

    ``self.config`` holds the constructor arguments (``TransformerLM(**model.config)`` rebuilds the model; save
    ``{"config": model.config, "model": model.state_dict()}`` as a checkpoint).
    """

    def __init__(self, vocab_size: int = 256, dim: int = 256, depth: int = 4, heads: int = 8,
                 dim_head: Optional[int] = None, kv_heads: Optional[int] = None, attn: str = "nsa",
                 mlp: str = "swiglu", mlp_mult: int = 4, max_seq_len: int = 4096, **nsa_kwargs: Any):
        super().__init__()
        positive_int("vocab_size", vocab_size)
        positive_int("dim", dim)
        positive_int("depth", depth)
        positive_int("heads", heads)
        positive_int("mlp_mult", mlp_mult)
        positive_int("max_seq_len", max_seq_len)
        if attn not in ATTENTION_KINDS:
            raise ValueError(f"attn must be one of {ATTENTION_KINDS}, got {attn!r}")
        if mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim must be divisible by heads when dim_head is None, got dim={dim}, heads={heads}")
            dim_head = dim // heads
        positive_int("dim_head", dim_head)
        unknown = sorted(set(nsa_kwargs) - set(_NSA_KWARGS))
        if unknown:
            raise ValueError(f"unknown TransformerLM argument(s) {unknown}; "
                             f"SparseAttention accepts {list(_NSA_KWARGS)}")
        self.config = dict(vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, dim_head=dim_head,
                           kv_heads=kv_heads, attn=attn, mlp=mlp, mlp_mult=mlp_mult, max_seq_len=max_seq_len,
                           **nsa_kwargs)
        self.vocab_size, self.dim, self.depth, self.attn_kind = vocab_size, dim, depth, attn
        self.max_seq_len = max_seq_len

        self.token_emb = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.layers = nn.ModuleList(
            Block(self._attention(dim, dim_head, heads, kv_heads, attn, nsa_kwargs), FeedForward(dim, mlp_mult, mlp))
            for _ in range(depth)
        )
        self.norm = nn.RMSNorm(dim)

    @staticmethod
    def _attention(dim, dim_head, heads, kv_heads, attn, nsa_kwargs) -> nn.Module:
        # each layer its own copy of any module passed (a compressor, the gate MLP), not one shared by all
        nsa_kwargs = copy.deepcopy(nsa_kwargs)
        if attn == "nsa":
            return SparseAttention(dim, dim_head, heads, kv_heads, **nsa_kwargs)
        shared = {k: v for k, v in nsa_kwargs.items() if k in _SHARED_KWARGS}
        window = shared.pop("sliding_window_size", 512) if attn == "window" else None
        shared.pop("sliding_window_size", None)
        return CausalAttention(dim, dim_head, heads, kv_heads, window_size=window, **shared)

    def check_ids(self, ids: Tensor) -> None:
        """``ids [B, T]``, integer, at most ``max_seq_len`` tokens; token ids in ``[0, vocab_size)`` are checked on
        CPU tensors only (on CUDA that needs a host sync every step; an id out of range there fails in the
        embedding as a device-side assert)."""
        tensor("ids", ids, ndim=2, integer=True)
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"ids has {ids.shape[1]} tokens, more than max_seq_len={self.max_seq_len}")
        index_range("ids", ids, self.vocab_size, "vocab_size", "token ids")

    def logits(self, x: Float[Tensor, "B T dim"]) -> Float[Tensor, "B T V"]:
        """Final norm and the head tied to the embedding."""
        return self.norm(x) @ self.token_emb.weight.t()

    def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> list:
        """One empty cache per layer (:class:`NSACache` or :class:`KVCache`), ``max_len`` default ``max_seq_len``."""
        max_len = self.max_seq_len if max_len is None else positive_int("max_len", max_len)
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.max_seq_len}")
        return [layer.attn.init_cache(batch_size, max_len) for layer in self.layers]

    def forward(self, ids: Int[Tensor, "B T"], cache: Optional[list] = None,
                lengths: Optional[Tensor] = None) -> Float[Tensor, "B T V"]:
        """Logits ``[B, T, vocab_size]`` of the next token at every position (causal).

        With ``cache`` (from :meth:`init_cache`): an empty cache is filled by this call (the prefill; ``ids``
        holds prompts left-aligned, ``lengths [B]`` tokens each, logits beyond a prompt are meaningless); a
        filled one is extended by ``ids``' tokens (a decode step; positions continue each sequence).
        """
        self.check_ids(ids)
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers)):
            raise ValueError(f"cache must be a list of {len(self.layers)} layer caches (init_cache), got "
                             f"{type(cache).__name__}")
        if cache is None and lengths is not None:
            raise ValueError("lengths is only used with a cache (the prefill's prompt lengths)")
        x = self.token_emb(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x) if cache is None else layer(x, cache=cache[i], lengths=lengths)
        return self.logits(x)

    def set_compile_decode(self, enabled: bool = True) -> None:
        """Decode NSA steps through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on CUDA."""
        for layer in self.layers:
            if isinstance(layer.attn, SparseAttention):
                layer.attn.compile_decode = enabled

    @torch.no_grad()
    def generate(self, prompt_ids: Union[Int[Tensor, "B T"], Sequence[int], Sequence[Sequence[int]]],
                 max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 prompt_lengths: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: Optional[bool] = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after each prompt with the KV cache: one parallel prefill, then one
        token per step. Returns only the new tokens, ``LongTensor [B, max_new_tokens]``.

        Prompts: ``prompt_ids [B, T]`` left-aligned (row ``b``'s prompt is ``prompt_ids[b, :prompt_lengths[b]]``,
        the rest padding; ``prompt_lengths`` default all ``T``), or a list of 1-D token sequences of any
        lengths; a flat list of ints is one prompt (``generate([1, 2, 3], n)`` returns ``[1, n]``), and a list
        mixing ints and sequences is a TypeError. Each row's logits are those of running it alone (so greedy
        decoding, ``temperature=0``, gives the same tokens; sampling draws from ``generator`` for the whole batch
        at once). ``top_k`` keeps the ``k`` most likely tokens. ``cuda_graph`` (default: on CUDA) replays the
        one-token decode step of the whole model from a CUDA graph captured on the second step, so the step costs
        its GPU work rather than hundreds of Python-launched kernels; the tokens are the same (sampling stays
        outside the graph).
        ValueError if a prompt plus ``max_new_tokens`` exceeds ``max_seq_len``.
        """
        positive_int("max_new_tokens", max_new_tokens)
        temperature = number("temperature", temperature, at_least=0)  # a NaN had failed inside multinomial
        if top_k is not None:
            positive_int("top_k", top_k)
        device = self.token_emb.weight.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        elif cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {device}")
        if isinstance(prompt_ids, (list, tuple)):
            if prompt_lengths is not None:
                raise ValueError("prompt_lengths is only for a padded prompt tensor, not a list of prompts")
            if not prompt_ids:
                raise ValueError("prompt_ids is an empty list")
            scalar = [isinstance(p, int) or (isinstance(p, Tensor) and p.ndim == 0) for p in prompt_ids]
            if all(scalar):  # one prompt's token ids, not len(prompt_ids) prompts of one token each
                prompt_ids = [prompt_ids]
            elif any(scalar):
                raise TypeError("prompt_ids must be a list of prompts (1-D token sequences) or one prompt as a flat "
                                f"list of ints, got a list mixing both: {prompt_ids!r}")
            for b, p in enumerate(prompt_ids):
                if hasattr(p, "__len__") and len(p) == 0:  # an empty list would come out a float tensor
                    raise ValueError(f"prompt_ids[{b}] is empty: every prompt needs at least one token")
            rows = [tensor(f"prompt_ids[{b}]", torch.as_tensor(p), ndim=1, integer=True).long()
                    for b, p in enumerate(prompt_ids)]
            prompt_lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
            ids = torch.zeros(len(rows), int(prompt_lengths.max()), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)] = r
        else:
            ids = prompt_ids
            tensor("prompt_ids", ids, ndim=2, integer=True)
        B, T = ids.shape
        if prompt_lengths is None:
            prompt_lengths = torch.full((B,), T, dtype=torch.long)
        tensor("prompt_lengths", prompt_lengths, ndim=1, integer=True, shape=(B,))
        prompt_lengths = prompt_lengths.to(device=device, dtype=torch.long)
        lo, hi = int(prompt_lengths.min()), int(prompt_lengths.max())
        if lo < 1 or hi > T:
            raise ValueError(f"prompt_lengths must be in [1, {T}], got min {lo}, max {hi}")
        if hi + max_new_tokens > self.max_seq_len:
            raise ValueError(f"the longest prompt ({hi} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        # padding past each prompt (any value, -1 say) becomes token 0, which the prefill embeds and ignores; the
        # prompts are checked before the move, while a CPU prompt for a CUDA model needs no sync
        ids = torch.where(torch.arange(T, device=ids.device) < prompt_lengths.to(ids.device)[:, None], ids, 0)
        index_range("prompt_ids", ids[:, :hi], self.vocab_size, "vocab_size", "token ids")
        ids = ids.to(device)
        # Compiled FlexAttention specializes on the prefill length (functional/flex.py): pad it to a power of two
        # so prompts of any length share a few kernels; prompt_lengths masks the padding out.
        padded = max(hi, min(max(PREFILL_BUCKET, 1 << (hi - 1).bit_length()), self.max_seq_len))
        cache = self.init_cache(B, max(padded, hi + max_new_tokens))
        ids = torch.nn.functional.pad(ids[:, :hi], (0, padded - hi))
        logits = self(ids, cache=cache, lengths=prompt_lengths)
        last = logits[torch.arange(B, device=device), prompt_lengths - 1]
        decode = _GraphedDecode(self, cache) if cuda_graph else (lambda ids: self(ids, cache=cache))
        out = []
        for step in range(max_new_tokens):
            token = self._sample(last, temperature, top_k, generator)
            out.append(token)
            if step + 1 < max_new_tokens:
                last = decode(token.unsqueeze(1))[:, -1]
        return torch.stack(out, dim=1)

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def extra_repr(self) -> str:
        return f"attn={self.attn_kind!r}, max_seq_len={self.max_seq_len}"


class _GraphedDecode:
    """A model's decode step of one token per sequence, replayed from a CUDA graph.

    The first call runs eagerly (it compiles the kernels and sets up their workspaces); the second captures the
    step and replays it; later calls copy the new tokens into the captured input and replay. The caches are
    preallocated and the step has no host syncs, so the graph reads and writes them in place: what it cannot
    hold is each cache's host-side count of tokens, advanced here after every replay (and the bound check
    before it). The returned logits live in the graph's output buffer, overwritten by the next call.
    """

    def __init__(self, model: TransformerLM, cache: list):
        self.model, self.cache = model, cache
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warm = False

    def __call__(self, ids: Int[Tensor, "B 1"]) -> Float[Tensor, "B 1 V"]:
        if not self.warm:
            self.warm = True
            return self.model(ids, cache=self.cache)
        if self.graph is None:
            self.ids = ids.clone()
            self.graph = torch.cuda.CUDAGraph()
            compiled = [layer.attn for layer in self.model.layers if getattr(layer.attn, "compile_decode", False)]
            for attn in compiled:  # its reduce-overhead graphs cannot nest in this one
                attn.compile_decode = False
            try:
                with torch.cuda.graph(self.graph):  # runs the host-side bookkeeping once, for this step
                    self.logits = self.model(self.ids, cache=self.cache)
            finally:
                for attn in compiled:
                    attn.compile_decode = True
            self.graph.replay()
            return self.logits
        for c in self.cache:
            c.check_room(ids.shape[1])
        self.ids.copy_(ids)
        self.graph.replay()
        for c in self.cache:
            c.advance_host(ids.shape[1])
        return self.logits
