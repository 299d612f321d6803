"""Argument checks for the public KDA functions.

Every check raises before any arithmetic, with a message that names the argument and what was
expected, so a bad call never turns into a silent wrong result or a shape error deep in a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class KDAShapes:
    B: int
    T: int
    H: int  # query/key heads
    HV: int  # value heads (HV % H == 0; HV > H is grouped-value attention)
    K: int
    V: int
    N: int  # number of sequences (B, or len(cu_seqlens) - 1)
    # cu_seqlens on the host, when known (from cu_seqlens_cpu, or the one copy the checks made): the GPU
    # path builds its chunk layout from it instead of copying cu_seqlens again. None for fixed length, and
    # during a CUDA-graph capture without cu_seqlens_cpu.
    cu: tuple | None = None


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _require_tensor(name: str, x, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_kda_inputs(
    q, k, v, g, beta, scale, initial_state, cu_seqlens,
    use_gate_in_kernel, A_log, dt_bias, lower_bound, state_pool_indices=None, state_v_first=False,
    cu_seqlens_cpu=None, half_state=False,
) -> KDAShapes:
    """The shapes of a valid call, or an error naming the argument at fault. ``half_state``: the state
    may also be float16 / bfloat16 (the decode path's state pool, as fla's fused_recurrent_kda takes it)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _require_tensor(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {_shape(q)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {_shape(q)} [B, T, H, K], got {_shape(k)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}, got shape {_shape(v)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"v's head count ({HV}) must be a multiple of q's ({H})")
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g must be [B, T, HV, K] = [{B}, {T}, {HV}, {K}], got {_shape(g)}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV] = [{B}, {T}, {HV}], got {_shape(beta)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head dimensions must be positive, got H={H}, K={K}, V={V}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")

    N, cu = B, None
    if cu_seqlens is not None:
        _require_tensor("cu_seqlens", cu_seqlens, floating=False)
        if cu_seqlens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"cu_seqlens must be int64 (or int32), got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {_shape(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
        # No host copy inside a CUDA graph capture (it would break the capture): shape checks only there.
        # Otherwise the caller's CPU copy (FLA's cu_seqlens_cpu), or one host copy of a small vector.
        if cu_seqlens_cpu is not None:
            if cu_seqlens_cpu.shape != cu_seqlens.shape:
                raise ValueError(f"cu_seqlens_cpu must have cu_seqlens' shape {_shape(cu_seqlens)}, "
                                 f"got {_shape(cu_seqlens_cpu)}")
            cu = cu_seqlens_cpu.tolist()
        elif _capturing(cu_seqlens):
            cu = None
        else:
            cu = cu_seqlens.tolist()
        if cu is not None:
            if cu[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
            if any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
            if cu[-1] != T:
                raise ValueError(f"cu_seqlens must end at T={T} (the packed length), got {cu[-1]}")
            cu = tuple(cu)
        N = cu_seqlens.numel() - 1

    if use_gate_in_kernel:
        if A_log is None and lower_bound is None:
            raise ValueError("use_gate_in_kernel=True with the softplus gate needs A_log (shape [HV])")
        if A_log is not None:
            _require_tensor("A_log", A_log)
            if A_log.numel() != HV:
                raise ValueError(f"A_log must hold HV={HV} values (shape [HV]), got shape {_shape(A_log)}")
        if dt_bias is not None:
            _require_tensor("dt_bias", dt_bias)
            if dt_bias.numel() != HV * K:
                raise ValueError(
                    f"dt_bias must hold HV*K={HV * K} values (shape [HV*K]), got shape {_shape(dt_bias)}"
                )
        if lower_bound is not None:
            check_lower_bound(lower_bound)
    else:
        given = [n for n, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)) if x is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} given but use_gate_in_kernel=False: g is taken as the final log decay; "
                "pass use_gate_in_kernel=True to apply the gate inside the operator"
            )

    if initial_state is not None:
        _require_tensor("initial_state", initial_state)
        want_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        if half_state:
            want_dtypes += (torch.float16, torch.bfloat16)
        if initial_state.dtype not in want_dtypes:
            raise TypeError(
                f"initial_state must be float32 (float64 allowed for float64 inputs"
                f"{'; float16 or bfloat16 for fused_recurrent_kda' if half_state else ''}), got {initial_state.dtype}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        # States are [.., K, V]; FLA's state_v_first layout stores them transposed.
        inner, names = ((V, K), "V, K") if state_v_first else ((K, V), "K, V")
        if state_pool_indices is None:
            if initial_state.shape != (N, HV, *inner):
                raise ValueError(
                    f"initial_state must be [N, HV, {names}] = [{N}, {HV}, {inner[0]}, {inner[1]}], "
                    f"got {_shape(initial_state)}"
                )
        elif initial_state.dim() != 4 or initial_state.shape[1:] != (HV, *inner):
            raise ValueError(
                f"the state pool (initial_state) must be [P, HV, {names}] = [P, {HV}, {inner[0]}, {inner[1]}], "
                f"got {_shape(initial_state)}"
            )
    if state_pool_indices is not None:
        _require_tensor("ssm_state_indices", state_pool_indices, floating=False)
        if initial_state is None:
            raise ValueError("ssm_state_indices needs initial_state, the state pool [P, HV, K, V]")
        if state_pool_indices.shape != (N,):
            raise ValueError(f"ssm_state_indices must be [N] = [{N}], got {_shape(state_pool_indices)}")
        slots = initial_state.shape[0]
        if state_pool_indices.numel() and state_pool_indices.is_cuda:
            # No host synchronisation on the decode path: a device-side assert, reported at a later sync.
            if not _capturing(state_pool_indices):
                in_range = ((state_pool_indices >= 0) & (state_pool_indices < slots)).all()
                torch._assert_async(in_range, f"ssm_state_indices must lie in [0, {slots}) (the pool's slots)")
        elif state_pool_indices.numel():
            low, high = int(state_pool_indices.min()), int(state_pool_indices.max())
            if low < 0 or high >= slots:
                raise ValueError(
                    f"ssm_state_indices must lie in [0, {slots}) (the pool has {slots} slots), "
                    f"got values from {low} to {high}"
                )
    return KDAShapes(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, cu=cu)


def _capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured (a host synchronisation would break the capture)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_lower_bound(lower_bound) -> None:
    """The bounded gate's floor must lie in [-5, 0) (FLA's range; every kernel relies on it)."""
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) or not (-5.0 <= lower_bound < 0.0):
        raise ValueError(f"lower_bound must be a number in [-5, 0), got {lower_bound!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size not in SUPPORTED_CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES}, got {chunk_size!r}")
