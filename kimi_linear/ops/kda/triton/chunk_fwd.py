"""Chunked KDA forward: chunk-local prep (four launches) and a sequential recurrence.

1. Prep, chunk-parallel. From the inputs of one chunk (beta sigmoid applied in-register; the gate's
   activation and the L2-norm factors from the float32 pre-passes ``utils.activate_gate`` and
   ``utils.qk_norms``, or in-register with ``KIMI_LINEAR_KDA_GATE_PASS`` / ``_NORM_PASS=fused``), with G
   the within-chunk inclusive cumulative log decay:

       Aqk[i, j] = scale * sum_d q_id k_jd exp(G_id - G_jd)     (j <= i)
       Akk[i, j] = beta_i * sum_d k_id k_jd exp(G_id - G_jd)    (j < i),   T = (I + Akk)^-1
       w = T (beta k exp(G)),  u = T (beta v),  qg = scale q exp(G),  kg = k exp(G_C - G),  decay = exp(G_C)

   stored chunk-major ([chunk, head, row, .]; kg transposed, [chunk, head, K, row]).

   Numerics for any gate value: pairwise decays are never formed from two long cumulative sums.
   * Pairs inside a 16-row sub-chunk, grid (chunks * BT/16, HV), one warp, two launches; both also
     invert the sub-chunk's diagonal block of I + Akk:
     - ``_chunk_diag_fast_kernel``, where the sub-chunk's log decays span at most 120 nats in every
       channel (``utils.DIAG_SPAN_MAX``; trained-model gates always, see docs/benchmarks.md):
       exp(G_i - G_j) = exp(G_i - mid) * exp(mid - G_j) around each channel's midpoint, both factors
       within e^(+-60), one tensor-core product per K block. It marks wider sub-chunks in ``wide``.
     - ``_chunk_diag_kernel`` for the marked ones (the rest return at once): column by column,
       exp(G_i - G_j) as a running product of the per-row decays exp(g) <= 1, on CUDA cores, exact for
       any gate.
   * Pairs between sub-chunks (``_chunk_tree_kernel``, grid (chunks, HV)): a binary tree over the rows
     gives every such pair one level B (16, 32, ...) at which i lies in an odd B-row block and j in the
     even block before it; there exp(G_i - G_j) = exp(sum of the gates from the start of i's block to
     i) * exp(sum after j to the end of j's block), both <= 1 and both sums of at most B same-sign gates,
     so one masked tensor-core product per level. T follows by the same tree from the diagonal blocks.
   Underflow to 0 is exact. At 64-row chunks (training's) ``_chunk_tree_subchunk_kernel`` does this
   work on the four sub-chunks as [16, BK] tiles instead, and at 32-row chunks (a forward without
   gradients: ``triton_backend.kernel_chunk``) ``_chunk_pair_subchunk_kernel`` on the two (one level, one
   block pair; 16-row chunks need no tree at all): [16, 16] block products and T by block
   substitution (ptxas, session 8: no spills, 12 KB of shared memory, against 84 / 112 B and 48 KB;
   H200, session 9, T=8K: forward 1.50 vs 1.64 ms at 2 warps; ``KIMI_LINEAR_KDA_TREE=masked`` keeps
   the masked kernel, which 128-row chunks use). (Sessions 6-8 tried a kernel taking whole
   chunks within the span limit in one piece: prep 1.33 vs 1.42 ms with trained-like gates, 1.85 vs
   1.63 with stress gates, and forward + backward slower with both; removed.)

   Then ``_chunk_wy_kernel`` (w, u, qg, kg, decay), reading the within-chunk sums of the gate from the
   pre-pass ``utils.gate_chunk_prepass`` (session 13) unless ``KIMI_LINEAR_KDA_GATE_CUMSUM=kernel``.
   History (T=8K, H=32, H200, docs/benchmarks.md): session 3 had three launches with the in-sub-chunk
   pairs one by one (2.2 ms); session 4 one tree kernel with levels 1 ... 32 (1.25 ms, the levels inside
   sub-chunks 0.46 ms of it); session 5 moved those to the one-warp diagonal kernel (forward 1.78 vs
   1.89 ms in all); session 6 added the tensor-core path for the sub-chunks that allow it (prep 1.36 vs
   1.78 ms with trained-like gates).
2. ``_chunk_recur_kernel``, sequential over the chunks of a sequence, grid (V / BV, N * HV): keeps a
   [K, BV] fp32 state slice in registers and fuses the output:

       v_new = u - w S;   o = qg S + Aqk v_new;   S <- decay * S + kg^T v_new

   optionally storing the state entering every chunk (prefix caching, and the backward pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRET, apply_beta, cdiv, chunk_program, chunk_rows, diag_span_max, dummy, env_choice, gate_prepass,
    head_a_log, inverse_step, l2_norm_factor, load_qkg_block, load_qkg_next, midpoint_factors, next_pow2,
    norm_prepass, seq_ordered, sequence_program, subchunk_block, subchunk_column, subchunk_program,
    subchunk_takes_fast_path, subchunk_tiles, tree_factor, tree_pairs, wide_flag,
)


@triton.jit
def _row_norms(q, k, norms, row0, r, m_r, i_h, H, K, BT: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr):
    """Per-row L2-norm factors of q and k over all K channels: 1 without the in-kernel norm (L2NORM 0),
    computed here (1) or read from ``norms`` ([token, head, 2], ``utils.qk_norms``; 2)."""
    rq = tl.full([BT], 1.0, dtype=tl.float32)
    rk = tl.full([BT], 1.0, dtype=tl.float32)
    if L2NORM == 2:
        p_n = norms + ((row0 + r) * H + i_h) * 2
        rq = tl.load(p_n, mask=m_r, other=1.0)
        rk = tl.load(p_n + 1, mask=m_r, other=1.0)
    elif L2NORM:
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
        rq = l2_norm_factor(sq)
        rk = l2_norm_factor(sk)
    return rq, rk


@triton.jit
def _row_scales(q, k, beta, norms, row0, r, m_r, i_h, i_hv, H, HV, K, BT: tl.constexpr, BK: tl.constexpr,
                L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    """Per-row L2-norm factors of q and k (``_row_norms``) and the activated beta."""
    rq, rk = _row_norms(q, k, norms, row0, r, m_r, i_h, H, K, BT, BK, L2NORM)
    b_beta = tl.load(beta + (row0 + r) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    b_beta = tl.where(m_r, apply_beta(b_beta, BETA_SIGMOID, NEG_EIGVAL), 0.0)
    return rq, rk, b_beta


@triton.jit
def _store_blocks(A_qk, A_kk, d_qk, b_beta, scale, r, row_off, base, aqk_out, t_out,
                  BT: tl.constexpr, INV_PREC: tl.constexpr):
    """Write the diagonal 16 x 16 block of a sub-chunk (rows row_off + r): Aqk with its diagonal d_qk, and
    T, the inverse of I + Akk on the block, by the tree T_2B = T_B - T_B L_B T_B (see _chunk_tree_kernel).
    A_qk, A_kk hold the strictly lower pairs, unscaled."""
    off = base * BT * BT + (row_off + r)[:, None] * BT + (row_off + r)[None, :]
    A_qk = (A_qk + tl.where(r[:, None] == r[None, :], d_qk[:, None], 0.0)) * scale
    tl.store(aqk_out + off, A_qk.to(aqk_out.dtype.element_ty))
    tl.store(t_out + off, _diag_inverse(A_kk * b_beta[:, None], r, INV_PREC))


@triton.jit
def _diag_inverse(A_kk, r, INV_PREC: tl.constexpr):
    """T = (I + A_kk)^-1 of a 16 x 16 block (A_kk strictly lower, rows scaled by beta), by the tree
    T_2B = T_B - T_B L_B T_B over the levels 1, 2, 4, 8 (see _chunk_tree_kernel)."""
    Tm = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - tl.where(tree_pairs(r, 1), A_kk, 0.0)
    for lv in tl.static_range(1, 4):
        Tm = inverse_step(Tm, tl.where(tree_pairs(r, 1 << lv), A_kk, 0.0), INV_PREC)
    return Tm


@triton.jit
def _midpoint_products(q, k, g, dt_bias, rows0, r, m_r, i_h, i_hv, rq, rk, a, lower_bound, H, HV, K,
                       SK: tl.constexpr, BK: tl.constexpr, NR: tl.constexpr,
                       GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """Aqk and Akk (unscaled, strictly lower) and the diagonal q.k of the NR rows r, for tiles whose log-decay
    span is within DIAG_SPAN_MAX: exp(G_i - G_j) = ea_i * eb_j (``midpoint_factors``), one tensor-core
    product per K block and matrix."""
    A_qk = tl.zeros([NR, NR], dtype=tl.float32)
    A_kk = tl.zeros([NR, NR], dtype=tl.float32)
    d_qk = tl.zeros([NR], dtype=tl.float32)
    for kb in range(0, SK, BK):
        o_k, m_rk, bq, bk, bg = load_qkg_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a,
                                               lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
        d_qk += tl.sum(bq * bk, axis=1)
        ea, eb = midpoint_factors(bg, r)
        kb_ = tl.trans(bk * eb)
        A_qk = tl.dot(bq * ea, kb_, A_qk, input_precision=PREC)
        A_kk = tl.dot(bk * ea, kb_, A_kk, input_precision=PREC)
    below = r[:, None] > r[None, :]  # (the pairs i < j may overflow to inf: never read)
    return tl.where(below, A_qk, 0.0), tl.where(below, A_kk, 0.0), d_qk


@triton.jit
def _exact_block(bq, bk, bg, r, A_qk, A_kk, BK: tl.constexpr):
    """One K block of the exact sub-chunk pairs (``_chunk_diag_kernel``): columns j from the last to the
    first, exp(G_i - G_j) as a running product of the per-row decays exp(g) <= 1 (exact for any gate,
    underflow to 0 is exact), picked out of the [16, BK] tiles by masked sums inside the warp."""
    dec = tl.exp(bg)
    E = tl.full([16, BK], 1.0, dtype=tl.float32)
    for t in tl.static_range(15):
        j = 14 - t
        E, e, kj = subchunk_column(E, dec, bk, r, j)
        ke = e * kj[None, :]
        A_qk += tl.where(r[None, :] == j, tl.sum(bq * ke, axis=1)[:, None], 0.0)
        A_kk += tl.where(r[None, :] == j, tl.sum(bk * ke, axis=1)[:, None], 0.0)
    return A_qk, A_kk


@triton.jit
def _chunk_diag_fast_kernel(
    q, k, g, beta, norms, A_log, dt_bias, chunk_info, aqk_out, t_out, wide,
    scale, lower_bound, span_max,
    H, HV, K, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """The pairs inside one 16-row sub-chunk on tensor cores, grid (chunks * BT / 16, HV), for sub-chunks
    whose log-decay span is at most ``span_max`` in every channel: the diagonal 16 x 16 blocks of Aqk and
    T, as ``_chunk_diag_kernel``, by ``_midpoint_products``. A first pass over the gates alone finds the
    span; wider sub-chunks are marked in ``wide`` and left at once to that kernel, which is exact for any
    gate."""
    i_hv, i_h, s, base, rows0, r, m_r, a = subchunk_program(chunk_info, A_log, H, HV, BT, HAS_A)
    if subchunk_takes_fast_path(g, dt_bias, wide, rows0, r, m_r, i_hv, a, lower_bound, span_max, HV, K,
                                BK, GATE, HAS_A, HAS_BIAS):
        rq, rk, b_beta = _row_scales(q, k, beta, norms, rows0, r, m_r, i_h, i_hv, H, HV, K, 16, BK,
                                     L2NORM, BETA_SIGMOID, NEG_EIGVAL)
        A_qk, A_kk, d_qk = _midpoint_products(q, k, g, dt_bias, rows0, r, m_r, i_h, i_hv, rq, rk, a,
                                              lower_bound, H, HV, K, SK, BK, 16, GATE, HAS_A, HAS_BIAS, PREC)
        _store_blocks(A_qk, A_kk, d_qk, b_beta, scale, r, s * 16, base, aqk_out, t_out, BT, INV_PREC)


@triton.jit
def _chunk_diag_kernel(
    q, k, g, beta, norms, A_log, dt_bias, chunk_info, aqk_out, t_out, wide,
    scale, lower_bound,
    H, HV, K, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, INV_PREC: tl.constexpr,
):
    """The pairs inside one 16-row sub-chunk for any gate, grid (chunks * BT / 16, HV): the sub-chunks
    ``_chunk_diag_fast_kernel`` marked in ``wide`` (the others return at once). Writes the diagonal
    16 x 16 blocks of Aqk and of T (the inverse of I + Akk restricted to the block) in place in
    ``aqk_out`` and ``t_out`` for the tree kernel.

    Columns j from the last to the first: E_i = exp(g_(j+1) + ... + g_i) grows by one decay factor
    exp(g) <= 1 per step, a product of factors <= 1, so exact for any gate (no reference row, no
    cancellation, underflow to 0 is exact). [16, BK] tiles on CUDA cores, one warp: the rows j are
    picked out of the tiles by masked sums inside the warp (no shared-memory round trips).
    """
    if tl.load(wide_flag(wide)) != 0:
        i_hv, i_h, s, base, rows0, r, m_r, a = subchunk_program(chunk_info, A_log, H, HV, BT, HAS_A)
        rq, rk, b_beta = _row_scales(q, k, beta, norms, rows0, r, m_r, i_h, i_hv, H, HV, K, 16, BK,
                                     L2NORM, BETA_SIGMOID, NEG_EIGVAL)
        A_qk = tl.zeros([16, 16], dtype=tl.float32)
        A_kk = tl.zeros([16, 16], dtype=tl.float32)
        d_qk = tl.zeros([16], dtype=tl.float32)
        for kb in range(0, SK, BK):
            o_k, m_rk, bq, bk, bg = load_qkg_block(q, k, g, dt_bias, kb, rows0, r, m_r, i_h, i_hv, rq, rk, a,
                                                   lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
            d_qk += tl.sum(bq * bk, axis=1)
            A_qk, A_kk = _exact_block(bq, bk, bg, r, A_qk, A_kk, BK)
        _store_blocks(A_qk, A_kk, d_qk, b_beta, scale, r, s * 16, base, aqk_out, t_out, BT, INV_PREC)


@triton.jit
def _level_products(bq, bk, f, keep, A_qk, A_kk, PREC: tl.constexpr):
    """Add one tree level's pairs (``keep``) to Aqk and Akk (unscaled): (q f)(k f)^T and (k f)(k f)^T."""
    fk = bk * f
    A_qk += tl.where(keep, tl.dot(bq * f, tl.trans(fk), input_precision=PREC), 0.0)
    A_kk += tl.where(keep, tl.dot(fk, tl.trans(fk), input_precision=PREC), 0.0)
    return A_qk, A_kk


@triton.jit
def _chunk_tree_kernel(
    q, k, g, beta, norms, A_log, dt_bias, chunk_info, aqk_out, t_out,
    scale, lower_bound,
    H, HV, K, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, LEVELS: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr, ABLATE: tl.constexpr = 0,
):
    """The pairs between the 16-row sub-chunks of one chunk, grid (chunks, HV), after
    ``_chunk_diag_kernel`` wrote the diagonal blocks of Aqk and T: completes Aqk and T = (I + Akk)^-1.
    Every pairwise decay exact for any gate, every product on tensor cores.

    Pairs by a binary tree over the chunk's rows: at level B (16, 32, ..., BT/2) the pairs are i in an
    odd B-block and j in the even B-block just before it, and exp(G_i - G_j) = f_i * f_j with f the
    level's per-row factors (``tree_factor``: sums of at most B same-sign gates of one block, never two
    long cumulative sums, so nothing overflows or cancels; underflow to 0 is exact). One masked
    [BT, BK] x [BK, BT] product per level and matrix.

    T by the same tree: with T_B the inverse of I + (Akk on the pairs inside B-blocks),
    T_2B = T_B - T_B L_B T_B where L_B is Akk on the pairs of level B (T_B L_B squares to zero), from
    the diagonal kernel's T_16. Every step inverts a real sub-block, so nothing grows as in a Neumann
    series.
    """
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    r = tl.arange(0, BT)
    m_r = r < n_rows
    a = head_a_log(A_log, i_hv, HAS_A)
    rq, rk, b_beta = _row_scales(q, k, beta, norms, row0, r, m_r, i_h, i_hv, H, HV, K, BT, BK,
                                 L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    A_qk = tl.zeros([BT, BT], dtype=tl.float32)
    A_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, SK, BK):
        _, _, _, _, bq, bk, bg, bgn = load_qkg_next(q, k, g, dt_bias, kb, row0, r, m_r, n_rows, i_h, i_hv, rq, rk,
                                                    a, lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
        # ABLATE (profiling only, wrong results): bit 1 drops the dot levels, bit 2 the inverse's steps.
        for lv in tl.static_range(4, 4 if (ABLATE & 1) else LEVELS):
            A_qk, A_kk = _level_products(bq, bk, tree_factor(bg, bgn, r, BT, BK, 1 << lv),
                                         tree_pairs(r, 1 << lv), A_qk, A_kk, PREC)
    off = base * BT * BT + r[:, None] * BT + r[None, :]
    diag = (r[:, None] // 16) == (r[None, :] // 16)  # the diagonal kernel's blocks, already stored
    tl.store(aqk_out + off, (A_qk * scale).to(aqk_out.dtype.element_ty), mask=~diag)
    A_kk = A_kk * b_beta[:, None]
    Tm = tl.load(t_out + off, mask=diag, other=0.0)
    for lv in tl.static_range(4, 4 if (ABLATE & 2) else LEVELS):
        Tm = inverse_step(Tm, tl.where(tree_pairs(r, 1 << lv), A_kk, 0.0), INV_PREC)
    tl.store(t_out + off, Tm, mask=~diag)


@triton.jit
def _sub_block_store(ptr, base, I: tl.constexpr, J: tl.constexpr, x, BT: tl.constexpr = 64):
    """Store the [16, 16] block (rows of sub-chunk I, columns of J) of a chunk's [BT, BT] matrix."""
    off, _ = subchunk_block(I, J, BT)
    tl.store(ptr + base * BT * BT + off, x.to(ptr.dtype.element_ty))


@triton.jit
def _sub_block_zeros(aqk_out, t_out, base, I: tl.constexpr, J: tl.constexpr, BT: tl.constexpr = 64):
    z = tl.zeros([16, 16], dtype=tl.float32)
    _sub_block_store(aqk_out, base, I, J, z, BT)
    _sub_block_store(t_out, base, I, J, z, BT)


@triton.jit
def _sub_block_load(ptr, base, I: tl.constexpr, J: tl.constexpr, BT: tl.constexpr = 64):
    off, _ = subchunk_block(I, J, BT)
    return tl.load(ptr + base * BT * BT + off)


@triton.jit
def _adjacent_pair(x_i, y_i, f_i, y_j, v_j, q_acc, k_acc, PREC: tl.constexpr):
    """The tree's level 16 for sub-chunk i and the one before it, j: the Aqk and Akk (unscaled) block
    products, with row factors exp(sum of i's gates from its start to the row) and column factors
    exp(sum of j's gates after the column's row to its end), both <= 1."""
    e_i = tl.exp(tl.minimum(f_i, 0.0))
    c_j = tl.trans(y_j * tl.exp(tl.minimum(v_j, 0.0)))
    return (tl.dot(x_i * e_i, c_j, q_acc, input_precision=PREC),
            tl.dot(y_i * e_i, c_j, k_acc, input_precision=PREC))


@triton.jit
def _chunk_tree_subchunk_kernel(
    q, k, g, beta, norms, A_log, dt_bias, chunk_info, aqk_out, t_out,
    scale, lower_bound,
    H, HV, K,
    BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """At 64-row chunks, in place of ``_chunk_tree_kernel`` (``KIMI_LINEAR_KDA_TREE=masked`` opts out):
    the same pairs and factors on the four 16-row sub-chunks as separate [16, BK] tiles. Level 16 is
    the block pairs (1, 0) and (3, 2), level 32 the pairs {2, 3} x {0, 1}; each is a [16, BK] x [BK, 16]
    product (not a [64, 64] one masked to an eighth or a quarter). T by block forward substitution from
    the diagonal kernel's blocks D_s: T_ij = -D_i sum_{j <= m < i} A_im T_mj, the same products as the
    tree's steps. Writes the off-diagonal blocks of Aqk and T (zeros above the diagonal)."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    a = head_a_log(A_log, i_hv, HAS_A)
    r0 = tl.arange(0, 16)
    rq0, rk0, b0 = _row_scales(q, k, beta, norms, row0, r0, r0 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    rq1, rk1, b1 = _row_scales(q, k, beta, norms, row0, r0 + 16, r0 + 16 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    rq2, rk2, b2 = _row_scales(q, k, beta, norms, row0, r0 + 32, r0 + 32 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    rq3, rk3, b3 = _row_scales(q, k, beta, norms, row0, r0 + 48, r0 + 48 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    z = tl.zeros([16, 16], dtype=tl.float32)
    q10, k10, q32, k32 = z, z, z, z
    q20, k20, q21, k21, q30, k30, q31, k31 = z, z, z, z, z, z, z, z
    for kb in range(0, K, BK):
        _, _, _, x0, y0, g0, f0, v0 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq0, rk0, a, lower_bound, H, HV, K, 0, BK,
            GATE, HAS_A, HAS_BIAS)
        _, _, _, x1, y1, g1, f1, v1 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq1, rk1, a, lower_bound, H, HV, K, 1, BK,
            GATE, HAS_A, HAS_BIAS)
        _, _, _, x2, y2, g2, f2, v2 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq2, rk2, a, lower_bound, H, HV, K, 2, BK,
            GATE, HAS_A, HAS_BIAS)
        _, _, _, x3, y3, g3, f3, v3 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq3, rk3, a, lower_bound, H, HV, K, 3, BK,
            GATE, HAS_A, HAS_BIAS)
        # Level 16: rows of 1 (3) from their sub-chunk start, columns of 0 (2) to their sub-chunk end.
        q10, k10 = _adjacent_pair(x1, y1, f1, y0, v0, q10, k10, PREC)
        q32, k32 = _adjacent_pair(x3, y3, f3, y2, v2, q32, k32, PREC)
        # Level 32: rows of 2, 3 from row 32, columns of 0, 1 up to row 31 (sums of one half-chunk's gates).
        e2 = tl.exp(tl.minimum(f2, 0.0))
        e3 = tl.exp(tl.minimum(f3 + tl.sum(g2, axis=0)[None, :], 0.0))
        c1 = tl.trans(y1 * tl.exp(tl.minimum(v1, 0.0)))
        c0 = tl.trans(y0 * tl.exp(tl.minimum(v0 + tl.sum(g1, axis=0)[None, :], 0.0)))
        xe2, ye2, xe3, ye3 = x2 * e2, y2 * e2, x3 * e3, y3 * e3
        q20 = tl.dot(xe2, c0, q20, input_precision=PREC)
        k20 = tl.dot(ye2, c0, k20, input_precision=PREC)
        q21 = tl.dot(xe2, c1, q21, input_precision=PREC)
        k21 = tl.dot(ye2, c1, k21, input_precision=PREC)
        q30 = tl.dot(xe3, c0, q30, input_precision=PREC)
        k30 = tl.dot(ye3, c0, k30, input_precision=PREC)
        q31 = tl.dot(xe3, c1, q31, input_precision=PREC)
        k31 = tl.dot(ye3, c1, k31, input_precision=PREC)
    _sub_block_store(aqk_out, base, 1, 0, q10 * scale)
    _sub_block_store(aqk_out, base, 3, 2, q32 * scale)
    _sub_block_store(aqk_out, base, 2, 0, q20 * scale)
    _sub_block_store(aqk_out, base, 2, 1, q21 * scale)
    _sub_block_store(aqk_out, base, 3, 0, q30 * scale)
    _sub_block_store(aqk_out, base, 3, 1, q31 * scale)
    # T = (I + Akk)^-1 by blocks, Akk rows scaled by beta.
    a10, a32 = k10 * b1[:, None], k32 * b3[:, None]
    a20, a21 = k20 * b2[:, None], k21 * b2[:, None]
    a30, a31 = k30 * b3[:, None], k31 * b3[:, None]
    d0 = _sub_block_load(t_out, base, 0, 0)
    d1 = _sub_block_load(t_out, base, 1, 1)
    d2 = _sub_block_load(t_out, base, 2, 2)
    d3 = _sub_block_load(t_out, base, 3, 3)
    t10 = -tl.dot(d1, tl.dot(a10, d0, input_precision=INV_PREC), input_precision=INV_PREC)
    t21 = -tl.dot(d2, tl.dot(a21, d1, input_precision=INV_PREC), input_precision=INV_PREC)
    t32 = -tl.dot(d3, tl.dot(a32, d2, input_precision=INV_PREC), input_precision=INV_PREC)
    s20 = tl.dot(a21, t10, tl.dot(a20, d0, input_precision=INV_PREC), input_precision=INV_PREC)
    t20 = -tl.dot(d2, s20, input_precision=INV_PREC)
    s31 = tl.dot(a32, t21, tl.dot(a31, d1, input_precision=INV_PREC), input_precision=INV_PREC)
    t31 = -tl.dot(d3, s31, input_precision=INV_PREC)
    s30 = tl.dot(a31, t10, tl.dot(a30, d0, input_precision=INV_PREC), input_precision=INV_PREC)
    s30 = tl.dot(a32, t20, s30, input_precision=INV_PREC)
    t30 = -tl.dot(d3, s30, input_precision=INV_PREC)
    _sub_block_store(t_out, base, 1, 0, t10)
    _sub_block_store(t_out, base, 2, 1, t21)
    _sub_block_store(t_out, base, 3, 2, t32)
    _sub_block_store(t_out, base, 2, 0, t20)
    _sub_block_store(t_out, base, 3, 1, t31)
    _sub_block_store(t_out, base, 3, 0, t30)
    _sub_block_zeros(aqk_out, t_out, base, 0, 1)  # the blocks above the diagonal
    _sub_block_zeros(aqk_out, t_out, base, 0, 2)
    _sub_block_zeros(aqk_out, t_out, base, 0, 3)
    _sub_block_zeros(aqk_out, t_out, base, 1, 2)
    _sub_block_zeros(aqk_out, t_out, base, 1, 3)
    _sub_block_zeros(aqk_out, t_out, base, 2, 3)


@triton.jit
def _chunk_pair_subchunk_kernel(
    q, k, g, beta, norms, A_log, dt_bias, chunk_info, aqk_out, t_out,
    scale, lower_bound,
    H, HV, K,
    BK: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """``_chunk_tree_subchunk_kernel`` for 32-row chunks: the tree's one level (16) is the block pair
    (1, 0), a [16, BK] x [BK, 16] product per K block; T_10 = -D_1 A_10 D_0. Writes the blocks (1, 0) of
    Aqk and T and zeros in (0, 1)."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV)
    a = head_a_log(A_log, i_hv, HAS_A)
    r0 = tl.arange(0, 16)
    rq0, rk0, b0 = _row_scales(q, k, beta, norms, row0, r0, r0 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    rq1, rk1, b1 = _row_scales(q, k, beta, norms, row0, r0 + 16, r0 + 16 < n_rows, i_h, i_hv, H, HV, K, 16, BK,
                               L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    q10 = tl.zeros([16, 16], dtype=tl.float32)
    k10 = tl.zeros([16, 16], dtype=tl.float32)
    for kb in range(0, K, BK):
        _, _, _, x0, y0, g0, f0, v0 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq0, rk0, a, lower_bound, H, HV, K, 0, BK,
            GATE, HAS_A, HAS_BIAS)
        _, _, _, x1, y1, g1, f1, v1 = subchunk_tiles(
            q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq1, rk1, a, lower_bound, H, HV, K, 1, BK,
            GATE, HAS_A, HAS_BIAS)
        q10, k10 = _adjacent_pair(x1, y1, f1, y0, v0, q10, k10, PREC)
    _sub_block_store(aqk_out, base, 1, 0, q10 * scale, 32)
    d0 = _sub_block_load(t_out, base, 0, 0, 32)
    d1 = _sub_block_load(t_out, base, 1, 1, 32)
    t10 = -tl.dot(d1, tl.dot(k10 * b1[:, None], d0, input_precision=INV_PREC), input_precision=INV_PREC)
    _sub_block_store(t_out, base, 1, 0, t10, 32)
    _sub_block_zeros(aqk_out, t_out, base, 0, 1, 32)  # the block above the diagonal


@triton.jit
def _chunk_wy_kernel(
    q, k, v, g, beta, norms, A_log, dt_bias, chunk_info, t_in,
    w_out, u_out, qg_out, kg_out, decay_out,
    scale, lower_bound,
    H, HV, K, V, SK: tl.constexpr, SV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, WY_PREC: tl.constexpr,
    CUMG: tl.constexpr = False, ready=None, STREAM_GROUP: tl.constexpr = 0,
):
    """Second half of the split prep, grid (chunks, HV): from the stored T, w = T (beta k e^G), u = T (beta v),
    qg, kg and the chunk's decay e^(G_C) (stored as its exponential, so the recurrences and the backward
    sweep take no exp of it per step). Decays relative to the chunk start (e^G) and to its end
    (e^(G_C - G)) are direct sums, so all <= 1. (Session 7 fused this into the tree kernel, which saved the
    second pass over q and k for the row norms and the load of T, but the tree kernel's extra registers
    cost more: prep 1.54 vs 1.42 ms at T=8K, H200.)

    ``STREAM_GROUP`` > 0 (one sequence, grid (HV, chunks): chunk by chunk): when its stores are done the
    program adds 1 to ``ready[chunk // STREAM_GROUP, head]`` with release semantics, so that a recurrence
    running beside it (``_chunk_recur_kernel`` with the same group) can start on a group as soon as its
    chunks are written."""
    i_c, i_hv, i_h, row0, n_rows, base = chunk_program(chunk_info, H, HV, STREAM_GROUP > 0)
    r = tl.arange(0, BT)
    m_r = r < n_rows
    a = head_a_log(A_log, i_hv, HAS_A)
    rq, rk, b_beta = _row_scales(q, k, beta, norms, row0, r, m_r, i_h, i_hv, H, HV, K, BT, BK,
                                 L2NORM, BETA_SIGMOID, NEG_EIGVAL)
    Tm = tl.load(t_in + base * BT * BT + r[:, None] * BT + r[None, :])
    for kb in range(0, SK, BK):
        o_k, m_rk, bq, bk, bg = load_qkg_block(q, k, g, dt_bias, kb, row0, r, m_r, i_h, i_hv, rq, rk, a, lower_bound,
                                               H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
        if CUMG:  # g holds the within-chunk cumulative log decay G (gate_chunk_prepass)
            g_last = tl.load(g + ((row0 + n_rows - 1) * HV + i_hv) * K + o_k, mask=o_k < K, other=0.0)
            e_start = tl.exp(bg)
            # (G_C - G_i cancels in float32 after -1000-nat gates: an exponent error of about |G| 2^-24)
            e_end = tl.exp(tl.minimum(g_last[None, :] - bg, 0.0))
            g_tot = g_last
        else:
            e_start = tl.exp(tl.cumsum(bg, axis=0))
            e_end = tl.exp(tl.minimum(tl.cumsum(bg, axis=0, reverse=True) - bg, 0.0))
            g_tot = tl.sum(bg, axis=0)
        p_o = base * BT * SK + r[:, None] * SK + o_k[None, :]
        m_o = (r < BT)[:, None] & (o_k < SK)[None, :]
        tl.store(qg_out + p_o, (bq * e_start * scale).to(qg_out.dtype.element_ty), mask=m_o)
        tl.store(kg_out + base * BT * SK + o_k[None, :] * BT + r[:, None], (bk * e_end).to(kg_out.dtype.element_ty),
                 mask=m_o)
        tl.store(decay_out + base * SK + o_k, tl.where(o_k < K, tl.exp(g_tot), 0.0), mask=o_k < SK)
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
    if STREAM_GROUP > 0:
        tl.debug_barrier()  # (every thread's stores are issued before the release)
        tl.atomic_add(ready + (i_c // STREAM_GROUP) * HV + i_hv, 1, sem="release")


@triton.jit
def _recur_chunk(c, S, w, u, qg, kg, aqk, decay, chunk_info, states, o, v_new_out, i_hv, r, o_k, o_v, m_kv, m_v,
                 m_ks, m_vs, HV, K, V, SK: tl.constexpr, SV: tl.constexpr, BT: tl.constexpr,
                 STORE_STATES: tl.constexpr, DOT_DTYPE: tl.constexpr, STORE_O: tl.constexpr,
                 STORE_VNEW: tl.constexpr):
    """One chunk of the recurrence: the output from the state entering chunk c, then the state leaving it."""
    base = (c * HV + i_hv).to(tl.int64)
    if STORE_STATES:
        tl.store(states + (base * K + o_k[:, None]) * V + o_v[None, :], S.to(states.dtype.element_ty), mask=m_kv)
    p_k = base * BT * SK + r[:, None] * SK + o_k[None, :]
    b_w = tl.load(w + p_k, mask=m_ks[None, :], other=0.0)
    if STORE_O:  # (the backward's state rebuild needs no output; loads kept in this order, as measured)
        b_qg = tl.load(qg + p_k, mask=m_ks[None, :], other=0.0)
    b_kgt = tl.load(kg + base * BT * SK + o_k[:, None] * BT + r[None, :], mask=m_ks[:, None], other=0.0)
    b_u = tl.load(u + base * BT * SV + r[:, None] * SV + o_v[None, :], mask=m_vs[None, :], other=0.0).to(tl.float32)
    if STORE_O:
        b_a = tl.load(aqk + base * BT * BT + r[:, None] * BT + r[None, :])
    b_decay = tl.load(decay + base * SK + o_k, mask=m_ks, other=0.0)
    Sd = S.to(DOT_DTYPE)
    v_new = b_u - tl.dot(b_w.to(DOT_DTYPE), Sd)
    if STORE_VNEW:  # (for the backward's gradient kernel; [chunk, head, row, V], fp32 or 16-bit)
        tl.store(v_new_out + (base * BT + r[:, None]) * V + o_v[None, :], v_new.to(v_new_out.dtype.element_ty),
                 mask=m_v[None, :])
    vd = v_new.to(DOT_DTYPE)
    if STORE_O:
        b_o = tl.dot(b_qg.to(DOT_DTYPE), Sd) + tl.dot(b_a.to(DOT_DTYPE), vd)
        row0, n_rows = chunk_rows(chunk_info, c)
        tl.store(o + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=(r < n_rows)[:, None] & m_v[None, :])
    return S * b_decay[:, None] + tl.dot(b_kgt.to(DOT_DTYPE), vd)


@triton.jit
def _chunk_recur_kernel(
    w, u, qg, kg, aqk, decay, chunk_info, seq_chunks, h0, ht, states, o, v_new_out,
    HV, K, V, SK: tl.constexpr, SV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_STATES: tl.constexpr, DOT_DTYPE: tl.constexpr,
    STORE_O: tl.constexpr = True, STORE_VNEW: tl.constexpr = False,
    ready=None, STREAM_GROUP: tl.constexpr = 0, SPIN_LIMIT: tl.constexpr = 0, ORDERED: tl.constexpr = False,
):
    """The sequential pass, one program per (V slice, sequence, head). ``STREAM_GROUP`` > 0 (one sequence,
    its chunk range starting at chunk 0): before each group of that many chunks the program waits until
    ``ready[group, head]`` counts the group's chunks (the w/u kernel, running beside it, adds one per chunk
    written), then runs the group. The wait sits outside the group's loop, so the loads the loop
    prefetches are issued after it. ``SPIN_LIMIT`` bounds the wait (the interpreter runs the w/u kernel
    first, so there it passes at once or the results are wrong, never a hang)."""
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV, ORDERED)
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
    if STREAM_GROUP > 0:
        for g0 in range(c0, c1, STREAM_GROUP):
            g1 = tl.minimum(g0 + STREAM_GROUP, c1)
            flag = ready + (g0 // STREAM_GROUP) * HV + i_hv
            # (an acquire that reads the group's full count synchronizes with every w/u program's release;
            # one thread reads it (triton 3.6 emits ld.acquire.gpu for an add of 0) and shares it through a
            # barrier, which orders the other threads' loads after it. A separate acquire after a volatile
            # spin was dropped by the compiler, its result being unused.)
            spins = 0
            while (tl.atomic_add(flag, 0, sem="acquire") < g1 - g0) & (spins < SPIN_LIMIT):
                spins += 1
            tl.debug_barrier()
            for c in range(g0, g1):
                S = _recur_chunk(c, S, w, u, qg, kg, aqk, decay, chunk_info, states, o, v_new_out, i_hv, r, o_k, o_v,
                                 m_kv, m_v, m_ks, m_vs, HV, K, V, SK, SV, BT, STORE_STATES, DOT_DTYPE, STORE_O,
                                 STORE_VNEW)
    else:
        for c in range(c0, c1):
            S = _recur_chunk(c, S, w, u, qg, kg, aqk, decay, chunk_info, states, o, v_new_out, i_hv, r, o_k, o_v,
                             m_kv, m_v, m_ks, m_vs, HV, K, V, SK, SV, BT, STORE_STATES, DOT_DTYPE, STORE_O,
                             STORE_VNEW)
    if STORE_HT:
        tl.store(ht + p_s, S, mask=m_kv)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# The last compiled kernel of each launcher (the benchmarks read registers and spills from it).
LAUNCHED: dict = {}


# Chunk layouts by shape (fixed length) or by the host offsets (varlen), oldest dropped first: building
# one costs about ten small device ops (fixed) or host work and an upload (varlen) per call, and a model
# calls every layer with the same layout (read-only tensors, so sharing them between calls is safe).
_LAYOUTS: dict = {}
_LAYOUTS_MAX = 64
# Layouts a CUDA graph captured from the cache: a graph reads them at every replay, so they are never
# dropped (dropping one from _LAYOUTS alone would free memory a graph still reads).
_GRAPH_LAYOUTS: dict = {}


def _fixed_layout(B: int, T: int, BT: int, device):
    nt = cdiv(T, BT)
    c = torch.arange(B * nt, device=device, dtype=torch.int64)
    j = c % nt
    start = (c // nt) * T + j * BT
    rows = torch.clamp(T - j * BT, max=BT)
    info = torch.stack([start, rows], dim=1).to(torch.int32)
    seq = torch.arange(B + 1, device=device, dtype=torch.int32) * nt
    return info, seq


def _varlen_layout(cu, BT: int, device):
    """The layout of the sequences at host offsets ``cu`` (int64 CPU tensor), built on the host and
    uploaded without waiting for the device (the copy from pageable memory is staged at once). With
    sequences of different chunk counts, seq_chunks also lists the sequences longest first after its
    offsets (``utils.sequence_program``): the recurrence's programs start in grid order, so the longest
    chains start first instead of waiting behind short ones for a free slot."""
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + BT - 1) // BT
    seq = torch.zeros(len(per_seq) + 1, dtype=torch.int64)
    seq[1:] = torch.cumsum(per_seq, 0)
    sid = torch.repeat_interleave(torch.arange(len(per_seq)), per_seq)
    j = torch.arange(int(seq[-1])) - seq[:-1][sid]  # chunk index within its sequence
    info = torch.stack([cu[:-1][sid] + j * BT, torch.clamp(lens[sid] - j * BT, max=BT)], dim=1)
    if len(per_seq) > 1 and bool((per_seq != per_seq[0]).any()) and seq_order() == "longest":
        seq = torch.cat([seq, torch.sort(per_seq, descending=True, stable=True).indices])
    return (info.to(torch.int32).to(device, non_blocking=True), seq.to(torch.int32).to(device, non_blocking=True))


def seq_order() -> str:
    """``KIMI_LINEAR_KDA_SEQ_ORDER``: ``longest`` (default) starts the sequential kernels' programs of a
    varlen batch longest sequence first, ``given`` in the batch's order (H200, session 18: a 9-sequence,
    32K-token varlen forward 4.20 ms against 4.54)."""
    return env_choice("KIMI_LINEAR_KDA_SEQ_ORDER", "longest", ("longest", "given"))


def chunk_layout(shapes, cu_seqlens, BT: int, device):
    """Chunk list over the flattened token axis (B*T for fixed length: B sequences of T).

    Returns (chunk_info int32 [NC, 2] = (first token, rows), seq_chunks int32 [N + 1] (chunk offsets per
    sequence), or [2N + 1] for a varlen batch run longest first (the offsets, then the program order)).
    Fixed-length batches build it on the device, varlen ones on the host from ``shapes.cu`` (the checks'
    host copy of cu_seqlens; copied here only when absent), so with ``cu_seqlens_cpu`` given a call makes
    no host synchronisation. Cached per shape or offsets (``_LAYOUTS``); nothing is added to the cache
    during a CUDA-graph capture (the tensors would live in the graph's private pool), and a cached layout a
    capture uses is kept for good (``_GRAPH_LAYOUTS``).
    """
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cu_seqlens is None:
        key = ("fixed", shapes.B, shapes.T, BT, str(device))
    else:
        if shapes.cu is None and capturing:
            raise RuntimeError("chunk_kda with cu_seqlens inside a CUDA-graph capture needs cu_seqlens_cpu (the "
                               "offsets on the host), and a call with the same offsets before the capture")
        # (a vectorized host build: a Python loop over the chunks cost more than the kernels' savings at
        # 16-row chunks; H200, session 13: a 32K varlen forward 6.9 ms)
        cu = shapes.cu if shapes.cu is not None else tuple(cu_seqlens.to("cpu").tolist())
        key = ("varlen", cu, BT, str(device), seq_order())
    if key in _LAYOUTS:
        if capturing:
            _GRAPH_LAYOUTS[key] = _LAYOUTS[key]
        return _LAYOUTS[key]
    if key in _GRAPH_LAYOUTS:
        return _GRAPH_LAYOUTS[key]
    if cu_seqlens is None:
        layout = _fixed_layout(shapes.B, shapes.T, BT, device)
    else:
        if capturing:  # (an upload from pageable host memory cannot be captured)
            raise RuntimeError("chunk_kda with cu_seqlens inside a CUDA-graph capture: call it once with the same "
                               "offsets before the capture, so that their chunk layout is built and kept")
        layout = _varlen_layout(torch.tensor(cu, dtype=torch.int64), BT, device)
    if not capturing:
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            del _LAYOUTS[next(iter(_LAYOUTS))]
        _LAYOUTS[key] = layout
    return layout


def storage_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the chunk intermediates (w, u, qg, kg, Aqk): the input's 16-bit type, else float32.

    16-bit intermediates halve their traffic and run the recurrence's products on bf16/fp16 tensor
    cores. ``KIMI_LINEAR_KDA_STORE=fp32`` keeps them in float32 (tf32 products). (An earlier unpadded
    layout gave wrong bf16 results on triton 3.6 for K=60 / V=100; padded to powers of two, the GPU
    suite passes.)
    """
    store = env_choice("KIMI_LINEAR_KDA_STORE", "16bit", ("16bit", "fp32"))
    if store == "16bit" and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return torch.float32


def prep_buffers(NC, shapes, BT, dtype, *, pad=False, aqk_dtype=None, u_dtype=None, with_aqk=True, with_t=True,
                 device=None):
    """Empty chunk-major outputs of ``chunk_prep`` for NC chunks: (w, u, qg, kg, Aqk or None, decay, T or None)."""
    HV, K, V = shapes.HV, shapes.K, shapes.V
    SK, SV = (next_pow2(max(K, 16)), next_pow2(max(V, 16))) if pad else (K, V)
    w = torch.empty(NC, HV, BT, SK, device=device, dtype=dtype)
    qg = torch.empty_like(w)
    kg = torch.empty(NC, HV, SK, BT, device=device, dtype=dtype)  # transposed
    u = torch.empty(NC, HV, BT, SV, device=device, dtype=u_dtype or dtype)
    decay = torch.empty(NC, HV, SK, device=device, dtype=torch.float32)
    aqk = torch.empty(NC, HV, BT, BT, device=device, dtype=aqk_dtype or dtype) if with_aqk else None
    t = torch.empty(NC, HV, BT, BT, device=device, dtype=torch.float32) if with_t else None  # (T: always written)
    return w, u, qg, kg, aqk, decay, t


def chunk_prep(q, k, v, g, beta, chunk_info, *, scale, shapes, gate, A_log, dt_bias, lower_bound,
               l2norm, beta_sigmoid, neg_eigval, BT, dtype, pad=False, store_t=False, aqk_dtype=None,
               t_given=None, u_dtype=None, g_act=None, norms=None, g_cum=None, out=None, stream_plan=None):
    """Launch the chunk-local kernels. Returns (w, u, qg, kg, Aqk, decay = e^gC) in chunk-major layout, plus
    T = (I + Akk)^-1 ([NC, HV, BT, BT] fp32) when ``store_t``.

    ``pad`` widens the K and V axes of the intermediates to powers of two (zeros past K and V), so the
    recurrence loads them without masks. ``aqk_dtype`` and ``u_dtype`` override the storage type of Aqk
    (the forward keeps an fp32 Aqk for the backward) and of u. With ``t_given`` (T of an earlier call on
    the same inputs) only the w/u launch runs, from that T, and Aqk is returned as None. With an in-kernel
    gate and ``gate_once`` the kernels read the activated gate (``g_act``, or ``activate_gate``'s here)
    instead of activating the raw one each; with the in-kernel L2 norm and ``norm_once`` they read the
    norm factors (``norms``, or ``qk_norms``' here) instead of computing them each. With ``g_cum``
    (``gate_chunk_prepass``' within-chunk cumulative log decay, same chunks) the w/u launch reads it
    instead of summing the gate itself. ``out`` (``prep_buffers``' tuple, or views of one over these
    chunks) receives the results instead of new tensors. ``stream_plan`` (``overlap.StreamPlan``): the w/u launch
    runs chunk by chunk and counts each chunk written in ``stream_plan.ready``, and its ``before_wy()`` is
    called just before it (to let a recurrence start beside it).
    """
    import os

    # H200, session 10, T=8K, H=32: the in-register activation cost the forward's prep kernels 0.21 ms
    # (and the forward + backward 0.6 ms) against a pre-activated gate.
    g_act = gate_prepass(g, A_log, dt_bias, lower_bound, gate, g_act)
    if g_act is not None:
        g, gate, A_log, dt_bias = g_act, 0, None, None

    H, HV, K, V = shapes.H, shapes.HV, shapes.K, shapes.V
    NC = chunk_info.shape[0]
    dev = q.device
    SK, SV = (next_pow2(max(K, 16)), next_pow2(max(V, 16))) if pad else (K, V)
    if out is None:
        out = prep_buffers(NC, shapes, BT, dtype, pad=pad, aqk_dtype=aqk_dtype, u_dtype=u_dtype,
                           with_aqk=t_given is None, with_t=t_given is None, device=dev)
    w, u, qg, kg, aqk, decay, t = out
    if t_given is not None:
        aqk, t = None, t_given
    outs = (w, u, qg, kg, aqk, decay) + ((t,) if store_t else ())
    if NC == 0:
        return outs
    # K blocks and warps; env overrides for tuning. Measured on an H200 at T=8K, H=32, K=V=128, bf16
    # (docs/benchmarks.md, session 4): tree kernel BK=32 1.19 ms vs 2.0 at BK=64; w/u kernel BK=32 434 us
    # vs 500 at BK=16 and 1190 at BK=128; 8 warps slower for both (and gave wrong T in a tree variant).
    env = os.environ.get
    warps = prep_warps(BT)
    BK = max(16, min(int(env("KIMI_LINEAR_KDA_PREP_BK", 32)), next_pow2(K)))
    BV = max(16, min(int(env("KIMI_LINEAR_KDA_PREP_BV", 64)), next_pow2(V)))
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    # Sub-chunk kernels, one warp each: the exact one with K blocks of 64 (session 5, H200, T=8K, whole
    # forward: 1.78 ms vs 1.92 at BK 32, 2.1 at BK 16; 2.6 / 3.1 ms with 2 / 4 warps at BK 32), the
    # tensor-core one with K blocks of 32 (session 6: prep 1.333 vs 1.358 ms at BK 64, 1.40 / 1.60 with
    # 2 / 4 warps; one-pass version of the kernel).
    DIAG_BK = max(16, min(int(env("KIMI_LINEAR_KDA_DIAG_BK", 64)), next_pow2(K)))
    diag_warps = int(env("KIMI_LINEAR_KDA_DIAG_WARPS", 1))
    FAST_BK = max(16, min(int(env("KIMI_LINEAR_KDA_DIAG_FAST_BK", 32)), next_pow2(K)))
    fast_warps = int(env("KIMI_LINEAR_KDA_DIAG_FAST_WARPS", 1))
    d = dummy(dev)
    a_log = A_log if A_log is not None else d
    bias = dt_bias if dt_bias is not None else d
    lb = float(lower_bound) if lower_bound is not None else 0.0
    # The L2-norm factors once for every launch (``norm_once``: L2NORM 2, read), else per kernel (1).
    nrm = norm_prepass(q, k, l2norm, norms)
    l2, nrm = (int(l2norm), d) if nrm is None else (2, nrm)
    inputs = dict(GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, L2NORM=l2,
                  BETA_SIGMOID=beta_sigmoid, NEG_EIGVAL=neg_eigval, SK=SK, BK=BK, num_warps=warps, num_stages=1)
    if t_given is None:
        # Pairs inside 16-row sub-chunks (CUDA cores), then the pairs between them (tensor cores). The
        # inverse's tree steps in tf32 for 16-bit inputs: T moved by 9e-6 relative against tf32x3, which
        # cost 0.8 ms more at T=8K (H200).
        grid = (NC * (BT // 16), HV)
        wide = torch.empty(HV, grid[0], device=dev, dtype=torch.int8)
        LAUNCHED["diag_fast"] = _chunk_diag_fast_kernel[grid](
            q, k, g, beta, nrm, a_log, bias, chunk_info, aqk, t, wide, float(scale), lb, diag_span_max(), H, HV, K,
            BT=BT, PREC=prec, INV_PREC=prec, **dict(inputs, BK=FAST_BK, num_warps=fast_warps))
        LAUNCHED["diag_wide"] = wide  # (benchmarks and tests read the share of wide sub-chunks)
        LAUNCHED["diag"] = _chunk_diag_kernel[grid](
            q, k, g, beta, nrm, a_log, bias, chunk_info, aqk, t, wide, float(scale), lb, H, HV, K,
            BT=BT, INV_PREC=prec, **dict(inputs, BK=DIAG_BK, num_warps=diag_warps))
        if BT == 64 and env_choice("KIMI_LINEAR_KDA_TREE", "subchunk", ("subchunk", "masked")) == "subchunk":
            # The tree levels on 16-row sub-chunk tiles. H200, session 9, T=8K, forward: 1.50 ms at 2
            # warps, 1.65 at 4, 1.58 at 1, 2.07 at 8; 1.77 with K blocks of 16 at 4 warps (masked: 1.64).
            # 2 pipeline stages: forward + backward 0.989 / 0.992 of 1 stage (session 11, init-like gates),
            # 0.991 / 0.990 (session 12, init-like / stress gates).
            sub = {key: val for key, val in inputs.items() if key != "SK"}  # (K blocks masked, not padded)
            sub.update(BK=max(16, min(int(env("KIMI_LINEAR_KDA_TREE_BK", 32)), next_pow2(K))),
                       num_warps=int(env("KIMI_LINEAR_KDA_TREE_WARPS", 2)),
                       num_stages=int(env("KIMI_LINEAR_KDA_TREE_STAGES", 2)))
            LAUNCHED["tree"] = _chunk_tree_subchunk_kernel[(NC, HV)](
                q, k, g, beta, nrm, a_log, bias, chunk_info, aqk, t, float(scale), lb, H, HV, K, PREC=prec,
                INV_PREC=prec, **sub)
            LAUNCHED["tree_fn"] = _chunk_tree_subchunk_kernel  # (tests check which ran)
        elif BT == 32 and env_choice("KIMI_LINEAR_KDA_TREE", "subchunk", ("subchunk", "masked")) == "subchunk":
            sub = {key: val for key, val in inputs.items() if key != "SK"}
            sub.update(BK=max(16, min(int(env("KIMI_LINEAR_KDA_TREE_BK", 32)), next_pow2(K))),
                       num_warps=int(env("KIMI_LINEAR_KDA_TREE_WARPS", 1)),
                       num_stages=int(env("KIMI_LINEAR_KDA_TREE_STAGES", 2)))
            LAUNCHED["tree_fn"] = _chunk_pair_subchunk_kernel
            LAUNCHED["tree"] = _chunk_pair_subchunk_kernel[(NC, HV)](
                q, k, g, beta, nrm, a_log, bias, chunk_info, aqk, t, float(scale), lb, H, HV, K, PREC=prec,
                INV_PREC=prec, **sub)
        elif BT > 16:
            LAUNCHED["tree_fn"] = _chunk_tree_kernel
            LAUNCHED["tree"] = _chunk_tree_kernel[(NC, HV)](
                q, k, g, beta, nrm, a_log, bias, chunk_info, aqk, t, float(scale), lb, H, HV, K,
                BT=BT, LEVELS=BT.bit_length() - 1, PREC=prec, INV_PREC=prec,
                ABLATE=int(os.environ.get("KIMI_LINEAR_KDA_TREE_ABLATE", 0)), **inputs)
    wy_inputs = dict(inputs, num_stages=int(env("KIMI_LINEAR_KDA_WY_STAGES", 1)))
    if g_cum is not None:  # (already activated and summed)
        g, a_log, bias = g_cum, d, d
        wy_inputs.update(GATE=0, HAS_A=False, HAS_BIAS=False)
    grid = (NC, HV)
    if stream_plan is not None:  # (grid (HV, chunks): every head of a chunk before the next chunk)
        stream_plan.before_wy()
        grid = (HV, NC)
        wy_inputs.update(ready=stream_plan.ready, STREAM_GROUP=stream_plan.group)
    LAUNCHED["wy"] = _chunk_wy_kernel[grid](
        q, k, v, g, beta, nrm, a_log, bias, chunk_info, t, w, u, qg, kg, decay, float(scale), lb, H, HV, K, V,
        BT=BT, SV=SV, BV=BV, WY_PREC=prec, CUMG=g_cum is not None, **wy_inputs)
    return outs


def prep_warps(BT: int) -> int:
    """Warps of the masked tree and w/u launches (``KIMI_LINEAR_KDA_PREP_WARPS``): one at 16-row chunks
    (H200, session 13, T=8K inference forward 1.104 ms vs 1.157 at 4 warps), 4 up to 64 rows, else 8."""
    import os

    return int(os.environ.get("KIMI_LINEAR_KDA_PREP_WARPS", 1 if BT == 16 else 4 if BT <= 64 else 8))


def recur_impl() -> str:
    """The forward recurrence's kernel (``KIMI_LINEAR_KDA_RECUR``): ``triton`` (``_chunk_recur_kernel``), or
    ``wgmma`` (opt-in, session 18, untimed: ``recur_wgmma``, the transposed state on Hopper's warp-group MMA,
    written in Gluon) where it applies: a CUDA Hopper GPU, 16-bit intermediates with K of 64 or 128 (the
    inference forward's, and since session 19 a training forward's with its float32 Aqk, interior states,
    and the backward's state rebuild with its float32 u), not streamed; elsewhere the Triton kernel runs
    (``LAUNCHED["recur_impl"]`` says which)."""
    return env_choice("KIMI_LINEAR_KDA_RECUR", "triton", ("triton", "wgmma"))


def recur_launch(dtype, BK: int, BV: int):
    """Warps and pipeline stages of ``_chunk_recur_kernel`` for intermediates of ``dtype`` and a [BK, BV]
    state slice (``KIMI_LINEAR_KDA_RECUR_WARPS`` / ``_STAGES``): 8 warps past a [128, 32] slice."""
    import os

    return int(os.environ.get("KIMI_LINEAR_KDA_RECUR_WARPS", 4 if BK * BV <= 128 * 32 else 8)), _recur_stages(dtype, BK)


def recur_bv(V: int, programs: int, BK: int) -> int:
    """V slice of the recurrence's programs for heads V wide, ``programs`` (sequence, head) pairs and K
    block BK (``KIMI_LINEAR_KDA_BV`` forces it)."""
    import os

    forced = os.environ.get("KIMI_LINEAR_KDA_BV")
    if forced:
        return int(forced)
    if BK > 128:
        # [256, 16] slices (4 warps, one pipeline stage: what fewer than 16 sequence-heads got) read
        # outside their shared memory on the card (compute-sanitizer, H100, triton 3.6.0, session 14:
        # "Invalid __shared__ read" in the output's products); [256, 64] at 8 warps passes the wide-head
        # tests ([256, 16] at two stages too; [256, 32] was not tried).
        return max(16, min(64, next_pow2(V)))
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


def chunk_recur(w, u, qg, kg, aqk, decay, chunk_info, seq_chunks, *, shapes, initial_state, out,
                store_final, store_states, BT, v_new=None, states_dtype=torch.float32, states=None, stream_plan=None):
    """Launch the sequential kernel. Returns (o, final_state or None, chunk states or None); with
    ``out=None`` no output is computed (the backward's state rebuild; session 8, H200, T=8K: forward +
    backward 10.57 vs 10.79 ms). ``v_new`` ([chunks, HV, BT, V], float32 or 16-bit) also receives u - w S of
    every chunk (the rebuild stores it for the backward). The chunk states are stored as ``states_dtype``:
    float32 for the caller's interior states, 16-bit for the backward's hand-offs (``chunk_bwd.handoff_dtypes``),
    into ``states`` where given (a caller-owned buffer with a slot per chunk).
    ``stream_plan`` (``overlap.StreamPlan``, one sequence): wait for each group of chunks in its ``ready``."""
    HV, K, V, N = shapes.HV, shapes.K, shapes.V, shapes.N
    dev = w.device
    NC = chunk_info.shape[0]
    ht = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32) if store_final else None
    if store_states and states is None:
        states = torch.empty(NC, HV, K, V, device=dev, dtype=states_dtype)
    if recur_impl() == "wgmma" and not INTERPRET and stream_plan is None:
        from . import recur_wgmma  # (Gluon: imported only where it can run)

        if recur_wgmma.applies(w, u, aqk, BT, NC, output=out is not None):
            LAUNCHED["recur"] = recur_wgmma.launch(w, u, qg, kg, aqk, decay, chunk_info, seq_chunks, shapes=shapes,
                                                   initial_state=initial_state, out=out, ht=ht, BT=BT,
                                                   ordered=seq_ordered(seq_chunks, N), states=states, v_new=v_new)
            LAUNCHED["recur_impl"] = "wgmma"
            LAUNCHED["wgmma_runs"] = LAUNCHED.get("wgmma_runs", 0) + 1  # (a forward + backward's tests count)
            return out, ht, states
    LAUNCHED["recur_impl"] = "triton"
    BK = max(16, next_pow2(K))
    BV = recur_bv(V, N * HV, BK)
    d = dummy(dev)
    dot_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[w.dtype]
    warps, stages = recur_launch(w.dtype, BK, BV)
    LAUNCHED["recur"] = _chunk_recur_kernel[(cdiv(V, BV), N * HV)](
        w, u, qg, kg, aqk, decay, chunk_info, seq_chunks,
        initial_state if initial_state is not None else d, ht if ht is not None else d,
        states if states is not None else d, out if out is not None else d, v_new if v_new is not None else d,
        HV, K, V, SK=w.shape[-1], SV=u.shape[-1], BT=BT, BK=BK, BV=BV, HAS_H0=initial_state is not None,
        STORE_HT=store_final, STORE_STATES=store_states, DOT_DTYPE=dot_dtype, STORE_O=out is not None,
        STORE_VNEW=v_new is not None, ORDERED=seq_ordered(seq_chunks, N),
        num_warps=warps, num_stages=stages,
        **({} if stream_plan is None else dict(ready=stream_plan.ready, STREAM_GROUP=stream_plan.group,
                                               SPIN_LIMIT=0 if INTERPRET else 2 ** 30)),
    )
    return out, ht, states
