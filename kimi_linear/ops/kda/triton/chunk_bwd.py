"""Chunked KDA backward.

1. Recompute the chunk-local quantities (w, u, qg, kg, Aqk, gC) with the prep kernel (fp32 storage) and
   the state entering every chunk with the recurrence kernel (``STORE_STATES``).
2. ``_chunk_recur_bwd_kernel``: reverse sweep over each sequence's chunks, grid (V / BV, N * HV), with the
   state gradient dS ([K, BV], fp32) in registers. For a chunk with entering state h:

       v_new = u - w h,   dv_new = Aqk^T do + kg dS
       dqg = do h^T,  dkg = v_new dS^T,  dw = -dv_new h^T,  du = dv_new,  dAqk = do v_new^T,
       dgC = exp(gC) * rowsum(h * dS),   dS <- exp(gC) * dS + qg^T do - w^T dv_new

   Partial sums over V blocks are accumulated with atomics; dS after the first chunk is dh0.
3. Chunk-local gradients: ``prep_bwd.chunk_prep_bwd`` (one program per chunk and value head) takes
   T = (I + Akk)^-1 stored by the prep kernel in step 1 and the gradients of step 2, and gives dq, dk,
   dv, dg (or the raw gate, A_log, dt_bias), dbeta, through the L2 norm, gate and sigmoid.
   ``prep_torch``, a differentiable PyTorch mirror of the prep kernel, is its test oracle and the
   fallback (autograd, slice by slice; slow) for chunk sizes the kernel does not take or with
   ``KIMI_LINEAR_KDA_PREP_BWD=autograd``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..gate import kda_gate
from .chunk_fwd import chunk_prep, chunk_recur
from .prep_bwd import chunk_prep_bwd
from .utils import chunk_rows, dummy, next_pow2, sequence_program


@triton.jit
def _chunk_recur_bwd_kernel(
    w, u, qg, kg, aqk, gc, chunk_info, seq_chunks, states, dht, do,
    du, dqg, dkg, dw, daqk, dgc, dh0,
    HV, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, ATOMIC: tl.constexpr,
):
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV)
    r = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    m_rk = (r < BT)[:, None] & m_k[None, :]
    p_s = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS = tl.load(dht + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        base = (c * HV + i_hv).to(tl.int64)
        h = tl.load(states + (base * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv, other=0.0)
        p_k = base * BT * K + r[:, None] * K + o_k[None, :]
        b_w = tl.load(w + p_k, mask=m_rk, other=0.0).to(tl.float32)
        b_qg = tl.load(qg + p_k, mask=m_rk, other=0.0).to(tl.float32)
        b_kg = tl.load(kg + base * BT * K + o_k[None, :] * BT + r[:, None], mask=m_rk, other=0.0).to(tl.float32)
        p_u = base * BT * V + r[:, None] * V + o_v[None, :]
        b_u = tl.load(u + p_u, mask=m_v[None, :], other=0.0).to(tl.float32)
        p_a = base * BT * BT + r[:, None] * BT + r[None, :]
        b_a = tl.load(aqk + p_a).to(tl.float32)
        b_gc = tl.load(gc + base * K + o_k, mask=m_k, other=0.0)
        row0, n_rows = chunk_rows(chunk_info, c)
        b_do = tl.load(do + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :],
                       mask=(r < n_rows)[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        v_new = b_u - tl.dot(b_w, h)
        dv = tl.dot(tl.trans(b_a), b_do) + tl.dot(b_kg, dS)
        tl.store(du + p_u, dv, mask=m_v[None, :])
        p_dqg = tl.dot(b_do, tl.trans(h))
        p_dkg = tl.dot(v_new, tl.trans(dS))
        p_dw = -tl.dot(dv, tl.trans(h))
        p_da = tl.dot(b_do, tl.trans(v_new))
        p_dgc = tl.sum(h * dS, axis=1) * tl.exp(b_gc)
        if ATOMIC:
            tl.atomic_add(dqg + p_k, p_dqg, mask=m_rk)
            tl.atomic_add(dkg + p_k, p_dkg, mask=m_rk)
            tl.atomic_add(dw + p_k, p_dw, mask=m_rk)
            tl.atomic_add(daqk + p_a, p_da)
            tl.atomic_add(dgc + base * K + o_k, p_dgc, mask=m_k)
        else:
            tl.store(dqg + p_k, p_dqg, mask=m_rk)
            tl.store(dkg + p_k, p_dkg, mask=m_rk)
            tl.store(dw + p_k, p_dw, mask=m_rk)
            tl.store(daqk + p_a, p_da)
            tl.store(dgc + base * K + o_k, p_dgc, mask=m_k)
        dS = dS * tl.exp(b_gc)[:, None] + tl.dot(tl.trans(b_qg), b_do) - tl.dot(tl.trans(b_w), dv)
    tl.store(dh0 + p_s, dS, mask=m_kv)


def chunk_recur_bwd(w, u, qg, kg, aqk, gc, info, seq, states, dht, do, *, shapes, BT):
    HV, K, V, N = shapes.HV, shapes.K, shapes.V, shapes.N
    NC = info.shape[0]
    dev = w.device
    BK = max(16, next_pow2(K))
    BV = max(16, min(32, next_pow2(V)))
    NV = triton.cdiv(V, BV)
    alloc = torch.zeros if NV > 1 else torch.empty
    dqg = alloc(NC, HV, BT, K, device=dev, dtype=torch.float32)
    dkg = alloc(NC, HV, BT, K, device=dev, dtype=torch.float32)
    dw = alloc(NC, HV, BT, K, device=dev, dtype=torch.float32)
    daqk = alloc(NC, HV, BT, BT, device=dev, dtype=torch.float32)
    dgc = alloc(NC, HV, K, device=dev, dtype=torch.float32)
    du = torch.empty(NC, HV, BT, V, device=dev, dtype=torch.float32)
    dh0 = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32)
    _chunk_recur_bwd_kernel[(NV, N * HV)](
        w, u, qg, kg, aqk, gc, info, seq, states, dht if dht is not None else dummy(dev), do.contiguous(),
        du, dqg, dkg, dw, daqk, dgc, dh0,
        HV, K, V, BT=BT, BK=BK, BV=BV, HAS_DHT=dht is not None, ATOMIC=NV > 1,
        num_warps=4 if BK <= 128 else 8, num_stages=1,
    )
    return du, dqg, dkg, dw, daqk, dgc, dh0


# ----------------------------------------------------------------------------------------------
# PyTorch mirror of the prep kernel (differentiable)
# ----------------------------------------------------------------------------------------------

def prep_torch(q, k, v, g, beta, valid, A_log, dt_bias, cfg, return_t=False):
    """q, k: [C, BT, H, K]; v: [C, BT, HV, V]; g: [C, BT, HV, K]; beta: [C, BT, HV]; valid: [C, BT] bool.

    Returns w, u, qg, kg ([C, HV, BT, .]), Aqk [C, HV, BT, BT] and gC [C, HV, K], as the kernel computes them
    (and T = (I + Akk)^-1 [C, HV, BT, BT] with ``return_t``). Float64 inputs compute in float64 (the test
    oracle of ``chunk_prep_bwd``), others in float32.
    """
    shapes = cfg.shapes
    group = shapes.HV // shapes.H
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = q.to(f32), k.to(f32), v.to(f32), g.to(f32), beta.to(f32)
    if cfg.l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if cfg.gate:
        g = kda_gate(g, A_log, dt_bias, cfg.lower_bound)
    if cfg.beta_sigmoid:
        beta = torch.sigmoid(beta) * (2.0 if cfg.neg_eigval else 1.0)
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    m = valid[:, :, None, None].to(f32)
    q, k, v, g = q * m, k * m, v * m, g * m
    beta = beta * valid[:, :, None].to(f32)
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))  # [C, HV, BT, D]
    beta = beta.transpose(1, 2)  # [C, HV, BT]
    C, HV, BT, K = k.shape
    r = torch.arange(BT, device=q.device)
    Aqk = torch.zeros(C, HV, BT, BT, device=q.device, dtype=f32)
    Akk = torch.zeros_like(Aqk)
    hb = BT // 2
    while hb >= 1:
        g4 = g.reshape(C, HV, BT // hb, hb, K)
        fwd = g4.cumsum(3).reshape(C, HV, BT, K)
        rev = g4.flip(3).cumsum(3).flip(3).reshape(C, HV, BT, K) - g
        odd = ((r // hb) % 2 == 1)[:, None]
        e = torch.exp(torch.where(odd, fwd, rev).clamp(max=0.0))
        row_q = torch.where(odd, q * e, 0.0)
        row_k = torch.where(odd, k * e, 0.0)
        col_k = torch.where(odd, 0.0, k * e)
        bi = r // hb
        keep = ((bi[:, None] == bi[None, :] + 1) & (bi[None, :] % 2 == 0)).to(f32)
        Aqk = Aqk + (row_q @ col_k.transpose(-1, -2)) * keep
        Akk = Akk + (row_k @ col_k.transpose(-1, -2)) * keep
        hb //= 2
    eye = torch.eye(BT, device=q.device, dtype=f32)
    Aqk = (Aqk + eye * (q * k).sum(-1)[..., None]) * cfg.scale
    Akk = Akk * beta[..., None]
    Tm = torch.linalg.solve_triangular(eye + Akk, eye.expand_as(Akk), upper=False, unitriangular=True)
    G = g.cumsum(2)
    G_after = g.flip(2).cumsum(2).flip(2) - g
    eG = torch.exp(G)
    w = Tm @ (k * eG * beta[..., None])
    u = Tm @ (v * beta[..., None])
    qg = q * eG * cfg.scale
    kg = k * torch.exp(G_after.clamp(max=0.0))
    gc = g.sum(2)
    if return_t:
        return w, u, qg, kg, Aqk, gc, Tm
    return w, u, qg, kg, Aqk, gc


def _prep_bwd_autograd(q, k, v, g, beta, A_log, dt_bias, info, dw, du, dqg, dkg, daqk, dgc, cfg):
    """Chunk-local gradients by autograd through ``prep_torch``, slice by slice (slow; the fallback for
    chunk sizes the kernel does not take, and a reference under ``KIMI_LINEAR_KDA_PREP_BWD=autograd``)."""
    shapes, BT = cfg.shapes, cfg.BT
    B, T = shapes.B, shapes.T
    HV, K, V = shapes.HV, shapes.K, shapes.V
    dev = q.device
    daqk = daqk * torch.ones(BT, BT, device=dev, dtype=torch.bool).tril()
    leaves = [x.detach().reshape(B * T, *x.shape[2:]).requires_grad_(True) for x in (q, k, v, g, beta)]
    a_leaf = None if A_log is None else A_log.detach().requires_grad_(True)
    b_leaf = None if dt_bias is None else dt_bias.detach().requires_grad_(True)
    NC = info.shape[0]
    # Slices sized to a quarter of the free device memory (the autograd graph keeps ~12 tensors per chunk).
    per_chunk = HV * BT * (3 * K + V + BT) * 4 * 12
    budget = torch.cuda.mem_get_info(dev)[0] // 4 if q.is_cuda else 2e8
    step = max(1, int(budget // max(per_chunk, 1)))
    rows = torch.arange(BT, device=dev)
    for c0 in range(0, NC, step):
        c1 = min(NC, c0 + step)
        inf = info[c0:c1].to(torch.int64)
        idx = inf[:, :1] + rows[None, :]
        valid = rows[None, :] < inf[:, 1:]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        with torch.enable_grad():
            xs = [lf[idx] for lf in leaves]
            outs = prep_torch(*xs, valid, a_leaf, b_leaf, cfg)
            grads = [dw[c0:c1], du[c0:c1], dqg[c0:c1], dkg[c0:c1], daqk[c0:c1], dgc[c0:c1]]
            torch.autograd.backward(outs, grads)
    dq, dk, dv, dg, dbeta = (lf.grad.reshape(x.shape).to(x.dtype) if lf.grad is not None else torch.zeros_like(x)
                             for lf, x in zip(leaves, (q, k, v, g, beta)))
    dA = None if a_leaf is None else (a_leaf.grad if a_leaf.grad is not None else torch.zeros_like(A_log))
    dbias = None if b_leaf is None else (b_leaf.grad if b_leaf.grad is not None else torch.zeros_like(dt_bias))
    return dq, dk, dv, dg, dbeta, dA, dbias


def chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, do, dht, cfg, info, seq):
    shapes, BT = cfg.shapes, cfg.BT
    B, T, HV, V = shapes.B, shapes.T, shapes.HV, shapes.V
    dev = q.device
    use_kernel = BT in (16, 32, 64, 128) and os.environ.get("KIMI_LINEAR_KDA_PREP_BWD") != "autograd"
    outs = chunk_prep(
        q, k, v, g, beta, info, scale=cfg.scale, shapes=shapes, gate=cfg.gate, A_log=A_log, dt_bias=dt_bias,
        lower_bound=cfg.lower_bound, l2norm=cfg.l2norm, beta_sigmoid=cfg.beta_sigmoid,
        neg_eigval=cfg.neg_eigval, BT=BT, dtype=torch.float32, store_t=use_kernel,
    )
    w, u, qg, kg, aqk, gc = outs[:6]
    tinv = outs[6] if use_kernel else None
    scratch = torch.empty(B, T, HV, V, device=dev, dtype=torch.float32)
    _, _, states = chunk_recur(w, u, qg, kg, aqk, gc, info, seq, shapes=shapes, initial_state=h0, out=scratch,
                               store_final=False, store_states=True, BT=BT)
    del scratch
    du, dqg, dkg, dw, daqk, dgc, dh0 = chunk_recur_bwd(
        w, u, qg, kg, aqk, gc, info, seq, states, None if dht is None else dht.contiguous(), do,
        shapes=shapes, BT=BT,
    )
    del w, u, qg, kg, aqk, gc, states
    if use_kernel:
        grads = chunk_prep_bwd(q, k, v, g, beta, A_log, dt_bias, info, tinv, dw, du, dqg, dkg, daqk, dgc, cfg=cfg,
                               overwrite_t=True)
    else:
        grads = _prep_bwd_autograd(q, k, v, g, beta, A_log, dt_bias, info, dw, du, dqg, dkg, daqk, dgc, cfg)
    return (*grads, (dh0 if h0 is not None else None))
