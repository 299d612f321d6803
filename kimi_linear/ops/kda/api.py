"""Public KDA operator: ``chunk_kda`` (prefill, training) and ``fused_recurrent_kda`` (decode).

Signatures follow flash-linear-attention 0.6 so callers can switch by changing an import. Each call
checks its arguments, then dispatches: CUDA tensors go to the Triton kernels when they are available,
everything else to the PyTorch implementations in this package (chunked or token loop), which are
differentiable by autograd.

The PyTorch path computes in float32 (float64 for float64 inputs) whatever the input dtype, keeps the
state in float32, and returns ``o`` in q's dtype.
"""

from __future__ import annotations

import os

import torch

from .checks import KDAShapes, check_chunk_size, check_kda_inputs
from .chunk import chunk_kda_torch
from .gate import compute_dtype_for, kda_gate, l2norm
from .reference import recurrent_kda_reference

BACKEND_ENV = "KIMI_LINEAR_KDA_BACKEND"  # "torch" forces the PyTorch path, "triton" forbids falling back


# What the Triton kernels are built for; anything else (float64 gradchecks, huge heads) runs in PyTorch.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def _gpu_backend(x: torch.Tensor, shapes: KDAShapes):
    """The Triton backend module for CUDA tensors, or None to use PyTorch."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice == "torch" or (not x.is_cuda and choice != "triton"):
        return None
    unsupported = x.dtype not in TRITON_DTYPES or max(shapes.K, shapes.V) > TRITON_MAX_HEAD_DIM
    if unsupported:
        if choice == "triton":
            raise ValueError(
                f"{BACKEND_ENV}=triton, but the Triton kernels take {', '.join(map(str, TRITON_DTYPES))} inputs "
                f"with K, V <= {TRITON_MAX_HEAD_DIM}; got {x.dtype}, K={shapes.K}, V={shapes.V}"
            )
        return None
    try:
        from . import triton_backend  # noqa: PLC0415 (optional: needs triton and a GPU or the interpreter)
    except ImportError:
        if choice == "triton":
            raise
        return None
    return triton_backend


# ----------------------------------------------------------------------------------------------
# Input preparation shared by the PyTorch paths
# ----------------------------------------------------------------------------------------------

def prepare_kda_inputs(
    q, k, v, g, beta, shapes: KDAShapes, *, use_qk_l2norm_in_kernel, use_gate_in_kernel,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, A_log, dt_bias, lower_bound,
):
    """Apply the fused pre-steps (L2 norm, gate, beta sigmoid) and expand q/k to the value heads.

    Returns q, k, v, g, beta in the compute dtype, all with HV heads.
    """
    dtype = compute_dtype_for(q, k, v, g, beta, A_log, dt_bias)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta)
        if allow_neg_eigval:
            beta = beta * 2.0
    group = shapes.HV // shapes.H
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    return q, k, v, g, beta


class _Packing:
    """Moves packed variable-length sequences ``[1, T, ...]`` into a zero-padded batch ``[N, Tmax, ...]``.

    Padding sits after each sequence's last token. Padded steps have g = 0 and beta = 0, the identity
    update, so the state that leaves a padded sequence is the state after its last real token.
    """

    def __init__(self, cu_seqlens: torch.Tensor | None, T: int, device):
        self.cu = None if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
        if self.cu is None:
            return
        lengths = [b - a for a, b in zip(self.cu, self.cu[1:])]
        self.lengths = lengths
        self.t_max = max(lengths) if lengths else 0
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        starts = torch.tensor(self.cu[:-1], dtype=torch.long)
        pos = torch.arange(T) - starts[seq]
        self.seq, self.pos = seq.to(device), pos.to(device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.cu is None:
            return x
        out = x.new_zeros(len(self.lengths), self.t_max, *x.shape[2:])
        return out.index_put((self.seq, self.pos), x[0])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.cu is None:
            return x
        return x[self.seq, self.pos].unsqueeze(0)

    def chunk_states(self, states: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """[N, NTmax, ...] chunk-start states -> [1, sum_n ceil(len_n / C), ...] (FLA's varlen layout)."""
        if self.cu is None:
            return states
        parts = [states[n, : -(-length // chunk_size)] for n, length in enumerate(self.lengths)]
        return torch.cat(parts, dim=0).unsqueeze(0)


def _read_state(initial_state, indices, state_v_first):
    if initial_state is None:
        return None
    state = initial_state if indices is None else initial_state[indices.long()]
    return state.transpose(-1, -2) if state_v_first else state


def _write_state(final_state, state_v_first):
    return final_state.transpose(-1, -2).contiguous() if state_v_first else final_state


def _reject_unsupported(cp_context=None, use_graph=False) -> None:
    if cp_context is not None:
        raise NotImplementedError("cp_context (multi-GPU context parallelism) is not supported yet")
    if use_graph:
        raise NotImplementedError(
            "use_graph=True (a device-built varlen chunk list, so that a captured CUDA graph can replay new "
            "cu_seqlens contents) is not supported; a captured call replays the offsets it was captured with "
            "(pass cu_seqlens_cpu, and call once with them before the capture)"
        )


def _state_layout(state_v_first: bool, transpose_state_layout: bool) -> bool:
    """fla's deprecated name for ``state_v_first``; both at once is an error, as in fla."""
    if state_v_first and transpose_state_layout:
        raise ValueError("pass state_v_first or its deprecated name transpose_state_layout, not both")
    return state_v_first or transpose_state_layout


def _check_call(
    q, k, v, g, beta, *, scale, initial_state, cu_seqlens, cu_seqlens_cpu, chunk_size, state_v_first,
    ssm_state_indices=None, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
    allow_neg_eigval, A_log, dt_bias, lower_bound, half_state=False,
):
    """Checks shared by both public functions; returns the shapes, the resolved scale and the flags
    every backend takes."""
    check_chunk_size(chunk_size)
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True needs use_beta_sigmoid_in_kernel=True")
    shapes = check_kda_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias, lower_bound,
        state_pool_indices=ssm_state_indices, state_v_first=state_v_first, cu_seqlens_cpu=cu_seqlens_cpu,
        half_state=half_state,
    )
    flags = dict(
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
    )
    return shapes, (shapes.K ** -0.5 if scale is None else scale), flags


def _packed_torch_inputs(q, k, v, g, beta, shapes, flags, cu_seqlens):
    """The PyTorch paths' inputs: pre-steps applied, varlen sequences moved into a padded batch."""
    packing = _Packing(cu_seqlens, shapes.T, q.device)
    prepared = prepare_kda_inputs(q, k, v, g, beta, shapes, **flags)
    return packing, [packing.pack(x) for x in prepared]


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    cp_context=None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    transpose_state_layout: bool = False,
):
    r"""Chunked Kimi Delta Attention, for prefill and training.

    Per value head, with state ``S`` of shape ``[K, V]``::

        S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]`` with ``HV % H == 0`` (``HV > H``: grouped value heads).
        g: ``[B, T, HV, K]``: the log decay (<= 0), or the raw gate input with ``use_gate_in_kernel``.
        beta: ``[B, T, HV]``: the update strength, or its logits with ``use_beta_sigmoid_in_kernel``.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` float32, N = B or the number of sequences in ``cu_seqlens``.
        output_final_state: also return the state after the last token (float32, ``[N, HV, K, V]``).
        use_qk_l2norm_in_kernel: L2-normalise q and k per head (``x / sqrt(sum x^2 + 1e-6)``).
        use_gate_in_kernel: apply the gate to ``g``: ``-exp(A_log) * softplus(g + dt_bias)``, or with
            ``lower_bound`` set, ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``.
        use_beta_sigmoid_in_kernel: ``beta = sigmoid(beta)`` (times 2 with ``allow_neg_eigval``).
        A_log: ``[HV]``; dt_bias: ``[HV * K]``; lower_bound: in ``[-5, 0)``.
        cu_seqlens: int64 ``[N + 1]`` offsets of sequences packed along T (B must be 1).
        chunk_size: 16, 32, 64 (default) or 128.
        return_intermediate_states: also return the state entering every chunk,
            ``[B, NT, HV, K, V]`` (varlen: ``[1, sum of per-sequence chunk counts, HV, K, V]``), in
            float32 (fla returns them in k's dtype: cast them if a prefix cache should hold 16 bits).
        state_v_first / transpose_state_layout: states are laid out ``[.., V, K]`` instead of ``[.., K, V]``.
        cu_seqlens_cpu: a CPU copy of cu_seqlens, read (instead of cu_seqlens) by the argument checks and
            the GPU path's chunk layout, so that a GPU call never waits for the device; without it the
            checks copy cu_seqlens to the host once. Inside a CUDA-graph capture a varlen call needs it,
            and a call with the same offsets before the capture.
        safe_gate, disable_recompute: accepted for FLA compatibility; the results do not depend on them
            (our kernels are safe for any gate).
        cp_context, use_graph: fla's context parallelism and device-built varlen chunk lists for CUDA
            graphs; not supported yet (``NotImplementedError`` unless left at None / False).
            max_num_seqs: fla's bound for ``use_graph``; accepted and unused.

    The parameters are fla-core 0.6.0's, in its order; A_log, dt_bias, chunk_size (fla's ``**kwargs``)
    and transpose_state_layout (fla's deprecated name for state_v_first) are keyword-only.

    Returns:
        ``(o, final_state)`` with ``o`` ``[B, T, HV, V]`` in q's dtype and ``final_state`` None unless
        asked for; ``(o, final_state, chunk_states)`` with ``return_intermediate_states``.
    """
    _reject_unsupported(cp_context, use_graph)
    state_v_first = _state_layout(state_v_first, transpose_state_layout)
    shapes, scale, flags = _check_call(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu, chunk_size=chunk_size,
        state_v_first=state_v_first, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
    )

    backend = _gpu_backend(q, shapes)
    if backend is not None:
        return backend.chunk_kda(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size, shapes=shapes,
            return_intermediate_states=return_intermediate_states, state_v_first=state_v_first, **flags,
        )

    packing, (q_, k_, v_, g_, beta_) = _packed_torch_inputs(q, k, v, g, beta, shapes, flags, cu_seqlens)
    o, final_state, chunk_states = chunk_kda_torch(
        q_, k_, v_, g_, beta_, scale,
        initial_state=_read_state(initial_state, None, state_v_first),
        chunk_size=chunk_size, return_chunk_states=return_intermediate_states,
    )
    o = packing.unpack(o).to(q.dtype)
    final_state = _write_state(final_state, state_v_first) if output_final_state else None
    if return_intermediate_states:
        chunk_states = _write_state(packing.chunk_states(chunk_states, chunk_size), state_v_first)
        return o, final_state, chunk_states
    return o, final_state


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    ssm_state_indices: torch.Tensor | None = None,
    inplace_final_state: bool = False,
    out: torch.Tensor | None = None,
    return_all_states: bool = False,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    transpose_state_layout: bool = False,
    chunk_size: int = 64,
):
    r"""Token-by-token Kimi Delta Attention: the decode path (one or a few tokens per sequence).

    Same arguments and results as :func:`chunk_kda` (``chunk_size`` is accepted and ignored). The
    positional parameters are fla-core 0.6.0's, in its order (A_log and dt_bias right after beta, as
    there); ours are keyword-only:

    Args:
        ssm_state_indices: int ``[N]``: ``initial_state`` is a state pool ``[P, HV, K, V]`` and
            sequence n reads slot ``ssm_state_indices[n]`` (continuous batching).
        inplace_final_state: write each sequence's final state back into its slot of
            ``initial_state`` (which is then also returned as the final state).
        out: optional preallocated output ``[B, T, HV, V]``, written and returned.
        initial_state: may also be float16 or bfloat16 here (a 16-bit state pool halves the decode's state
            traffic, as in fla): it is read into float32, the recurrence runs in float32, and the in-place
            write rounds the final state to the pool's type; a final state returned otherwise is float32.
        return_all_states: also return the state after every token, float32 ``[B, T, HV, K, V]``
            (``[.., V, K]`` with ``state_v_first``), for speculative-decoding rollback:
            ``(o, final_state, all_states)``.
    """
    state_v_first = _state_layout(state_v_first, transpose_state_layout)
    shapes, scale, flags = _check_call(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu, chunk_size=chunk_size,
        state_v_first=state_v_first, ssm_state_indices=ssm_state_indices,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound, half_state=True,
    )
    if inplace_final_state and initial_state is None:
        raise ValueError("inplace_final_state=True needs initial_state to write into")
    if out is not None:
        want = (shapes.B, shapes.T, shapes.HV, shapes.V)
        if not isinstance(out, torch.Tensor) or out.shape != want:
            raise ValueError(f"out must be a tensor of shape {list(want)}, got {getattr(out, 'shape', out)}")

    backend = _gpu_backend(q, shapes)
    if backend is not None:
        return backend.fused_recurrent_kda(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, shapes=shapes, ssm_state_indices=ssm_state_indices,
            inplace_final_state=inplace_final_state, out=out, state_v_first=state_v_first,
            return_all_states=return_all_states, **flags,
        )

    packing, (q_, k_, v_, g_, beta_) = _packed_torch_inputs(q, k, v, g, beta, shapes, flags, cu_seqlens)
    o, final_state, all_states = recurrent_kda_reference(
        q_, k_, v_, g_, beta_, scale, initial_state=_read_state(initial_state, ssm_state_indices, state_v_first),
        return_all_states=return_all_states,
    )
    o = packing.unpack(o).to(q.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    final_state = _write_state(final_state, state_v_first)
    if inplace_final_state:
        with torch.no_grad():
            if ssm_state_indices is None:
                initial_state.copy_(final_state)
            else:
                initial_state[ssm_state_indices.long()] = final_state.to(initial_state.dtype)
        final_state = initial_state
    final_state = final_state if output_final_state or inplace_final_state else None
    if return_all_states:
        all_states = _write_state(packing.unpack(all_states).to(torch.float32), state_v_first)
        return o, final_state, all_states
    return o, final_state
