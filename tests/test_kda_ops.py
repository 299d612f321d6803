"""The KDA operator on the CPU (PyTorch paths) against the float64 token loop.

Tolerances (relative RMS error against float64): float32 inputs <= 1e-5, bf16 inputs <= 5e-3,
float32 gradients <= 1e-4; float64 gradients by torch.autograd.gradcheck.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_linear.ops import (
    chunk_kda, fused_kda_gate, fused_recurrent_kda, kda_gate_lower_bound, kda_gate_softplus,
)

from kda_utils import check_half_state_pool, make_inputs, reference, rel_rms

FP32_TOL = 1e-5
BF16_TOL = 5e-3
FP32_GRAD_TOL = 1e-4

HEAD_DIMS = [(32, 32), (60, 100), (64, 64), (100, 60), (128, 128)]
LENGTHS = [1, 15, 63, 64, 65, 200, 1000]


def assert_close(x, ref, tol, what):
    err = rel_rms(x, ref)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,V", HEAD_DIMS)
@pytest.mark.parametrize("T", LENGTHS)
def test_chunk_matches_reference_fp32(T, K, V):
    x = make_inputs(B=2, T=T, H=2, K=K, V=V, seed=T * 1000 + K)
    o, s = x.call(chunk_kda)
    o_ref, s_ref = reference(x)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.shape == (2, T, 2, V) and s.shape == (2, 2, K, V)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "final state")


@pytest.mark.parametrize("K,V", [(32, 32), (60, 100), (128, 128)])
@pytest.mark.parametrize("T", [1, 15, 65, 200])
def test_fused_recurrent_matches_reference_fp32(T, K, V):
    x = make_inputs(B=3, T=T, H=2, K=K, V=V, seed=T + K)
    o, s = x.call(fused_recurrent_kda)
    o_ref, s_ref = reference(x)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "final state")


@pytest.mark.parametrize("T", [63, 200, 1000])
@pytest.mark.parametrize("gate", ["softplus", "lower_bound"])
def test_chunk_bf16(T, gate):
    x = make_inputs(B=2, T=T, H=4, K=64, V=64, gate=gate, dtype=torch.bfloat16, seed=T)
    o, s = x.call(chunk_kda)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # The reference sees the same bf16-rounded inputs, so the error is the operator's own.
    o_ref, s_ref = reference(x)
    assert_close(o, o_ref, BF16_TOL, "o")
    assert_close(s, s_ref, BF16_TOL, "final state")


@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
@pytest.mark.parametrize("l2norm_in_kernel", [True, False])
@pytest.mark.parametrize("beta_logits", [True, False])
def test_gate_forms_and_flags(gate, l2norm_in_kernel, beta_logits):
    x = make_inputs(B=2, T=130, H=2, K=48, V=40, gate=gate, l2norm_in_kernel=l2norm_in_kernel,
                    beta_logits=beta_logits, seed=7)
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert_close(o, o_ref, FP32_TOL, f"{fn.__name__} o")
        assert_close(s, s_ref, FP32_TOL, f"{fn.__name__} state")


def test_default_scale_is_inverse_sqrt_k_and_custom_scale_applies():
    x = make_inputs(B=1, T=70, H=2, K=64, V=32, seed=3)
    o_default, _ = x.call(chunk_kda)
    o_explicit, _ = x.call(chunk_kda, scale=64 ** -0.5)
    torch.testing.assert_close(o_default, o_explicit, rtol=0, atol=0)
    x.kwargs["scale"] = 0.37
    o, s = x.call(chunk_kda)
    o_ref, s_ref = reference(x)
    assert_close(o, o_ref, FP32_TOL, "o with scale=0.37")
    assert rel_rms(o, o_default) > 0.1, "scale had no effect"


@pytest.mark.parametrize("gate", ["softplus", "pregated"])
@pytest.mark.parametrize("frac", [0.02, 0.3])
def test_extreme_gates_stay_finite_and_exact(gate, frac):
    x = make_inputs(B=2, T=300, H=2, K=32, V=32, gate=gate, extreme_gate_frac=frac, seed=11)
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert_close(o, o_ref, FP32_TOL, f"{fn.__name__} o")
        assert_close(s, s_ref, FP32_TOL, f"{fn.__name__} state")


def test_whole_chunk_of_minus_1000_gates_resets_the_state():
    x = make_inputs(B=1, T=200, H=1, K=16, V=16, gate="pregated", seed=5)
    x.g[:, 64:128] = -1000.0  # one full chunk of total forgetting
    o, s = x.call(chunk_kda)
    o_ref, s_ref = reference(x)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "state")


@pytest.mark.parametrize("logit", [-20.0, 20.0])
def test_beta_near_zero_and_one(logit):
    x = make_inputs(B=2, T=100, H=2, K=32, V=32, seed=int(logit) + 50)
    x.beta.fill_(logit)
    x.beta[:, ::7] = 0.0  # mix in ordinary values
    o_ref, s_ref = reference(x)
    o, s = x.call(chunk_kda)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "state")


def test_grouped_value_heads():
    x = make_inputs(B=2, T=90, H=2, HV=4, K=32, V=24, seed=13)
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert o.shape == (2, 90, 4, 24)
        assert_close(o, o_ref, FP32_TOL, f"{fn.__name__} o")
        assert_close(s, s_ref, FP32_TOL, f"{fn.__name__} state")


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128])
def test_chunk_sizes_agree(chunk_size):
    x = make_inputs(B=1, T=150, H=2, K=32, V=32, seed=17)
    o_ref, s_ref = reference(x)
    o, s = x.call(chunk_kda, chunk_size=chunk_size)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "state")


def test_without_initial_or_final_state():
    x = make_inputs(B=2, T=70, H=2, K=32, V=32, with_state=False, seed=19)
    x.kwargs["output_final_state"] = False
    o, s = x.call(chunk_kda)
    assert s is None
    o_ref, _ = reference(x)
    assert_close(o, o_ref, FP32_TOL, "o")


def test_empty_sequence_returns_initial_state():
    x = make_inputs(B=2, T=0, H=2, K=8, V=8, seed=1)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert o.shape == (2, 0, 2, 8)
        torch.testing.assert_close(s, x.initial_state)


# ---------------------------------------------------------------------------------------------
# Variable-length batches, split prefill, decode after prefill
# ---------------------------------------------------------------------------------------------

VARLEN_CASES = [
    [0, 1],
    [0, 15],
    [0, 1, 16, 80, 280],
    [0, 15, 100, 300, 301, 1200],
    [0, 64, 128, 129],
]


@pytest.mark.parametrize("cu", VARLEN_CASES)
@pytest.mark.parametrize("gate", ["softplus", "lower_bound"])
def test_varlen_matches_per_sequence_reference(cu, gate):
    x = make_inputs(B=1, T=cu[-1], H=2, K=32, V=48, gate=gate, cu_seqlens=cu, seed=len(cu))
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert s.shape == (len(cu) - 1, 2, 32, 48)
        assert_close(o, o_ref, FP32_TOL, f"{fn.__name__} o")
        assert_close(s, s_ref, FP32_TOL, f"{fn.__name__} state")


def test_varlen_allows_empty_sequences():
    cu = [0, 10, 10, 30]
    x = make_inputs(B=1, T=30, H=1, K=16, V=16, cu_seqlens=cu, seed=2)
    o, s = x.call(chunk_kda)
    torch.testing.assert_close(s[1], x.initial_state[1])
    o_ref, s_ref = reference(x)
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(s, s_ref, FP32_TOL, "state")


@pytest.mark.parametrize("split", [1, 37, 64, 100])
def test_prefill_in_pieces_equals_all_at_once(split):
    x = make_inputs(B=2, T=229, H=2, K=32, V=32, seed=split)
    o_all, s_all = x.call(chunk_kda)
    kw = dict(x.kwargs, A_log=x.A_log, dt_bias=x.dt_bias)
    first = slice(0, split)
    rest = slice(split, None)
    o1, s1 = chunk_kda(x.q[:, first], x.k[:, first], x.v[:, first], x.g[:, first], x.beta[:, first],
                       initial_state=x.initial_state, **kw)
    o2, s2 = chunk_kda(x.q[:, rest], x.k[:, rest], x.v[:, rest], x.g[:, rest], x.beta[:, rest],
                       initial_state=s1, **kw)
    assert_close(torch.cat([o1, o2], 1), o_all, FP32_TOL, "o")
    assert_close(s2, s_all, FP32_TOL, "state")


def test_decode_token_by_token_after_prefill_equals_one_pass():
    x = make_inputs(B=2, T=150, H=2, K=32, V=32, seed=23)
    o_all, s_all = x.call(chunk_kda)
    kw = dict(x.kwargs, A_log=x.A_log, dt_bias=x.dt_bias)
    P = 100
    outs = []
    o, state = chunk_kda(x.q[:, :P], x.k[:, :P], x.v[:, :P], x.g[:, :P], x.beta[:, :P],
                         initial_state=x.initial_state, **kw)
    outs.append(o)
    for t in range(P, 150):
        sl = slice(t, t + 1)
        o, state = fused_recurrent_kda(x.q[:, sl], x.k[:, sl], x.v[:, sl], x.g[:, sl], x.beta[:, sl],
                                       initial_state=state, **kw)
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_all, FP32_TOL, "o")
    assert_close(state, s_all, FP32_TOL, "state")


def test_intermediate_states_are_the_states_entering_each_chunk():
    x = make_inputs(B=2, T=150, H=2, K=16, V=16, seed=29)
    o, s, h = x.call(chunk_kda, return_intermediate_states=True)
    _, _, states = reference(x, return_all_states=True)
    assert h.shape == (2, 3, 2, 16, 16)
    assert_close(h[:, 0], x.initial_state, FP32_TOL, "chunk 0 start")
    assert_close(h[:, 1], states[:, 63], FP32_TOL, "chunk 1 start")
    assert_close(h[:, 2], states[:, 127], FP32_TOL, "chunk 2 start")
    h16 = x.cast(torch.bfloat16).call(chunk_kda, return_intermediate_states=True)[2]
    assert h16.dtype == torch.float32  # float32 whatever the inputs (documented: fla returns k's dtype)


def test_intermediate_states_varlen_layout():
    cu = [0, 10, 140]
    x = make_inputs(B=1, T=140, H=1, K=16, V=16, cu_seqlens=cu, seed=31)
    _, _, h = x.call(chunk_kda, return_intermediate_states=True)
    _, _, per_seq = reference(x, return_all_states=True)
    assert h.shape == (1, 1 + 3, 1, 16, 16)  # ceil(10/64) + ceil(130/64)
    assert_close(h[0, 0], x.initial_state[0], FP32_TOL, "seq 0 chunk 0")
    assert_close(h[0, 1], x.initial_state[1], FP32_TOL, "seq 1 chunk 0")
    assert_close(h[0, 2], per_seq[1][0, 63], FP32_TOL, "seq 1 chunk 1")
    assert_close(h[0, 3], per_seq[1][0, 127], FP32_TOL, "seq 1 chunk 2")


def test_state_v_first_layout_is_the_transpose():
    x = make_inputs(B=2, T=70, H=2, K=16, V=24, seed=37)
    o, s = x.call(chunk_kda)
    h0_vk = x.initial_state.transpose(-1, -2).contiguous()
    for fn in (chunk_kda, fused_recurrent_kda):
        o_t, s_t = x.call(fn, initial_state=h0_vk, state_v_first=True)
        assert s_t.shape == (2, 2, 24, 16)
        assert_close(o_t, o, FP32_TOL, "o")
        assert_close(s_t.transpose(-1, -2), s, FP32_TOL, "state")


def test_state_pool_decode_reads_and_writes_only_its_slots():
    x = make_inputs(B=3, T=1, H=2, K=16, V=16, seed=41)
    pool = torch.full((8, 2, 16, 16), 1e30)  # poisoned slots must stay untouched
    slots = torch.tensor([5, 0, 3])
    pool[slots] = x.initial_state
    untouched = [i for i in range(8) if i not in slots.tolist()]
    o_ref, s_ref = reference(x)
    o, s = x.call(fused_recurrent_kda, initial_state=pool, ssm_state_indices=slots, inplace_final_state=True)
    assert s is pool
    assert_close(o, o_ref, FP32_TOL, "o")
    assert_close(pool[slots], s_ref, FP32_TOL, "written slots")
    assert (pool[untouched] == 1e30).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_pool_in_16_bits(dtype):
    check_half_state_pool(fused_recurrent_kda, dtype)


def test_decode_writes_into_a_preallocated_output():
    x = make_inputs(B=2, T=1, H=2, K=16, V=16, seed=43)
    out = torch.full((2, 1, 2, 16), float("nan"))
    o, _ = x.call(fused_recurrent_kda, out=out)
    assert o is out and torch.isfinite(out).all()
    assert_close(out, reference(x)[0], FP32_TOL, "o")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 140), K=st.integers(1, 40), V=st.integers(1, 40), H=st.integers(1, 3),
    chunk_size=st.sampled_from([16, 32, 64]), gate=st.sampled_from(["softplus", "lower_bound", "pregated"]),
    extreme=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16),
)
def test_property_chunk_equals_token_loop(T, K, V, H, chunk_size, gate, extreme, seed):
    """Random shapes, chunk sizes, gates. Tiny random outputs can be sums that nearly cancel (a single
    output value 100x smaller than its terms), where no float32 algorithm reaches 1e-5 relative error:
    the bound is 1e-5 or 10x the float32 token loop's own error on the same inputs, whichever is larger."""
    x = make_inputs(B=1, T=T, H=H, K=K, V=V, gate=gate, seed=seed, extreme_gate_frac=extreme)
    o_ref, s_ref = reference(x)
    o_loop, s_loop = x.call(fused_recurrent_kda)
    o, s = x.call(chunk_kda, chunk_size=chunk_size)
    assert_close(o, o_ref, max(FP32_TOL, 10 * rel_rms(o_loop, o_ref)), "o")
    assert_close(s, s_ref, max(FP32_TOL, 10 * rel_rms(s_loop, s_ref)), "state")


# ---------------------------------------------------------------------------------------------
# Drop-in for flash-linear-attention: fla-core 0.6.0's parameters, in its order
# ---------------------------------------------------------------------------------------------

# Positional parameters and defaults of fla-core 0.6.0's public functions (fla/ops/kda/chunk.py,
# fused_recurrent.py and gate.py), and the names fla reads from its **kwargs. A call written for fla binds the same
# arguments here; our own additions are keyword-only.
FLA_POSITIONAL = {
    "chunk_kda": dict(
        q=None, k=None, v=None, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
        allow_neg_eigval=False, safe_gate=False, lower_bound=None, disable_recompute=False,
        return_intermediate_states=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None,
        cp_context=None, use_graph=False, max_num_seqs=None),
    "fused_recurrent_kda": dict(
        q=None, k=None, v=None, g=None, beta=None, A_log=None, dt_bias=None, scale=None, initial_state=None,
        output_final_state=False, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, lower_bound=None, state_v_first=False,
        cu_seqlens=None),
    "fused_kda_gate": dict(g=None, A_log=None, dt_bias=None, lower_bound=None, output_dtype=torch.float32),
}
FLA_KWARGS = {"chunk_kda": {"A_log", "dt_bias", "chunk_size", "transpose_state_layout"},
              "fused_recurrent_kda": {"transpose_state_layout"}, "fused_kda_gate": set()}


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda, fused_kda_gate], ids=lambda f: f.__name__)
def test_signature_is_fla_drop_in(fn):
    import inspect

    params = inspect.signature(fn).parameters.values()
    positional = {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}
    keyword_only = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    fla = FLA_POSITIONAL[fn.__name__]
    assert list(positional) == list(fla)  # same names in the same order
    assert {n: (None if d is inspect.Parameter.empty else d) for n, d in positional.items()} == fla
    assert FLA_KWARGS[fn.__name__] <= keyword_only


def test_fused_kda_gate_takes_fla_arguments():
    """fla's ``fused_kda_gate(g, A_log, dt_bias, lower_bound, output_dtype)``: our gate, in the asked dtype."""
    x = make_inputs(B=1, T=5, H=2, K=8, V=8, seed=4)
    g = x.g.to(torch.bfloat16)
    want = kda_gate_softplus(g, x.A_log, x.dt_bias)
    got = fused_kda_gate(g, x.A_log, x.dt_bias)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    got = fused_kda_gate(g, None, x.dt_bias, -5.0, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, kda_gate_lower_bound(g, None, x.dt_bias, -5.0).to(torch.bfloat16))


def test_positional_call_in_fla_order():
    """Arguments passed by position as fla takes them (lower_bound is chunk_kda's 14th, A_log and dt_bias
    fused_recurrent_kda's 6th and 7th) give what the same arguments by name give."""
    x = make_inputs(B=1, T=20, H=2, K=16, V=16, gate="lower_bound", seed=3)
    kw = dict(initial_state=x.initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True,
              use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=-5.0, A_log=x.A_log,
              dt_bias=x.dt_bias)
    ts = (x.q, x.k, x.v, x.g, x.beta)
    o, s = chunk_kda(*ts, None, x.initial_state, True, True, True, True, False, False, -5.0,
                     A_log=x.A_log, dt_bias=x.dt_bias)
    o_kw, s_kw = chunk_kda(*ts, **kw)
    assert torch.equal(o, o_kw) and torch.equal(s, s_kw)
    o, s = fused_recurrent_kda(*ts, x.A_log, x.dt_bias, None, x.initial_state, True, True, True, True, False, -5.0)
    o_kw, s_kw = fused_recurrent_kda(*ts, **kw)
    assert torch.equal(o, o_kw) and torch.equal(s, s_kw)


# ---------------------------------------------------------------------------------------------
# Gate functions
# ---------------------------------------------------------------------------------------------

def test_gate_functions_match_their_formulas():
    g = torch.randn(3, 5, 4, 8, dtype=torch.float64) * 10
    A_log = torch.randn(4, dtype=torch.float64)
    dt_bias = torch.randn(32, dtype=torch.float64)
    x = g + dt_bias.view(4, 8)
    softplus = torch.where(x > 20, x, torch.log1p(torch.exp(x)))
    expected = -torch.exp(A_log).view(4, 1) * softplus
    torch.testing.assert_close(kda_gate_softplus(g, A_log, dt_bias), expected)
    torch.testing.assert_close(kda_gate_softplus(g, A_log.view(1, 1, 4, 1), dt_bias.view(4, 8)), expected)
    lb = kda_gate_lower_bound(g, A_log, dt_bias, -5.0)
    torch.testing.assert_close(lb, -5.0 * torch.sigmoid(torch.exp(A_log).view(4, 1) * x))
    assert (lb <= 0).all() and (lb >= -5).all()  # open interval, closed once sigmoid saturates
    assert kda_gate_softplus(g.float(), A_log.float(), dt_bias.float()).dtype == torch.float32
    assert kda_gate_softplus(g.bfloat16(), A_log.float(), dt_bias.float()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
def test_gradcheck_float64(gate):
    x = make_inputs(B=1, T=19, H=1, K=4, V=3, gate=gate, dtype=torch.float64, seed=53, requires_grad=True)
    x.initial_state = x.initial_state.detach().double().requires_grad_()
    names = ["q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"]
    leaves = {n: getattr(x, n) for n in names if getattr(x, n) is not None}

    def f(*tensors):
        y = type(x)(**{**{n: getattr(x, n) for n in names}, **dict(zip(leaves, tensors)), "kwargs": x.kwargs})
        o, s = y.call(chunk_kda, chunk_size=16)  # T=19 spans two chunks and a padded tail
        return o, s

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
@pytest.mark.parametrize("T,K,V", [(65, 32, 32), (200, 60, 100)])
def test_gradients_fp32_against_float64_reference(gate, T, K, V):
    x = make_inputs(B=2, T=T, H=2, K=K, V=V, gate=gate, seed=T + K, requires_grad=True,
                    extreme_gate_frac=0.01)
    x64 = x.cast(torch.float64, torch.float64, torch.float64)
    for t in x64.tensors():
        t.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    do = torch.randn(2, T, 2, V, generator=gen, dtype=torch.float64)
    ds = torch.randn(2, 2, K, V, generator=gen, dtype=torch.float64)

    o, s = x.call(chunk_kda)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    o_ref, s_ref = reference(x64)
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()

    for name, a, b in zip(["q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"],
                          [x.q, x.k, x.v, x.g, x.beta, x.A_log, x.dt_bias, x.initial_state],
                          [x64.q, x64.k, x64.v, x64.g, x64.beta, x64.A_log, x64.dt_bias, x64.initial_state]):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient reached {name}"
        assert_close(a.grad, b.grad, FP32_GRAD_TOL, f"d{name}")


def test_gradients_varlen_and_extreme_gates_are_finite():
    cu = [0, 1, 15, 100]
    x = make_inputs(B=1, T=100, H=2, K=16, V=16, cu_seqlens=cu, extreme_gate_frac=0.2, seed=59,
                    requires_grad=True, gate="pregated")
    x64 = x.cast(torch.float64, torch.float64, torch.float64)
    for t in x64.tensors():
        t.requires_grad_(True)
    o, s = x.call(chunk_kda)
    (o.sum() + s.sum()).backward()
    o_ref, s_ref = reference(x64)
    (o_ref.sum() + s_ref.sum()).backward()
    for name in ["q", "k", "v", "g", "beta", "initial_state"]:
        a, b = getattr(x, name).grad, getattr(x64, name).grad
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert_close(a, b, FP32_GRAD_TOL, f"d{name}")
