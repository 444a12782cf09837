"""Compression networks for NSA's compressed branch (the paper's ``phi``, eq. 7).

Every compressor is an ``nn.Module`` mapping keys or values ``[B, H, T, D] -> [B, H, Tc, D]``: compressed token
``c`` summarizes the block of ``l = block_size`` tokens ``[c*d, c*d + l)`` (``d = stride``), and there are
``Tc = max(0, (T - l) // d + 1)`` of them (a trailing partial block is not compressed until it completes).
``T < l`` gives an empty ``[B, H, 0, D]`` tensor that is still part of the autograd graph.

Besides ``forward(x)`` each compressor has ``compress_blocks(blocks)``, ``[B, H, N, l, D] -> [B, H, N, D]``,
which compresses already-cut blocks (one at a time while decoding with a KV cache, say); ``forward`` is
``compress_blocks(compression_blocks(x, l, d))``.

Per block ``X`` (``l x D``), by name (see :func:`get_compressor`):

* ``"mean"``: :class:`MeanPool`, ``mean_i X[i]``; no parameters.
* ``"mlp"``: :class:`MLPCompress`, the paper's ``phi``: ``MLP(flatten(X + P))`` with a learned ``P [l, D]``.
* ``"conv"``: :class:`ConvCompress`, a ``Conv1d`` over time with kernel ``l`` and stride ``d``.
* ``"attention_pool"``: :class:`AttentionPool`, ``sum_i softmax_i(X W + P)[i] * X[i]`` per feature.
* ``"grouped_mlp"``: :class:`GroupedMLP`, :class:`MLPCompress` with separate weights per head.
* ``"linear"``: :class:`LinearCompress`, ``W flatten(X)``.

Pick one by name with :func:`get_compressor`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .._checks import block_and_stride, number, positive_int, tensor
from ..functional import compression_blocks, num_compressed_blocks

__all__ = [
    "AttentionPool",
    "COMPRESSORS",
    "Compressor",
    "ConvCompress",
    "GroupedMLP",
    "LinearCompress",
    "MLPCompress",
    "MeanPool",
    "get_compressor",
]


def _optional_positive(name: str, value: Optional[int]) -> Optional[int]:
    return None if value is None else positive_int(name, value)


def _hidden_size(hidden_dim: Optional[int], expand_factor: float, in_features: int) -> int:
    if hidden_dim is not None:
        return positive_int("hidden_dim", hidden_dim)
    expand_factor = number("expand_factor", expand_factor, greater_than=0)  # finite: inf had overflowed int()
    return max(1, int(in_features * expand_factor))


def _linear_init_(weight: Tensor, bias: Optional[Tensor], fan_in: int) -> None:
    """``nn.Linear``'s default initialization, for weights kept as raw (per-head) parameters."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class Compressor(nn.Module):
    """Base class: validates input, cuts it into compression blocks, calls :meth:`compress_blocks`.

    Args:
        block_size: ``l``, tokens per compression block.
        stride: ``d``, distance between the starts of consecutive blocks (``1 <= d <= l``).
        head_dim: ``D``, the feature size of the keys/values it compresses (``None``: any, parameter-free only).
        num_heads: ``H``; required by compressors with per-head weights, otherwise (if given) checked on input.
    """

    requires_head_dim = True
    requires_num_heads = False

    def __init__(self, block_size: int, stride: int, head_dim: Optional[int] = None, num_heads: Optional[int] = None):
        super().__init__()
        block_and_stride(block_size, stride)
        if head_dim is None and self.requires_head_dim:
            raise ValueError(f"{type(self).__name__} needs head_dim (the D of [B, H, T, D]), got None")
        if num_heads is None and self.requires_num_heads:
            raise ValueError(f"{type(self).__name__} has per-head weights and needs num_heads, got None")
        self.block_size = block_size
        self.stride = stride
        self.head_dim = _optional_positive("head_dim", head_dim)
        self.num_heads = _optional_positive("num_heads", num_heads)

    def num_blocks(self, seq_len: int) -> int:
        """``Tc = max(0, (T - l) // d + 1)`` for ``seq_len = T`` tokens."""
        return num_compressed_blocks(seq_len, self.block_size, self.stride)

    def check_input(self, x: Tensor, name: str = "x", ndim: int = 4) -> None:
        """Validate ``x [B, H, T, D]`` (or blocks ``[B, H, N, l, D]`` with ``ndim=5``) against this module."""
        tensor(name, x, ndim=ndim, floating=True)
        if self.head_dim is not None and x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must have head_dim (last dim) {self.head_dim}, got shape {list(x.shape)}")
        if self.num_heads is not None and x.shape[1] != self.num_heads:
            raise ValueError(f"{name} must have num_heads={self.num_heads} heads (dim 1), got shape {list(x.shape)}")
        if ndim == 5 and x.shape[3] != self.block_size:
            raise ValueError(f"{name} must be blocks [B, H, N, block_size={self.block_size}, D], got {list(x.shape)}")

    def blocks(self, x: Float[Tensor, "B H T D"]) -> Float[Tensor, "B H Tc l D"]:
        """The ``Tc`` compression blocks of ``x``; when ``Tc = 0`` an empty view still connected to ``x``."""
        return compression_blocks(x, self.block_size, self.stride)

    def forward(self, x: Float[Tensor, "B H T D"]) -> Float[Tensor, "B H Tc D"]:
        """Compress ``x [B, H, T, D]`` to ``[B, H, Tc, D]``."""
        self.check_input(x)
        return self._compress(self.blocks(x))

    def compress_blocks(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        """Compress already-cut blocks ``[B, H, N, l, D]`` (e.g. the newest one while decoding) to ``[B, H, N, D]``."""
        self.check_input(blocks, "blocks", ndim=5)
        return self._compress(blocks)

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        """Subclasses: each block of ``l`` tokens to one vector (input already validated)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"block_size={self.block_size}", f"stride={self.stride}"]
        if self.head_dim is not None:
            parts.append(f"head_dim={self.head_dim}")
        if self.num_heads is not None:
            parts.append(f"num_heads={self.num_heads}")
        return ", ".join(parts)


class MeanPool(Compressor):
    """Mean of each block's ``l`` tokens: parameter-free, equal to :func:`nsa_flex.functional.mean_pool`."""

    requires_head_dim = False

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        return blocks.mean(dim=-2)


class MLPCompress(Compressor):
    """The paper's ``phi``: add a learned intra-block position embedding ``P [l, D]``, flatten the block of
    ``l`` tokens and map it with an MLP ``l*D -> hidden -> D`` to one vector. Weights are shared by all heads.

    Args:
        hidden_dim: hidden width; default ``int(l * D * expand_factor)``.
        expand_factor: used when ``hidden_dim`` is None (1.0, as lucidrains' default compress MLP).
        activation: module class or instance placed between the two linears (default ``nn.ReLU``).

    ``P`` starts at zero. (Added before the first linear, ``P`` amounts to a reparameterization of that linear's
    bias; it is kept for fidelity to the paper and so that checkpoints carry it explicitly.)
    """

    def __init__(self, block_size: int, stride: int, head_dim: int, num_heads: Optional[int] = None,
                 hidden_dim: Optional[int] = None, expand_factor: float = 1.0,
                 activation: Union[type[nn.Module], nn.Module] = nn.ReLU):
        super().__init__(block_size, stride, head_dim, num_heads)
        in_features = block_size * head_dim
        self.hidden_dim = _hidden_size(hidden_dim, expand_factor, in_features)
        self.pos_emb = nn.Parameter(torch.zeros(block_size, head_dim))
        self.net = nn.Sequential(
            nn.Linear(in_features, self.hidden_dim),
            activation() if isinstance(activation, type) else activation,
            nn.Linear(self.hidden_dim, head_dim),
        )

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        flat = rearrange(blocks + self.pos_emb, "b h n l d -> b h n (l d)")
        return self.net(flat)


class GroupedMLP(Compressor):
    """:class:`MLPCompress` with separate weights for each of ``num_heads`` heads (required).

    Parameters: ``pos_emb [H, l, D]`` (starts at zero), ``w1 [H, l*D, hidden]``, ``b1 [H, hidden]``,
    ``w2 [H, hidden, D]``, ``b2 [H, D]``; initialized like ``nn.Linear``.
    """

    requires_num_heads = True

    def __init__(self, block_size: int, stride: int, head_dim: int, num_heads: Optional[int] = None,
                 hidden_dim: Optional[int] = None, expand_factor: float = 1.0,
                 activation: Union[type[nn.Module], nn.Module] = nn.ReLU):
        super().__init__(block_size, stride, head_dim, num_heads)
        H, in_features = self.num_heads, block_size * head_dim
        self.hidden_dim = _hidden_size(hidden_dim, expand_factor, in_features)
        self.pos_emb = nn.Parameter(torch.zeros(H, block_size, head_dim))
        self.w1 = nn.Parameter(torch.empty(H, in_features, self.hidden_dim))
        self.b1 = nn.Parameter(torch.empty(H, self.hidden_dim))
        self.w2 = nn.Parameter(torch.empty(H, self.hidden_dim, head_dim))
        self.b2 = nn.Parameter(torch.empty(H, head_dim))
        self.act = activation() if isinstance(activation, type) else activation
        _linear_init_(self.w1, self.b1, in_features)
        _linear_init_(self.w2, self.b2, self.hidden_dim)

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        flat = rearrange(blocks + self.pos_emb[:, None], "b h n l d -> b h n (l d)")
        hidden = self.act(torch.einsum("bhni,hio->bhno", flat, self.w1) + self.b1[:, None])
        return torch.einsum("bhni,hio->bhno", hidden, self.w2) + self.b2[:, None]


class ConvCompress(Compressor):
    """A strided convolution over time: ``Conv1d(D, D, kernel_size=l, stride=d)``, i.e. compressed token ``c``
    is ``bias + sum_{i<l} W[:, :, i] @ x[c*d + i]``.

    Args:
        per_head: False (default) shares one convolution across heads; True gives each of ``num_heads`` heads
            its own (a grouped ``Conv1d(H*D, H*D, l, stride=d, groups=H)``), and needs ``num_heads``.
        bias: whether the convolution has a bias.
    """

    def __init__(self, block_size: int, stride: int, head_dim: int, num_heads: Optional[int] = None,
                 per_head: bool = False, bias: bool = True):
        if per_head and num_heads is None:
            raise ValueError("ConvCompress(per_head=True) needs num_heads, got None")
        super().__init__(block_size, stride, head_dim, num_heads)
        self.per_head = per_head
        groups = num_heads if per_head else 1
        channels = head_dim * groups
        self.conv = nn.Conv1d(channels, channels, kernel_size=block_size, stride=stride, groups=groups, bias=bias)

    def forward(self, x: Float[Tensor, "B H T D"]) -> Float[Tensor, "B H Tc D"]:
        self.check_input(x)
        B, H, T, D = x.shape
        if self.num_blocks(T) == 0:
            return self._compress(self.blocks(x))
        if self.per_head:
            out = self.conv(rearrange(x, "b h t d -> b (h d) t"))
            return rearrange(out, "b (h d) n -> b h n d", h=H)
        out = self.conv(rearrange(x, "b h t d -> (b h) d t"))
        return rearrange(out, "(b h) d n -> b h n d", b=B)

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        D = self.head_dim
        if self.per_head:
            weight = rearrange(self.conv.weight, "(h o) i l -> h o i l", h=self.num_heads)
            out = torch.einsum("bhnli,hoil->bhno", blocks, weight)
            bias = None if self.conv.bias is None else self.conv.bias.view(self.num_heads, 1, D)
        else:
            out = torch.einsum("bhnli,oil->bhno", blocks, self.conv.weight)
            bias = self.conv.bias
        return out if bias is None else out + bias


class AttentionPool(Compressor):
    """Attention pooling (as in Enformer): per feature, a softmax over the block's ``l`` positions of learned
    logits ``X W + P`` (``W [D, D]`` a linear of each token, ``P [l, D]`` per position) weighs the tokens.

    Both start at zero, so a fresh ``AttentionPool`` equals :class:`MeanPool`. Weights are shared by all heads.
    """

    def __init__(self, block_size: int, stride: int, head_dim: int, num_heads: Optional[int] = None):
        super().__init__(block_size, stride, head_dim, num_heads)
        self.to_logits = nn.Linear(head_dim, head_dim, bias=False)
        nn.init.zeros_(self.to_logits.weight)
        self.pos_logits = nn.Parameter(torch.zeros(block_size, head_dim))

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        weights = (self.to_logits(blocks) + self.pos_logits).softmax(dim=-2)
        return (weights * blocks).sum(dim=-2)


class LinearCompress(Compressor):
    """One linear map of the flattened block, ``l*D -> D`` (no hidden layer); shared by all heads."""

    def __init__(self, block_size: int, stride: int, head_dim: int, num_heads: Optional[int] = None,
                 bias: bool = False):
        super().__init__(block_size, stride, head_dim, num_heads)
        self.proj = nn.Linear(block_size * head_dim, head_dim, bias=bias)

    def _compress(self, blocks: Float[Tensor, "B H N l D"]) -> Float[Tensor, "B H N D"]:
        return self.proj(rearrange(blocks, "b h n l d -> b h n (l d)"))


COMPRESSORS: dict[str, type[Compressor]] = {
    "mean": MeanPool,
    "mlp": MLPCompress,
    "conv": ConvCompress,
    "attention_pool": AttentionPool,
    "grouped_mlp": GroupedMLP,
    "linear": LinearCompress,
}

CompressorLike = Callable[[Tensor], Tensor]


def get_compressor(name_or_module: Union[str, nn.Module, CompressorLike], **kwargs: Any) -> CompressorLike:
    """A compressor by name (a key of :data:`COMPRESSORS`, built with ``kwargs``), or ``name_or_module`` itself
    when it is already a module/callable (then ``kwargs`` must be empty).

    Typical kwargs: ``block_size, stride, head_dim, num_heads`` plus the class's own (``hidden_dim``,
    ``expand_factor``, ``per_head``, ``bias``, ...).
    """
    if isinstance(name_or_module, str):
        cls = COMPRESSORS.get(name_or_module)
        if cls is None:
            raise ValueError(f"name_or_module must be one of {sorted(COMPRESSORS)} or a module, got {name_or_module!r}")
        return cls(**kwargs)
    if callable(name_or_module):
        if kwargs:
            raise TypeError(f"kwargs are only used with a compressor name, got a module and {sorted(kwargs)}")
        return name_or_module
    raise TypeError(f"name_or_module must be a compressor name or a module, got {type(name_or_module).__name__}")
