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

Numerical safety for any gate (log decays of -1000 included): every exponential that is evaluated
has an argument <= 0, and the cumulative decays are differenced in float64 (see below). The pairwise decay exp(G_i - G_j) is split at a reference point between j and i
for rows and columns in different 16-row sub-chunks (both factors <= 1), and computed exactly,
pair by pair, inside the 16x16 diagonal blocks. Large decays underflow to 0, which is the right answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUB_CHUNK = 16


def _lower_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _intra_chunk_matrices(q, k, G, sub):
    """Aqk (lower, diagonal included) and the unscaled Akk (strictly lower) for every chunk.

    q, k: [..., C, K] in the compute dtype; G: [..., C, K] in float64 (see chunk_kda_torch).
    Returns two [..., C, C] tensors.
    """
    dtype = q.dtype
    *lead, C, K = k.shape
    ns = C // sub
    device = k.device

    # Diagonal sub-blocks: exact pairwise decays, [.., ns, sub, sub, K]. The exponent is masked to -inf
    # above the diagonal before exp so neither the value nor its gradient can overflow.
    qs = q.reshape(*lead, ns, sub, K)
    ks = k.reshape(*lead, ns, sub, K)
    Gs = G.reshape(*lead, ns, sub, K)
    diff = Gs.unsqueeze(-2) - Gs.unsqueeze(-3)  # [.., ns, i, j, K] = G_i - G_j
    keep = _lower_mask(sub, strict=False, device=device)
    decay = torch.exp(diff.masked_fill(~keep[:, :, None], float("-inf")).to(dtype))
    kd = ks.unsqueeze(-3) * decay  # k_j * exp(G_i - G_j)
    aqk_diag = (qs.unsqueeze(-2) * kd).sum(-1)
    akk_diag = (ks.unsqueeze(-2) * kd).sum(-1).masked_fill(~_lower_mask(sub, True, device), 0.0)

    # Off-diagonal blocks (row sub-chunk I > column sub-chunk J). Reference = G at J's last row:
    # exp(G_i - ref) <= 1 for rows after J, exp(ref - G_j) <= 1 for rows of J.
    row_blocks_qk = [[None] * ns for _ in range(ns)]
    row_blocks_kk = [[None] * ns for _ in range(ns)]
    for J in range(ns - 1):
        ref = Gs[..., J, -1:, :]  # [.., 1, K]
        kj = ks[..., J, :, :] * torch.exp((ref - Gs[..., J, :, :]).to(dtype))  # [.., sub, K]
        later = slice((J + 1) * sub, C)
        dec = torch.exp((G[..., later, :] - ref).to(dtype))
        aqk = (q[..., later, :] * dec) @ kj.transpose(-1, -2)  # [.., C-(J+1)sub, sub]
        akk = (k[..., later, :] * dec) @ kj.transpose(-1, -2)
        for I in range(J + 1, ns):
            rows = slice((I - J - 1) * sub, (I - J) * sub)
            row_blocks_qk[I][J] = aqk[..., rows, :]
            row_blocks_kk[I][J] = akk[..., rows, :]

    zeros = q.new_zeros(*lead, sub, sub)

    def assemble(blocks, diag):
        rows = []
        for I in range(ns):
            cols = [blocks[I][J] if J < I else (diag[..., I, :, :] if J == I else zeros) for J in range(ns)]
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)

    return assemble(row_blocks_qk, aqk_diag), assemble(row_blocks_kk, akk_diag)


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

    # The cumulative decay is kept in float64: after a very negative gate (say -1000) G sits near
    # -1000 * n, and differences G_i - G_j of later rows would lose most of their float32 digits.
    G = g.to(torch.float64).cumsum(dim=-2)
    Aqk, Akk = _intra_chunk_matrices(q, k, G, sub)
    Akk = Akk * beta
    exp_G = torch.exp(G.to(q.dtype))
    # One unit-lower-triangular solve gives w and u together (the diagonal of Akk is never read).
    rhs = torch.cat([beta * k * exp_G, beta * v], dim=-1)
    wu = torch.linalg.solve_triangular(Akk, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]

    G_last = G[..., -1:, :]  # [B, H, N, 1, K]
    qg = q * exp_G
    kg = k * torch.exp((G_last - G).to(q.dtype))
    last_decay = torch.exp(G_last.to(q.dtype)).transpose(-1, -2)  # [B, H, N, K, 1]

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
