"""Chunked KDA backward.

1. Recompute the chunk-local quantities (w, u, qg, kg, the decay e^gC; Aqk and T unless the forward kept
   them) with the prep kernels, and with the recurrence kernel the state h entering every chunk (``STORE_STATES``,
   float32) and v_new = u - w h (``STORE_VNEW``, float32). w, qg and kg are stored in the inputs' 16-bit
   type (the forward's padded layout), u in float32 (``recompute_dtypes``).
2. ``_chunk_recur_bwd_kernel``: reverse sweep over each sequence's chunks, grid (V / BV, N * HV), with the
   state gradient dS ([K, BV], fp32) in registers. For a chunk:

       dv_new = Aqk^T do + kg dS,   dS <- e^gC * dS + qg^T do - w^T dv_new

   It stores dv_new (= du) and dS per chunk (each V slice its own part; dS after the first chunk is
   dh0). ``_chunk_bwd_grads_kernel`` then forms, chunk-parallel over full V rows,
   dqg = do h^T, dkg = v_new dS^T, dw = -dv_new h^T, dAqk = do v_new^T, dgC = e^gC * rowsum(h * dS).
   (The earlier single sweep summed those over V slices with fp32 atomics: 36 ms of sweep at T=32K, H=32
   on an H200.)
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
from .chunk_fwd import storage_dtype
from .overlap import prep_and_recur
from .prep_bwd import chunk_prep_bwd
from .utils import (
    INTERPRET, cdiv, chunk_program, chunk_rows, dummy, env_choice, gate_prepass, next_pow2, seq_ordered,
    sequence_program,
)


# Which implementation the last launches took (tests and benchmarks read it).
LAUNCHED: dict = {}


@triton.jit
def _chunk_recur_bwd_kernel(
    w, kg, aqk, decay, qg, chunk_info, seq_chunks, dht, do,
    du, ds_out, dh0,
    HV, K, V, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, DOT16: tl.constexpr = 0,
    ORDERED: tl.constexpr = False,
):
    """Reverse sweep, grid (V / BV, N * HV): only the dependent chain. Per chunk it stores dv (= du) and
    the state gradient dS entering the sweep step (the gradient of the state after the chunk);
    ``_chunk_bwd_grads_kernel`` turns those into the other gradients chunk-parallel. Every store is
    exclusive to its V slice (no atomics). v_new comes from the state rebuild (``chunk_recur`` with
    ``v_new``), so the sweep neither loads the chunk states nor u."""
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV, ORDERED)
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
        p_kv = (base * K + o_k[:, None]) * V + o_v[None, :]
        tl.store(ds_out + p_kv, dS.to(ds_out.dtype.element_ty), mask=m_kv)
        # w, qg, kg, e^gC in the (possibly padded, SK wide) layout of the prep kernels.
        p_k = base * BT * SK + r[:, None] * SK + o_k[None, :]
        # DOT16: the products on 16-bit tensor cores in w's type: 1 those with do (Aqk and qg rounded for
        # them), 2 all of them (dS and dv rounded too); 0 tf32 on float32 operands.
        DT: tl.constexpr = w.dtype.element_ty if DOT16 == 2 else tl.float32
        DO_DT: tl.constexpr = w.dtype.element_ty if DOT16 >= 1 else tl.float32
        b_w = tl.load(w + p_k, mask=m_rk, other=0.0).to(DT)
        b_qg = tl.load(qg + p_k, mask=m_rk, other=0.0).to(DO_DT)
        b_kg = tl.load(kg + base * BT * SK + o_k[None, :] * BT + r[:, None], mask=m_rk, other=0.0).to(DT)
        b_a = tl.load(aqk + base * BT * BT + r[:, None] * BT + r[None, :]).to(DO_DT)
        b_decay = tl.load(decay + base * SK + o_k, mask=m_k, other=0.0)
        row0, n_rows = chunk_rows(chunk_info, c)
        b_do = tl.load(do + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :],
                       mask=(r < n_rows)[:, None] & m_v[None, :], other=0.0).to(DO_DT)
        dv = tl.dot(tl.trans(b_a), b_do) + tl.dot(b_kg, dS.to(DT))
        tl.store(du + base * BT * V + r[:, None] * V + o_v[None, :], dv.to(du.dtype.element_ty), mask=m_v[None, :])
        dS = dS * b_decay[:, None] + tl.dot(tl.trans(b_qg), b_do) - tl.dot(tl.trans(b_w), dv.to(DT))
    tl.store(dh0 + p_s, dS, mask=m_kv)


@triton.jit
def _dot_nt(a, b, acc, SIXTEEN: tl.constexpr):
    """acc + a b^T: on 16-bit tensor cores when both operands are stored in the same 16-bit type
    (``SIXTEEN``), else tf32 on float32 copies."""
    if SIXTEEN:
        return tl.dot(a, tl.trans(b), acc)
    return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc)


@triton.jit
def _chunk_bwd_grads_kernel(
    decay, chunk_info, states, ds, do, dv, v_new,
    dqg, dkg, dw, daqk, dgc,
    HV, K, V, SK: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    Q16: tl.constexpr = 0, K16: tl.constexpr = 0, W16: tl.constexpr = 0, A16: tl.constexpr = 0,
):
    """Chunk-parallel, grid (chunks, HV, K / BK), for a chunk with entering state h and state gradient dS:

        dqg = do h^T,  dkg = v_new dS^T,  dw = -dv h^T,  dAqk = do v_new^T,  dgC = e^gC rowsum(h * dS)

    Q16 / K16 / W16 / A16: the product of dqg / dkg / dw / dAqk on 16-bit tensor cores (both operands
    handed over in the same 16-bit type, ``handoff_dtypes``). dqg, dkg, dw are stored in their buffers' type.
    """
    i_c, i_hv, _, row0, n_rows, base = chunk_program(chunk_info, HV, HV)
    i_k = tl.program_id(2)
    r = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    acc_q = tl.zeros([BT, BK], dtype=tl.float32)
    acc_k = tl.zeros([BT, BK], dtype=tl.float32)
    acc_w = tl.zeros([BT, BK], dtype=tl.float32)
    acc_a = tl.zeros([BT, BT], dtype=tl.float32)
    acc_g = tl.zeros([BK], dtype=tl.float32)
    for vb in range(0, V, BV):
        o_v = vb + tl.arange(0, BV)
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = (base * K + o_k[:, None]) * V + o_v[None, :]
        h = tl.load(states + p_kv, mask=m_kv, other=0.0)
        b_ds = tl.load(ds + p_kv, mask=m_kv, other=0.0)
        b_do = tl.load(do + ((row0 + r)[:, None] * HV + i_hv) * V + o_v[None, :],
                       mask=(r < n_rows)[:, None] & m_v[None, :], other=0.0)
        p_u = base * BT * V + r[:, None] * V + o_v[None, :]
        b_dv = tl.load(dv + p_u, mask=m_v[None, :], other=0.0)
        b_vn = tl.load(v_new + p_u, mask=m_v[None, :], other=0.0)
        acc_q = _dot_nt(b_do, h, acc_q, Q16)
        acc_k = _dot_nt(b_vn, b_ds, acc_k, K16)
        acc_w = _dot_nt(b_dv, h, acc_w, W16)
        acc_g += tl.sum(h.to(tl.float32) * b_ds.to(tl.float32), axis=1)
        # (every K block forms dAqk, the first stores it: at the default single K block that is no extra
        # work, and under ``if i_k == 0`` ptxas serialised the loop's warp-group MMAs, C7517, session 19)
        acc_a = _dot_nt(b_do, b_vn, acc_a, A16)
    p_k = base * BT * K + r[:, None] * K + o_k[None, :]
    m_rk = (r < BT)[:, None] & m_k[None, :]
    tl.store(dqg + p_k, acc_q.to(dqg.dtype.element_ty), mask=m_rk)
    tl.store(dkg + p_k, acc_k.to(dkg.dtype.element_ty), mask=m_rk)
    tl.store(dw + p_k, (-acc_w).to(dw.dtype.element_ty), mask=m_rk)
    tl.store(dgc + base * K + o_k, acc_g * tl.load(decay + base * SK + o_k, mask=m_k, other=0.0), mask=m_k)
    if i_k == 0:
        tl.store(daqk + base * BT * BT + r[:, None] * BT + r[None, :], acc_a)


def sweep_dot16(w_dtype) -> int:
    """The reverse sweep's DOT16 for rebuilt w of type ``w_dtype`` (``KIMI_LINEAR_KDA_SWEEP_DOT``): 0 tf32
    products, 1 those with do in 16 bits (the default), 2 all in 16 bits; always 0 for float32 w.
    (Session 11 tried a fourth form, the dependent chain's products as bf16 head + tail pairs: 0.9% faster
    with tf32's errors, but triton 3.6 compiled it to out-of-bounds shared-memory reads (compute-sanitizer,
    K = 60, V = 100; the GPU grid failed with it), so it was removed.)"""
    mode = env_choice("KIMI_LINEAR_KDA_SWEEP_DOT", "do16", ("tf32", "do16", "16bit"))
    return 0 if w_dtype == torch.float32 else {"tf32": 0, "do16": 1, "16bit": 2}[mode]


def _same16(a, b) -> int:
    """1 when a product of a and b can run on 16-bit tensor cores as stored (both the same 16-bit type)."""
    return int(a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16))


def grads_launch(K: int, V: int):
    """K block, V block, warps and stages of ``_chunk_bwd_grads_kernel``
    (``KIMI_LINEAR_KDA_GRADS_BK`` / ``_GRADS_BV`` / ``_GRADS_WARPS`` / ``_GRADS_STAGES``). Each program
    reads dv and v_new of its chunk once per K block, so wider K blocks read them fewer times: H200,
    session 11, T=8K, forward + backward 6.72 vs 6.95 ms with the whole K = 128 at 8 warps (K blocks of
    32 at 4 warps before; 64 at 8 warps 6.95, one stage 6.79, V blocks of 16 6.89)."""
    env = os.environ.get
    GK = max(16, min(int(env("KIMI_LINEAR_KDA_GRADS_BK", 128)), next_pow2(K)))
    GV = max(16, min(int(env("KIMI_LINEAR_KDA_GRADS_BV", 32)), next_pow2(V)))
    warps = int(env("KIMI_LINEAR_KDA_GRADS_WARPS", 8 if GK > 64 else 4))
    return GK, GV, warps, int(env("KIMI_LINEAR_KDA_GRADS_STAGES", 2))


HANDOFFS = ("states", "ds", "vnew", "du", "grads")
HANDOFF_16BIT = torch.bfloat16  # (the interpreter tests set float16: bf16 products are wrong there)


def handoff_dtypes(q) -> dict:
    """Storage types of the tensors the backward hands from one launch to the next: ``states`` (the
    rebuilt chunk states), ``ds`` (the sweep's per-chunk state gradients), ``vnew`` (v_new of the
    rebuild), ``du`` (the sweep's dv) and ``grads`` (the gradient kernel's dqg, dkg, dw). Float32 unless
    named in ``KIMI_LINEAR_KDA_BWD_HANDOFF`` (names separated by ``,`` or ``+``, or ``all``; default
    ``none``), which stores them in bf16 for 16-bit inputs. bf16 for fp16 inputs too: state gradients
    summed over a long sequence can pass fp16's 65504. Only the copies between launches are rounded; the
    kernels keep states and dS in float32 registers. Session 12: ``all`` is 4.5% faster at 8K, but the
    rounding breaks the error bounds where gradients are small differences of large terms
    (docs/benchmarks.md), so it is an opt-in."""
    raw = os.environ.get("KIMI_LINEAR_KDA_BWD_HANDOFF", "none").strip()
    names = HANDOFFS if raw == "all" else () if raw in ("none", "") else tuple(
        x.strip() for x in raw.replace("+", ",").split(","))
    bad = [x for x in names if x not in HANDOFFS]
    if bad:
        raise ValueError(f"KIMI_LINEAR_KDA_BWD_HANDOFF: unknown name(s) {bad}; expected names from "
                         f"{', '.join(HANDOFFS)} separated by ',' or '+', or all / none")
    half = q.dtype in (torch.bfloat16, torch.float16)
    return {x: HANDOFF_16BIT if half and x in names else torch.float32 for x in HANDOFFS}


def sweep_impl() -> str:
    """The reverse sweep's kernel (``KIMI_LINEAR_KDA_SWEEP``): ``triton`` (``_chunk_recur_bwd_kernel``), or
    ``wgmma`` (opt-in, session 20, untimed: ``sweep_wgmma``, the transposed state gradient on Hopper's
    warp-group MMA, written in Gluon) where it applies (``sweep_wgmma.applies``), else the Triton kernel
    (``LAUNCHED["sweep_impl"]`` says which)."""
    return env_choice("KIMI_LINEAR_KDA_SWEEP", "triton", ("triton", "wgmma"))


def chunk_recur_bwd(w, qg, kg, aqk, decay, info, seq, states, v_new, dht, do, *, shapes, BT, handoff=None):
    """Reverse sweep then the chunk-parallel gradients, from the rebuilt intermediates, the chunk states
    and v_new of the state rebuild (``chunk_recur`` with ``v_new``). Returns (du, dqg, dkg, dw, dAqk, dgC,
    dh0): du, dqg, dkg, dw in the types of ``handoff`` (``handoff_dtypes``; float32 if None), the rest
    float32. The per-chunk state gradients take a buffer as large as ``states`` ([chunks, HV, K, V])."""
    HV, K, V, N = shapes.HV, shapes.K, shapes.V, shapes.N
    NC = info.shape[0]
    dev = w.device
    f32 = torch.float32
    BK = max(16, next_pow2(K))
    # V slices of 32 and 8 warps: session 7, H200, T=8K, H=32, forward + backward 10.88 ms vs 11.12 with
    # 4 warps (init-like gates; 11.42 vs 11.66 stress), 12.26 / 11.67 at slices of 16 / 64
    # (docs/results/kda_bwd_variants_h200_session7.log).
    # Never below 32 (narrow heads are masked): slices of 16 faulted the device (illegal memory access)
    # on the H200 with the 16-bit rebuild, session 9, where session 7's float32 rebuild had run them.
    # Products with do in 16 bits and 2 stages: session 10, forward + backward 6.93 vs 7.18 ms (tf32, 1
    # stage); all products in 16 bits 6.79 ms but dbeta's worst suite error 7.8e-3 instead of 6.0e-3;
    # 4 warps lost (1.011), as did 2 stages in tf32 at 4 warps (1.021).
    BV = max(32, min(int(os.environ.get("KIMI_LINEAR_KDA_SWEEP_BV", 32)), next_pow2(V)))
    do = do.contiguous()
    handoff = handoff or {x: f32 for x in HANDOFFS}
    du = torch.empty(NC, HV, BT, V, device=dev, dtype=handoff["du"])
    ds = torch.empty(NC, HV, K, V, device=dev, dtype=handoff["ds"])
    dh0 = torch.empty(N, HV, K, V, device=dev, dtype=f32)
    on_wgmma = False
    if sweep_impl() == "wgmma" and not INTERPRET:
        from . import sweep_wgmma  # (Gluon: imported only where it can run)

        on_wgmma = sweep_wgmma.applies(w, aqk, do, BT, NC, K, V)
        if on_wgmma:
            sweep_wgmma.launch(w, qg, kg, aqk, decay, info, seq, dht, do, du, ds, dh0, HV=HV, K=K, V=V, N=N, BT=BT,
                               ordered=seq_ordered(seq, N))
    LAUNCHED["sweep_impl"] = "wgmma" if on_wgmma else "triton"
    if not on_wgmma:
        _chunk_recur_bwd_kernel[(cdiv(V, BV), N * HV)](
            w, kg, aqk, decay, qg, info, seq, dht if dht is not None else dummy(dev), do,
            du, ds, dh0,
            HV, K, V, SK=w.shape[-1], BT=BT, BK=BK, BV=BV, HAS_DHT=dht is not None,
            DOT16=sweep_dot16(w.dtype), ORDERED=seq_ordered(seq, N),
            num_warps=int(os.environ.get("KIMI_LINEAR_KDA_SWEEP_WARPS", 8)),
            num_stages=1 if INTERPRET else int(os.environ.get("KIMI_LINEAR_KDA_SWEEP_STAGES", 2)),
        )
    dqg = torch.empty(NC, HV, BT, K, device=dev, dtype=handoff["grads"])
    dkg = torch.empty_like(dqg)
    dw = torch.empty_like(dqg)
    daqk = torch.empty(NC, HV, BT, BT, device=dev, dtype=f32)
    dgc = torch.empty(NC, HV, K, device=dev, dtype=f32)
    GK, GV, g_warps, g_stages = grads_launch(K, V)
    if NC > 0:
        _chunk_bwd_grads_kernel[(NC, HV, cdiv(K, GK))](
            decay, info, states, ds, do, du, v_new, dqg, dkg, dw, daqk, dgc, HV, K, V, SK=decay.shape[-1], BT=BT,
            BK=GK, BV=GV,
            Q16=_same16(do, states), K16=_same16(v_new, ds), W16=_same16(du, states), A16=_same16(do, v_new),
            num_warps=g_warps, num_stages=1 if INTERPRET else g_stages,
        )
    return du, dqg, dkg, dw, daqk, dgc, dh0


# ----------------------------------------------------------------------------------------------
# PyTorch mirror of the prep kernel (differentiable)
# ----------------------------------------------------------------------------------------------

def prep_torch(q, k, v, g, beta, valid, A_log, dt_bias, cfg, return_t=False):
    """q, k: [C, BT, H, K]; v: [C, BT, HV, V]; g: [C, BT, HV, K]; beta: [C, BT, HV]; valid: [C, BT] bool.

    Returns w, u, qg, kg ([C, HV, BT, .]), Aqk [C, HV, BT, BT] and gC [C, HV, K], as the kernels compute them
    (they store gC as its exponential, the chunk's decay; here it stays a log, as ``dgc`` is its gradient)
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
            grads = [x[c0:c1].float() for x in (dw, du, dqg, dkg, daqk, dgc)]
            torch.autograd.backward(outs, grads)
    dq, dk, dv, dg, dbeta = (lf.grad.reshape(x.shape).to(x.dtype) if lf.grad is not None else torch.zeros_like(x)
                             for lf, x in zip(leaves, (q, k, v, g, beta)))
    dA = None if a_leaf is None else (a_leaf.grad if a_leaf.grad is not None else torch.zeros_like(A_log))
    dbias = None if b_leaf is None else (b_leaf.grad if b_leaf.grad is not None else torch.zeros_like(dt_bias))
    return dq, dk, dv, dg, dbeta, dA, dbias


def recompute_dtypes(q):
    """Storage types of the backward's rebuilt intermediates (w, qg, kg; u; the chunk states stay
    float32). By default (``KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT=u32``) the forward's own 16-bit type with
    u in float32: forward + backward 9.58 -> 8.69 ms at T=8K, H=32 on an H200 (session 9), worst gradient
    error on the GPU suite dbeta 6.0e-3 (kg's rounding, read by the reverse sweep), dA_log 5.0e-3.
    ``=1`` stores u in 16 bits too (a further ~1%), but dA_log with -1000 gates then reaches 1.8e-2
    against float64, over the 1e-2 bound: u's rounding together with the tf32 state products (with
    exact products the rounding alone moves it by 1.5e-3; session 8, docs/benchmarks.md). ``=0``
    rebuilds everything in float32. Float32 inputs always rebuild in float32."""
    mode = env_choice("KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT", "u32", ("u32", "0", "1"))
    if mode == "1":
        return storage_dtype(q), storage_dtype(q)
    if mode == "u32":
        return storage_dtype(q), torch.float32
    return torch.float32, torch.float32


def chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, do, dht, cfg, info, seq, kept=None):
    """``kept``: (Aqk fp32, T, activated gate or None, L2-norm factors or None) kept by the forward, or None
    to recompute them (the same numbers)."""
    shapes, BT = cfg.shapes, cfg.BT
    use_kernel = BT in (16, 32, 64, 128) and env_choice("KIMI_LINEAR_KDA_PREP_BWD", "kernel",
                                                        ("kernel", "autograd")) == "kernel"
    # 16-bit intermediates need the padded layout, as in the forward (the unpadded one was wrong on
    # triton 3.6 for K=60).
    dtype, u_dtype = recompute_dtypes(q)
    # The activated gate, once for the rebuild and the prep backward's launches before pass 2.
    g_act = gate_prepass(g, A_log, dt_bias, cfg.lower_bound, cfg.gate, None if kept is None else kept[2])
    t_given = None if kept is None else kept[1]
    prep_kw = dict(scale=cfg.scale, shapes=shapes, gate=cfg.gate, A_log=A_log, dt_bias=dt_bias,
                   lower_bound=cfg.lower_bound, l2norm=cfg.l2norm, beta_sigmoid=cfg.beta_sigmoid,
                   neg_eigval=cfg.neg_eigval, BT=BT, dtype=dtype, pad=dtype != torch.float32, store_t=use_kernel,
                   aqk_dtype=torch.float32, u_dtype=u_dtype, g_act=g_act, norms=None if kept is None else kept[3])
    handoff = handoff_dtypes(q)
    v_new = torch.empty(info.shape[0], shapes.HV, BT, shapes.V, device=q.device, dtype=handoff["vnew"])
    aqk = None if kept is None else kept[0]
    outs, _, states = prep_and_recur(q, k, v, g, beta, info, seq, prep_kw, h0=h0, out=None, store_final=False,
                                     store_states=True, t_given=t_given, aqk=aqk, v_new=v_new,
                                     states_dtype=handoff["states"])
    if aqk is None:
        aqk = outs[4]
    w, u, qg, kg, _, decay = outs[:6]
    tinv = outs[6] if use_kernel else None
    du, dqg, dkg, dw, daqk, dgc, dh0 = chunk_recur_bwd(
        w, qg, kg, aqk, decay, info, seq, states, v_new, None if dht is None else dht.contiguous(), do,
        shapes=shapes, BT=BT, handoff=handoff,
    )
    del w, u, qg, kg, aqk, decay, states, v_new
    if use_kernel:
        # A kept T must survive a second backward (retain_graph), so it is not reused as scratch.
        grads = chunk_prep_bwd(q, k, v, g, beta, A_log, dt_bias, info, tinv, dw, du, dqg, dkg, daqk, dgc, cfg=cfg,
                               overwrite_t=kept is None, g_act=g_act)
    else:
        grads = _prep_bwd_autograd(q, k, v, g, beta, A_log, dt_bias, info, dw, du, dqg, dkg, daqk, dgc, cfg)
    return (*grads, (dh0 if h0 is not None else None))
