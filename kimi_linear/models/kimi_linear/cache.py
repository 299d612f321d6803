"""The decoding cache of Kimi Linear: plain tensors, one set per layer, batch-major.

Per KDA layer (fixed size, independent of length):
    conv_states[i]       [B, 3*C, W]   the last W pre-convolution inputs of q | k | v (C = heads*head_dim),
                                       model dtype (FLA's width W = 4; only the newest W-1 reach outputs)
    recurrent_states[i]  [B, H, K, V]  float32, FLA's [K, V] layout
Per MLA layer (grows with length; preallocated to ``capacity`` positions and doubled when full):
    latents[i]           [B, S_max, kv_lora_rank]   kv_a_layernorm(c): the normalised latent
    k_pe[i]              [B, S_max, qk_rope_head_dim]  the shared (unrotated) key part
``seq_len`` is the number of positions already written (the same for every row of the batch).

The class is deliberately dumb: an inference engine can allocate it, index rows (``select``), or replace
the tensors with views into its own pools; the model only reads/writes these tensors in place.
"""

from __future__ import annotations

import torch

from .configuration import KimiLinearConfig


class KimiLinearCache:
    def __init__(
        self,
        config: KimiLinearConfig,
        batch_size: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.batch_size = batch_size
        self.seq_len = 0
        self.capacity = max(int(capacity), 1)
        C = config.kda_num_heads * config.kda_head_dim
        H, K = config.kda_num_heads, config.kda_head_dim
        W = config.kda_conv_kernel_size
        self.conv_states: dict[int, torch.Tensor] = {}
        self.recurrent_states: dict[int, torch.Tensor] = {}
        self.latents: dict[int, torch.Tensor] = {}
        self.k_pe: dict[int, torch.Tensor] = {}
        for i in config.kda_layers:
            self.conv_states[i] = torch.zeros(batch_size, 3 * C, W, dtype=dtype, device=device)
            self.recurrent_states[i] = torch.zeros(batch_size, H, K, K, dtype=torch.float32, device=device)
        for i in config.mla_layers:
            self.latents[i] = torch.zeros(batch_size, self.capacity, config.kv_lora_rank, dtype=dtype, device=device)
            self.k_pe[i] = torch.zeros(batch_size, self.capacity, config.qk_rope_head_dim, dtype=dtype, device=device)

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more positions in every MLA layer (doubling, amortised O(1))."""
        need = self.seq_len + new_tokens
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for store in (self.latents, self.k_pe):
            for i, t in store.items():
                grown = t.new_zeros(t.shape[0], new_cap, t.shape[2])
                grown[:, : self.seq_len] = t[:, : self.seq_len]
                store[i] = grown
        self.capacity = new_cap

    def advance(self, new_tokens: int) -> None:
        self.seq_len += new_tokens

    def select(self, rows: torch.Tensor | list[int]) -> "KimiLinearCache":
        """A new cache holding only the given batch rows (e.g. dropping finished sequences)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = object.__new__(KimiLinearCache)
        out.config, out.seq_len, out.capacity = self.config, self.seq_len, self.capacity
        out.batch_size = len(rows)
        for name in ("conv_states", "recurrent_states", "latents", "k_pe"):
            store = getattr(self, name)
            setattr(out, name, {i: t[rows.to(t.device)] for i, t in store.items()})
        return out

    def nbytes(self) -> int:
        """Bytes held, counting MLA only up to seq_len (the allocated capacity may be larger)."""
        fixed = sum(t.nbytes for t in (*self.conv_states.values(), *self.recurrent_states.values()))
        per_pos = sum(t[:, :1].nbytes for t in (*self.latents.values(), *self.k_pe.values()))
        return fixed + per_pos * self.seq_len
