"""Decode kernel: KDA one token at a time, state kept in registers (fp32) for the whole sequence.

Grid: (cdiv(V, BV), N * HV). Each program owns a [K, BV] slice of one sequence's state for one value
head, reads it from the state pool slot (``indices[n]`` if given), loops over the sequence's tokens and
writes the slice back (in place into the pool, or into a separate final-state tensor). L2 norm, gate and
beta sigmoid are applied in-register. Optional: the state after every token (speculative-decoding rollback).
No host synchronisation and no allocation inside the launch: safe to capture in a CUDA graph.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .utils import apply_beta, apply_gate, cdiv, dummy, head_a_log, load_bias, next_pow2


@triton.jit
def _recurrent_kda_kernel(
    q, k, v, g, beta, A_log, dt_bias, h0, ht, o, all_states, cu_seqlens, indices,
    scale, lower_bound,
    T, H, HV, K, V,
    s_h0_n, s_h0_h, s_h0_k, s_h0_v,
    s_ht_n, s_ht_h, s_ht_k, s_ht_v,
    s_as_k, s_as_v,
    BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    VARLEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_INDICES: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_ALL: tl.constexpr, HT_IN_POOL: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    if HAS_INDICES:
        slot = tl.load(indices + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        p_h0 = h0 + slot * s_h0_n + i_hv * s_h0_h + o_k[:, None] * s_h0_k + o_v[None, :] * s_h0_v
        S = tl.load(p_h0, mask=m_kv, other=0.0).to(tl.float32)

    a = head_a_log(A_log, i_hv, HAS_A)
    bias = load_bias(dt_bias, i_hv, K, o_k, m_k, BK, HAS_BIAS)

    for t in range(bos, eos):
        p_qk = (t * H + i_h) * K + o_k
        b_q = tl.load(q + p_qk, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * HV + i_hv) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_b = tl.load(beta + t * HV + i_hv).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale
        b_g = apply_gate(b_g, a, bias, lower_bound, GATE, HAS_A, HAS_BIAS)
        b_g = tl.where(m_k, b_g, 0.0)
        b_b = apply_beta(b_b, BETA_SIGMOID, NEG_EIGVAL)
        S = S * tl.exp(b_g)[:, None]
        b_v = b_b * (b_v - tl.sum(S * b_k[:, None], axis=0))
        S = S + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(S * b_q[:, None], axis=0)
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_ALL:
            p_as = all_states + (t * HV + i_hv) * K * V + o_k[:, None] * s_as_k + o_v[None, :] * s_as_v
            tl.store(p_as, S.to(all_states.dtype.element_ty), mask=m_kv)

    if STORE_HT:
        if HT_IN_POOL:
            ht_row = slot
        else:
            ht_row = i_n.to(tl.int64)
        p_ht = ht + ht_row * s_ht_n + i_hv * s_ht_h + o_k[:, None] * s_ht_k + o_v[None, :] * s_ht_v
        tl.store(p_ht, S.to(ht.dtype.element_ty), mask=m_kv)


def recurrent_kda_fwd(
    q, k, v, g, beta, *, scale, shapes, gate, A_log, dt_bias, lower_bound, l2norm, beta_sigmoid,
    neg_eigval, initial_state, cu_seqlens, indices, final_state, out, all_states, state_v_first,
):
    """Launch the decode kernel.

    initial_state: [P, HV, K, V] (or [P, HV, V, K] with state_v_first), any float dtype, or None.
    final_state: tensor to write the final state into: the pool itself (``initial_state``, slot
    ``indices[n]``) for in-place updates, else an [N, HV, K, V] tensor, or None. out: [B, T, HV, V]. all_states: [B, T, HV, K, V]
    (or [.., V, K]) or None.
    """
    T, H, HV, K, V, N = shapes.T, shapes.H, shapes.HV, shapes.K, shapes.V, shapes.N
    dev = q.device
    BK = next_pow2(K)
    # V slices of 64 from 256 (sequence, head) pairs up: H100, session 14, batch 64 / 256 at H = 32, 87% /
    # 96% of the copy ceiling against 86% / 92% at 32; H200, session 2: 74% / 82% against 74% / 81%.
    BV = min(next_pow2(V), 64 if N * HV >= 256 else 16)
    BV = max(BV, min(16, next_pow2(V)))
    # Tuning overrides (benchmarks/kda_decode_sweep.py); results do not depend on them.
    BV = min(int(os.environ.get("KIMI_LINEAR_KDA_DECODE_BV", BV)), max(16, next_pow2(V)))
    # 2 warps up to a 128 x 64 slice (255 registers, no spills): 74% / 82% of the copy ceiling at batch 64 / 256 on an H200 against
    # 68% / 73% with 4 warps (docs/results/kda_decode_sweep_h200.log).
    warps = int(os.environ.get("KIMI_LINEAR_KDA_DECODE_WARPS", 4 if BK * BV > 8192 else 2))

    def strides(s):
        if s is None:
            return 0, 0, 0, 0
        n, h, a, b = s.stride()
        return (n, h, b, a) if state_v_first else (n, h, a, b)

    s0 = strides(initial_state)
    s1 = strides(final_state)
    if all_states is not None:
        s_as = (1, K) if state_v_first else (V, 1)
    else:
        s_as = (0, 0)
    d = dummy(dev)
    grid = (cdiv(V, BV), N * HV)
    _recurrent_kda_kernel[grid](
        q, k, v, g, beta,
        A_log if A_log is not None else d, dt_bias if dt_bias is not None else d,
        initial_state if initial_state is not None else d, final_state if final_state is not None else d,
        out, all_states if all_states is not None else d,
        cu_seqlens if cu_seqlens is not None else d, indices if indices is not None else d,
        float(scale), float(lower_bound) if lower_bound is not None else 0.0,
        T, H, HV, K, V, *s0, *s1, *s_as,
        BK=BK, BV=BV, GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
        L2NORM=l2norm, BETA_SIGMOID=beta_sigmoid, NEG_EIGVAL=neg_eigval,
        VARLEN=cu_seqlens is not None, HAS_H0=initial_state is not None, HAS_INDICES=indices is not None,
        STORE_HT=final_state is not None, STORE_ALL=all_states is not None,
        HT_IN_POOL=final_state is not None and final_state is initial_state,
        num_warps=warps, num_stages=1,
    )
    return out
