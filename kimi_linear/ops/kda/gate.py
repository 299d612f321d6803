"""Element-wise pieces of KDA that sit in front of the recurrence: the forget-gate activations,
the L2 normalisation of q and k, and beta's sigmoid.

These are the PyTorch definitions; GPU kernels fuse the same formulas and are tested against them.
All of them compute in float32 (or float64 for float64 inputs) because the gate is a log-decay that
gets summed over up to 64 tokens per chunk, where bf16 rounding would be visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_lower_bound

L2NORM_EPS = 1e-6
# Softplus switches to the identity above this argument, as torch's default and FLA's gate kernel do.
SOFTPLUS_THRESHOLD = 20.0


def compute_dtype_for(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (reference and gradcheck runs), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _biased_input(g: torch.Tensor, A_log, dt_bias) -> torch.Tensor:
    """g + dt_bias in the compute dtype (dt_bias holds H*K values, one per channel)."""
    x = g.to(compute_dtype_for(g, A_log, dt_bias))
    if dt_bias is not None:
        x = x + dt_bias.to(x.dtype).reshape(g.shape[-2], g.shape[-1])
    return x


def _per_head_a(A_log: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    # The checkpoint stores A_log as [1, 1, H, 1]; FLA takes [H]. Both flatten to H values.
    return A_log.to(dtype).reshape(num_heads, 1)


def kda_gate_softplus(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Kimi-Linear-48B forget gate in log space: ``-exp(A_log[h]) * softplus(g + dt_bias)``.

    g is ``[..., H, K]`` (raw low-rank projection output), A_log has H values, dt_bias H*K values.
    Returns a float32 (float64 for float64 input) tensor of the same shape, every value <= 0.
    """
    x = _biased_input(g, A_log, dt_bias)
    return -torch.exp(_per_head_a(A_log, g.shape[-2], x.dtype)) * F.softplus(x, threshold=SOFTPLUS_THRESHOLD)


def kda_gate_lower_bound(
    g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, lower_bound: float
) -> torch.Tensor:
    """The bounded forget gate of newer KDA checkpoints: ``lower_bound * sigmoid(exp(A_log[h]) * (g + dt_bias))``.

    Every value lies in ``(lower_bound, 0)``. Without A_log the scale is 1, as in FLA.
    """
    check_lower_bound(lower_bound)
    x = _biased_input(g, A_log, dt_bias)
    if A_log is not None:
        x = torch.exp(_per_head_a(A_log, g.shape[-2], x.dtype)) * x
    return lower_bound * torch.sigmoid(x)


def kda_gate(
    g: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """The forget gate as the kernels apply it with ``use_gate_in_kernel=True``:
    the lower-bound form when ``lower_bound`` is given, else the softplus form."""
    if lower_bound is None:
        if A_log is None:
            raise ValueError("A_log is required for the softplus gate (lower_bound=None)")
        return kda_gate_softplus(g, A_log, dt_bias)
    return kda_gate_lower_bound(g, A_log, dt_bias, lower_bound)


def fused_kda_gate(
    g: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fla-core 0.6.0's name and signature for ``kda_gate`` (fla.ops.kda.gate), so code written against
    fla keeps working: the same gate, returned in ``output_dtype`` (float32 by default, as in fla)."""
    return kda_gate(g, A_log, dt_bias, lower_bound).to(output_dtype)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dimension (FLA's form: eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
