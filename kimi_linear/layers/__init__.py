"""Layers of Kimi Linear, one per file, built on ``kimi_linear.ops``."""

from .kda import KimiDeltaAttention
from .mla import MultiHeadLatentAttention
from .mlp import SwiGLUMLP
from .moe import GroupedExperts, SparseMoE, TopKRouter
from .norm import GatedRMSNorm, RMSNorm
from .short_conv import ShortConvolution

__all__ = [
    "KimiDeltaAttention",
    "MultiHeadLatentAttention",
    "SwiGLUMLP",
    "GroupedExperts",
    "SparseMoE",
    "TopKRouter",
    "GatedRMSNorm",
    "RMSNorm",
    "ShortConvolution",
]
