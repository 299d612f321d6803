"""Chunk-local KDA forward for 64-token chunks: 16-row tiles, the whole K width at once.

For one chunk (grid: chunks x HV) with G the within-chunk cumulative log decay, T = (I + Akk)^-1 and
Tb = T Diag(beta) (the recurrence then needs no beta and no separate u = T beta v):

    Aqk[i, j] = scale * sum_d q_id k_jd exp(G_id - G_jd)  (j <= i),   Akk likewise with beta_i (j < i)
    x  = k exp(G)                 (key decayed from the chunk start)
    qg = scale * q exp(G)
    M  = Aqk Tb                   (so o = qg S + M (v - x S))
    Wt = kg^T Tb,  kg = k exp(G_C - G)   (so S <- exp(G_C) S + Wt (v - x S))
    gC = G_C

``BWD_OUT`` writes Aqk and T instead (the backward rebuilds w, u from T with ``_chunk_wy_kernel``).

The chunk is walked in four 16-row sub-chunks, each loaded once as [16, K] tiles (L2 norm, gate and
beta sigmoid applied in registers); no [64, K] tile is ever live, which is what kept the earlier
one-program-per-chunk kernels at 255 registers with spills.

* Between sub-chunks J < I: exp(G_i - G_j) = exp(local sum up to i) * exp(decay from j to the start of
  I). The second factor lives in ``c_J`` = k_J decayed to the end of J, multiplied by each later
  sub-chunk's total as the walk goes on; after the last one c_J = kg_J. Every factor is <= 1.
* Inside a sub-chunk: the local cumulative sum G' (row 0's own gate left out: it cancels in every pair)
  is factored around its per-channel midpoint, exp(G'_i - m) * exp(m - G'_j), when the sub-chunk's decay
  span is within 2 * DIAG_SPAN for every channel (factors within exp(+-DIAG_SPAN)). Wider sub-chunks are
  flagged by a small first launch, ``_chunk_diag_kernel``, which forms their pairs one by one,
  exp(G'_i - G'_j), on [16, 16, 16] channel blocks (exact for any gate); the main kernel loads those
  blocks instead (keeping that path out of the main kernel keeps its registers down).
* T: 16 x 16 diagonal blocks by forward substitution, off-diagonal blocks by block substitution, fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import apply_beta, apply_gate, chunk_rows, dummy, load_bias, next_pow2

# Largest |exponent| of a factored in-sub-chunk decay (fp32 exp overflows near 88).
DIAG_SPAN = 60.0
# KIMI_LINEAR_KDA_INTRA_DIAG: "auto" (factored where the span allows, else exact), "exact" (always pairwise),
# "factored" (never pairwise: wrong for steep gates; profiling only).
DIAG_MODES = {"auto": 0, "factored": 1, "exact": 2}


@triton.jit
def _rows16(q, k, g, beta, row0, s, n_rows, i_h, i_hv, H, HV, K, o_k, m_k, a, bias, lower_bound,
            GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
            L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    """Rows [16 s, 16 s + 16) of the chunk: normalised q, k, the activated log decay and beta (fp32)."""
    r16 = s * 16 + tl.arange(0, 16)
    m_r = r16 < n_rows
    m = m_r[:, None] & m_k[None, :]
    p = ((row0 + r16)[:, None] * H + i_h) * K + o_k[None, :]
    bq = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
    bk = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
    if L2NORM:
        bq = bq * (1.0 / tl.sqrt(tl.sum(bq * bq, axis=1) + 1e-6))[:, None]
        bk = bk * (1.0 / tl.sqrt(tl.sum(bk * bk, axis=1) + 1e-6))[:, None]
    bg = tl.load(g + ((row0 + r16)[:, None] * HV + i_hv) * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    bg = tl.where(m, apply_gate(bg, a, bias[None, :], lower_bound, GATE, HAS_A, HAS_BIAS), 0.0)
    b = tl.load(beta + (row0 + r16) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    b = tl.where(m_r, apply_beta(b, BETA_SIGMOID, NEG_EIGVAL), 0.0)
    return bq, bk, bg, b


@triton.jit
def _decays16(bg):
    """exp of the decay from the sub-chunk start to each row (inclusive) and from each row to the
    sub-chunk end (exclusive), both <= 1, and the sub-chunk total (log)."""
    G = tl.cumsum(bg, axis=0)
    R = tl.minimum(tl.cumsum(bg, axis=0, reverse=True) - bg, 0.0)
    return tl.exp(G), tl.exp(R), tl.sum(bg, axis=0)


@triton.jit
def _pair(x, y, c, PREC: tl.constexpr):
    """(x c^T, y c^T): one 16 x 16 block of Aqk and of Akk."""
    ct = tl.trans(c)
    return tl.dot(x, ct, input_precision=PREC), tl.dot(y, ct, input_precision=PREC)


@triton.jit
def _diag_factored(bq, bk, Gp, mid, PREC: tl.constexpr):
    x = Gp - mid[None, :]
    ex = tl.exp(x)
    col = tl.trans(bk * tl.exp(-x))
    return tl.dot(bq * ex, col, input_precision=PREC), tl.dot(bk * ex, col, input_precision=PREC)


@triton.jit
def _diag_exact(q, k, g, row0, s, n_rows, i_h, i_hv, H, HV, K, rq, rk, a, dt_bias, lower_bound,
                SK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """sum_d q_id k_jd exp(G'_id - G'_jd) pair by pair, 16 channels at a time (reloaded from memory)."""
    a16 = tl.arange(0, 16)
    r16 = s * 16 + a16
    m_r = r16 < n_rows
    d_qk = tl.zeros([16, 16], dtype=tl.float32)
    d_kk = tl.zeros([16, 16], dtype=tl.float32)
    for cb in range(0, SK, 16):
        o_c = cb + a16
        m_c = o_c < K
        m = m_r[:, None] & m_c[None, :]
        p = ((row0 + r16)[:, None] * H + i_h) * K + o_c[None, :]
        cq = tl.load(q + p, mask=m, other=0.0).to(tl.float32) * rq[:, None]
        ck = tl.load(k + p, mask=m, other=0.0).to(tl.float32) * rk[:, None]
        bias = load_bias(dt_bias, i_hv, K, o_c, m_c, 16, HAS_BIAS)
        cg = tl.load(g + ((row0 + r16)[:, None] * HV + i_hv) * K + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        cg = tl.where(m, apply_gate(cg, a, bias[None, :], lower_bound, GATE, HAS_A, HAS_BIAS), 0.0)
        cG = tl.cumsum(tl.where((a16 == 0)[:, None], 0.0, cg), axis=0)
        ke = ck[None, :, :] * tl.exp(tl.minimum(cG[:, None, :] - cG[None, :, :], 0.0))
        d_qk += tl.sum(cq[:, None, :] * ke, axis=2)
        d_kk += tl.sum(ck[:, None, :] * ke, axis=2)
    return d_qk, d_kk


@triton.jit
def _chunk_diag_kernel(
    q, k, g, A_log, dt_bias, chunk_info, flag_out, d_out, lower_bound,
    H, HV, K, SK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, L2NORM: tl.constexpr,
    ALL: tl.constexpr, SPAN: tl.constexpr,
):
    """Grid (chunks * 4, HV). Flags the 16-row sub-chunks whose decay span is too wide to factor (every
    one with ``ALL``) and writes their diagonal Aqk / Akk blocks, formed pair by pair, to ``d_out``."""
    i_s = tl.program_id(0)
    i_hv = tl.program_id(1)
    i_c = i_s // 4
    s = i_s % 4
    i_h = i_hv // (HV // H)
    row0, n_rows = chunk_rows(chunk_info, i_c)
    a16 = tl.arange(0, 16)
    o_k = tl.arange(0, SK)
    m_k = o_k < K
    r16 = s * 16 + a16
    m = (r16 < n_rows)[:, None] & m_k[None, :]
    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)
    bias = load_bias(dt_bias, i_hv, K, o_k, m_k, SK, HAS_BIAS)
    bg = tl.load(g + ((row0 + r16)[:, None] * HV + i_hv) * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    bg = tl.where(m, apply_gate(bg, a, bias[None, :], lower_bound, GATE, HAS_A, HAS_BIAS), 0.0)
    Gp = tl.cumsum(tl.where((a16 == 0)[:, None], 0.0, bg), axis=0)
    wide = tl.max(tl.max(Gp, axis=0) - tl.min(Gp, axis=0)) > 2.0 * SPAN
    if ALL:
        wide = True
    slot = (i_c.to(tl.int64) * HV + i_hv) * 4 + s
    tl.store(flag_out + slot, wide.to(tl.int32))
    if wide:
        p = ((row0 + r16)[:, None] * H + i_h) * K + o_k[None, :]
        rq = tl.full([16], 1.0, dtype=tl.float32)
        rk = tl.full([16], 1.0, dtype=tl.float32)
        if L2NORM:
            bq = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
            bk = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
            rq = 1.0 / tl.sqrt(tl.sum(bq * bq, axis=1) + 1e-6)
            rk = 1.0 / tl.sqrt(tl.sum(bk * bk, axis=1) + 1e-6)
        d_qk, d_kk = _diag_exact(q, k, g, row0, s, n_rows, i_h, i_hv, H, HV, K, rq, rk, a, dt_bias, lower_bound,
                                 SK, GATE, HAS_A, HAS_BIAS)
        p_d = d_out + slot * 512 + a16[:, None] * 16 + a16[None, :]
        tl.store(p_d, d_qk)
        tl.store(p_d + 256, d_kk)


@triton.jit
def _diag16(bq, bk, bg, flags, d_in, slot, PAIRWISE: tl.constexpr, PREC: tl.constexpr):
    """The diagonal 16 x 16 blocks of Aqk and Akk (all i, j; the caller keeps j <= i / j < i): factored
    around the per-channel midpoint, or (flagged sub-chunks) the pairwise blocks of _chunk_diag_kernel."""
    a16 = tl.arange(0, 16)
    Gp = tl.cumsum(tl.where((a16 == 0)[:, None], 0.0, bg), axis=0)
    mid = 0.5 * (tl.max(Gp, axis=0) + tl.min(Gp, axis=0))
    if PAIRWISE:
        if tl.load(flags + slot) != 0:
            p_d = d_in + slot * 512 + a16[:, None] * 16 + a16[None, :]
            d_qk = tl.load(p_d)
            d_kk = tl.load(p_d + 256)
        else:
            d_qk, d_kk = _diag_factored(bq, bk, Gp, mid, PREC)
    else:
        d_qk, d_kk = _diag_factored(bq, bk, Gp, mid, PREC)
    return d_qk, d_kk


@triton.jit
def _inv16(A):
    """(I + A)^-1 for a strictly lower-triangular 16 x 16 A, by forward substitution in fp32."""
    a16 = tl.arange(0, 16)
    T = tl.where(a16[:, None] == a16[None, :], 1.0, 0.0)
    for i in range(1, 16):
        sel = (a16 == i)[:, None]
        a_row = tl.sum(tl.where(sel, A, 0.0), axis=0)
        T = tl.where(sel, T - tl.sum(a_row[:, None] * T, axis=0)[None, :], T)
    return T


@triton.jit
def _d(x, y):
    """Exact fp32 product of two 16 x 16 blocks (the inverse's block substitution)."""
    return tl.dot(x, y, input_precision="ieee")


@triton.jit
def _store16(ptr, x, row_blk, col_blk):
    a16 = tl.arange(0, 16)
    tl.store(ptr + (row_blk * 16 + a16)[:, None] * 64 + (col_blk * 16 + a16)[None, :], x.to(ptr.dtype.element_ty))


@triton.jit
def _store_lower64(ptr, B00, B10, B11, B20, B21, B22, B30, B31, B32, B33):
    """A block-lower-triangular 64 x 64 matrix from its 10 blocks (zeros above)."""
    z = tl.zeros([16, 16], dtype=tl.float32)
    _store16(ptr, B00, 0, 0)
    _store16(ptr, z, 0, 1)
    _store16(ptr, z, 0, 2)
    _store16(ptr, z, 0, 3)
    _store16(ptr, B10, 1, 0)
    _store16(ptr, B11, 1, 1)
    _store16(ptr, z, 1, 2)
    _store16(ptr, z, 1, 3)
    _store16(ptr, B20, 2, 0)
    _store16(ptr, B21, 2, 1)
    _store16(ptr, B22, 2, 2)
    _store16(ptr, z, 2, 3)
    _store16(ptr, B30, 3, 0)
    _store16(ptr, B31, 3, 1)
    _store16(ptr, B32, 3, 2)
    _store16(ptr, B33, 3, 3)


@triton.jit
def _chunk_intra_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info,
    flags, d_in, x_out, qg_out, wt_out, m_out, gc_out, aqk_out, t_out,
    scale, lower_bound,
    H, HV, K, SK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    FWD_OUT: tl.constexpr, BWD_OUT: tl.constexpr, PAIRWISE: tl.constexpr, PREC: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1)
    i_h = i_hv // (HV // H)
    row0, n_rows = chunk_rows(chunk_info, i_c)
    base = i_c.to(tl.int64) * HV + i_hv
    slot0 = base * 4
    o_k = tl.arange(0, SK)
    m_k = o_k < K
    a16 = tl.arange(0, 16)
    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)
    bias = load_bias(dt_bias, i_hv, K, o_k, m_k, SK, HAS_BIAS)
    p_x = base * 64 * SK + a16[:, None] * SK + o_k[None, :]  # rows of a chunk-major [64, SK] output
    ty = qg_out.dtype.element_ty

    # ---- sub-chunk 0
    q0, k0, g0, b0 = _rows16(q, k, g, beta, row0, 0, n_rows, i_h, i_hv, H, HV, K, o_k, m_k, a, bias,
                                   lower_bound, GATE, HAS_A, HAS_BIAS, L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    eg, er, t0 = _decays16(g0)
    Q00, K00 = _diag16(q0, k0, g0, flags, d_in, slot0 + 0, PAIRWISE, PREC)
    if FWD_OUT:
        tl.store(qg_out + p_x, (q0 * eg * scale).to(ty))
        tl.store(x_out + p_x, (k0 * eg).to(ty))
    c0 = k0 * er
    # ---- sub-chunk 1
    q1, k1, g1, b1 = _rows16(q, k, g, beta, row0, 1, n_rows, i_h, i_hv, H, HV, K, o_k, m_k, a, bias,
                                   lower_bound, GATE, HAS_A, HAS_BIAS, L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    eg, er, t1 = _decays16(g1)
    Q11, K11 = _diag16(q1, k1, g1, flags, d_in, slot0 + 1, PAIRWISE, PREC)
    x = q1 * eg
    y = k1 * eg
    Q10, K10 = _pair(x, y, c0, PREC)
    if FWD_OUT:
        f = tl.exp(t0)[None, :]
        tl.store(qg_out + p_x + 16 * SK, (x * f * scale).to(ty))
        tl.store(x_out + p_x + 16 * SK, (y * f).to(ty))
    f = tl.exp(t1)[None, :]
    c0 = c0 * f
    c1 = k1 * er
    # ---- sub-chunk 2
    q2, k2, g2, b2 = _rows16(q, k, g, beta, row0, 2, n_rows, i_h, i_hv, H, HV, K, o_k, m_k, a, bias,
                                   lower_bound, GATE, HAS_A, HAS_BIAS, L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    eg, er, t2 = _decays16(g2)
    Q22, K22 = _diag16(q2, k2, g2, flags, d_in, slot0 + 2, PAIRWISE, PREC)
    x = q2 * eg
    y = k2 * eg
    Q21, K21 = _pair(x, y, c1, PREC)
    Q20, K20 = _pair(x, y, c0, PREC)
    if FWD_OUT:
        f = tl.exp(t0 + t1)[None, :]
        tl.store(qg_out + p_x + 32 * SK, (x * f * scale).to(ty))
        tl.store(x_out + p_x + 32 * SK, (y * f).to(ty))
    f = tl.exp(t2)[None, :]
    c0 = c0 * f
    c1 = c1 * f
    c2 = k2 * er
    # ---- sub-chunk 3
    q3, k3, g3, b3 = _rows16(q, k, g, beta, row0, 3, n_rows, i_h, i_hv, H, HV, K, o_k, m_k, a, bias,
                                   lower_bound, GATE, HAS_A, HAS_BIAS, L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    eg, er, t3 = _decays16(g3)
    Q33, K33 = _diag16(q3, k3, g3, flags, d_in, slot0 + 3, PAIRWISE, PREC)
    x = q3 * eg
    y = k3 * eg
    Q32, K32 = _pair(x, y, c2, PREC)
    Q31, K31 = _pair(x, y, c1, PREC)
    Q30, K30 = _pair(x, y, c0, PREC)
    if FWD_OUT:
        f = tl.exp(t0 + t1 + t2)[None, :]
        tl.store(qg_out + p_x + 48 * SK, (x * f * scale).to(ty))
        tl.store(x_out + p_x + 48 * SK, (y * f).to(ty))
        tl.store(gc_out + base * SK + o_k, t0 + t1 + t2 + t3)

    # ---- masks, scale and beta
    lower = a16[:, None] >= a16[None, :]
    strict = a16[:, None] > a16[None, :]
    Q00 = tl.where(lower, Q00, 0.0) * scale
    Q11 = tl.where(lower, Q11, 0.0) * scale
    Q22 = tl.where(lower, Q22, 0.0) * scale
    Q33 = tl.where(lower, Q33, 0.0) * scale
    Q10, Q20, Q21, Q30, Q31, Q32 = Q10 * scale, Q20 * scale, Q21 * scale, Q30 * scale, Q31 * scale, Q32 * scale
    K10 = K10 * b1[:, None]
    K20 = K20 * b2[:, None]
    K21 = K21 * b2[:, None]
    K30 = K30 * b3[:, None]
    K31 = K31 * b3[:, None]
    K32 = K32 * b3[:, None]

    # ---- T = (I + Akk)^-1, block lower triangular
    T00 = _inv16(tl.where(strict, K00, 0.0) * b0[:, None])
    T11 = _inv16(tl.where(strict, K11, 0.0) * b1[:, None])
    T22 = _inv16(tl.where(strict, K22, 0.0) * b2[:, None])
    T33 = _inv16(tl.where(strict, K33, 0.0) * b3[:, None])
    T10 = -_d(T11, _d(K10, T00))
    T21 = -_d(T22, _d(K21, T11))
    T32 = -_d(T33, _d(K32, T22))
    T20 = -_d(T22, _d(K20, T00) + _d(K21, T10))
    T31 = -_d(T33, _d(K31, T11) + _d(K32, T21))
    T30 = -_d(T33, _d(K30, T00) + _d(K31, T10) + _d(K32, T20))
    if BWD_OUT:
        _store_lower64(aqk_out + base * 4096, Q00, Q10, Q11, Q20, Q21, Q22, Q30, Q31, Q32, Q33)
        _store_lower64(t_out + base * 4096, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33)

    if FWD_OUT:
        # Tb = T Diag(beta): scale the columns of block column J by beta_J.
        T00 = T00 * b0[None, :]
        T10 = T10 * b0[None, :]
        T20 = T20 * b0[None, :]
        T30 = T30 * b0[None, :]
        T11 = T11 * b1[None, :]
        T21 = T21 * b1[None, :]
        T31 = T31 * b1[None, :]
        T22 = T22 * b2[None, :]
        T32 = T32 * b2[None, :]
        T33 = T33 * b3[None, :]
        # M = Aqk Tb
        M00 = tl.dot(Q00, T00, input_precision=PREC)
        M10 = tl.dot(Q11, T10, tl.dot(Q10, T00, input_precision=PREC), input_precision=PREC)
        M11 = tl.dot(Q11, T11, input_precision=PREC)
        M20 = tl.dot(Q22, T20, tl.dot(Q21, T10, tl.dot(Q20, T00, input_precision=PREC), input_precision=PREC),
                     input_precision=PREC)
        M21 = tl.dot(Q22, T21, tl.dot(Q21, T11, input_precision=PREC), input_precision=PREC)
        M22 = tl.dot(Q22, T22, input_precision=PREC)
        M30 = tl.dot(Q33, T30, tl.dot(Q32, T20, tl.dot(Q31, T10, tl.dot(Q30, T00, input_precision=PREC),
                                                          input_precision=PREC), input_precision=PREC),
                     input_precision=PREC)
        M31 = tl.dot(Q33, T31, tl.dot(Q32, T21, tl.dot(Q31, T11, input_precision=PREC), input_precision=PREC),
                     input_precision=PREC)
        M32 = tl.dot(Q33, T32, tl.dot(Q32, T22, input_precision=PREC), input_precision=PREC)
        M33 = tl.dot(Q33, T33, input_precision=PREC)
        _store_lower64(m_out + base * 4096, M00, M10, M11, M20, M21, M22, M30, M31, M32, M33)
        # Wt = kg^T Tb, kg_J = c_J decayed to the chunk end; stored [SK, 64].
        f = tl.exp(t3)[None, :]
        c0 = tl.trans(c0 * f)
        c1 = tl.trans(c1 * f)
        c2 = tl.trans(c2 * f)
        c3 = tl.trans(k3 * er)
        p_w = wt_out + base * SK * 64 + o_k[:, None] * 64 + a16[None, :]
        wt = wt_out.dtype.element_ty
        w0 = tl.dot(c3, T30, tl.dot(c2, T20, tl.dot(c1, T10, tl.dot(c0, T00, input_precision=PREC),
                                                     input_precision=PREC), input_precision=PREC),
                    input_precision=PREC)
        tl.store(p_w, w0.to(wt))
        w1 = tl.dot(c3, T31, tl.dot(c2, T21, tl.dot(c1, T11, input_precision=PREC), input_precision=PREC),
                    input_precision=PREC)
        tl.store(p_w + 16, w1.to(wt))
        w2 = tl.dot(c3, T32, tl.dot(c2, T22, input_precision=PREC), input_precision=PREC)
        tl.store(p_w + 32, w2.to(wt))
        tl.store(p_w + 48, tl.dot(c3, T33, input_precision=PREC).to(wt))


def _diag_mode() -> int:
    name = os.environ.get("KIMI_LINEAR_KDA_INTRA_DIAG", "auto")
    if name not in DIAG_MODES:
        raise ValueError(f"KIMI_LINEAR_KDA_INTRA_DIAG must be one of {sorted(DIAG_MODES)}, got {name!r}")
    return DIAG_MODES[name]


# The last compiled kernel (the benchmarks read registers and spills from it).
LAUNCHED: dict = {}


def chunk_intra(q, k, g, beta, chunk_info, *, scale, shapes, gate, A_log, dt_bias, lower_bound, l2norm,
                beta_sigmoid, neg_eigval, dtype, backward=False):
    """Launch ``_chunk_intra_kernel`` over 64-token chunks.

    Forward (``backward=False``): returns (x, qg, wt, m, gC) for ``chunk_recur(..., u_from_v=True)``:
    x, qg [NC, HV, 64, SK], wt [NC, HV, SK, 64], m [NC, HV, 64, 64] in ``dtype``, gC [NC, HV, SK] fp32,
    with SK = K padded to a power of two (zeros past K).
    Backward: returns (Aqk in ``dtype``, T in fp32), both [NC, HV, 64, 64].
    """
    H, HV, K = shapes.H, shapes.HV, shapes.K
    NC = chunk_info.shape[0]
    dev = q.device
    SK = next_pow2(max(K, 16))
    d = dummy(dev)
    if backward:
        aqk = torch.empty(NC, HV, 64, 64, device=dev, dtype=dtype)
        t = torch.empty(NC, HV, 64, 64, device=dev, dtype=torch.float32)
        outs = (d, aqk, d, d, d, aqk, t)  # qg_out is unused here (it only names a storage type)
        result = (aqk, t)
    else:
        x = torch.empty(NC, HV, 64, SK, device=dev, dtype=dtype)
        qg = torch.empty_like(x)
        wt = torch.empty(NC, HV, SK, 64, device=dev, dtype=dtype)
        m = torch.empty(NC, HV, 64, 64, device=dev, dtype=dtype)
        gc = torch.empty(NC, HV, SK, device=dev, dtype=torch.float32)
        outs = (x, qg, wt, m, gc, d, d)
        result = (x, qg, wt, m, gc)
    if NC == 0:
        return result
    mode = _diag_mode()
    a_log = A_log if A_log is not None else d
    bias = dt_bias if dt_bias is not None else d
    lb = float(lower_bound) if lower_bound is not None else 0.0
    gates = dict(GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, L2NORM=l2norm)
    flags, d_pairs = d, d
    if mode != DIAG_MODES["factored"]:
        # Pairwise diagonal blocks of the sub-chunks that cannot be factored (8 KB per chunk and head,
        # written only where flagged).
        flags = torch.empty(NC * HV * 4, device=dev, dtype=torch.int32)
        d_pairs = torch.empty(NC * HV * 4 * 512, device=dev, dtype=torch.float32)
        LAUNCHED["diag"] = _chunk_diag_kernel[(NC * 4, HV)](
            q, k, g, a_log, bias, chunk_info, flags, d_pairs, lb, H, HV, K, SK=SK, **gates,
            ALL=mode == DIAG_MODES["exact"], SPAN=DIAG_SPAN, num_warps=4, num_stages=1,
        )
    warps = int(os.environ.get("KIMI_LINEAR_KDA_INTRA_WARPS", 4))
    LAUNCHED["intra"] = _chunk_intra_kernel[(NC, HV)](
        q, k, g, beta, a_log, bias, chunk_info, flags, d_pairs, *outs, float(scale), lb, H, HV, K, SK=SK,
        **gates, BETA_SIGMOID=beta_sigmoid, NEG_EIGVAL=neg_eigval, FWD_OUT=not backward, BWD_OUT=backward,
        PAIRWISE=mode != DIAG_MODES["factored"], PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=1,
    )
    return result
