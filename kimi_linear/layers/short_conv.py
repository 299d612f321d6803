"""Causal depthwise short convolution with SiLU, as used on KDA's q, k and v (FLA ``ShortConvolution``).

    y_t[c] = silu( sum_{i=0..W-1} weight[c, 0, i] * x_{t-W+1+i}[c] )

Tap ``W-1`` multiplies the current token. Inputs before the sequence start are zero, or come from a
conv state: the last ``W`` *pre-convolution* inputs of the sequence so far, ``[B, C, W]`` (FLA's and the
reference code's width; only the newest ``W-1`` columns ever reach an output).

The same code serves prefill (T tokens) and decode (T = 1): the state is prepended, one depthwise
conv1d runs over the window, and the new state is the last W inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        # [C, 1, W] like nn.Conv1d(groups=C) and the checkpoint's q_conv1d.weight; no bias.
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default init (fan_in = W for a depthwise conv).
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[B, T, C]``. conv_state: ``[B, C, W]`` or None (zeros before the start).

        When a conv state is given it is updated in place to the last W inputs. Returns ``[B, T, C]``
        in x's dtype; the convolution itself is computed in float32, as FLA does.
        """
        B, T, C = x.shape
        if C != self.channels:
            raise ValueError(f"expected {self.channels} channels, got x of shape {list(x.shape)}")
        W = self.kernel_size
        xt = x.transpose(1, 2)  # [B, C, T]
        if conv_state is None:
            window = F.pad(xt, (W - 1, 0))
        else:
            if conv_state.shape != (B, C, W):
                raise ValueError(f"conv_state must be [B, C, W] = [{B}, {C}, {W}], got {list(conv_state.shape)}")
            window = torch.cat([conv_state[:, :, 1:].to(xt.dtype), xt], dim=-1)  # [B, C, W-1+T]
        compute = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
        y = F.conv1d(window.to(compute), self.weight.to(compute), groups=C)  # [B, C, T]
        if conv_state is not None:
            with torch.no_grad():
                # The last W inputs; on a short first step the zero padding of the old state fills the rest.
                full = torch.cat([conv_state[:, :, :1].to(xt.dtype), window], dim=-1)
                conv_state.copy_(full[:, :, -W:])
        return F.silu(y).to(x.dtype).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation=silu"
