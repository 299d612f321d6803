"""Multi-head Latent Attention without positional encoding (MLA NoPE), as in Kimi Linear.

Per token:  q = q_proj(x) -> [H, nope + rope];  [c ; k_pe] = kv_a_proj_with_mqa(x) (c: kv_lora_rank
latent, k_pe: one rope-dim key shared by all heads);  c_hat = kv_a_layernorm(c) (eps 1e-6);
kv_b_proj(c_hat) -> per head [k_nope | v].  Keys are [k_nope_h ; k_pe], queries [q_nope_h ; q_pe_h];
nothing is rotated (NoPE). Softmax scale is (nope + rope)^-0.5 = 1/sqrt(192).

What is cached per token is the latent [c_hat ; k_pe] (512 + 64 = 576 values), not per-head K and V.
Two equal ways to attend over it:
  * expanded (prefill): run kv_b_proj over every cached latent, then ordinary multi-head attention;
  * absorbed (decode): fold kv_b_proj's key half into the query and its value half into the output,
    so each head attends directly over the 576-wide latent: MQA with one shared KV head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm

# Queries up to this length (with a cache) use the absorbed form: cheaper than re-expanding the whole cache.
ABSORB_MAX_QUERY_LEN = 16


class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        q_lora_rank: int | None = None,
        kv_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if q_lora_rank is not None:
            raise ValueError("q_lora_rank must be None (Kimi Linear uses a plain q_proj); low-rank q is not implemented")
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=kv_norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        latent_cache: torch.Tensor | None = None,
        k_pe_cache: torch.Tensor | None = None,
        past_len: int = 0,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """x: ``[B, T, D]``.

        latent_cache ``[B, S_max, kv_lora_rank]`` and k_pe_cache ``[B, S_max, rope]``: when given, this
        step's latents are written at positions ``past_len .. past_len+T-1`` and attention runs over
        positions ``0 .. past_len+T-1``. absorb: force the absorbed (True) or expanded (False) form;
        None picks absorbed for short queries against a cache.
        """
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)

        if latent_cache is not None:
            if k_pe_cache is None:
                raise ValueError("latent_cache and k_pe_cache must be given together")
            end = past_len + T
            if latent_cache.shape[1] < end:
                raise ValueError(f"latent cache holds {latent_cache.shape[1]} positions, need {end}")
            with torch.no_grad():
                latent_cache[:, past_len:end] = c
                k_pe_cache[:, past_len:end] = k_pe
            # Read back through the cache (detached: the cache is for inference, not for backprop).
            c, k_pe = latent_cache[:, :end], k_pe_cache[:, :end]
        elif past_len:
            raise ValueError("past_len > 0 needs latent_cache and k_pe_cache")

        if absorb is None:
            absorb = latent_cache is not None and T <= ABSORB_MAX_QUERY_LEN
        attend = self._attend_absorbed if absorb else self._attend_expanded
        o = attend(q_nope, q_pe, c, k_pe, past_len)  # [B, T, H, v_head_dim]
        return self.o_proj(o.reshape(B, T, H * self.v_head_dim))

    # ------------------------------------------------------------------------------------------
    def _causal_mask(self, T: int, S: int, past_len: int, device) -> torch.Tensor:
        """[T, S] bool, True where query i (at position past_len + i) may see key j."""
        qpos = torch.arange(T, device=device)[:, None] + past_len
        return torch.arange(S, device=device)[None, :] <= qpos

    def _attend_expanded(self, q_nope, q_pe, c, k_pe, past_len):
        B, T, H, _ = q_nope.shape
        S = c.shape[1]
        kv = self.kv_b_proj(c).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, *, d]
        if past_len == 0 and T == S:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            mask = self._causal_mask(T, S, past_len, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return o.transpose(1, 2)

    def _attend_absorbed(self, q_nope, q_pe, c, k_pe, past_len):
        B, T, H, _ = q_nope.shape
        S = c.shape[1]
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, nope, R], [H, v, R]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # key half of kv_b folded into q
        scores = torch.einsum("bthr,bsr->bhts", q_latent, c) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale
        scores = scores.masked_fill(~self._causal_mask(T, S, past_len, scores.device), float("-inf"))
        p = scores.softmax(dim=-1).to(c.dtype)
        o_latent = torch.einsum("bhts,bsr->bthr", p, c)
        return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)  # value half of kv_b applied after attention
