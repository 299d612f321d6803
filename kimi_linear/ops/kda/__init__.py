"""Kimi Delta Attention: the public operator, its gate functions and its float64-capable reference."""

from .api import chunk_kda, fused_recurrent_kda
from .gate import fused_kda_gate, kda_gate, kda_gate_lower_bound, kda_gate_softplus, l2norm
from .reference import recurrent_kda_reference

__all__ = [
    "chunk_kda",
    "fused_recurrent_kda",
    "kda_gate",
    "kda_gate_softplus",
    "kda_gate_lower_bound",
    "fused_kda_gate",
    "l2norm",
    "recurrent_kda_reference",
]
