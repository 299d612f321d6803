"""KDA as written in the tech report: one token at a time. This is the definition every other
implementation in the project is tested against (run it on float64 inputs for a gold reference).

Per head, with state S of shape [K, V] (key channels are rows):

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

computed in the order that costs O(K V) per token:

    S <- exp(g_t)[:, None] * S          decay, per key channel
    e <- beta_t * (v_t - S^T k_t)       the delta rule's correction
    S <- S + k_t e^T
    o_t <- S^T (scale * q_t)            the output reads the updated state
"""

from __future__ import annotations

import torch


def recurrent_kda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    return_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token loop over already-prepared inputs (gate activated, q/k normalised if wanted, heads equal).

    Shapes: q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; state ``[B, H, K, V]``.
    Computes in the inputs' dtype (pass float32 or float64). Returns ``(o, final_state, states)``,
    where ``states`` is ``[B, T, H, K, V]``, the state after every token, when ``return_all_states``.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = q.dtype
    S = (
        torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    outputs = []
    states = []
    for t in range(T):
        S = torch.exp(g[:, t]).unsqueeze(-1) * S
        kv = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        e = beta[:, t].unsqueeze(-1) * (v[:, t] - kv)
        S = S + k[:, t].unsqueeze(-1) * e.unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        if return_all_states:
            states.append(S)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V, dtype=dtype)
    all_states = None
    if return_all_states:
        all_states = torch.stack(states, dim=1) if states else S.new_zeros(B, 0, H, K, V)
    return o, S, all_states
