"""nn.Modules built on nsa_flex.functional: compression networks and the NSA layer ``SparseAttention``."""

from . import compression
from .attention import SparseAttention
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

__all__ = [
    "COMPRESSORS",
    "AttentionPool",
    "Compressor",
    "ConvCompress",
    "GroupedMLP",
    "LinearCompress",
    "MLPCompress",
    "MeanPool",
    "RotaryEmbedding",
    "SparseAttention",
    "apply_rotary",
    "compression",
    "get_compressor",
]
