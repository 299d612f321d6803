"""Shared helpers of the model tests: tiny configs and models with non-trivial random weights."""

from __future__ import annotations

import torch

from kimi_linear.models import KimiLinearConfig, KimiLinearForCausalLM


def tiny_config(**overrides) -> KimiLinearConfig:
    # 6 layers: KDA KDA KDA MLA KDA MLA (1-based kda_layers [1,2,3,5]), dense layer 0, MoE after; 8 experts top-2.
    args = dict(num_hidden_layers=6, hidden_size=64, num_heads=4, head_dim=16, vocab_size=256, num_experts=8, top_k=2)
    args.update(overrides)
    return KimiLinearConfig.tiny(**args)


def tiny_model(seed: int = 0, std: float = 0.08, bias_scale: float = 0.3, **overrides) -> KimiLinearForCausalLM:
    """A tiny float32 model with random weights, random norm weights and a non-zero router bias
    (so the selection bias and the biased-weights flag are exercised)."""
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_config(**overrides))
    model.init_weights(std=std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                p.uniform_(-bias_scale, bias_scale)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used throughout the model tests."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
