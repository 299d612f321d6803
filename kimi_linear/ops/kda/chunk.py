"""Chunked KDA in PyTorch: the CPU path, differentiable by autograd.

Tokens are grouped into chunks of C (64 by default). Inside a chunk everything is parallel matrix
algebra; across chunks a short sequential loop carries the [K, V] state. With G_r the cumulative log
decay of row r from the chunk start (per key channel) and S the state entering the chunk:

    Akk[i, j] = beta_i * sum_d k_id k_jd exp(G_id - G_jd)        j < i
    Aqk[i, j] =          sum_d q_id k_jd exp(G_id - G_jd)        j <= i      (q already scaled)
    T         = (I + Akk)^-1                                     unit lower triangular
    w         = T (beta * k * exp(G)),   u = T (beta * v)        the WY / UT form (tech report 3.1)
    v_new     = u - w S                                          beta * (delta-rule correction)
    o         = (q * exp(G)) S + Aqk v_new
    S_next    = exp(G_C) * S + (k * exp(G_C - G))^T v_new

Numerical safety for any gate (log decays of -1000 included). Every decay factor is computed from a
direct sum of the gates between its two rows, never as a difference of two long cumulative sums:
after a gate of -1000 such sums sit near -1000 and their float32 difference would lose its digits.
- Across 16-row sub-chunks, exp(G_i - G_j) = exp(decay from i's sub-chunk start to i)
  * exp(decay of the whole sub-chunks between) * exp(decay from j to the end of j's sub-chunk),
  every factor <= 1.
- Inside a 16x16 diagonal block, it is split at the middle row while the decay across the block is
  moderate (factors <= exp(SAFE_SPAN)); blocks with a larger decay are computed pair by pair from
  float64 segment sums.
- The chunk-level factors (q and k decayed to the chunk's start or end) are prefix or suffix sums.
Large decays underflow to 0, which is the right answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUB_CHUNK = 16
# Largest decay (in log units, over one 16-row sub-chunk and any key channel) for which the diagonal
# blocks use the factored form: exp(40) ~ 2e17 keeps every factor and product far from fp32 overflow.
SAFE_SPAN = 40.0


def _lower_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _cumsum_exclusive(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Sum of the rows strictly before (or, reversed, strictly after) each row, along dim -2."""
    zero = torch.zeros_like(x[..., :1, :])
    if reverse:
        return torch.cat([x[..., 1:, :].flip(-2).cumsum(-2).flip(-2), zero], dim=-2)
    return torch.cat([zero, x[..., :-1, :].cumsum(-2)], dim=-2)


def _intra_chunk_matrices(q, k, g, sub):
    """Aqk (lower, diagonal included) and the unscaled Akk (strictly lower) for every chunk.

    q, k, g: [..., C, K] (g the per-token log decay). Returns two [..., C, C] tensors.
    """
    *lead, C, K = k.shape
    ns = C // sub
    device = k.device
    qs = q.reshape(*lead, ns, sub, K)
    ks = k.reshape(*lead, ns, sub, K)
    gs = g.reshape(*lead, ns, sub, K)
    # Decay from the sub-chunk's first row to row i (gates of rows 1..i; 0 for row 0): differences of
    # two rows give the gates between them, and a large first gate never enters them.
    since_start = torch.cat([torch.zeros_like(gs[..., :1, :]), gs[..., 1:, :]], dim=-2).cumsum(-2)
    from_start_inclusive = gs.cumsum(-2)  # decay from the sub-chunk's start through row i
    to_end = _cumsum_exclusive(gs, reverse=True)  # decay after row j to the sub-chunk's end
    totals = from_start_inclusive[..., -1, :]  # [.., ns, K]

    # Diagonal blocks, factored at the middle row m: exp(G_i - G_j) = exp(G_i - G_m) exp(G_m - G_j).
    rel = since_start - since_start[..., sub // 2 : sub // 2 + 1, :]
    up = torch.exp(rel.clamp(-SAFE_SPAN, SAFE_SPAN))
    down = torch.exp((-rel).clamp(-SAFE_SPAN, SAFE_SPAN))
    k_down = (ks * down).transpose(-1, -2)
    aqk_diag = (qs * up) @ k_down
    akk_diag = (ks * up) @ k_down
    span = (since_start.amax(dim=-2) - since_start.amin(dim=-2)).amax(dim=-1)  # [.., ns]
    unsafe = (span > SAFE_SPAN).nonzero(as_tuple=True)
    if unsafe[0].numel():
        qu, ku = qs[unsafe], ks[unsafe]  # [n, sub, K]
        cum = gs[unsafe].to(torch.float64).cumsum(-2)
        diff = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # [n, i, j, K]: gates in (j, i], exact in float64
        keep = _lower_mask(sub, strict=False, device=device)
        decay = torch.exp(diff.masked_fill(~keep[:, :, None], float("-inf")).to(q.dtype))
        kd = ku.unsqueeze(-3) * decay  # k_j * exp(G_i - G_j)
        aqk_diag = aqk_diag.index_put(unsafe, (qu.unsqueeze(-2) * kd).sum(-1))
        akk_diag = akk_diag.index_put(unsafe, (ku.unsqueeze(-2) * kd).sum(-1))
    aqk_diag = aqk_diag.masked_fill(~_lower_mask(sub, False, device), 0.0)
    akk_diag = akk_diag.masked_fill(~_lower_mask(sub, True, device), 0.0)

    # Off-diagonal blocks, row sub-chunk I after column sub-chunk J: three factors, each <= 1.
    k_to_end = ks * torch.exp(to_end)  # [.., ns, sub, K]
    zeros = q.new_zeros(*lead, sub, sub)
    rows_qk, rows_kk = [], []
    for I in range(ns):
        cols_qk, cols_kk = [], []
        between = torch.zeros_like(totals[..., 0, :])  # decay of the whole sub-chunks J+1 .. I-1
        blocks_qk, blocks_kk = [zeros] * ns, [zeros] * ns
        for J in range(I - 1, -1, -1):
            dec = torch.exp(from_start_inclusive[..., I, :, :] + between.unsqueeze(-2))
            kj = k_to_end[..., J, :, :].transpose(-1, -2)
            blocks_qk[J] = (qs[..., I, :, :] * dec) @ kj
            blocks_kk[J] = (ks[..., I, :, :] * dec) @ kj
            between = between + totals[..., J, :]
        blocks_qk[I], blocks_kk[I] = aqk_diag[..., I, :, :], akk_diag[..., I, :, :]
        rows_qk.append(torch.cat(blocks_qk, dim=-1))
        rows_kk.append(torch.cat(blocks_kk, dim=-1))
    return torch.cat(rows_qk, dim=-2), torch.cat(rows_kk, dim=-2)


def chunk_kda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked KDA over prepared inputs (gate activated, heads equal), computed in the inputs' dtype.

    Shapes: q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; state ``[B, H, K, V]``.
    T need not be a multiple of ``chunk_size``: the tail is padded with identity steps (g = 0,
    beta = 0), which leave the state untouched. Returns ``(o, final_state, chunk_states)``;
    ``chunk_states`` is ``[B, NT, H, K, V]``, the state entering each chunk, when asked for.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    sub = min(SUB_CHUNK, C)
    pad = (-T) % C
    n_chunks = (T + pad) // C

    def to_chunks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, n_chunks, C, x.shape[-1])

    q, k, v, g = (to_chunks(x) for x in (q * scale, k, v, g))
    beta = to_chunks(beta.unsqueeze(-1))  # [B, H, N, C, 1]

    Aqk, Akk = _intra_chunk_matrices(q, k, g, sub)
    Akk = Akk * beta
    G = g.cumsum(dim=-2)  # decay from the chunk start through each row
    exp_G = torch.exp(G)
    # One unit-lower-triangular solve gives w and u together (the diagonal of Akk is never read).
    rhs = torch.cat([beta * k * exp_G, beta * v], dim=-1)
    wu = torch.linalg.solve_triangular(Akk, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]

    qg = q * exp_G
    kg = k * torch.exp(_cumsum_exclusive(g, reverse=True))  # decay after each row to the chunk end
    last_decay = exp_G[..., -1:, :].transpose(-1, -2)  # [B, H, N, K, 1]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    chunk_states = []
    for n in range(n_chunks):
        if return_chunk_states:
            chunk_states.append(S)
        v_new = u[:, :, n] - w[:, :, n] @ S
        outputs.append(qg[:, :, n] @ S + Aqk[:, :, n] @ v_new)
        S = last_decay[:, :, n] * S + kg[:, :, n].transpose(-1, -2) @ v_new

    if n_chunks:
        o = torch.stack(outputs, dim=2).reshape(B, H, n_chunks * C, V)[:, :, :T]
    else:
        o = q.new_zeros(B, H, 0, V)
    states = None
    if return_chunk_states:
        states = torch.stack(chunk_states, dim=1) if chunk_states else q.new_zeros(B, 0, H, K, V)
    return o.transpose(1, 2), S, states
