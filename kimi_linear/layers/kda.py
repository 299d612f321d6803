"""Kimi Delta Attention (KDA) layer, named and shaped like the official checkpoint.

    x -> q, k, v projections -> separate causal short convs with SiLU (q_conv1d, k_conv1d, v_conv1d)
      -> KDA recurrence with per-channel forget gate g and per-head beta (ops.chunk_kda / fused_recurrent_kda)
      -> head-wise RMSNorm gated by sigmoid(g_b(g_a(x))) -> o_proj

The gate, the L2 norm of q and k and beta's sigmoid are all applied inside the operator, in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import chunk_kda, fused_recurrent_kda
from .norm import GatedRMSNorm
from .short_conv import ShortConvolution

# The reference switches from the chunked kernel to the token-recurrent one at this query length.
RECURRENT_MAX_QUERY_LEN = 64


class KimiDeltaAttention(nn.Module):
    """KDA mixer. Parameters (for hidden D, H heads of size K; C = H*K):

    q/k/v_proj [C, D]; q/k/v_conv1d.weight [C, 1, W]; f_a_proj [K, D]; f_b_proj [C, K];
    dt_bias [C] and A_log [1, 1, H, 1] (both float32); b_proj [H, D]; g_a_proj [K, D]; g_b_proj [C, K];
    o_norm.weight [K]; o_proj [D, C].
    """

    # Kept in float32 whatever dtype the module is cast to (see _apply).
    FP32_PARAMS = ("A_log", "dt_bias")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        conv_kernel_size: int = 4,
        norm_eps: float = 1e-5,
        gate_lower_bound: float | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.gate_lower_bound = gate_lower_bound
        C = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, C, bias=False)
        self.k_proj = nn.Linear(hidden_size, C, bias=False)
        self.v_proj = nn.Linear(hidden_size, C, bias=False)
        self.q_conv1d = ShortConvolution(C, conv_kernel_size)
        self.k_conv1d = ShortConvolution(C, conv_kernel_size)
        self.v_conv1d = ShortConvolution(C, conv_kernel_size)
        # Low-rank (rank = head_dim) forget gate; A_log per head, dt_bias per channel.
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, C, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, num_heads, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(C, dtype=torch.float32))
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        # Low-rank output gate.
        self.g_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, C, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(C, hidden_size, bias=False)
        self.reset_gate_parameters()

    @property
    def conv_channels(self) -> int:
        return self.num_heads * self.head_dim

    def reset_gate_parameters(self) -> None:
        """FLA's initialisation: A = uniform(1, 16), dt = log-uniform(1e-3, 1e-1), dt_bias = softplus^-1(dt)."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half()/.bfloat16() would downcast A_log and dt_bias; the checkpoint stores them
        # in float32 and the gate is computed in float32, so follow the device change only.
        keep = {name: self._parameters.pop(name) for name in self.FP32_PARAMS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, p in keep.items():
                self._parameters[name] = p
        for name, p in keep.items():
            moved = fn(p.data)
            if moved.dtype != p.dtype and p.dtype == torch.float32:
                moved = p.data.to(device=moved.device)
            if torch._has_compatible_shallow_copy_type(p.data, moved):
                p.data = moved
            else:  # e.g. meta -> cuda in to_empty(): replace the Parameter object, as Module._apply does
                self._parameters[name] = nn.Parameter(moved, requires_grad=p.requires_grad)
        return self

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        recurrent_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``[B, T, D]``.

        conv_state: ``[B, 3*C, W]``, the q|k|v conv states side by side (pre-conv inputs), or None.
        recurrent_state: ``[B, H, K, K]`` float32 in FLA's [K, V] layout, or None (a zero state).
        Both states are updated in place when given (decoding); without them the layer is a plain
        causal sequence op (training, prefill without cache).
        """
        B, T, _ = x.shape
        H, K, C = self.num_heads, self.head_dim, self.conv_channels
        if conv_state is not None and conv_state.shape[:2] != (B, 3 * C):
            raise ValueError(f"conv_state must be [B, 3*C, W] = [{B}, {3 * C}, W], got {list(conv_state.shape)}")
        cq, ck, cv = (None, None, None) if conv_state is None else conv_state.split(C, dim=1)
        q = self.q_conv1d(self.q_proj(x), cq).view(B, T, H, K)
        k = self.k_conv1d(self.k_proj(x), ck).view(B, T, H, K)
        v = self.v_conv1d(self.v_proj(x), cv).view(B, T, H, K)
        g = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K)  # raw gate input; activated in the kernel
        beta = self.b_proj(x)  # logits; sigmoid in the kernel (float32)

        kda = fused_recurrent_kda if (T <= RECURRENT_MAX_QUERY_LEN and not self.training) else chunk_kda
        o, final_state = kda(
            q, k, v, g, beta,
            initial_state=recurrent_state,
            output_final_state=recurrent_state is not None,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            A_log=self.A_log.view(H),
            dt_bias=self.dt_bias,
            lower_bound=self.gate_lower_bound,
        )
        if recurrent_state is not None:
            with torch.no_grad():
                recurrent_state.copy_(final_state)

        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        o = self.o_norm(o, gate).reshape(B, T, C)
        return self.o_proj(o)
