"""Operators: each behind one stable function, with its PyTorch reference beside it.

Kernels live here and nowhere else; layers call these functions and never a backend directly.
"""

from .kda import (
    chunk_kda,
    fused_kda_gate,
    fused_recurrent_kda,
    kda_gate,
    kda_gate_lower_bound,
    kda_gate_softplus,
    l2norm,
    recurrent_kda_reference,
)

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
