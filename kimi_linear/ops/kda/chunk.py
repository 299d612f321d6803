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

Numerical safety for any gate (log decays of -1000 included). Every decay exponent is a direct sum
of the gates between two rows (a matmul of g with a 0/1 mask), never a difference of two long
cumulative sums: after a gate of -1000 such sums sit near -1000 and their float32 difference would
lose its digits. Within a chunk of 16-row sub-chunks, for row i in sub-chunk I and column j in J:
- I > J: exp(G_i - G_j) = exp(gates from I's start through i) * exp(gates of the whole sub-chunks
  between) * exp(gates after j to J's end), three factors <= 1;
- I = J (diagonal blocks): exp(G_i - G_j) = exp(-(gates after i to the end)) * exp(gates after j to
  the end), a row factor >= 1 bounded by the decay across the block; blocks where that decay exceeds
  SAFE_SPAN are recomputed pair by pair from float64 segment sums.
Large decays underflow to 0, which is the right answer.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SUB_CHUNK = 16
# Largest decay (in log units, over one 16-row sub-chunk and any key channel) for which the diagonal
# blocks use the factored form: exp(40) ~ 2e17 keeps every factor and product far from fp32 overflow.
SAFE_SPAN = 40.0


def _lower_mask(n: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


@functools.lru_cache(maxsize=32)
def _segment_masks(C: int, sub: int, dtype: torch.dtype, device: torch.device):
    """[C, C] 0/1 matrices M such that (M @ g)[r] sums the gates of one segment for row r:

    since_start: gates from the start of r's sub-chunk through r;
    to_end:      gates after r through the end of r's sub-chunk.
    """
    r = torch.arange(C).view(C, 1)
    t = torch.arange(C).view(1, C)
    same_sub = (r // sub) == (t // sub)
    masks = (same_sub & (t <= r), same_sub & (t > r))
    return tuple(m.to(device=device, dtype=dtype) for m in masks)


def _intra_chunk_matrices(q, k, g, sub):
    """Aqk (lower, diagonal included) and the unscaled Akk (strictly lower) for every chunk, plus the
    chunk-level decay factors exp(G_r) (from the chunk start through r) and exp(G_C - G_r).

    q, k, g: [..., C, K] (g the per-token log decay). Returns two [..., C, C] and two [..., C, K].
    """
    *lead, C, K = k.shape
    ns = C // sub
    device = k.device
    since_start_mask, to_end_mask = _segment_masks(C, sub, q.dtype, device)
    since_start = since_start_mask @ g  # <= 0
    to_end = to_end_mask @ g  # <= 0
    exp_since_start, exp_to_end = torch.exp(since_start), torch.exp(to_end)
    k_col = (k * exp_to_end).reshape(*lead, ns, sub, K)  # k_j decayed to its sub-chunk's end
    q_row = (q * exp_since_start).reshape(*lead, ns, sub, K)
    k_row = (k * exp_since_start).reshape(*lead, ns, sub, K)
    totals = since_start.reshape(*lead, ns, sub, K)[..., -1, :]  # decay across each sub-chunk

    # Diagonal blocks, referenced at the block's last row: the row factor 1 / exp(to_end) >= 1. The
    # clamp only touches blocks recomputed below, and keeps their (discarded) values and grads finite.
    col_decay = exp_to_end.clamp(min=math.exp(-SAFE_SPAN)).reshape(*lead, ns, sub, K)
    k_col_t = k_col.transpose(-1, -2)
    diag_qk = (q.reshape(*lead, ns, sub, K) / col_decay) @ k_col_t  # [.., ns, sub, sub]
    diag_kk = (k.reshape(*lead, ns, sub, K) / col_decay) @ k_col_t
    low, high = torch.aminmax(to_end.reshape(*lead, ns, sub * K), dim=-1)
    span = torch.maximum(-low, high)  # [.., ns]: largest |decay exponent| inside each block
    unsafe = (span > SAFE_SPAN).nonzero(as_tuple=True)
    if unsafe[0].numel():
        qu = q.reshape(*lead, ns, sub, K)[unsafe]
        ku = k.reshape(*lead, ns, sub, K)[unsafe]
        cum = g.reshape(*lead, ns, sub, K)[unsafe].to(torch.float64).cumsum(-2)
        diff = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # [n, i, j, K]: gates in (j, i], exact in float64
        keep = _lower_mask(sub, strict=False, device=device)
        decay = torch.exp(diff.masked_fill(~keep[:, :, None], float("-inf")).to(q.dtype))
        kd = ku.unsqueeze(-3) * decay  # k_j * exp(G_i - G_j)
        diag_qk = diag_qk.index_put(unsafe, (qu.unsqueeze(-2) * kd).sum(-1))
        diag_kk = diag_kk.index_put(unsafe, (ku.unsqueeze(-2) * kd).sum(-1))
    diag_qk = diag_qk * _lower_mask(sub, False, device)
    diag_kk = diag_kk * _lower_mask(sub, True, device)

    # Off-diagonal blocks: row sub-chunk I against all earlier column sub-chunks in one product,
    # each column block scaled by the decay of the whole sub-chunks between it and I.
    aqk = q.new_zeros(*lead, C, C)
    akk = q.new_zeros(*lead, C, C)
    # Diagonal blocks in one copy each: view [.., C, C] as [.., I, row, J, col] and take I == J.
    aqk.view(*lead, ns, sub, ns, sub).diagonal(dim1=-4, dim2=-2).copy_(diag_qk.movedim(-3, -1))
    akk.view(*lead, ns, sub, ns, sub).diagonal(dim1=-4, dim2=-2).copy_(diag_kk.movedim(-3, -1))
    for I in range(1, ns):
        cols = []
        between = torch.zeros_like(totals[..., 0, :])
        for J in range(I - 1, -1, -1):
            cols.insert(0, k_col[..., J, :, :] * torch.exp(between).unsqueeze(-2))
            between = between + totals[..., J, :]
        earlier = torch.cat(cols, dim=-2).transpose(-1, -2)  # [.., K, I * sub]
        rows = slice(I * sub, (I + 1) * sub)
        aqk[..., rows, : I * sub] = q_row[..., I, :, :] @ earlier
        akk[..., rows, : I * sub] = k_row[..., I, :, :] @ earlier
    # Chunk-level decays from the same pieces: through row r from the chunk start, and after r to the
    # chunk end, each a sub-chunk factor times the whole sub-chunks before (after) it.
    before = torch.cat([torch.zeros_like(totals[..., :1, :]), totals[..., :-1, :].cumsum(-2)], dim=-2)
    after = torch.cat([totals[..., 1:, :].flip(-2).cumsum(-2).flip(-2), torch.zeros_like(totals[..., :1, :])], dim=-2)
    exp_prefix = (exp_since_start.reshape(*lead, ns, sub, K) * torch.exp(before).unsqueeze(-2)).reshape(*lead, C, K)
    exp_suffix = (exp_to_end.reshape(*lead, ns, sub, K) * torch.exp(after).unsqueeze(-2)).reshape(*lead, C, K)
    return aqk, akk, exp_prefix, exp_suffix


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

    Aqk, Akk, exp_G, exp_to_chunk_end = _intra_chunk_matrices(q, k, g, sub)
    Akk = Akk * beta
    # T = (I + Akk)^-1 from one unit-lower-triangular solve (the diagonal of Akk is never read).
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    T_inv = torch.linalg.solve_triangular(Akk, eye.expand_as(Akk), upper=False, unitriangular=True)
    w = T_inv @ (beta * k * exp_G)
    u = T_inv @ (beta * v)

    qg = q * exp_G
    kg = k * exp_to_chunk_end
    last_decay = exp_G[..., -1:, :].transpose(-1, -2)  # [B, H, N, K, 1]

    # Outputs inside the loop while S is hot in cache: measured faster than stacking every chunk's
    # state and doing two large batched products afterwards (16 MB more traffic at T=4096, H=4).
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs, chunk_states = [], []
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
