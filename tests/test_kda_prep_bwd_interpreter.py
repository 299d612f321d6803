"""The chunk-local backward kernel (``chunk_prep_bwd``) under TRITON_INTERPRET=1, float32, against float64
autograd through ``prep_torch`` (the differentiable mirror of the forward prep kernel), with random
upstream gradients."""

from __future__ import annotations

import os

import pytest
import torch

from kda_utils import make_inputs, rel_rms
from kimi_linear.ops.kda.checks import KDAShapes

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py on machines without a GPU)"),
]

TOL = 1e-4


def _cfg(shapes, BT, gate, lower_bound, l2norm, beta_sigmoid, neg_eigval, scale):
    from kimi_linear.ops.kda.triton_backend import _Cfg

    return _Cfg(shapes=shapes, BT=BT, scale=scale, gate=gate, lower_bound=lower_bound, l2norm=l2norm,
                beta_sigmoid=beta_sigmoid, neg_eigval=neg_eigval, cu_seqlens=None, store_states=False)


def _run(*, B=1, T=40, H=1, HV=None, K=20, V=24, BT=16, gate="softplus", l2norm=True, beta_sigmoid=True,
         neg_eigval=False, extreme=0.0, extreme_value=None, cu_seqlens=None, seed=0, overwrite_t=False, tol=TOL):
    from kimi_linear.ops.kda.triton.chunk_bwd import prep_torch
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_layout
    from kimi_linear.ops.kda.triton.prep_bwd import chunk_prep_bwd
    from kimi_linear.ops.kda.triton.utils import gate_code

    HV = HV or H
    inp = make_inputs(B=B, T=T, H=H, K=K, V=V, HV=HV, gate=gate, l2norm_in_kernel=l2norm, seed=seed,
                      beta_logits=beta_sigmoid, extreme_gate_frac=extreme, extreme_value=extreme_value,
                      dtype=torch.float64, with_state=False)
    lb = inp.kwargs.get("lower_bound")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    shapes = KDAShapes(B, T, H, HV, K, V, N)
    cfg = _cfg(shapes, BT, gate_code(gate != "pregated", lb), lb, l2norm, beta_sigmoid, neg_eigval, 0.7 * K ** -0.5)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    info, _ = chunk_layout(shapes, cu, BT, "cpu")
    NC = info.shape[0]

    # float64 oracle: autograd through prep_torch on the gathered chunks.
    leaves = [x.detach().reshape(B * T, *x.shape[2:]).requires_grad_(True) for x in (inp.q, inp.k, inp.v, inp.g, inp.beta)]
    params = [None if p is None else p.detach().requires_grad_(True) for p in (inp.A_log, inp.dt_bias)]
    rows = torch.arange(BT)
    inf = info.to(torch.int64)
    valid = rows[None, :] < inf[:, 1:]
    idx = torch.where(valid, inf[:, :1] + rows[None, :], 0)
    outs = prep_torch(*[lf[idx] for lf in leaves], valid, *params, cfg, return_t=True)
    Tm = outs[-1].detach()
    gen = torch.Generator().manual_seed(seed + 100)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs[:6]]
    torch.autograd.backward(outs[:6], ups)
    want = [lf.grad.reshape(x.shape) for lf, x in zip(leaves, (inp.q, inp.k, inp.v, inp.g, inp.beta))]
    want += [p.grad for p in params if p is not None]

    x = inp.cast(torch.float32)
    f = lambda t: t.float().contiguous()  # noqa: E731
    dw, du, dqg, dkg, daqk, dgc = (f(u) for u in ups)
    got = chunk_prep_bwd(x.q, x.k, x.v, x.g, x.beta, None if x.A_log is None else x.A_log.reshape(-1),
                         None if x.dt_bias is None else x.dt_bias.reshape(-1), info, f(Tm),
                         dw, du, dqg, dkg, daqk, dgc, cfg=cfg, overwrite_t=overwrite_t)
    assert got[0].dtype == torch.float32 and got[2].shape == x.v.shape
    got = [t for t in got if t is not None]
    names = ["dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias"][: len(got)]
    errs = {n: rel_rms(a, b) for n, a, b in zip(names, got, want)}
    assert NC > 0 and max(errs.values()) < tol, errs
    return errs


@pytest.mark.parametrize("gate", ["pregated", "softplus", "lower_bound"])
def test_gates(gate):
    """Each gate form, BT=16, partial last chunk, K/V not powers of two, GVA (H=1, HV=2), a few extreme
    gates (-1000 log decays, +1000 raw gates)."""
    _run(T=25, H=1, HV=2, BT=16, gate=gate, extreme=0.03, seed=1)


@pytest.mark.parametrize("gate,extreme", [("pregated", 0.03), ("lower_bound", 0.0)])
def test_chunk64(gate, extreme):
    """BT=64 (the default chunk): six tree levels, partial last chunk."""
    _run(T=73, H=1, BT=64, gate=gate, extreme=extreme, seed=1)


@pytest.mark.parametrize("tree", ["kernel", "pass2"])
def test_chunk64_weak_decay(tree, monkeypatch):
    """Every log decay -0.002: the pairs far apart in a chunk (tree level 32) carry as much as the near
    ones, so an error there cannot hide under them; the tree levels in their own kernel (the default)
    or inside pass 2 (``KIMI_LINEAR_KDA_PREP_BWD_TREE=pass2``, as at 32- and 128-row chunks)."""
    monkeypatch.setenv("KIMI_LINEAR_KDA_PREP_BWD_TREE", tree)
    _run(T=128, H=1, BT=64, gate="pregated", extreme=1.0, extreme_value=-0.002, seed=6)


@pytest.mark.parametrize("BT", [32, 128])
def test_chunk_sizes(BT):
    """BT=32 and 128 (five and seven tree levels), K=40 (several K blocks)."""
    _run(T=BT + 9, H=2, K=40, V=20, BT=BT, gate="lower_bound", extreme=0.02, seed=2)


def test_flags_off():
    """No L2 norm, beta given directly (no sigmoid), pregated with -1000 decays."""
    _run(T=21, H=2, BT=16, gate="pregated", l2norm=False, beta_sigmoid=False, extreme=0.05, seed=3)


def test_neg_eigval_and_varlen():
    """neg_eigval (beta in (0, 2)) and packed short sequences (1, 5, 17, 9 tokens) in one flattened batch;
    T's storage reused as the dAkk scratch (as the operator's backward does)."""
    cu = [0, 1, 6, 23, 32]
    _run(B=1, T=32, H=1, HV=2, K=20, V=24, BT=16, gate="softplus", neg_eigval=True, cu_seqlens=cu, seed=4,
         overwrite_t=True)


def test_all_extreme():
    """Every gate +1000 raw (saturated softplus, -exp(A)*1000 per token): finite, correct gradients."""
    _run(T=20, H=1, BT=16, gate="softplus", extreme=1.0, seed=5)


@pytest.mark.parametrize("value", [-60.0, -70.0])
def test_gates_near_cutoff(value):
    """Log decays of -60 and -70 in 10% of the entries, around the -64 below which the sub-chunk kernel
    drops its (cancelling) gate-gradient residue: dg still matches float64."""
    _run(T=40, H=1, BT=16, gate="pregated", extreme=0.1, extreme_value=value, seed=6)


# (case, _run arguments, share of wide sub-chunks expected on the default path: 0, "some" or 1)
SUBCHUNK_CASES = {
    "moderate": (dict(T=40, H=1, HV=2, BT=16, gate="softplus", seed=1), 0),
    "mixed": (dict(T=73, H=1, BT=64, gate="pregated", extreme=0.03, seed=1), "some"),
    # -7.8 per token: a span of 15 * 7.8 = 117 nats, just inside the tensor-core path's 120 (factors up
    # to e^58.5); -8.2: 123, just outside.
    "inside_limit": (dict(T=48, H=1, BT=16, gate="pregated", extreme=1.0, extreme_value=-7.8, seed=2), 0),
    "outside_limit": (dict(T=48, H=1, BT=16, gate="pregated", extreme=1.0, extreme_value=-8.2, seed=2), 1),
    "neg_eigval_varlen": (dict(B=1, T=32, H=1, HV=2, K=20, V=24, BT=16, gate="softplus", neg_eigval=True,
                               cu_seqlens=[0, 1, 6, 23, 32], seed=4, overwrite_t=True), 0),
}


@pytest.mark.parametrize("path", ["default", "exact"])
@pytest.mark.parametrize("case", list(SUBCHUNK_CASES))
def test_subchunk_paths(case, path, monkeypatch):
    """The two sub-chunk kernels against float64: the default split (tensor cores where a sub-chunk's
    log-decay span is <= 120 nats, the exact column-by-column kernel for the rest) and every sub-chunk
    down the exact path (KIMI_LINEAR_KDA_DIAG_SPAN=-1). The share of wide sub-chunks is checked, so each
    case really takes the path it is meant to."""
    from kimi_linear.ops.kda.triton import prep_bwd

    kw, share = SUBCHUNK_CASES[case]
    if path == "exact":
        monkeypatch.setenv("KIMI_LINEAR_KDA_DIAG_SPAN", "-1")
        share = 1
    _run(**kw)
    wide = prep_bwd.LAUNCHED["diag_wide"].float().mean().item()
    assert (0 < wide < 1) if share == "some" else wide == share, wide


@pytest.mark.parametrize("case", [
    dict(T=73, H=1, HV=2, BT=64, gate="pregated", extreme=0.03, seed=1),  # GVA, -1000 gates, partial chunk
    dict(T=128, H=2, K=40, V=20, BT=64, gate="lower_bound", extreme=0.02, seed=2),  # two K blocks
    dict(T=70, H=1, BT=64, gate="softplus", extreme=1.0, seed=5),  # every raw gate +1000
    dict(T=128, H=1, BT=64, gate="pregated", extreme=1.0, extreme_value=-1.9, seed=3),  # long spans, no underflow
    dict(T=128, H=1, BT=64, gate="pregated", extreme=1.0, extreme_value=-0.002, seed=6),  # weak decay: far pairs count
    dict(B=1, T=150, H=1, HV=2, BT=64, gate="softplus", cu_seqlens=[0, 5, 70, 150], seed=4),  # varlen
], ids=["gva", "two_k_blocks", "all_extreme", "long_span", "weak_decay", "varlen"])
def test_tree_kernel(case, monkeypatch):
    """``KIMI_LINEAR_KDA_PREP_BWD_TREE=kernel`` (the default at 64-row chunks): pass 2's tree levels in a
    launch of their own on 16-row sub-chunk tiles, here in K blocks of 16; against float64, with the
    launch checked."""
    from kimi_linear.ops.kda.triton import prep_bwd

    monkeypatch.setenv("KIMI_LINEAR_KDA_PREP_BWD_TREE", "kernel")
    monkeypatch.setenv("KIMI_LINEAR_KDA_PREP_BWD_TREE_BK", "16")  # several K blocks at these widths
    _run(**case)
    assert prep_bwd.LAUNCHED["tree_kernel_nk"] > 1
    assert prep_bwd.LAUNCHED["tree_fn"] is prep_bwd._prep_bwd_tree_kernel
