"""Chunked KDA forward: chunk-local prep (three launches) and a sequential recurrence.

1. Prep, chunk-parallel, grid (chunks, HV). From the raw inputs of one chunk (L2 norm, gate, beta
   sigmoid applied in-register), with G the within-chunk inclusive cumulative log decay:

       Aqk[i, j] = scale * sum_d q_id k_jd exp(G_id - G_jd)     (j <= i)
       Akk[i, j] = beta_i * sum_d k_id k_jd exp(G_id - G_jd)    (j < i),   T = (I + Akk)^-1
       w = T (beta k exp(G)),  u = T (beta v),  qg = scale q exp(G),  kg = k exp(G_C - G),  gC = G_C

   stored chunk-major ([chunk, head, row, .]; kg transposed, [chunk, head, K, row]).

   Numerics for any gate value: pairwise decays are never formed from two long cumulative sums. Rows
   are grouped in 16-row sub-chunks with local sums from segmented scans (same-sign terms only). Between
   sub-chunks J < I, exp(G_i - G_j) = exp(local sum up to i) * exp(totals strictly between) *
   exp(local sum after j), all <= 1. Inside a sub-chunk the pairs are formed one by one by
   ``_chunk_diag_kernel``, exp(G'_i - G'_j) with G' a short local sum, on [16, 16, 8] channel blocks.
   Underflow to 0 is exact.

   Three launches: ``_chunk_diag_kernel`` (the diagonal 16 x 16 blocks), ``_chunk_prep_kernel`` (Aqk and
   T), ``_chunk_wy_kernel`` (w, u, qg, kg, gC). Until session 3 the diagonal blocks were factored around a
   sub-chunk row inside the prep kernel with a binary-tree fallback for steep gates; the fallback alone
   cost registers everywhere (docs/benchmarks.md).
2. ``_chunk_recur_kernel``, sequential over the chunks of a sequence, grid (V / BV, N * HV): keeps a
   [K, BV] fp32 state slice in registers and fuses the output:

       v_new = u - w S;   o = qg S + Aqk v_new;   S <- exp(gC) * S + kg^T v_new

   optionally storing the state entering every chunk (prefix caching, and the backward pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRET, apply_beta, chunk_program, chunk_rows, dummy, load_bias, load_qkg, next_pow2, pair_block,
    sequence_program, sub_chunk_program,
)


@triton.jit
def _row_norms(q, k, row0, r, m_r, i_h, H, K, BT: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr):
    """Per-row L2-norm factors of q and k over all K channels (1 without the in-kernel norm)."""
    rq = tl.full([BT], 1.0, dtype=tl.float32)
    rk = tl.full([BT], 1.0, dtype=tl.float32)
    if L2NORM:
        sq = tl.zeros([BT], dtype=tl.float32)
        sk = tl.zeros([BT], dtype=tl.float32)
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_rk = m_r[:, None] & (o_k < K)[None, :]
            p_qk = ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :]
            bq = tl.load(q + p_qk, mask=m_rk, other=0.0).to(tl.float32)
            bk = tl.load(k + p_qk, mask=m_rk, other=0.0).to(tl.float32)
            sq += tl.sum(bq * bq, axis=1)
            sk += tl.sum(bk * bk, axis=1)
        rq = 1.0 / tl.sqrt(sq + 1e-6)
        rk = 1.0 / tl.sqrt(sk + 1e-6)
    return rq, rk


@triton.jit
def _row_scales(q, k, beta, row0, r, m_r, i_h, i_hv, H, HV, K, BT: tl.constexpr, BK: tl.constexpr,
                L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    """Per-row L2-norm factors of q and k and the activated beta."""
    rq, rk = _row_norms(q, k, row0, r, m_r, i_h, H, K, BT, BK, L2NORM)
    b_beta = tl.load(beta + (row0 + r) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    b_beta = tl.where(m_r, apply_beta(b_beta, BETA_SIGMOID, NEG_EIGVAL), 0.0)
    return rq, rk, b_beta


@triton.jit
def _diag_offsets(NS: tl.constexpr, BT: tl.constexpr):
    """[NS, 16, 16] offsets of the 16 x 16 diagonal blocks inside a row-major [BT, BT] matrix."""
    a16 = tl.arange(0, 16)
    s3 = tl.arange(0, NS)[:, None, None] * 16
    return (s3 + a16[None, :, None]) * BT + (s3 + a16[None, None, :])


@triton.jit
def _seg_add(a_v, a_start, b_v, b_start):
    """Combine of a segmented sum: a segment restarts where the flag is set."""
    return tl.where(b_start != 0, b_v, a_v + b_v), a_start | b_start


@triton.jit
def _sub_chunk_sums(bg, r, BT: tl.constexpr, BK: tl.constexpr, NS: tl.constexpr):
    """Per 16-row sub-chunk sums of the log decays, with no cancellation (every sum adds same-sign terms).

    Returns Gloc (inclusive cumsum inside the sub-chunk), Rloc (exclusive reverse cumsum inside it) and the
    sub-chunk totals tot [NS, BK].
    """
    first = tl.broadcast_to(((r % 16) == 0).to(tl.int32)[:, None], (BT, BK))
    last = tl.broadcast_to(((r % 16) == 15).to(tl.int32)[:, None], (BT, BK))
    g_loc, _ = tl.associative_scan((bg, first), 0, _seg_add)
    r_in, _ = tl.associative_scan((bg, last), 0, _seg_add, reverse=True)
    r_loc = tl.minimum(r_in - bg, 0.0)
    tot = tl.sum(tl.reshape(bg, (NS, 16, BK)), axis=1)
    return g_loc, r_loc, tot


@triton.jit
def _between(tot, lo, hi, NS: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """Row-broadcast [BT, BK] of sum_{I + lo <= m <= I + hi} tot[m] for each row's sub-chunk I (exact sums)."""
    s = tl.arange(0, NS)
    d = s[None, :] - s[:, None]
    sel = ((d >= lo) & (d <= hi))[:, :, None]
    w = tl.sum(tl.where(sel, tl.broadcast_to(tot[None, :, :], (NS, NS, BK)), 0.0), axis=1)
    return tl.reshape(tl.broadcast_to(w[:, None, :], (NS, 16, BK)), (BT, BK))


@triton.jit
def _chunk_diag_kernel(
    q, k, g, A_log, dt_bias, chunk_info, d_out, lower_bound,
    H, HV, K,
    BT: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, L2NORM: tl.constexpr,
):
    """The 16 x 16 diagonal blocks of Aqk and Akk (before scale, beta and masks), grid (chunks * BT/16, HV):
    sum_d q_id k_jd exp(G'_id - G'_jd) for all i, j of one sub-chunk, formed pair by pair on [16, 16, BC]
    channel blocks. G' is the sub-chunk's local cumulative sum without row 0's gate (it cancels in every
    pair), so the exponent is a short sum and exact for any gate; i < j entries are clamped (the caller
    masks them). Writes [chunks, HV, BT/16, 2, 16, 16] fp32."""
    NS: tl.constexpr = BT // 16
    i_c, s, i_hv, i_h, row0, r16, m_r, base = sub_chunk_program(chunk_info, H, HV, NS)
    a16 = tl.arange(0, 16)
    rq, rk = _row_norms(q, k, row0, r16, m_r, i_h, H, K, 16, BN, L2NORM)
    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)
    d_qk = tl.zeros([16, 16], dtype=tl.float32)
    d_kk = tl.zeros([16, 16], dtype=tl.float32)
    for cb in range(0, K, BC):
        cq, ck, cG = pair_block(q, k, g, row0, r16, m_r, i_h, i_hv, H, HV, K, cb + tl.arange(0, BC), rq, rk, a,
                                dt_bias, lower_bound, BC, GATE, HAS_A, HAS_BIAS)
        ke = ck[None, :, :] * tl.exp(tl.minimum(cG[:, None, :] - cG[None, :, :], 0.0))
        d_qk += tl.sum(cq[:, None, :] * ke, axis=2)
        d_kk += tl.sum(ck[:, None, :] * ke, axis=2)
    p_d = d_out + (base * NS + s) * 512 + a16[:, None] * 16 + a16[None, :]
    tl.store(p_d, d_qk)
    tl.store(p_d + 256, d_kk)


@triton.jit
def _invert(D_kk, A_kk, r, BT: tl.constexpr, NS: tl.constexpr, LEVELS: tl.constexpr):
    """T = (I + Akk)^-1 from Akk's 16 x 16 diagonal blocks D_kk [NS, 16, 16] and its entries between
    sub-chunks A_kk [BT, BT] (zero elsewhere)."""
    a16 = tl.arange(0, 16)
    # (I + A_kk)^-1 = R Tdiag: the 16 x 16 diagonal blocks by forward substitution (exact fp32), then
    # R = (I + M)^-1 with M = Tdiag L (strictly block-lower, nilpotent): (I - M)(I + M^2)(I + M^4)...
    eye3 = (a16[:, None] == a16[None, :])[None, :, :]
    T3 = tl.where(eye3, 1.0, 0.0) + tl.zeros([NS, 16, 16], dtype=tl.float32)
    for i in range(1, 16):
        sel = (a16 == i)[None, :, None]
        a_row = tl.sum(tl.where(sel, D_kk, 0.0), axis=1)
        upd = tl.sum(a_row[:, :, None] * T3, axis=1)
        T3 = tl.where(sel, T3 - upd[:, None, :], T3)
    # Block-diagonal Tdiag as a [BT, BT] tile.
    same = (tl.arange(0, NS)[:, None, None, None] == tl.arange(0, NS)[None, None, :, None])
    Tfull = tl.reshape(tl.where(same, tl.broadcast_to(T3[:, :, None, :], (NS, 16, NS, 16)), 0.0), (BT, BT))
    if NS > 1:
        M = tl.reshape(tl.dot(T3, tl.reshape(A_kk, (NS, 16, BT)), input_precision="tf32x3"), (BT, BT))
        R = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - M
        P = M
        for lv in tl.static_range(LEVELS - 5):
            P = tl.dot(P, P, input_precision="tf32x3")
            R = R + tl.dot(R, P, input_precision="tf32x3")
        Tfull = tl.dot(R, Tfull, input_precision="tf32x3")
    return Tfull


@triton.jit
def _chunk_inverse_kernel(t, HV, BT: tl.constexpr, LEVELS: tl.constexpr):
    """Grid (chunks, HV): T = (I + Akk)^-1 in place of the Akk written by ``_chunk_prep_kernel`` with
    INVERT=False (KIMI_LINEAR_KDA_PREP_INVERSE=split: the inverse in its own launch)."""
    NS: tl.constexpr = BT // 16
    r = tl.arange(0, BT)
    p_t = t + (tl.program_id(0).to(tl.int64) * HV + tl.program_id(1)) * BT * BT
    gap = (r // 16)[:, None] - (r // 16)[None, :]
    A_kk = tl.load(p_t + r[:, None] * BT + r[None, :], mask=gap != 0, other=0.0)
    D_kk = tl.load(p_t + _diag_offsets(NS, BT))
    Tfull = _invert(D_kk, A_kk, r, BT, NS, LEVELS)
    tl.debug_barrier()  # every thread has read Akk before T overwrites it
    tl.store(p_t + r[:, None] * BT + r[None, :], Tfull)


@triton.jit
def _chunk_prep_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info, d_in, aqk_out, t_out,
    scale, lower_bound,
    H, HV, K, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, LEVELS: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, INVERT: tl.constexpr = True,
):
    # Writes Aqk and T (Akk with INVERT=False); the diagonal 16 x 16 blocks come from _chunk_diag_kernel, and
    # _chunk_wy_kernel then writes w, u, qg, kg, gC from T.
    NS: tl.constexpr = BT // 16
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    r = tl.arange(0, BT)
    m_r = r < n_rows
    a16 = tl.arange(0, 16)
    sub = r // 16

    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)

    rq, rk, b_beta = _row_scales(q, k, beta, row0, r, m_r, i_h, i_hv, H, HV, K, BT, BK,
                                 L2NORM, BETA_SIGMOID, NEG_EIGVAL)

    A_qk = tl.zeros([BT, BT], dtype=tl.float32)  # entries between different sub-chunks
    A_kk = tl.zeros([BT, BT], dtype=tl.float32)
    gap = sub[:, None] - sub[None, :]
    for kb in range(0, SK, BK):
        o_k = kb + tl.arange(0, BK)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        bias = load_bias(dt_bias, i_hv, K, o_k, m_k, BK, HAS_BIAS)
        bq, bk, bg = load_qkg(q, k, g, row0, i_h, i_hv, o_k, m_rk, rq, rk, a, bias, lower_bound,
                               H, HV, K, GATE, HAS_A, HAS_BIAS, r)
        g_loc, r_loc, tot = _sub_chunk_sums(bg, r, BT, BK, NS)
        e_g = tl.exp(g_loc)  # <= 1: decay from the sub-chunk start to the row
        e_r = tl.exp(r_loc)  # <= 1: decay from the row to the sub-chunk end
        # Outputs that need no inverse: decays from the chunk start (qg) and to the chunk end (kg).
        # Between sub-chunks J < I: exp(G_i - G_j) = e_g[i] * exp(totals strictly between) * e_r[j].
        row_q = bq * e_g
        row_k = bk * e_g
        col_k = bk * e_r
        for dist in tl.static_range(1, NS):
            if dist == 1:
                fq = row_q
                fk = row_k
            else:
                f = tl.exp(_between(tot, 1 - dist, -1, NS, BK, BT))
                fq = row_q * f
                fk = row_k * f
            keep = gap == dist
            A_qk += tl.where(keep, tl.dot(fq, tl.trans(col_k)), 0.0)
            A_kk += tl.where(keep, tl.dot(fk, tl.trans(col_k)), 0.0)

    s3 = tl.arange(0, NS)[:, None, None]
    p_in = d_in + (base * NS + s3) * 512 + a16[None, :, None] * 16 + a16[None, None, :]
    D_qk = tl.load(p_in)
    D_kk = tl.load(p_in + 256)
    lower3 = (a16[:, None] >= a16[None, :])[None, :, :]
    strict3 = (a16[:, None] > a16[None, :])[None, :, :]
    D_qk = tl.where(lower3, D_qk, 0.0) * scale
    D_kk = tl.where(strict3, D_kk, 0.0) * tl.reshape(b_beta, (NS, 16))[:, :, None]
    A_qk = A_qk * scale
    A_kk = A_kk * b_beta[:, None]

    p_a = aqk_out + base * BT * BT
    tl.store(p_a + r[:, None] * BT + r[None, :], A_qk.to(aqk_out.dtype.element_ty), mask=gap != 0)
    tl.store(p_a + _diag_offsets(NS, BT), D_qk.to(aqk_out.dtype.element_ty))

    p_t = t_out + base * BT * BT
    if INVERT:
        tl.store(p_t + r[:, None] * BT + r[None, :], _invert(D_kk, A_kk, r, BT, NS, LEVELS))
    else:  # Akk itself (strictly lower); _chunk_inverse_kernel inverts it in place
        tl.store(p_t + r[:, None] * BT + r[None, :], A_kk, mask=gap != 0)
        tl.store(p_t + _diag_offsets(NS, BT), D_kk)


@triton.jit
def _chunk_wy_kernel(
    q, k, v, g, beta, A_log, dt_bias, chunk_info, t_in,
    w_out, u_out, qg_out, kg_out, gc_out,
    scale, lower_bound,
    H, HV, K, V, SK: tl.constexpr, SV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, WY_PREC: tl.constexpr,
):
    """Second half of the split prep: from T, w = T (beta k e^G), u = T (beta v), qg, kg, gC. Decays
    relative to the chunk start (e^G) and to its end (e^(G_C - G)) are direct sums, so all <= 1."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    r = tl.arange(0, BT)
    m_r = r < n_rows
    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)
    rq, rk, b_beta = _row_scales(q, k, beta, row0, r, m_r, i_h, i_hv, H, HV, K, BT, BK,
                                 L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    Tm = tl.load(t_in + base * BT * BT + r[:, None] * BT + r[None, :])
    for kb in range(0, SK, BK):
        o_k = kb + tl.arange(0, BK)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        bias = load_bias(dt_bias, i_hv, K, o_k, m_k, BK, HAS_BIAS)
        bq, bk, bg = load_qkg(q, k, g, row0, i_h, i_hv, o_k, m_rk, rq, rk, a, bias, lower_bound,
                               H, HV, K, GATE, HAS_A, HAS_BIAS, r)
        e_start = tl.exp(tl.cumsum(bg, axis=0))
        e_end = tl.exp(tl.minimum(tl.cumsum(bg, axis=0, reverse=True) - bg, 0.0))
        p_o = base * BT * SK + r[:, None] * SK + o_k[None, :]
        m_o = (r < BT)[:, None] & (o_k < SK)[None, :]
        tl.store(qg_out + p_o, (bq * e_start * scale).to(qg_out.dtype.element_ty), mask=m_o)
        tl.store(kg_out + base * BT * SK + o_k[None, :] * BT + r[:, None], (bk * e_end).to(kg_out.dtype.element_ty),
                 mask=m_o)
        tl.store(gc_out + base * SK + o_k, tl.sum(bg, axis=0), mask=o_k < SK)
        b_w = tl.dot(Tm, bk * e_start * b_beta[:, None], input_precision=WY_PREC)
        tl.store(w_out + p_o, b_w.to(w_out.dtype.element_ty), mask=m_o)
    for vb in range(0, SV, BV):
        o_v = vb + tl.arange(0, BV)
        m_v = o_v < V
        bv = tl.load(v + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :],
                     mask=m_r[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_u = tl.dot(Tm, bv * b_beta[:, None], input_precision=WY_PREC)
        tl.store(u_out + base * BT * SV + r[:, None] * SV + o_v[None, :], b_u.to(u_out.dtype.element_ty),
                 mask=(r < BT)[:, None] & (o_v < SV)[None, :])


@triton.jit
def _chunk_recur_kernel(
    w, u, qg, kg, aqk, gc, chunk_info, seq_chunks, h0, ht, states, o,
    HV, K, V, SK: tl.constexpr, SV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_STATES: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV)
    r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # Intermediates padded to the block width (SK = BK, zeros past K) need no masks: SK, SV are
    # constexpr so these fold to constants.
    m_ks = o_k < SK
    m_vs = o_v < SV
    p_s = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0 + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(c0, c1):
        base = (c * HV + i_hv).to(tl.int64)
        if STORE_STATES:
            tl.store(states + (base * K + o_k[:, None]) * V + o_v[None, :], S, mask=m_kv)
        p_k = base * BT * SK + r[:, None] * SK + o_k[None, :]
        b_w = tl.load(w + p_k, mask=m_ks[None, :], other=0.0)
        b_qg = tl.load(qg + p_k, mask=m_ks[None, :], other=0.0)
        b_kgt = tl.load(kg + base * BT * SK + o_k[:, None] * BT + r[None, :], mask=m_ks[:, None], other=0.0)
        b_u = tl.load(u + base * BT * SV + r[:, None] * SV + o_v[None, :], mask=m_vs[None, :], other=0.0).to(tl.float32)
        b_a = tl.load(aqk + base * BT * BT + r[:, None] * BT + r[None, :])
        b_gc = tl.load(gc + base * SK + o_k, mask=m_ks, other=0.0)
        Sd = S.to(DOT_DTYPE)
        v_new = b_u - tl.dot(b_w.to(DOT_DTYPE), Sd)
        vd = v_new.to(DOT_DTYPE)
        b_o = tl.dot(b_qg.to(DOT_DTYPE), Sd) + tl.dot(b_a.to(DOT_DTYPE), vd)
        row0, n_rows = chunk_rows(chunk_info, c)
        tl.store(o + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=(r < n_rows)[:, None] & m_v[None, :])
        S = S * tl.exp(b_gc)[:, None] + tl.dot(b_kgt.to(DOT_DTYPE), vd)
    if STORE_HT:
        tl.store(ht + p_s, S, mask=m_kv)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# The last compiled kernel of each launcher (the benchmarks read registers and spills from it).
LAUNCHED: dict = {}


def chunk_layout(shapes, cu_seqlens, BT: int, device):
    """Chunk list over the flattened token axis (B*T for fixed length: B sequences of T).

    Returns (chunk_info int32 [NC, 2] = (first token, rows), seq_chunks int32 [N + 1]).
    Fixed-length batches build it on the device without a host synchronisation.
    """
    if cu_seqlens is None:
        B, T = shapes.B, shapes.T
        nt = triton.cdiv(T, BT)
        c = torch.arange(B * nt, device=device, dtype=torch.int64)
        j = c % nt
        start = (c // nt) * T + j * BT
        rows = torch.clamp(T - j * BT, max=BT)
        info = torch.stack([start, rows], dim=1).to(torch.int32)
        seq = torch.arange(B + 1, device=device, dtype=torch.int32) * nt
        return info, seq
    cu = [int(x) for x in cu_seqlens.tolist()]
    starts, rows, seq = [], [], [0]
    for a, b in zip(cu, cu[1:]):
        for s in range(a, b, BT):
            starts.append(s)
            rows.append(min(BT, b - s))
        seq.append(len(starts))
    info = torch.tensor(list(zip(starts, rows)), dtype=torch.int32).reshape(-1, 2).to(device)
    return info, torch.tensor(seq, dtype=torch.int32, device=device)


def storage_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the chunk intermediates (w, u, qg, kg, Aqk): the input's 16-bit type, else float32.

    16-bit intermediates halve their traffic and run the recurrence's products on bf16/fp16 tensor
    cores. ``KIMI_LINEAR_KDA_STORE=fp32`` keeps them in float32 (tf32 products). (An earlier unpadded
    layout gave wrong bf16 results on triton 3.6 for K=60 / V=100; padded to powers of two, the GPU
    suite passes.)
    """
    import os

    if os.environ.get("KIMI_LINEAR_KDA_STORE", "16bit") == "16bit" and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return torch.float32


def chunk_prep(q, k, v, g, beta, chunk_info, *, scale, shapes, gate, A_log, dt_bias, lower_bound,
               l2norm, beta_sigmoid, neg_eigval, BT, dtype, pad=False, store_t=False, aqk_dtype=None,
               t_given=None):
    """Launch the chunk-local kernels. Returns (w, u, qg, kg, Aqk, gC) in chunk-major layout, plus
    T = (I + Akk)^-1 ([NC, HV, BT, BT] fp32) when ``store_t``.

    ``pad`` widens the K and V axes of the intermediates to powers of two (zeros past K and V), so the
    recurrence loads them without masks. ``aqk_dtype`` overrides Aqk's storage type (the forward keeps an
    fp32 Aqk for the backward). With ``t_given`` (T of an earlier call on the same inputs) only the w/u
    launch runs, from that T, and Aqk is returned as None.
    """
    import os

    H, HV, K, V = shapes.H, shapes.HV, shapes.K, shapes.V
    NC = chunk_info.shape[0]
    dev = q.device
    SK, SV = (next_pow2(max(K, 16)), next_pow2(max(V, 16))) if pad else (K, V)
    w = torch.empty(NC, HV, BT, SK, device=dev, dtype=dtype)
    qg = torch.empty_like(w)
    kg = torch.empty(NC, HV, SK, BT, device=dev, dtype=dtype)  # transposed
    u = torch.empty(NC, HV, BT, SV, device=dev, dtype=dtype)
    gc = torch.empty(NC, HV, SK, device=dev, dtype=torch.float32)
    if t_given is None:
        aqk = torch.empty(NC, HV, BT, BT, device=dev, dtype=aqk_dtype or dtype)
        t = torch.empty(NC, HV, BT, BT, device=dev, dtype=torch.float32)  # the prep always writes T
    else:
        aqk, t = None, t_given
    outs = (w, u, qg, kg, aqk, gc) + ((t,) if store_t else ())
    if NC == 0:
        return outs
    # K/V blocks and warps of the prep kernel; env overrides for tuning (see docs/benchmarks.md).
    BK = max(16, min(int(os.environ.get("KIMI_LINEAR_KDA_PREP_BK", 16)), next_pow2(K)))
    BV = max(16, min(int(os.environ.get("KIMI_LINEAR_KDA_PREP_BV", 64)), next_pow2(V)))
    warps = int(os.environ.get("KIMI_LINEAR_KDA_PREP_WARPS", 4 if BT <= 64 else 8))
    d = dummy(dev)
    a_log = A_log if A_log is not None else d
    bias = dt_bias if dt_bias is not None else d
    lb = float(lower_bound) if lower_bound is not None else 0.0
    inputs = dict(GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, L2NORM=l2norm,
                  BETA_SIGMOID=beta_sigmoid, NEG_EIGVAL=neg_eigval, SK=SK, BK=BK, num_warps=warps, num_stages=1)
    wy = dict(SV=SV, BV=BV, WY_PREC="tf32x3" if q.dtype == torch.float32 else "tf32")
    if t_given is None:
        # The diagonal 16 x 16 blocks, pair by pair (exact for any gate; 8 KB per chunk and head at BT=64).
        d_pairs = torch.empty(NC, HV, BT // 16, 2, 16, 16, device=dev, dtype=torch.float32)
        LAUNCHED["diag"] = _chunk_diag_kernel[(NC * (BT // 16), HV)](
            q, k, g, a_log, bias, chunk_info, d_pairs, lb, H, HV, K, BT=BT, BC=8, BN=min(64, next_pow2(K)),
            GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, L2NORM=l2norm, num_warps=4,
            num_stages=1,
        )
        # Aqk and T, then w, u, qg, kg, gC from T in a second launch (fewer live registers each: 9.7 ms vs
        # 12.6 ms for one fused launch at T=32K, H=32 on an H200, session 2).
        # KIMI_LINEAR_KDA_PREP_INVERSE=split: the inverse in its own launch (opt-in; not yet timed on a GPU).
        split_inverse = os.environ.get("KIMI_LINEAR_KDA_PREP_INVERSE") == "split"
        LAUNCHED["prep"] = _chunk_prep_kernel[(NC, HV)](
            q, k, g, beta, a_log, bias, chunk_info, d_pairs, aqk, t, float(scale), lb, H, HV, K,
            BT=BT, LEVELS=BT.bit_length() - 1, INVERT=not split_inverse, **inputs)
        if split_inverse:
            LAUNCHED["inverse"] = _chunk_inverse_kernel[(NC, HV)](
                t, HV, BT=BT, LEVELS=BT.bit_length() - 1, num_warps=warps, num_stages=1)
    LAUNCHED["wy"] = _chunk_wy_kernel[(NC, HV)](
        q, k, v, g, beta, a_log, bias, chunk_info, t, w, u, qg, kg, gc, float(scale), lb, H, HV, K, V,
        BT=BT, **inputs, **wy)
    return outs


def _recur_bv(V: int, programs: int) -> int:
    import os

    forced = os.environ.get("KIMI_LINEAR_KDA_BV")
    if forced:
        return int(forced)
    # Measured on H200 at T=32K, H=32 (128 V-slices of 32 vs 256 of 16 vs 64 of 64): 32 is best.
    bv = 32 if programs >= 16 else 16
    return max(16, min(bv, next_pow2(V)))


def _recur_stages(dtype, BK: int) -> int:
    import os

    forced = os.environ.get("KIMI_LINEAR_KDA_STAGES")
    if forced:
        return int(forced)
    if INTERPRET or dtype == torch.float32 or BK > 128:
        return 1
    return 3  # H200, T=32K, bf16: 3 stages 0.74 ms, 2 stages 1.10 ms


def chunk_recur(w, u, qg, kg, aqk, gc, chunk_info, seq_chunks, *, shapes, initial_state, out,
                store_final, store_states, BT):
    """Launch the sequential kernel. Returns (o, final_state or None, chunk states or None)."""
    import os

    HV, K, V, N = shapes.HV, shapes.K, shapes.V, shapes.N
    dev = w.device
    NC = chunk_info.shape[0]
    ht = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32) if store_final else None
    states = torch.empty(NC, HV, K, V, device=dev, dtype=torch.float32) if store_states else None
    BK = max(16, next_pow2(K))
    BV = _recur_bv(V, N * HV)
    d = dummy(dev)
    dot_dtype = tl.float32 if w.dtype == torch.float32 else (tl.bfloat16 if w.dtype == torch.bfloat16 else tl.float16)
    LAUNCHED["recur"] = _chunk_recur_kernel[(triton.cdiv(V, BV), N * HV)](
        w, u, qg, kg, aqk, gc, chunk_info, seq_chunks,
        initial_state if initial_state is not None else d, ht if ht is not None else d,
        states if states is not None else d, out,
        HV, K, V, SK=w.shape[-1], SV=u.shape[-1], BT=BT, BK=BK, BV=BV, HAS_H0=initial_state is not None,
        STORE_HT=store_final, STORE_STATES=store_states, DOT_DTYPE=dot_dtype,
        num_warps=int(os.environ.get("KIMI_LINEAR_KDA_RECUR_WARPS", 4 if BK * BV <= 128 * 32 else 8)),
        num_stages=_recur_stages(w.dtype, BK),
    )
    return out, ht, states
