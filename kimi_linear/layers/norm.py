"""RMS normalisations used by Kimi Linear.

``RMSNorm`` is the decoder/final/latent norm; ``GatedRMSNorm`` is KDA's head-wise output norm with a
sigmoid output gate (FLA's ``FusedRMSNormGated`` with activation "sigmoid").
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``: normalise in float32, cast back, then scale.

    The cast back to the input dtype happens *before* the weight multiply, as in the reference code
    (plain ``w * x_hat``, not ``(1 + w) * x_hat``).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Head-wise RMSNorm with a sigmoid gate: ``x_hat * weight * sigmoid(gate)``, all in float32.

    ``x`` and ``gate`` are ``[..., head_dim]``; the one ``weight`` of size ``head_dim`` is shared by all
    heads. The result is cast to x's dtype once, at the end (as FLA's fused kernel does).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if gate.shape != x.shape:
            raise ValueError(f"gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
        dtype = x.dtype
        compute = torch.promote_types(dtype, torch.float32)
        x32 = x.to(compute)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x32 * self.weight.to(compute) * torch.sigmoid(gate.to(compute))
        return y.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, gate=sigmoid"
