"""Kimi Linear: decoder layers in the config's KDA/MLA pattern, the base model and the causal LM.

    h = embed_tokens(ids)
    for each layer:  h += mixer(input_layernorm(h));  h += ffn(post_attention_layernorm(h))
    logits = lm_head(norm(h))

mixer is KDA or MLA (``config.is_kda_layer``); ffn is the dense SwiGLU ``mlp`` (layers < first_k_dense_replace)
or the ``block_sparse_moe``. Module names equal the official checkpoint names except the stacked experts.
One forward serves training, prefill and decode: pass a ``KimiLinearCache`` to continue a sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import (
    GatedRMSNorm, KimiDeltaAttention, MultiHeadLatentAttention, RMSNorm, ShortConvolution, SparseMoE, SwiGLUMLP,
)
from ...layers.moe import GroupedExperts, TopKRouter
from .cache import KimiLinearCache
from .configuration import KimiLinearConfig


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: KimiLinearCache | None = None


class KimiLinearDecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_kda = config.is_kda_layer(layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_kda:
            self.self_attn = KimiDeltaAttention(
                config.hidden_size, config.kda_num_heads, config.kda_head_dim,
                conv_kernel_size=config.kda_conv_kernel_size, norm_eps=config.rms_norm_eps,
                gate_lower_bound=config.gate_lower_bound,
            )
        else:
            self.self_attn = MultiHeadLatentAttention(
                config.hidden_size, config.num_attention_heads, kv_lora_rank=config.kv_lora_rank,
                qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank,
                kv_norm_eps=1e-6,  # the reference's KimiRMSNorm default, not rms_norm_eps (architecture.md 4.3)
            )
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(
                config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_token,
                num_shared_experts=config.num_shared_experts, num_expert_group=config.num_expert_group,
                topk_group=config.topk_group, renormalize=config.moe_renormalize,
                routed_scaling_factor=config.routed_scaling_factor,
                biased_router_weights=config.moe_biased_router_weights,
            )
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cache: KimiLinearCache | None = None, absorb: bool | None = None) -> torch.Tensor:
        x = self.input_layernorm(h)
        i = self.layer_idx
        if self.is_kda:
            if cache is None:
                x = self.self_attn(x)
            else:
                x = self.self_attn(x, cache.conv_states[i], cache.recurrent_states[i])
        elif cache is None:
            x = self.self_attn(x, absorb=absorb)
        else:
            x = self.self_attn(x, cache.latents[i], cache.k_pe[i], past_len=cache.seq_len, absorb=absorb)
        h = h + x
        x = self.post_attention_layernorm(h)
        x = self.block_sparse_moe(x) if self.is_moe else self.mlp(x)
        return h + x


class KimiLinearModel(nn.Module):
    config_class = KimiLinearConfig

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        cache: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Returns the final-normed hidden states ``[B, T, D]``; advances ``cache`` by T if given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3:
            raise ValueError(f"expected input_ids [B, T] or inputs_embeds [B, T, D], got shape {list(h.shape)}")
        B, T = h.shape[:2]
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} sequences but the input has {B}")
            cache.reserve(T)
        for layer in self.layers:
            h = layer(h, cache, absorb=absorb)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    @classmethod
    def from_pretrained(cls, path, *args, dtype=None, device="cpu", config: KimiLinearConfig | None = None, **kwargs):
        """Load the base model (no lm_head) from a local directory in the official layout."""
        from .checkpoint import load_pretrained  # noqa: PLC0415 (checkpoint imports this module)

        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        return load_pretrained(cls, path, dtype=dtype, device=device, config=config)


class KimiLinearForCausalLM(nn.Module):
    config_class = KimiLinearConfig

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        if not isinstance(config, KimiLinearConfig):
            raise TypeError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        absorb: bool | None = None,
    ) -> CausalLMOutput:
        """logits ``[B, T, V]`` (only the last ``logits_to_keep`` positions if > 0); loss is the mean
        next-token cross-entropy over labels != -100 (labels are shifted inside, like transformers)."""
        h = self.model(input_ids, cache=cache, inputs_embeds=inputs_embeds, absorb=absorb)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels and logits_to_keep cannot be combined")
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)

    def new_cache(self, batch_size: int, capacity: int = 256) -> KimiLinearCache:
        p = self.lm_head.weight
        return KimiLinearCache(self.config, batch_size, capacity=capacity, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.Tensor, max_new_tokens: int, cache: KimiLinearCache | None = None):
        """Prefill ``input_ids`` then decode ``max_new_tokens`` tokens greedily with the cache.

        Returns the new tokens ``[B, max_new_tokens]`` (no stopping at eos: callers cut where they want).
        """
        if cache is None:
            cache = self.new_cache(input_ids.shape[0], capacity=input_ids.shape[1] + max_new_tokens)
        logits = self(input_ids, cache=cache, logits_to_keep=1).logits
        out = []
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(token)
            if len(out) == max_new_tokens:
                break
            logits = self(token, cache=cache, logits_to_keep=1).logits
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """(Re)initialise every parameter in place (works after ``to_empty`` on any device): normal(std)
        for matrices and embeddings, ones for norms, FLA's init for the KDA gate, zero router bias."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, ShortConvolution):
                module.weight.uniform_(-1.0 / math.sqrt(module.kernel_size), 1.0 / math.sqrt(module.kernel_size))
            elif isinstance(module, KimiDeltaAttention):
                module.reset_gate_parameters()
            elif isinstance(module, TopKRouter):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                for w in (module.w1, module.w3, module.w2):
                    w.normal_(0.0, std)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)

    def num_parameters(self) -> int:
        """Every value stored in the checkpoint (e_score_correction_bias included)."""
        seen = {id(p): p.numel() for p in self.parameters()}
        return sum(seen.values())

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *args, dtype=None, device="cpu", config: KimiLinearConfig | None = None, **kwargs):
        """Load a local directory in the official layout (config.json + sharded safetensors).

        Accepts and ignores the hub arguments transformers' Auto classes pass along (revision, ...).
        ``torch_dtype`` is accepted as an alias of ``dtype``.
        """
        from .checkpoint import load_pretrained  # noqa: PLC0415 (checkpoint imports this module)

        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        return load_pretrained(cls, path, dtype=dtype, device=device, config=config)

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 1024**3) -> None:
        from .checkpoint import save_pretrained  # noqa: PLC0415

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
