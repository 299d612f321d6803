"""Long sequences and many-sequence varlen batches on the CPU (about 10 s in all).

Same tolerances as tests/test_kda_ops.py, against the float64 token loop: float32 <= 1e-5 on outputs
and states, <= 1e-4 on gradients.
"""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops import chunk_kda, fused_recurrent_kda

from kda_utils import make_inputs, reference, rel_rms

@pytest.mark.parametrize("gate", ["softplus", "lower_bound"])
@pytest.mark.parametrize("T", [4096, 8192])
def test_long_sequences_forward(T, gate):
    x = make_inputs(B=1, T=T, H=2, K=64, V=64, gate=gate, seed=T, extreme_gate_frac=0.001)
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert rel_rms(o, o_ref) <= 1e-5, fn.__name__
        assert rel_rms(s, s_ref) <= 1e-5, fn.__name__


def test_long_sequence_gradients():
    T = 2048
    x = make_inputs(B=1, T=T, H=2, K=32, V=32, seed=1, requires_grad=True)
    x64 = x.cast(torch.float64, torch.float64, torch.float64)
    for t in x64.tensors():
        t.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    do = torch.randn(1, T, 2, 32, generator=gen, dtype=torch.float64)
    o, s = x.call(chunk_kda)
    ((o.double() * do).sum() + s.double().sum()).backward()
    o_ref, s_ref = reference(x64)
    ((o_ref * do).sum() + s_ref.sum()).backward()
    for name in ["q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"]:
        err = rel_rms(getattr(x, name).grad, getattr(x64, name).grad)
        assert err <= 1e-4, f"d{name}: {err:.2e}"


def test_varlen_many_sequences():
    lengths = [1, 15, 64, 65, 300, 1000, 3, 2000]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    x = make_inputs(B=1, T=cu[-1], H=2, K=48, V=40, cu_seqlens=cu, seed=5, extreme_gate_frac=0.01)
    o_ref, s_ref = reference(x)
    for fn in (chunk_kda, fused_recurrent_kda):
        o, s = x.call(fn)
        assert rel_rms(o, o_ref) <= 1e-5, fn.__name__
        assert rel_rms(s, s_ref) <= 1e-5, fn.__name__
