"""Triton backend of the KDA operator (called by ``api.py`` for CUDA tensors, or for any tensor when
``KIMI_LINEAR_KDA_BACKEND=triton``; on the CPU that needs ``TRITON_INTERPRET=1``).

Entry points mirror the api call sites: ``chunk_kda(...)`` and ``fused_recurrent_kda(...)`` receive the
raw inputs plus the resolved ``scale``, the ``KDAShapes`` and the flags. The chunked path is a
``torch.autograd.Function`` (forward: the chunk-local launches, then one sequential launch; see
``triton/chunk_fwd.py``; backward: ``triton/chunk_bwd.py``).
"""

from __future__ import annotations

import torch

from .triton.chunk_bwd import chunk_kda_bwd
from .triton.chunk_fwd import chunk_layout, storage_dtype
from .triton.overlap import prep_and_recur
from .triton.recurrent import recurrent_kda_fwd
from .triton.utils import (
    env_choice, gate_chunk_prepass, gate_code, gate_cumsum_mode, gate_once, gate_prepass, norm_prepass,
)

# Internal chunk length of the Triton kernels. Results do not depend on it except for the layout of
# the interior states, which follow the caller's chunk_size.
DEFAULT_BT = 64
# A forward that needs no gradients and no interior states runs 32-row chunks: the pairs between its two
# 16-row sub-chunks are one block product (``chunk_fwd._chunk_pair_subchunk_kernel``), and the recurrence
# takes half the steps of 16-row chunks. H100, T=8K, H=32, session 14: forward 1.131 ms vs 1.184 at 16
# rows (recurrence 332 vs 508 us, pair kernel 123 us). Session 13 (H200): 16 rows 1.078 vs 1.188 ms at
# 64. The backward at 16 rows was 9% slower than at 64, so training keeps 64.
INFERENCE_BT = 32


def kernel_chunk(training: bool) -> int:
    """The kernel chunk length; ``KIMI_LINEAR_KDA_BT`` (16, 32 or 64) overrides it for timing."""
    forced = env_choice("KIMI_LINEAR_KDA_BT", "auto", ("auto", "16", "32", "64"))
    if forced != "auto":
        return int(forced)
    return DEFAULT_BT if training else INFERENCE_BT


def _c(x):
    return None if x is None else x.contiguous()


def _flat_params(A_log, dt_bias):
    a = None if A_log is None else A_log.reshape(-1).to(torch.float32).contiguous()
    b = None if dt_bias is None else dt_bias.reshape(-1).to(torch.float32).contiguous()
    return a, b


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def keep_for_backward() -> bool:
    """Whether the forward keeps Aqk (fp32) and T for the backward, which then skips recomputing them
    (512 B per token and value head at 64-row chunks), and its float32 activated gate and L2-norm factors
    (``activate_gate`` / ``qk_norms``, when those pre-passes run: 4 K bytes more per token and value head,
    512 B at K = 128, as for fla's kept float32 cumulative gate; 8 B per token and head for the norms),
    which the backward would otherwise compute again. KIMI_LINEAR_KDA_BWD_RECOMPUTE=full recomputes
    everything instead (the numbers are the same either way)."""
    return env_choice("KIMI_LINEAR_KDA_BWD_RECOMPUTE", "partial", ("partial", "full")) == "partial"


def _forward(q, k, v, g, beta, A_log, dt_bias, h0, cfg, store_states, keep=False):
    shapes, BT = cfg.shapes, cfg.BT
    info, seq = chunk_layout(shapes, cfg.cu_seqlens, BT, q.device)
    # The pre-passes here rather than inside chunk_prep, so that a training forward can keep them.
    g_cum = None
    if gate_cumsum_mode() == "prepass":
        g_act, g_cum = gate_chunk_prepass(g, A_log, dt_bias, cfg.lower_bound, cfg.gate, info, BT,
                                          store_act=gate_once(cfg.gate))
    else:
        g_act = gate_prepass(g, A_log, dt_bias, cfg.lower_bound, cfg.gate)
    norms = norm_prepass(q, k, cfg.l2norm)
    common = dict(scale=cfg.scale, shapes=shapes, gate=cfg.gate, A_log=A_log, dt_bias=dt_bias,
                  lower_bound=cfg.lower_bound, l2norm=cfg.l2norm, beta_sigmoid=cfg.beta_sigmoid,
                  neg_eigval=cfg.neg_eigval, BT=BT, g_act=g_act, norms=norms)
    prep_kw = dict(dtype=storage_dtype(q), pad=True, store_t=keep, aqk_dtype=torch.float32 if keep else None,
                   g_cum=g_cum, **common)
    o = torch.empty(shapes.B, shapes.T, shapes.HV, shapes.V, device=q.device, dtype=q.dtype)
    outs, ht, states = prep_and_recur(q, k, v, g, beta, info, seq, prep_kw, h0=h0, out=o, store_final=True,
                                      store_states=store_states)
    kept = (outs[4], outs[6], g_act, norms) if keep else None
    return o, ht, states, info, seq, kept


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, h0, cfg):
        keep = any(ctx.needs_input_grad[:8]) and keep_for_backward()
        o, ht, states, info, seq, kept = _forward(q, k, v, g, beta, A_log, dt_bias, h0, cfg, cfg.store_states, keep)
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, h0)
        ctx.cfg = cfg
        ctx.layout = (info, seq)
        ctx.kept = kept  # (Aqk fp32, T, activated gate or None, norm factors or None) or None; held as attributes
        if states is None:
            return o, ht
        ctx.mark_non_differentiable(states)
        return o, ht, states

    @staticmethod
    def backward(ctx, do, dht, *unused):
        q, k, v, g, beta, A_log, dt_bias, h0 = ctx.saved_tensors
        grads = chunk_kda_bwd(q, k, v, g, beta, A_log, dt_bias, h0, do, dht, ctx.cfg, *ctx.layout, kept=ctx.kept)
        dq, dk, dv, dg, dbeta, dA, dbias, dh0 = grads
        return dq, dk, dv, dg, dbeta, dA, dbias, dh0, None


def _every_chunk(states, BT, chunk_size, B, cu):
    """Kernel-chunk (BT rows) start states [NC, HV, K, V] -> the caller's chunk starts: [B, NT, ...] for
    fixed length (``cu`` None), [1, sum_n ceil(len_n / chunk_size), ...] for varlen at host offsets ``cu``
    (every chunk_size / BT-th state)."""
    step = chunk_size // BT
    if cu is None:
        states = states.reshape(B, states.shape[0] // B, *states.shape[1:])
        return states[:, ::step] if step > 1 else states
    if step > 1:
        keep, start = [], 0
        for a, b in zip(cu, cu[1:]):
            n = -(-(b - a) // BT)
            keep.extend(range(start, start + n, step))
            start += n
        states = states[torch.tensor(keep, dtype=torch.long).to(states.device, non_blocking=True)]
    return states.unsqueeze(0)


def _state_out(s, state_v_first):
    return s.transpose(-1, -2).contiguous() if state_v_first else s


def chunk_kda(
    q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size, shapes,
    return_intermediate_states, state_v_first, use_qk_l2norm_in_kernel, use_gate_in_kernel,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, A_log, dt_bias, lower_bound,
):
    # Differentiable reshapes/casts: gradients reach A_log, dt_bias and the initial state in their own layout.
    a = None if A_log is None else A_log.reshape(-1).to(torch.float32)
    b = None if dt_bias is None else dt_bias.reshape(-1).to(torch.float32)
    h0 = None if initial_state is None else (
        initial_state.transpose(-1, -2) if state_v_first else initial_state
    ).to(torch.float32)
    args = [x.contiguous() for x in (q, k, v, g, beta)] + [_c(a), _c(b), _c(h0)]
    training = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args)
    # Interior states are reported at the caller's chunk boundaries, so then the kernel chunk follows it,
    # up to 64 rows: 128-row chunks run as 64-row kernel chunks and report every other state (the tree
    # kernel at 128 rows needs 260 KB of shared memory, more than an H100 or H200 has).
    BT = min(chunk_size, kernel_chunk(True)) if return_intermediate_states else kernel_chunk(training)
    cfg = _Cfg(
        shapes=shapes, BT=BT, scale=float(scale), gate=gate_code(use_gate_in_kernel, lower_bound),
        lower_bound=lower_bound, l2norm=bool(use_qk_l2norm_in_kernel), beta_sigmoid=bool(use_beta_sigmoid_in_kernel),
        neg_eigval=bool(allow_neg_eigval), cu_seqlens=cu_seqlens, store_states=bool(return_intermediate_states),
    )
    outs = ChunkKDAFunction.apply(*args, cfg)
    o, ht = outs[0], outs[1]
    ht = _state_out(ht, state_v_first) if output_final_state else None
    if return_intermediate_states:
        # (shapes.cu: the checks' host offsets, set for every varlen call that got this far: chunk_layout
        # refuses one without them)
        states = _every_chunk(outs[2], BT, chunk_size, shapes.B, shapes.cu)
        return o, ht, _state_out(states, state_v_first)
    return o, ht


def fused_recurrent_kda(
    q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, shapes, ssm_state_indices,
    inplace_final_state, out, state_v_first, use_qk_l2norm_in_kernel, use_gate_in_kernel,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, A_log, dt_bias, lower_bound, return_all_states=False,
):
    """Decode path. No host synchronisation and, with ``out`` and ``inplace_final_state``, no allocation."""
    a, b = _flat_params(A_log, dt_bias)
    if out is None:
        out = torch.empty(shapes.B, shapes.T, shapes.HV, shapes.V, device=q.device, dtype=q.dtype)
    if inplace_final_state:
        final = initial_state
    elif output_final_state:
        final = torch.empty(shapes.N, shapes.HV, *((shapes.V, shapes.K) if state_v_first else (shapes.K, shapes.V)),
                            device=q.device, dtype=torch.float32)
    else:
        final = None
    all_states = None
    if return_all_states:
        dims = (shapes.V, shapes.K) if state_v_first else (shapes.K, shapes.V)
        all_states = torch.empty(shapes.B, shapes.T, shapes.HV, *dims, device=q.device, dtype=torch.float32)
    recurrent_kda_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale=scale,
        shapes=shapes, gate=gate_code(use_gate_in_kernel, lower_bound), A_log=a, dt_bias=b,
        lower_bound=lower_bound, l2norm=bool(use_qk_l2norm_in_kernel), beta_sigmoid=bool(use_beta_sigmoid_in_kernel),
        neg_eigval=bool(allow_neg_eigval), initial_state=initial_state,
        cu_seqlens=cu_seqlens, indices=ssm_state_indices, final_state=final, out=out,
        all_states=all_states, state_v_first=state_v_first,
    )
    if return_all_states:
        return out, final, all_states
    return out, final
