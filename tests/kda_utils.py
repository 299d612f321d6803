"""Shared helpers for KDA tests: random inputs and the float64 token-loop gold reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kimi_linear.ops import kda_gate, l2norm, recurrent_kda_reference


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (NaN or inf anywhere gives inf, so it always fails)."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm()
    return float((x - ref).norm() / (denom if denom > 0 else 1.0))


@dataclass
class KDAInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    A_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None
    initial_state: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)  # flags for chunk_kda / fused_recurrent_kda

    def tensors(self):
        return [t for t in (self.q, self.k, self.v, self.g, self.beta, self.A_log, self.dt_bias,
                            self.initial_state) if t is not None]

    def call(self, fn, **extra):
        kw = dict(self.kwargs, initial_state=self.initial_state)
        if self.A_log is not None:
            kw["A_log"] = self.A_log
        if self.dt_bias is not None:
            kw["dt_bias"] = self.dt_bias
        kw.update(extra)
        return fn(self.q, self.k, self.v, self.g, self.beta, **kw)

    def cast(self, dtype, state_dtype=torch.float32, params_dtype=torch.float32) -> "KDAInputs":
        def c(t, d):
            return None if t is None else t.detach().to(d).requires_grad_(t.requires_grad)

        return KDAInputs(
            c(self.q, dtype), c(self.k, dtype), c(self.v, dtype), c(self.g, dtype), c(self.beta, dtype),
            c(self.A_log, params_dtype), c(self.dt_bias, params_dtype), c(self.initial_state, state_dtype),
            dict(self.kwargs),
        )


def make_inputs(
    B=2, T=64, H=2, K=32, V=32, HV=None, *, gate="softplus", l2norm_in_kernel=True, dtype=torch.float32,
    with_state=True, seed=0, scale=None, beta_logits=True, extreme_gate_frac=0.0, extreme_value=None,
    cu_seqlens=None, requires_grad=False,
) -> KDAInputs:
    """Random inputs for every gate form.

    gate: "softplus" (the 48B checkpoint's, raw g with A_log/dt_bias), "lower_bound" (lower_bound=-5),
    or "pregated" (g is already a log decay <= 0). extreme_gate_frac sets that fraction of the log
    decays to -1000 (pregated) or the raw gate to +1000 (in-kernel gates, which saturates to -exp(A)*1000);
    ``extreme_value`` replaces that value.
    """
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k = randn(B, T, H, K), randn(B, T, H, K)
    if not l2norm_in_kernel:
        # Without the in-kernel L2 norm, unit-norm keys keep the delta rule contractive.
        q, k = l2norm(q), l2norm(k)
    v = randn(B, T, HV, V)
    beta = randn(B, T, HV) if beta_logits else torch.sigmoid(randn(B, T, HV))
    kwargs = dict(use_qk_l2norm_in_kernel=l2norm_in_kernel, use_beta_sigmoid_in_kernel=beta_logits,
                  output_final_state=True)
    if scale is not None:
        kwargs["scale"] = scale
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64)
    A_log = dt_bias = None
    if gate == "pregated":
        g = -torch.nn.functional.softplus(randn(B, T, HV, K)) * 0.5
        default_extreme = -1000.0
    else:
        g = randn(B, T, HV, K)
        A_log = torch.log(torch.empty(HV, dtype=torch.float64).uniform_(0.5, 4.0, generator=gen))
        dt_bias = randn(HV * K) * 0.5
        kwargs["use_gate_in_kernel"] = True
        if gate == "lower_bound":
            kwargs["lower_bound"] = -5.0
        elif gate != "softplus":
            raise ValueError(gate)
        default_extreme = 1000.0
    extreme_value = default_extreme if extreme_value is None else float(extreme_value)
    if extreme_gate_frac:
        mask = torch.rand(B, T, HV, K, generator=gen) < extreme_gate_frac
        g = torch.where(mask, torch.full_like(g, extreme_value), g)
    h0 = randn(N, HV, K, V) if with_state else None
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = KDAInputs(q, k, v, g, beta, A_log, dt_bias, h0, kwargs).cast(dtype, wide, wide)
    if requires_grad:
        for t in inputs.tensors():
            t.requires_grad_(True)
    return inputs


def reference(inputs: KDAInputs, return_all_states: bool = False):
    """Float64 token loop over the same inputs, sequence by sequence. Returns (o, final_state[, states])."""
    x = inputs.cast(torch.float64, torch.float64, torch.float64) if inputs.q.dtype != torch.float64 else inputs
    kw = inputs.kwargs
    q, k, v, g, beta = x.q, x.k, x.v, x.g, x.beta
    if kw.get("use_qk_l2norm_in_kernel"):
        q, k = l2norm(q), l2norm(k)
    if kw.get("use_gate_in_kernel"):
        g = kda_gate(g, x.A_log, x.dt_bias, kw.get("lower_bound"))
    if kw.get("use_beta_sigmoid_in_kernel"):
        beta = torch.sigmoid(beta)
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, 2), k.repeat_interleave(group, 2)
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    cu = kw.get("cu_seqlens")
    if cu is None:
        return recurrent_kda_reference(q, k, v, g, beta, scale, x.initial_state, return_all_states)[
            : 3 if return_all_states else 2
        ]
    outs, finals, states = [], [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        h0 = None if x.initial_state is None else x.initial_state[n : n + 1]
        o, s, all_s = recurrent_kda_reference(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], scale, h0, return_all_states
        )
        outs.append(o)
        finals.append(s)
        states.append(all_s)
    o, s = torch.cat(outs, 1), torch.cat(finals, 0)
    return (o, s, states) if return_all_states else (o, s)


def check_half_state_pool(fused_recurrent_kda, dtype: torch.dtype, seed: int = 47, to_device=None) -> None:
    """``fused_recurrent_kda`` on a 16-bit state pool, in place, against the same call on a float32 pool
    holding the same values. The recurrence runs in float32 either way, so the outputs are identical and
    the written slots are the float32 run's final states rounded to the pool's type; the other slots stay
    as they were. Not in place, the final state comes back in float32. ``to_device`` moves the inputs
    (a ``KDAInputs`` function; the pool follows q's device)."""
    x = make_inputs(B=3, T=3, H=2, K=16, V=24, seed=seed)
    x = to_device(x) if to_device is not None else x
    slots = torch.tensor([4, 0, 2], device=x.q.device)
    pool16 = torch.full((6, 2, 16, 24), 7.0, device=x.q.device).to(dtype)
    pool16[slots] = x.initial_state.to(dtype)
    pool32 = pool16.float()
    h0 = pool16[slots].clone()
    o16, s16 = x.call(fused_recurrent_kda, initial_state=pool16, ssm_state_indices=slots, inplace_final_state=True)
    o32, _ = x.call(fused_recurrent_kda, initial_state=pool32, ssm_state_indices=slots, inplace_final_state=True)
    assert s16 is pool16 and s16.dtype == dtype
    assert torch.equal(o16, o32)
    assert torch.equal(pool16[slots], pool32[slots].to(dtype))
    assert (pool16[[1, 3, 5]] == 7).all()
    _, final = x.call(fused_recurrent_kda, initial_state=h0, output_final_state=True)
    assert final.dtype == torch.float32 and torch.equal(final, pool32[slots])
