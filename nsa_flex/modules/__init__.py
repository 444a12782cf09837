"""nn.Modules built on nsa_flex.functional: compression networks, the NSA layer ``SparseAttention`` and a small LM."""

from . import compression
from .attention import SparseAttention
from .cache import KVCache, NSACache
from .compression import (
    COMPRESSORS,
    AttentionPool,
    Compressor,
    ConvCompress,
    GroupedMLP,
    LinearCompress,
    MeanPool,
    MLPCompress,
    get_compressor,
)
from .rotary import RotaryEmbedding, apply_rotary
from .transformer import CausalAttention, TransformerLM

__all__ = [
    "COMPRESSORS",
    "AttentionPool",
    "CausalAttention",
    "Compressor",
    "ConvCompress",
    "GroupedMLP",
    "KVCache",
    "LinearCompress",
    "MLPCompress",
    "MeanPool",
    "NSACache",
    "RotaryEmbedding",
    "SparseAttention",
    "TransformerLM",
    "apply_rotary",
    "compression",
    "get_compressor",
]
