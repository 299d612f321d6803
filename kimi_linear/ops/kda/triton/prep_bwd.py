"""Backward of the chunk-local KDA prep (``chunk_fwd.chunk_prep``), four launches.

Given T = (I + Akk)^-1 from the forward and the gradients of w, u, qg, kg, Aqk and the log chunk decay gC
(from the reverse recurrence), it returns the gradients of the raw inputs (through L2 norm, gate activation and beta
sigmoid). With X = T^T dw, Y = T^T du and dAkk = -T^T (dw W0^T + du U0^T) T^T (W0 = b k e^G, U0 = b v):

    dv = b Y,  db = v.Y + (k e^G).X + sum_j dAkk_ij Kk_ij,  dk += b e^G X + e^(G_C - G) dkg,  dq += scale e^G dqg

plus the pairwise terms of Aqk (Mq = scale dAqk) and Akk (b_i dAkk) and the gate gradients of all decays.

Launches:

1. ``_prep_bwd_wy_kernel`` (grid chunks x HV): L2 norms, dT, e^G X (parked in the dk buffer), the V side
   (dv, v.Y) and dAkk (to a scratch, T's own storage with ``overwrite_t``).
2. The pairs inside each 16-row sub-chunk (grid chunks * BT/16 x HV, one warp), split as in the
   forward: ``_prep_bwd_diag_fast_kernel`` on tensor cores where the sub-chunk's log decays span at most
   120 nats (factors around each channel's midpoint), ``_prep_bwd_diag_kernel`` for the rest, column
   by column with the decays as running products of exp(g) <= 1, on CUDA cores. Their parts of dq, dk
   and the gate gradient go to fp32 scratch buffers, their part of dbeta into the pass-1 partial sums.
3. ``_chunk_prep_bwd_kernel`` (grid chunks x HV): per K block, the terms without pairwise decays, the
   diagonal kernel's parts, the pairs between sub-chunks by the forward's binary tree (levels 16 ...
   BT/2), the gate activation; then the L2-norm backward, which needs q.dq over the whole row.

At 64-row chunks (the default; ``KIMI_LINEAR_KDA_PREP_BWD_TREE=pass2`` opts out, and 128-row chunks keep
the levels in pass 2; at 32-row chunks ``_prep_bwd_pair_kernel`` takes the one level, the block pair
(1, 0), session 14; training at 32 rows took 1.034x the time of 64, session 16) ``_prep_bwd_tree_kernel``
(grid chunks x HV x K / BK, between 2 and 3) takes the tree levels on [16, BK] sub-chunk tiles, as
[16, 16] block products, adding its parts to the sub-chunk kernels' buffers, and pass 2 skips them. ptxas
(sm_90a, session 9): pass 2 then has 128 registers at 8 warps, no spills and 1696 SASS instructions
(560 / 648 B of spills and 6200 with the levels at 4 warps). H200, session 9, T=8K, forward + backward:
9.77 -> 8.69 ms with the tree kernel at 4 warps, 8.37 at 2, 7.98 with pass 2 at 8 warps and the forward's
sub-chunk tree (trained-like gates).

(Sessions 6-8 tried a whole-chunk branch of pass 2 for chunks whose log-decay span is within
``utils.DIAG_SPAN_MAX``, in one kernel with both branches and then as a launch of its own: chunk_prep_bwd
6.34 and 5.73 ms vs 5.53 at T=8K with trained-like gates on an H200; removed.)

Pairwise decays exp(G_i - G_j) are never formed from two long cumulative sums (fp32 digits are lost
after -1000 gates, and exp(G_i) * exp(-G_j) overflows). At tree level HB the pair (i in an odd HB-block,
j in the even block before it) is exp(fwd_i) * exp(rev_j), fwd = inclusive and rev = exclusive reverse
cumsum inside the HB-block: <= 0 sums of one block's gates (rev from the gates shifted by one row, not
"sum minus self"). One masked [BT, BT] @ [BT, BK] product per side and matrix. Underflow to 0 is exact.

The tree levels' gate gradients go only to the gates inside their blocks (segmented sums), never as a
"+x at row i, -x at row j" pair through one cumulative sum over the chunk: that cancels, and the tf32
residue multiplied by a -1000 gate ruined dA_log. The sub-chunk kernels do use that +x / -x form, but
inside 16 rows and at fp32 precision (CUDA cores, or tf32x3 products on the tensor-core path; residue
~1e-7 of the pairs' terms), and drop it for gates below -64, whose true gradient there is below e^-64
of those terms. Products through T use tf32x3; the
pairwise ones ``PAIR_PREC`` (tf32x3 for fp32 inputs, tf32 for 16-bit ones, as the forward). dq/dk go
through fp32 per-value-head buffers (summed over the GVA group on the host), dA_log / dt_bias through
per-(chunk, head) partial sums.

History (T=8K, H=32, H200): session 3 formed the in-sub-chunk pairs one by one in a launch of its own
(5.4 of the backward's ~18 ms); session 4 walked the tree down to single rows (tree levels 2, 4, 8 ~1.3
ms each); session 5's diagonal kernel took forward + backward from 14.9 to 12.7 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRET, apply_beta, block_channels, block_cumsum, cdiv, chunk_program, diag_span_max, dummy,
    env_choice, gate_prepass, head_a_log, l2_norm_factor, load_gate, load_qkg_block, load_qkg_next, midpoint_factors,
    next_pow2, subchunk_block, subchunk_column, subchunk_program, subchunk_takes_fast_path, subchunk_tiles,
    tree_factor, tree_pairs, wide_flag,
)

# The last compiled kernel of each launch (the benchmarks read registers and spills from them).
LAUNCHED: dict = {}


@triton.jit
def _block_pair(bq_i, bk_i, bb_i, e_i, bk_j, e_j, mq, mk, PREC: tl.constexpr):
    """Gradients of sum_ij mq_ij q_i.k_j P_ij + mk_ij b_i k_i.k_j P_ij with P_ij = e_i * e_j (per channel),
    for a tile of rows i (q, k, beta, factors e_i) against a tile of columns j (k, factors e_j).

    mq, mk are already masked to the pairs of this factoring. Returns dq_i, the row and column parts of
    dk (dk_i, dk_j), the gradients of the row and column exponents (d log e_i, d log e_j) and the Akk
    part of db_i.
    """
    row_q = bq_i * e_i
    row_k = bk_i * e_i
    col_k = bk_j * e_j
    rq = tl.dot(mq, col_k, input_precision=PREC)
    rk = tl.dot(mk, col_k, input_precision=PREC)
    cc = tl.dot(tl.trans(mq), row_q, input_precision=PREC)
    cc = tl.dot(tl.trans(mk), row_k * bb_i[:, None], cc, input_precision=PREC)
    t = row_k * rk
    return (e_i * rq, e_i * (bb_i[:, None] * rk), e_j * cc, row_q * rq + bb_i[:, None] * t, col_k * cc,
            tl.sum(t, axis=1))


@triton.jit
def _pairs(bq, bk, bb, ea, eb, mq, mk, PREC: tl.constexpr):
    """``_block_pair`` with rows and columns from the same tile (a sub-chunk, or a chunk's tree level:
    one factor array for both sides, as a level's rows and columns are disjoint). Returns dq, dk, the
    row and column exponent gradients and the Akk part of db."""
    d_q, d_ki, d_kj, d_row, d_col, d_b = _block_pair(bq, bk, bb, ea, bk, eb, mq, mk, PREC)
    return d_q, d_ki + d_kj, d_row, d_col, d_b


@triton.jit
def _load_pairs(p_aqk, p_akk, r, n_rows, scale, keep, BT: tl.constexpr):
    """Mq = scale dAqk and dAkk (already strictly lower) on the pairs of one factoring (keep implies i > j).
    Loaded per use: masked-off entries cost no memory traffic, and no [BT, BT] tile stays live."""
    off = r[:, None] * BT + r[None, :]
    m = keep & (r < n_rows)[:, None]
    mq = tl.load(p_aqk + off, mask=m, other=0.0) * scale
    mk = tl.load(p_akk + off, mask=m, other=0.0)
    return mq, mk


@triton.jit
def _tree_level(bq, bk, bb, bg, bgn, p_aqk, p_akk, r, n_rows, scale, BT: tl.constexpr, BK: tl.constexpr,
                HB: tl.constexpr, PREC: tl.constexpr):
    """Pairs (i in an odd HB-block, j in the even block before it). The exponent gradients go to the
    gates of the two blocks only (segmented sums), so nothing cancels across blocks."""
    e = tree_factor(bg, bgn, r, BT, BK, HB)
    mq, mk = _load_pairs(p_aqk, p_akk, r, n_rows, scale, tree_pairs(r, HB), BT)
    d_q, d_k, d_row, d_col, d_b = _pairs(bq, bk, bb, e, e, mq, mk, PREC)
    # fwd_i = sum of g over [block start, i]; rev_j = sum over (j, block end].
    d_g = block_cumsum(d_row, BT, BK, HB, True) + (block_cumsum(d_col, BT, BK, HB, False) - d_col)
    return d_q, d_k, d_g, d_b


@triton.jit
def _head_and_beta(A_log, beta, row_hv, m_r, i_hv, HAS_A: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                   NEG_EIGVAL: tl.constexpr):
    """A_log of the value head (0 without), and the raw and activated beta of the chunk's rows."""
    a = head_a_log(A_log, i_hv, HAS_A)
    xb = tl.load(beta + row_hv, mask=m_r, other=0.0).to(tl.float32)
    return a, xb, tl.where(m_r, apply_beta(xb, BETA_SIGMOID, NEG_EIGVAL), 0.0)


@triton.jit
def _prep_bwd_wy_kernel(
    q, k, v, g, beta, A_log, dt_bias, chunk_info, T,
    dw, du, dk, dv, dakk, norms, db_part,
    lower_bound,
    H, HV, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
):
    """Pass 1, grid (chunks, HV): L2 norms (to ``norms``), dT = dw W0^T + du U0^T, X = T^T dw (parked as
    e^G X in the dk buffer), the V side (dv, and v.Y to ``db_part``), dAkk = -T^T dT T^T (strictly lower,
    to ``dakk``)."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    r = tl.arange(0, BT)
    m_r = r < n_rows
    off_tt = r[:, None] * BT + r[None, :]
    p_akk = dakk + base * BT * BT
    row_qk = (row0 + r) * H + i_h  # token rows of q / k
    row_hv = (row0 + r) * HV + i_hv  # token rows of v / g and of the per-value-head outputs

    a, xb, bb = _head_and_beta(A_log, beta, row_hv, m_r, i_hv, HAS_A, BETA_SIGMOID, NEG_EIGVAL)
    Tm = tl.load(T + base * BT * BT + off_tt)

    # ---- pass 1: L2 norms, dT = dw W0^T + du U0^T, X = T^T dw, the V side (dv, v.Y), dAkk -------------
    sq = tl.zeros([BT], dtype=tl.float32)
    sk = tl.zeros([BT], dtype=tl.float32)
    dT = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k, m_k, m_rk, bias = block_channels(dt_bias, kb, m_r, i_hv, K, BK, HAS_BIAS)
        xk = tl.load(k + row_qk[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
        _, bg = load_gate(g, row0, r, i_hv, o_k, m_rk, a, bias, lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
        eG = tl.exp(tl.cumsum(bg, axis=0))
        b_dw = tl.load(dw + base * BT * K + r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
        dT = tl.dot(b_dw, tl.trans(xk * eG), dT, input_precision="tf32x3")
        # dW0 = T^T dw, parked (times e^G) in the dk buffer for pass 2.
        X = tl.dot(tl.trans(Tm), b_dw, input_precision="tf32x3")
        tl.store(dk + row_hv[:, None] * K + o_k[None, :], eG * X, mask=m_rk)
        if L2NORM:
            xq = tl.load(q + row_qk[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
            sq += tl.sum(xq * xq, axis=1)
            sk += tl.sum(xk * xk, axis=1)
    rq = tl.full([BT], 1.0, dtype=tl.float32)
    rk = tl.full([BT], 1.0, dtype=tl.float32)
    if L2NORM:
        rq = l2_norm_factor(sq)
        rk = l2_norm_factor(sk)
    dT = dT * (bb * rk)[None, :]
    db = tl.zeros([BT], dtype=tl.float32)
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_rv = m_r[:, None] & (o_v < V)[None, :]
        bv = tl.load(v + row_hv[:, None] * V + o_v[None, :], mask=m_rv, other=0.0).to(tl.float32)
        b_du = tl.load(du + base * BT * V + r[:, None] * V + o_v[None, :], mask=m_rv, other=0.0).to(tl.float32)
        dT = tl.dot(b_du, tl.trans(bv * bb[:, None]), dT, input_precision="tf32x3")
        Y = tl.dot(tl.trans(Tm), b_du, input_precision="tf32x3")
        db += tl.sum(bv * Y, axis=1)
        tl.store(dv + row_hv[:, None] * V + o_v[None, :], (Y * bb[:, None]).to(dv.dtype.element_ty), mask=m_rv)
    # dAkk = -T^T dT T^T on the strictly lower triangle of the valid rows, through a scratch tile.
    m_strict = (r[:, None] > r[None, :]) & m_r[:, None]
    dAkk = tl.dot(dT, tl.trans(Tm), input_precision="tf32x3")
    dAkk = -tl.dot(tl.trans(Tm), dAkk, input_precision="tf32x3")
    tl.debug_barrier()  # the scratch may be T's own storage (overwrite_t): every thread has read T
    tl.store(p_akk + off_tt, tl.where(m_strict, dAkk, 0.0))
    tl.store(norms + base * 2 * BT + r, rq)
    tl.store(norms + base * 2 * BT + BT + r, rk)
    tl.store(db_part + base * BT + r, db)


@triton.jit
def _diag_bwd_rows(beta, daqk, dakk, norms, scale, i_hv, s, base, rows0, r, m_r, HV, BT: tl.constexpr,
                   BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    """Per-row data of a 16-row sub-chunk program: flattened (row, head) index, beta, the L2-norm factors
    (from pass 1), and Mq = scale dAqk and dAkk on the block's strictly lower pairs."""
    row_hv = (rows0 + r) * HV + i_hv
    bb = tl.where(m_r, apply_beta(tl.load(beta + row_hv, mask=m_r, other=0.0).to(tl.float32), BETA_SIGMOID,
                                  NEG_EIGVAL), 0.0)
    rq = tl.load(norms + base * 2 * BT + s * 16 + r)
    rk = tl.load(norms + base * 2 * BT + BT + s * 16 + r)
    p_blk = base * BT * BT + (s * 16 + r)[:, None] * BT + (s * 16 + r)[None, :]
    m_pair = (r[:, None] > r[None, :]) & m_r[:, None]
    Mq = tl.load(daqk + p_blk, mask=m_pair, other=0.0) * scale
    Mk = tl.load(dakk + p_blk, mask=m_pair, other=0.0)
    return row_hv, bb, rq, rk, Mq, Mk


@triton.jit
def _diag_gate_grad(bg, r, d_l):
    """The in-sub-chunk part of the gate gradient: gate m gets the pairs with j < m <= i, the reverse
    cumulative sum of d_l (+ at row i, - at row j). Row 0's gate enters no pair; the cancellation residue
    (fp32-level) is dropped for gates below -64, whose true gradient here is below e^-64 of the pairs'
    terms."""
    return tl.where((bg < -64.0) | (r == 0)[:, None], 0.0, tl.cumsum(d_l, axis=0, reverse=True))


@triton.jit
def _put_parts(ddq, ddk, ddg, p, m, d_q, d_k, d_g, ADD: tl.constexpr):
    """Parts of dq, dk and the gate gradient at offsets p (mask m) of the sub-chunk kernels' float32
    buffers: stored, or with ``ADD`` added to what the sub-chunk kernels stored there."""
    if ADD:
        d_q += tl.load(ddq + p, mask=m, other=0.0)
        d_k += tl.load(ddk + p, mask=m, other=0.0)
        d_g += tl.load(ddg + p, mask=m, other=0.0)
    tl.store(ddq + p, d_q, mask=m)
    tl.store(ddk + p, d_k, mask=m)
    tl.store(ddg + p, d_g, mask=m)


@triton.jit
def _store_diag_grads(ddq, ddk, ddg, row_hv, o_k, m_rk, r, bg, d_q, d_k, d_l, K):
    """Store one K block's in-sub-chunk parts of dq, dk and the gate gradient (``_diag_gate_grad``)."""
    _put_parts(ddq, ddk, ddg, row_hv[:, None] * K + o_k[None, :], m_rk, d_q, d_k, _diag_gate_grad(bg, r, d_l), 0)


@triton.jit
def _add_diag_db(db_part, base, s, r, db, BT: tl.constexpr):
    """Add the sub-chunk's dbeta part to pass 1's partial sums."""
    p_db = db_part + base * BT + s * 16 + r
    db_old = tl.load(p_db)
    tl.debug_barrier()  # every thread has read db_part before any writes it
    tl.store(p_db, db_old + db)


@triton.jit
def _prep_bwd_diag_fast_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info, daqk, dakk, norms, db_part,
    ddq, ddk, ddg, wide,
    scale, lower_bound, span_max,
    H, HV, K,
    BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
):
    """The pairs inside one 16-row sub-chunk on tensor cores, grid (chunks * BT / 16, HV), after pass 1,
    for sub-chunks whose log-decay span is at most ``span_max`` (``midpoint_factors``): as
    ``_prep_bwd_diag_kernel``. A first pass over the gates alone finds the span; wider sub-chunks are
    marked in ``wide`` and left at once to that kernel. tf32x3 products: the gate gradient's + / - sums
    cancel, and their residue must stay at fp32 level (see ``_store_diag_grads``)."""
    i_hv, i_h, s, base, rows0, r, m_r, a = subchunk_program(chunk_info, A_log, H, HV, BT, HAS_A)
    if subchunk_takes_fast_path(g, dt_bias, wide, rows0, r, m_r, i_hv, a, lower_bound, span_max, HV, K,
                                BK, GATE, HAS_A, HAS_BIAS):
        row_hv, bb, rq, rk, Mq, Mk = _diag_bwd_rows(beta, daqk, dakk, norms, scale, i_hv, s, base, rows0, r, m_r,
                                                    HV, BT, BETA_SIGMOID, NEG_EIGVAL)
        db = tl.zeros([16], dtype=tl.float32)
        for kb in range(0, K, BK):
            o_k, m_rk, bq, bk, bg = load_qkg_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a,
                                                   lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
            ea, eb = midpoint_factors(bg, r)
            d_q, d_k, d_row, d_col, d_b = _pairs(bq, bk, bb, ea, eb, Mq, Mk, "tf32x3")
            db += d_b
            _store_diag_grads(ddq, ddk, ddg, row_hv, o_k, m_rk, r, bg, d_q, d_k, d_row - d_col, K)
        _add_diag_db(db_part, base, s, r, db, BT)


@triton.jit
def _exact_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a, lower_bound, H, HV, K,
                 Mq, Mk, bb, row_hv, ddq, ddk, ddg, db, BK: tl.constexpr, GATE: tl.constexpr,
                 HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One K block of ``_prep_bwd_diag_kernel``: its parts stored, db returned with the block's part
    added."""
    o_k, m_rk, bq, bk, bg = load_qkg_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a,
                                           lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
    dec = tl.exp(bg)
    acc_q = tl.zeros([16, BK], dtype=tl.float32)  # dq
    acc_c = tl.zeros([16, BK], dtype=tl.float32)  # column side of dk
    acc_m = tl.zeros([16, BK], dtype=tl.float32)  # sum_j dAkk_ij k_j E_ij
    E = tl.full([16, BK], 1.0, dtype=tl.float32)
    for t in tl.static_range(15):
        j = 14 - t
        E, e, kj = subchunk_column(E, dec, bk, r, j)
        wq = tl.sum(tl.where(r[None, :] == j, Mq, 0.0), axis=1)  # column j of Mq
        mk = tl.sum(tl.where(r[None, :] == j, Mk, 0.0), axis=1)  # column j of dAkk
        ke = e * kj[None, :]
        acc_q += wq[:, None] * ke
        acc_m += mk[:, None] * ke
        colx = tl.sum((wq[:, None] * bq + (mk * bb)[:, None] * bk) * e, axis=0)
        acc_c += tl.where((r == j)[:, None], colx[None, :], 0.0)
    acc_r = bb[:, None] * acc_m  # row side of dk
    db += tl.sum(bk * acc_m, axis=1)
    _store_diag_grads(ddq, ddk, ddg, row_hv, o_k, m_rk, r, bg, acc_q, acc_r + acc_c,
                      bq * acc_q + bk * (acc_r - acc_c), K)
    return db


@triton.jit
def _prep_bwd_diag_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info, daqk, dakk, norms, db_part,
    ddq, ddk, ddg, wide,
    scale, lower_bound,
    H, HV, K,
    BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
):
    """The pairs inside one 16-row sub-chunk for any gate, grid (chunks * BT / 16, HV), after pass 1:
    the sub-chunks ``_prep_bwd_diag_fast_kernel`` marked in ``wide`` (the others return at once). Their
    parts of dq, dk (normalised q, k) and of the gradient of every activated gate go to ``ddq``, ``ddk``,
    ``ddg`` (pass 2 adds them), their part of dbeta into ``db_part``.

    As the forward's ``_chunk_diag_kernel``: columns j from the last to the first, E_i = exp(g_(j+1) +
    ... + g_i) as a running product of decays <= 1 (exact for any gate), one warp. The loop keeps only dq,
    the column side of dk and sum_j dAkk_ij k_j E_ij; the row side of dk (beta times the last), dbeta
    and the gate terms (q * dq + k * dk_row - k * dk_col) are formed once after it (session 5: 14% fewer
    instructions than summing them per column, same sums).
    """
    if tl.load(wide_flag(wide)) != 0:
        i_hv, i_h, s, base, rows0, r, m_r, a = subchunk_program(chunk_info, A_log, H, HV, BT, HAS_A)
        row_hv, bb, rq, rk, Mq, Mk = _diag_bwd_rows(beta, daqk, dakk, norms, scale, i_hv, s, base, rows0, r, m_r,
                                                    HV, BT, BETA_SIGMOID, NEG_EIGVAL)
        db = tl.zeros([16], dtype=tl.float32)
        for kb in range(0, K, BK):
            db = _exact_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a, lower_bound, H, HV, K,
                              Mq, Mk, bb, row_hv, ddq, ddk, ddg, db, BK, GATE, HAS_A, HAS_BIAS)
        _add_diag_db(db_part, base, s, r, db, BT)


@triton.jit
def _quarter(q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K,
             S: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr,
             HAS_BIAS: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, BT: tl.constexpr = 64):
    """``subchunk_tiles`` of sub-chunk S of a BT-row chunk with pass 1's L2-norm factors, and the rows'
    activated beta."""
    rq = tl.load(norms + base * 2 * BT + S * 16 + tl.arange(0, 16))
    rk = tl.load(norms + base * 2 * BT + BT + S * 16 + tl.arange(0, 16))
    r, m_rk, o_k, bq, bk, bg, fwd, after = subchunk_tiles(q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq, rk, a,
                                                          lower_bound, H, HV, K, S, BK, GATE, HAS_A, HAS_BIAS)
    m_r = r < n_rows
    bb = tl.load(beta + (row0 + r) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    bb = tl.where(m_r, apply_beta(bb, BETA_SIGMOID, NEG_EIGVAL), 0.0)
    return r, m_rk, o_k, bq, bk, bg, fwd, after, bb


@triton.jit
def _block_pair_loads(p_aqk, p_akk, n_rows, scale, I: tl.constexpr, J: tl.constexpr, BT: tl.constexpr = 64):
    """scale dAqk and dAkk on the [16, 16] block of rows of sub-chunk I and columns of sub-chunk J (I > J)
    of a BT-row chunk."""
    off, rows = subchunk_block(I, J, BT)
    m = (rows < n_rows)[:, None]
    return tl.load(p_aqk + off, mask=m, other=0.0) * scale, tl.load(p_akk + off, mask=m, other=0.0)


@triton.jit
def _adjacent_pair_bwd(q_i, k_i, b_i, f_i, k_j, v_j, mq, mk, PREC: tl.constexpr):
    """The tree's level 16 for sub-chunk i and the one before it, j, backward: from the block's scaled
    dAqk (mq) and dAkk (mk), with the factors inside the sub-chunks, returns dq_i, dk_i, dk_j, the gate
    gradients of i's and j's gates and dbeta_i."""
    e_i = tl.exp(tl.minimum(f_i, 0.0))
    e_j = tl.exp(tl.minimum(v_j, 0.0))
    dq_i, dk_i, dk_j, d_row, d_col, db_i = _block_pair(q_i, k_i, b_i, e_i, k_j, e_j, mq, mk, PREC)
    return dq_i, dk_i, dk_j, tl.cumsum(d_row, axis=0, reverse=True), tl.cumsum(d_col, axis=0) - d_col, db_i


@triton.jit
def _add_rows(ddq, ddk, ddg, row0, r, m_rk, o_k, i_hv, HV, K, d_q, d_k, d_g):
    """Add a [16, BK] block's dq, dk and gate gradient to the sub-chunk kernels' buffers."""
    _put_parts(ddq, ddk, ddg, ((row0 + r) * HV + i_hv)[:, None] * K + o_k[None, :], m_rk, d_q, d_k, d_g, 1)


@triton.jit
def _prep_bwd_tree_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info, daqk, dakk, norms, ddq, ddk, ddg, db_tree,
    scale, lower_bound,
    H, HV, K,
    BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, PAIR_PREC: tl.constexpr,
):
    """At 64-row chunks (``KIMI_LINEAR_KDA_PREP_BWD_TREE=pass2`` opts out): pass 2's tree levels in a launch
    of their own, grid (chunks, HV, K / BK), on [16, BK] sub-chunk tiles. The pairs between sub-chunks
    as [16, 16] x [16, BK] block products: level 16 the pairs (1, 0) and (3, 2), level 32 the pairs of
    sub-chunks {2, 3} x {0, 1}, with the tree's factors (sums of the gates of one half-chunk only, so
    exact for any gate), instead of [64, 64] x [64, BK] products masked to an eighth and a quarter of
    their entries. Adds dq, dk and the gate gradient to the sub-chunk kernels' ``ddq`` / ``ddk`` /
    ``ddg`` (each program owns its rows and channels) and writes its dbeta parts per K block to
    ``db_tree`` ([chunks, HV, K / BK, 64]); pass 2 then skips its levels. (Session 12 also took the pairs
    inside the sub-chunks here, replacing the tensor-core sub-chunk launch: 1.026x / 0.993x the forward +
    backward time with init-like / stress gates, session 13; removed in session 20.)"""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    i_k = tl.program_id(2)
    kb = i_k * BK
    a = head_a_log(A_log, i_hv, HAS_A)
    p_aqk = daqk + base * 4096
    p_akk = dakk + base * 4096
    r0, m0, o_k, q0, k0, g0, _, v0, b0 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 0, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL)
    r1, m1, _, q1, k1, g1, f1, v1, b1 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 1, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL)
    r2, m2, _, q2, k2, g2, f2, v2, b2 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 2, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL)
    r3, m3, _, q3, k3, g3, f3, v3, b3 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 3, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL)
    # f: row-side sums (from the sub-chunk start, inclusive), v: column-side sums (after the row to the
    # sub-chunk end): all sums of same-sign gates of one sub-chunk.
    # Level 16: pairs (1, 0) and (3, 2), factors inside the sub-chunks.
    mq10, mk10 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 1, 0)
    dq1, dk1, dk0, dg1, dg0, db1 = _adjacent_pair_bwd(q1, k1, b1, f1, k0, v0, mq10, mk10, PAIR_PREC)
    mq32, mk32 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 3, 2)
    dq3, dk3, dk2, dg3, dg2, db3 = _adjacent_pair_bwd(q3, k3, b3, f3, k2, v2, mq32, mk32, PAIR_PREC)
    dq2 = tl.zeros([16, BK], dtype=tl.float32)
    db2 = tl.zeros([16], dtype=tl.float32)
    # Level 32: rows of sub-chunks 2, 3 against columns of 0, 1. Row factors from row 32 on, column factors
    # after the column's row up to row 31.
    e2 = tl.exp(tl.minimum(f2, 0.0))
    e3 = tl.exp(tl.minimum(f3 + tl.sum(g2, axis=0)[None, :], 0.0))
    e1 = tl.exp(tl.minimum(v1, 0.0))
    e0 = tl.exp(tl.minimum(v0 + tl.sum(g1, axis=0)[None, :], 0.0))
    mq20, mk20 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 2, 0)
    mq21, mk21 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 2, 1)
    mq30, mk30 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 3, 0)
    mq31, mk31 = _block_pair_loads(p_aqk, p_akk, n_rows, scale, 3, 1)
    c0 = k0 * e0
    c1 = k1 * e1
    rowq2, rowk2 = q2 * e2, k2 * e2
    rowq3, rowk3 = q3 * e3, k3 * e3
    rq2 = tl.dot(mq20, c0, input_precision=PAIR_PREC)
    rq2 = tl.dot(mq21, c1, rq2, input_precision=PAIR_PREC)
    rk2 = tl.dot(mk20, c0, input_precision=PAIR_PREC)
    rk2 = tl.dot(mk21, c1, rk2, input_precision=PAIR_PREC)
    rq3 = tl.dot(mq30, c0, input_precision=PAIR_PREC)
    rq3 = tl.dot(mq31, c1, rq3, input_precision=PAIR_PREC)
    rk3 = tl.dot(mk30, c0, input_precision=PAIR_PREC)
    rk3 = tl.dot(mk31, c1, rk3, input_precision=PAIR_PREC)
    wk2 = rowk2 * b2[:, None]
    wk3 = rowk3 * b3[:, None]
    cc0 = tl.dot(tl.trans(mq20), rowq2, input_precision=PAIR_PREC)
    cc0 = tl.dot(tl.trans(mq30), rowq3, cc0, input_precision=PAIR_PREC)
    cc0 = tl.dot(tl.trans(mk20), wk2, cc0, input_precision=PAIR_PREC)
    cc0 = tl.dot(tl.trans(mk30), wk3, cc0, input_precision=PAIR_PREC)
    cc1 = tl.dot(tl.trans(mq21), rowq2, input_precision=PAIR_PREC)
    cc1 = tl.dot(tl.trans(mq31), rowq3, cc1, input_precision=PAIR_PREC)
    cc1 = tl.dot(tl.trans(mk21), wk2, cc1, input_precision=PAIR_PREC)
    cc1 = tl.dot(tl.trans(mk31), wk3, cc1, input_precision=PAIR_PREC)
    t2 = rowk2 * rk2
    t3 = rowk3 * rk3
    dq2 += e2 * rq2
    dq3 += e3 * rq3
    dk2 += e2 * (b2[:, None] * rk2)
    dk3 += e3 * (b3[:, None] * rk3)
    dk0 += e0 * cc0
    dk1 += e1 * cc1
    db2 += tl.sum(t2, axis=1)
    db3 += tl.sum(t3, axis=1)
    # Gate gradients: row side to the gates from row 32 to the row (across sub-chunks 2 and 3), column
    # side to those after the column's row up to row 31 (across 0 and 1).
    dr2 = rowq2 * rq2 + b2[:, None] * t2
    dr3 = rowq3 * rq3 + b3[:, None] * t3
    dc0 = c0 * cc0
    dc1 = c1 * cc1
    dg3 += tl.cumsum(dr3, axis=0, reverse=True)
    dg2 += tl.cumsum(dr2, axis=0, reverse=True) + tl.sum(dr3, axis=0)[None, :]
    dg0 += tl.cumsum(dc0, axis=0) - dc0
    dg1 += tl.cumsum(dc1, axis=0) - dc1 + tl.sum(dc0, axis=0)[None, :]
    dq0 = tl.zeros([16, BK], dtype=tl.float32)
    db0 = tl.zeros([16], dtype=tl.float32)
    _add_rows(ddq, ddk, ddg, row0, r0, m0, o_k, i_hv, HV, K, dq0, dk0, dg0)
    _add_rows(ddq, ddk, ddg, row0, r1, m1, o_k, i_hv, HV, K, dq1, dk1, dg1)
    _add_rows(ddq, ddk, ddg, row0, r2, m2, o_k, i_hv, HV, K, dq2, dk2, dg2)
    _add_rows(ddq, ddk, ddg, row0, r3, m3, o_k, i_hv, HV, K, dq3, dk3, dg3)
    p_db = db_tree + (base * tl.num_programs(2) + i_k) * 64 + tl.arange(0, 16)
    tl.store(p_db, db0)
    tl.store(p_db + 16, db1)
    tl.store(p_db + 32, db2)
    tl.store(p_db + 48, db3)


@triton.jit
def _prep_bwd_pair_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info, daqk, dakk, norms, ddq, ddk, ddg, db_tree,
    scale, lower_bound,
    H, HV, K,
    BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, PAIR_PREC: tl.constexpr,
):
    """``_prep_bwd_tree_kernel`` for 32-row chunks, grid (chunks, HV, K / BK): the tree's one level, the
    block pair (1, 0) of the two 16-row sub-chunks, with the factors inside the sub-chunks (exact for any
    gate). Adds dq, dk and the gate gradient to the sub-chunk kernels' buffers and writes its dbeta parts
    to ``db_tree`` ([chunks, HV, K / BK, 32]); pass 2 then skips its level."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    i_k = tl.program_id(2)
    kb = i_k * BK
    a = head_a_log(A_log, i_hv, HAS_A)
    r0, m0, o_k, q0, k0, g0, _, v0, b0 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 0, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL, 32)
    r1, m1, _, q1, k1, g1, f1, v1, b1 = _quarter(
        q, k, g, beta, dt_bias, norms, row0, n_rows, i_h, i_hv, base, kb, a, lower_bound, H, HV, K, 1, BK,
        GATE, HAS_A, HAS_BIAS, BETA_SIGMOID, NEG_EIGVAL, 32)
    mq10, mk10 = _block_pair_loads(daqk + base * 1024, dakk + base * 1024, n_rows, scale, 1, 0, 32)
    dq1, dk1, dk0, dg1, dg0, db1 = _adjacent_pair_bwd(q1, k1, b1, f1, k0, v0, mq10, mk10, PAIR_PREC)
    _add_rows(ddq, ddk, ddg, row0, r0, m0, o_k, i_hv, HV, K, tl.zeros([16, BK], dtype=tl.float32), dk0, dg0)
    _add_rows(ddq, ddk, ddg, row0, r1, m1, o_k, i_hv, HV, K, dq1, dk1, dg1)
    p_db = db_tree + (base * tl.num_programs(2) + i_k) * 32 + tl.arange(0, 16)
    tl.store(p_db, tl.zeros([16], dtype=tl.float32))
    tl.store(p_db + 16, db1)


@triton.jit
def _chunk_prep_bwd_kernel(
    q, k, g, beta, A_log, dt_bias, chunk_info,
    dqg, dkg, daqk, dgc, norms, db_part, ddq, ddk, ddg,
    dq, dk, dg, dbeta, dA_part, dbias_part, dakk, db_tree, dq_out, dk_out,
    scale, lower_bound,
    H, HV, K,
    BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    PAIR_PREC: tl.constexpr, ABLATE: tl.constexpr = 0, TREE_KERNEL_NK: tl.constexpr = 0,
    FINAL_OUT: tl.constexpr = 0,
):
    """Passes 2 and 3, grid (chunks, HV): every other chunk-local gradient per K block, the pairs by tree
    levels (unless ``_prep_bwd_tree_kernel`` took them: ``TREE_KERNEL_NK`` > 0 is its number of K
    blocks, whose dbeta parts are summed here); then the L2-norm backward. With ``FINAL_OUT`` (no GVA
    group to sum) the finished dq, dk go straight to ``dq_out`` / ``dk_out`` in their type; otherwise
    they stay in the float32 ``dq`` / ``dk``."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    # ABLATE (profiling only, wrong results): bit 1 drops the tree levels (16 ... BT/2), 16 drops pass 3.
    r = tl.arange(0, BT)
    m_r = r < n_rows
    p_aqk = daqk + base * BT * BT
    p_akk = dakk + base * BT * BT
    row_qk = (row0 + r) * H + i_h  # token rows of q / k
    row_hv = (row0 + r) * HV + i_hv  # token rows of v / g and of the per-value-head outputs

    a, xb, bb = _head_and_beta(A_log, beta, row_hv, m_r, i_hv, HAS_A, BETA_SIGMOID, NEG_EIGVAL)
    rq = tl.load(norms + base * 2 * BT + r)
    rk = tl.load(norms + base * 2 * BT + BT + r)
    db = tl.load(db_part + base * BT + r)
    for i_k in tl.static_range(TREE_KERNEL_NK):
        db += tl.load(db_tree + (base * TREE_KERNEL_NK + i_k) * BT + r)
    dq_diag = tl.load(p_aqk + r * BT + r, mask=m_r, other=0.0) * scale  # Aqk's diagonal, no decay

    # ---- pass 2: per K block ------------------------------------------------------------------------
    dA = tl.zeros([BK], dtype=tl.float32)
    sdq = tl.zeros([BT], dtype=tl.float32)
    sdk = tl.zeros([BT], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k, m_k, m_rk, bias, bq, bk, bg, bgn = load_qkg_next(q, k, g, dt_bias, kb, row0, r, m_r, n_rows, i_h,
                                                              i_hv, rq, rk, a, lower_bound, H, HV, K, BK, GATE,
                                                              HAS_A, HAS_BIAS)

        # Terms without pairwise decays. Exponent gradients of G_i reach g_m for m <= i; kg's decay to
        # the chunk end reaches g_m for m > i.
        p_ck = base * BT * K + r[:, None] * K + o_k[None, :]
        t_q = tl.exp(tl.cumsum(bg, axis=0)) * tl.load(dqg + p_ck, mask=m_rk, other=0.0).to(tl.float32) * scale
        kX = tl.load(dk + row_hv[:, None] * K + o_k[None, :], mask=m_rk, other=0.0)  # e^G T^T dw
        acc_q = t_q + dq_diag[:, None] * bk
        acc_k = bb[:, None] * kX + dq_diag[:, None] * bq
        d_G = bq * t_q + bb[:, None] * (bk * kX)
        db += tl.sum(bk * kX, axis=1)
        t_k = tl.exp(tl.minimum(tl.cumsum(bgn, axis=0, reverse=True), 0.0)) * tl.load(dkg + p_ck, mask=m_rk, other=0.0).to(tl.float32)
        acc_k += t_k
        kgd = bk * t_k
        b_dgc = tl.load(dgc + base * K + o_k, mask=m_k, other=0.0)
        d_g = tl.cumsum(d_G, axis=0, reverse=True) + (tl.cumsum(kgd, axis=0) - kgd) + b_dgc[None, :]

        p_hk = row_hv[:, None] * K + o_k[None, :]
        # Pairs inside 16-row sub-chunks: from the diagonal kernel.
        acc_q += tl.load(ddq + p_hk, mask=m_rk, other=0.0)
        acc_k += tl.load(ddk + p_hk, mask=m_rk, other=0.0)
        d_g += tl.load(ddg + p_hk, mask=m_rk, other=0.0)
        # The pairs between sub-chunks, by tree levels BT/2 ... 16.
        for lv in tl.static_range(0 if (ABLATE & 1) or TREE_KERNEL_NK > 0 else BT.bit_length() - 5):
            d_q, d_k, d_l, d_b = _tree_level(bq, bk, bb, bg, bgn, p_aqk, p_akk, r, n_rows, scale, BT, BK,
                                             BT >> (lv + 1), PAIR_PREC)
            acc_q += d_q
            acc_k += d_k
            d_g += d_l
            db += d_b

        # Through the gate activation (raw gate reloaded rather than kept live).
        d_g = tl.where(m_rk, d_g, 0.0)
        if GATE != 0:
            xs, bg = load_gate(g, row0, r, i_hv, o_k, m_rk, a, bias, lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
            if HAS_BIAS:
                xs = xs + bias[None, :]
            if GATE == 1:
                sig = tl.where(xs > 20.0, 1.0, tl.sigmoid(xs))
                if HAS_A:
                    dA += tl.sum(d_g * bg, axis=0)
                d_g = -tl.exp(a) * sig * d_g
            else:
                z = xs
                if HAS_A:
                    z = tl.exp(a) * xs
                s = tl.sigmoid(z)
                d_g = d_g * (lower_bound * s * (1.0 - s))
                if HAS_A:
                    dA += tl.sum(d_g * z, axis=0)
                    d_g = d_g * tl.exp(a)
        if HAS_BIAS:
            tl.store(dbias_part + base * K + o_k, tl.sum(d_g, axis=0), mask=m_k)
        tl.store(dg + p_hk, d_g.to(dg.dtype.element_ty), mask=m_rk)
        if FINAL_OUT and not L2NORM:
            tl.store(dq_out + p_hk, acc_q.to(dq_out.dtype.element_ty), mask=m_rk)
            tl.store(dk_out + p_hk, acc_k.to(dk_out.dtype.element_ty), mask=m_rk)
        else:
            tl.store(dq + p_hk, acc_q, mask=m_rk)
            tl.store(dk + p_hk, acc_k, mask=m_rk)
        if L2NORM:
            sdq += tl.sum(bq * acc_q, axis=1)
            sdk += tl.sum(bk * acc_k, axis=1)

    if HAS_A:
        tl.store(dA_part + base, tl.sum(dA, axis=0))
    if BETA_SIGMOID:
        s = tl.sigmoid(xb)
        db = db * s * (1.0 - s)
        if NEG_EIGVAL:
            db = db * 2.0
    tl.store(dbeta + row_hv, db.to(dbeta.dtype.element_ty), mask=m_r)

    # ---- pass 3: L2-norm backward, dx = r (dx^ - (x^.dx^) x^) ----------------------------------------
    if L2NORM and (ABLATE & 16) == 0:
        tl.debug_barrier()
        for kb in range(0, K, BK):
            o_k = kb + tl.arange(0, BK)
            m_rk = m_r[:, None] & (o_k < K)[None, :]
            p_qk = row_qk[:, None] * K + o_k[None, :]
            p_hk = row_hv[:, None] * K + o_k[None, :]
            bq = tl.load(q + p_qk, mask=m_rk, other=0.0).to(tl.float32) * rq[:, None]
            bk = tl.load(k + p_qk, mask=m_rk, other=0.0).to(tl.float32) * rk[:, None]
            g_q = tl.load(dq + p_hk, mask=m_rk, other=0.0)
            g_k = tl.load(dk + p_hk, mask=m_rk, other=0.0)
            f_q = rq[:, None] * (g_q - sdq[:, None] * bq)
            f_k = rk[:, None] * (g_k - sdk[:, None] * bk)
            if FINAL_OUT:
                tl.store(dq_out + p_hk, f_q.to(dq_out.dtype.element_ty), mask=m_rk)
                tl.store(dk_out + p_hk, f_k.to(dk_out.dtype.element_ty), mask=m_rk)
            else:
                tl.store(dq + p_hk, f_q, mask=m_rk)
                tl.store(dk + p_hk, f_k, mask=m_rk)


def chunk_prep_bwd(q, k, v, g, beta, A_log, dt_bias, chunk_info, T, dw, du, dqg, dkg, daqk, dgc, *, cfg,
                   overwrite_t=False, g_act=None):
    """Gradients of the raw inputs of the prep kernel (see the module docstring).

    Shapes: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K]; beta [B, T, HV]; chunk_info int32 [NC, 2];
    T, daqk [NC, HV, BT, BT]; dw, dqg, dkg [NC, HV, BT, K]; du [NC, HV, BT, V]; dgc [NC, HV, K] (T, daqk, dgc
    fp32; dw, du, dqg, dkg fp32 or 16-bit, the backward's hand-offs).
    BT must be a power of two in 16 ... 128 (128 is heavy on registers). ``overwrite_t`` reuses T's
    storage as the kernel's dAkk scratch (T is garbage afterwards). With an in-kernel gate and
    ``utils.gate_once``, pass 1 and the pair kernels read the activated gate (``g_act``, or
    ``activate_gate``'s here: ``utils.gate_prepass``); pass 2 activates the raw one itself, for the
    activation's derivative.
    Returns (dq, dk, dv, dg, dbeta, dA_log or None, ddt_bias or None).
    """
    shapes, BT = cfg.shapes, cfg.BT
    B, Tlen, H, HV, K, V = shapes.B, shapes.T, shapes.H, shapes.HV, shapes.K, shapes.V
    assert BT in (16, 32, 64, 128), BT
    NC = chunk_info.shape[0]
    dev = q.device
    f32 = torch.float32
    dq32 = torch.empty(B, Tlen, HV, K, device=dev, dtype=f32)
    dk32 = torch.empty(B, Tlen, HV, K, device=dev, dtype=f32)
    # Without a GVA group to sum, pass 2 / 3 write the finished dq, dk in the inputs' type (session 12:
    # no cast launches after it; they took 113 us of an 8K forward + backward on the H200).
    final_out = env_choice("KIMI_LINEAR_KDA_PREP_BWD_FINAL", "1", ("1", "0")) == "1" and HV == H
    dq_out = torch.empty(B, Tlen, H, K, device=dev, dtype=q.dtype) if final_out else None
    dk_out = torch.empty(B, Tlen, H, K, device=dev, dtype=k.dtype) if final_out else None
    dv = torch.empty(B, Tlen, HV, V, device=dev, dtype=v.dtype)
    dg = torch.empty(B, Tlen, HV, K, device=dev, dtype=g.dtype)
    dbeta = torch.empty(B, Tlen, HV, device=dev, dtype=beta.dtype)
    dA_part = torch.empty(NC, HV, device=dev, dtype=f32) if A_log is not None else None
    dbias_part = torch.empty(NC, HV, K, device=dev, dtype=f32) if dt_bias is not None else None
    dakk = T if overwrite_t else torch.empty_like(T)  # dAkk of every chunk (written by pass 1)
    if NC > 0:
        # Pass 2 (the per-K-block kernel): at BT=64 without the tree levels (their own kernel), 8 warps:
        # forward + backward 7.98 vs 8.21 ms at T=8K, H=32 on an H200 (session 9; K blocks of 32 at 4
        # warps 7.99). With the levels, 4 warps had won (session 6: 6.17 vs 7.21 ms).
        bk, warps = {16: (32, 4), 32: (16, 8), 64: (16, 8), 128: (16, 8)}[BT]
        BK = max(16, min(int(os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_BK", bk)), next_pow2(K)))
        BV = max(16, min(int(os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_BV", 32)), next_pow2(V)))
        warps = int(os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_WARPS", warps))
        prec = os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_PREC") or ("tf32x3" if q.dtype == f32 else "tf32")
        d = dummy(dev)
        a_log = A_log if A_log is not None else d
        bias = dt_bias if dt_bias is not None else d
        lb = float(cfg.lower_bound) if cfg.lower_bound is not None else 0.0
        flags = dict(GATE=cfg.gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
                     BETA_SIGMOID=cfg.beta_sigmoid, NEG_EIGVAL=cfg.neg_eigval)
        # The launches before pass 2 only need the activated gate.
        g_pre, a_pre, bias_pre, flags_pre = g, a_log, bias, flags
        g_act = gate_prepass(g, A_log, dt_bias, cfg.lower_bound, cfg.gate, g_act)
        if g_act is not None:
            g_pre, a_pre, bias_pre, flags_pre = g_act, d, d, dict(flags, GATE=0, HAS_A=False, HAS_BIAS=False)
        norms = torch.empty(NC, HV, 2, BT, device=dev, dtype=f32)  # L2-norm factors of q and k
        db_part = torch.empty(NC, HV, BT, device=dev, dtype=f32)
        # Two pipeline stages in passes 1 and 2 (prefetch of the next K block): session 7, H200, T=8K,
        # chunk_prep_bwd 5.59 vs 5.80 ms with one (init-like gates; 5.94 vs 6.15 stress gates), forward +
        # backward 11.12 vs 11.33 ms; three stages 13.0 ms.
        stages = 1 if INTERPRET else int(os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_STAGES", 2))
        LAUNCHED["wy"] = _prep_bwd_wy_kernel[(NC, HV)](
            q, k, v, g_pre, beta, a_pre, bias_pre, chunk_info, T, dw, du, dk32, dv, dakk, norms, db_part,
            lb, H, HV, K, V, BT=BT, BK=BK, BV=BV, L2NORM=cfg.l2norm, **flags_pre, num_warps=4, num_stages=stages,
        )
        # The sub-chunk kernels' dq, dk, dg: tensor cores where the log-decay span allows, then the exact
        # column-by-column kernel for the rest. One warp each, K blocks of 32. H200, T=8K: exact kernel
        # (session 5, forward + backward) 12.9 ms vs 13.7 at BK 16 and 16.0 at BK 64, 14.7 / 15.7 ms with
        # 2 / 4 warps; tensor-core kernel (session 6, chunk_prep_bwd, init-like gates, one-pass version)
        # 5.58 ms vs 5.59 at BK 16, 5.80 with 2 warps, 5.93 with 4 warps and BK 64.
        diag = torch.empty(3, B * Tlen * HV * K, device=dev, dtype=f32)
        grid = (NC * (BT // 16), HV)
        env = os.environ.get
        tree_kernel = BT in (32, 64) and env_choice("KIMI_LINEAR_KDA_PREP_BWD_TREE", "kernel", ("kernel", "pass2")) == "kernel"
        tree_bk = max(16, min(int(env("KIMI_LINEAR_KDA_PREP_BWD_TREE_BK", 32)), next_pow2(K)))
        tree_nk = cdiv(K, tree_bk) if tree_kernel else 0
        wide = torch.empty(HV, grid[0], device=dev, dtype=torch.int8)
        db_tree = torch.empty(NC, HV, tree_nk, BT, device=dev, dtype=f32) if tree_kernel else d

        LAUNCHED["diag_fast"] = _prep_bwd_diag_fast_kernel[grid](
            q, k, g_pre, beta, a_pre, bias_pre, chunk_info, daqk, dakk, norms, db_part, diag[0], diag[1],
            diag[2], wide, float(cfg.scale), lb, diag_span_max(), H, HV, K, BT=BT,
            BK=max(16, min(int(env("KIMI_LINEAR_KDA_BWD_DIAG_FAST_BK", 32)), next_pow2(K))), **flags_pre,
            num_warps=int(env("KIMI_LINEAR_KDA_BWD_DIAG_FAST_WARPS", 1)), num_stages=1,
        )
        LAUNCHED["diag_wide"] = wide
        LAUNCHED["diag"] = _prep_bwd_diag_kernel[grid](
            q, k, g_pre, beta, a_pre, bias_pre, chunk_info, daqk, dakk, norms, db_part, diag[0], diag[1], diag[2],
            wide, float(cfg.scale), lb, H, HV, K, BT=BT,
            BK=max(16, min(int(env("KIMI_LINEAR_KDA_BWD_DIAG_BK", 32)), next_pow2(K))), **flags_pre,
            num_warps=int(env("KIMI_LINEAR_KDA_BWD_DIAG_WARPS", 1)), num_stages=1,
        )
        # The tree levels (pairs between sub-chunks) in a launch of their own on sub-chunk tiles, after the
        # sub-chunk kernels: they add to those kernels' buffers.
        if tree_kernel and BT == 32:  # (training at 32 rows: 1.034x the time of 64, session 16, H100)
            LAUNCHED["tree_fn"] = _prep_bwd_pair_kernel
            LAUNCHED["tree"] = _prep_bwd_pair_kernel[(NC, HV, tree_nk)](
                q, k, g_pre, beta, a_pre, bias_pre, chunk_info, daqk, dakk, norms, diag[0], diag[1], diag[2],
                db_tree, float(cfg.scale), lb, H, HV, K, BK=tree_bk, **flags_pre, PAIR_PREC=prec,
                num_warps=int(env("KIMI_LINEAR_KDA_PREP_BWD_TREE_WARPS", 2)), num_stages=1,
            )
        elif tree_kernel:
            # 64-row chunks. Session 9, H200, T=8K, forward + backward: 2 warps 8.37 ms, 4 warps 8.69, 1 warp
            # 9.46 (8 warps: 10.79 vs 9.52 at 4 with the float32 rebuild); K blocks of 16 10.21 and 64 8.41
            # at 4 warps, 64 at 2 9.38.
            LAUNCHED["tree_fn"] = _prep_bwd_tree_kernel
            LAUNCHED["tree"] = _prep_bwd_tree_kernel[(NC, HV, tree_nk)](
                q, k, g_pre, beta, a_pre, bias_pre, chunk_info, daqk, dakk, norms, diag[0], diag[1], diag[2],
                db_tree, float(cfg.scale), lb, H, HV, K, BK=tree_bk, **flags_pre, PAIR_PREC=prec,
                num_warps=int(env("KIMI_LINEAR_KDA_PREP_BWD_TREE_WARPS", 2)), num_stages=1,
            )
        LAUNCHED["tree_kernel_nk"] = tree_nk
        LAUNCHED["pairs"] = _chunk_prep_bwd_kernel[(NC, HV)](
            q, k, g, beta, a_log, bias, chunk_info, dqg, dkg, daqk, dgc, norms, db_part, diag[0], diag[1],
            diag[2], dq32, dk32, dg, dbeta, dA_part if dA_part is not None else d,
            dbias_part if dbias_part is not None else d, dakk, db_tree,
            dq_out if final_out else d, dk_out if final_out else d, float(cfg.scale), lb, H, HV, K, BT=BT, BK=BK,
            L2NORM=cfg.l2norm, **flags, PAIR_PREC=prec, num_warps=warps, num_stages=stages, TREE_KERNEL_NK=tree_nk,
            FINAL_OUT=int(final_out),
            ABLATE=int(os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_ABLATE", 0)),
        )
    group = HV // H
    if group > 1:
        dq32 = dq32.view(B, Tlen, H, group, K).sum(3)
        dk32 = dk32.view(B, Tlen, H, group, K).sum(3)
    if final_out and NC > 0:
        dq, dk = dq_out, dk_out
    else:
        dq, dk = dq32.to(q.dtype), dk32.to(k.dtype)
    dA = None if A_log is None else (dA_part.sum(0) if NC > 0 else torch.zeros_like(A_log))
    dbias = None if dt_bias is None else (dbias_part.sum(0).reshape(-1) if NC > 0 else torch.zeros_like(dt_bias))
    return dq, dk, dv, dg, dbeta, dA, dbias
