"""DeepSeek-V3-style mixture of experts as used by Kimi Linear: sigmoid router with a selection bias,
grouped top-k, renormalised and scaled weights, routed SwiGLU experts plus one always-on shared expert.

Experts are stored stacked (``w1``/``w3`` ``[E, I, D]``, ``w2`` ``[E, D, I]``) so that a batch runs as a
few large grouped matmuls: tokens are sorted by expert and each expert multiplies one contiguous slice.
The checkpoint's per-expert names (``experts.{e}.w1.weight``) map to rows of these stacks (see
``models/kimi_linear/checkpoint.py``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import SwiGLUMLP


class TopKRouter(nn.Module):
    """Sigmoid scores in float32; ``e_score_correction_bias`` steers which experts are chosen only.

    biased_weights=False (default): weights are the unbiased sigmoid scores of the chosen experts
    (DeepSeek-V3, vLLM, transformers). biased_weights=True reproduces the checkpoint's shipped remote
    code, whose in-place add makes the weights ``score + bias`` (architecture.md section 7.1).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        num_expert_group: int = 1,
        topk_group: int = 1,
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        biased_weights: bool = False,
    ):
        super().__init__()
        if num_experts % num_expert_group:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by num_expert_group ({num_expert_group})")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.renormalize = renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.biased_weights = biased_weights
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A checkpoint tensor (bf16 in the official files), not trained by gradient: a Parameter so it is
        # counted, moved and saved like every other checkpoint tensor.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``[N, D]``. Returns (weights ``[N, k]`` float32 (float64 for float64 x), expert ids ``[N, k]``)."""
        compute = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 in float64 tests)
        logits = F.linear(x.to(compute), self.weight.to(compute))
        scores = logits.sigmoid()
        bias = self.e_score_correction_bias.to(compute)
        choice = scores + bias
        if self.num_expert_group > 1:
            # Keep the topk_group groups whose best two (biased) scores sum highest.
            N, G = choice.shape[0], self.num_expert_group
            grouped = choice.view(N, G, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        source = scores + bias if self.biased_weights else scores
        weights = source.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


# Devices on which torch._grouped_mm raised once (private API across torch versions): use the loop there.
_GROUPED_MM_FAILED: set[str] = set()


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows, and on CUDA bf16 on sm90+; else fall back."""
    if not hasattr(torch, "_grouped_mm") or x.device.type in _GROUPED_MM_FAILED:
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return False  # CPU training: use the per-expert loop, whose backward is plain matmuls
    elif x.dtype != torch.float32:
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 and t.shape[-2] * t.element_size() % 16 == 0
               for t in weights)


class GroupedExperts(nn.Module):
    """E SwiGLU experts, stacked: ``w2_e( silu(w1_e x) * w3_e x )``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # down
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: ``[M, D]`` rows grouped by expert (expert 0's rows first); counts: ``[E]`` rows each."""
        if _grouped_mm_ok(x_sorted, self.w1, self.w2):
            offs = counts.cumsum(0).to(torch.int32)
            try:
                gate = torch._grouped_mm(x_sorted, self.w1.transpose(-2, -1), offs=offs)
                up = torch._grouped_mm(x_sorted, self.w3.transpose(-2, -1), offs=offs)
                return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)
            except RuntimeError as e:  # a torch build without this grouped-mm variant: say so, then loop
                _GROUPED_MM_FAILED.add(x_sorted.device.type)
                warnings.warn(f"torch._grouped_mm failed on {x_sorted.device.type} ({e}); using the per-expert loop",
                              RuntimeWarning, stacklevel=2)
        # Fallback: one matmul per expert that received tokens, over its contiguous slice.
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xs = x_sorted[start:start + n]
                outs.append(F.linear(F.silu(F.linear(xs, self.w1[e])) * F.linear(xs, self.w3[e]), self.w2[e]))
                start += n
        if not outs:
            return x_sorted.new_zeros(0, self.w2.shape[1])
        return torch.cat(outs, dim=0)


class SparseMoE(nn.Module):
    """Router + grouped routed experts + one shared SwiGLU expert (always on, no gate of its own)."""

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int = 1,
        num_expert_group: int = 1,
        topk_group: int = 1,
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        biased_router_weights: bool = False,
    ):
        super().__init__()
        self.top_k = top_k
        self.gate = TopKRouter(
            hidden_size, num_experts, top_k, num_expert_group, topk_group, renormalize,
            routed_scaling_factor, biased_router_weights,
        )
        self.experts = GroupedExperts(num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = SwiGLUMLP(hidden_size, moe_intermediate_size * num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)  # [N, k] float32, [N, k]
        # Sort the N*k (token, expert) assignments by expert so each expert's rows are contiguous.
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_ids, minlength=self.experts.num_experts)
        expert_out = self.experts(flat[token_of], counts)  # [N*k, D] in x's dtype
        # Combine in float32 (as the reference: bf16 expert outputs x fp32 weights, summed in fp32).
        weighted = expert_out.to(weights.dtype) * weights.reshape(-1)[order, None]
        routed = torch.zeros(flat.shape, dtype=weights.dtype, device=x.device).index_add_(0, token_of, weighted)
        return routed.to(x.dtype).view(shape) + self.shared_experts(x)
