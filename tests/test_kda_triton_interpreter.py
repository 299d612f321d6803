"""The Triton KDA kernels under TRITON_INTERPRET=1 on the CPU (float32, tiny shapes).

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when no GPU is present; these
tests force the Triton backend for CPU tensors with KIMI_LINEAR_KDA_BACKEND=triton and compare with the
float64 token loop. The full grid runs on a GPU (tests/gpu/test_kda_gpu.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from kda_utils import check_half_state_pool, make_inputs, reference, rel_rms
from kimi_linear.ops import kda_gate, l2norm
from kimi_linear.ops import chunk_kda, fused_recurrent_kda
from kimi_linear.ops.kda import api

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py on machines without a GPU)"),
]

TOL = 1e-4  # float32 arithmetic (exact products in the interpreter) vs float64


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv(api.BACKEND_ENV, "triton")


def _fp32_vs_float64(inp64, seed, **call_kw):
    """chunk_kda forward + backward on the float32 cast of float64 inputs (requires_grad) against the
    float64 token loop, with random upstream gradients: (output error, final-state error, gradient errors)."""
    ref_o, ref_s = reference(inp64)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ref_s.shape, generator=gen, dtype=torch.float64)
    gref = torch.autograd.grad((ref_o * do).sum() + (ref_s * dht).sum(), inp64.tensors())
    x = inp64.cast(torch.float32)
    o, s = x.call(chunk_kda, **call_kw)
    got = torch.autograd.grad((o * do.float()).sum() + (s * dht.float()).sum(), x.tensors())
    return rel_rms(o, ref_o), rel_rms(s, ref_s), [rel_rms(a, b) for a, b in zip(got, gref)]


@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
def test_chunk_forward_backward(gate):
    """Chunked forward + backward (all inputs) against float64, GVA, K/V not powers of two, -1000 gates."""
    inp64 = make_inputs(B=2, T=37, H=1, HV=2, K=20, V=24, gate=gate, extreme_gate_frac=0.05, seed=2,
                        requires_grad=True, scale=0.3, dtype=torch.float64)
    o_err, s_err, errs = _fp32_vs_float64(inp64, seed=0, chunk_size=32)
    assert o_err < TOL and s_err < TOL
    # dA_log with +1000 raw softplus gates (log decays of -exp(A) * 1000) carries fp32 rounding of those
    # large decays: ~5e-5 (it was ~1e-3 while the pairs inside sub-chunks were factored around a midpoint).
    assert max(errs) < 2e-4, errs


@pytest.mark.parametrize("fwd_tree,bwd_tree", [("masked", "pass2"), (None, None)])
def test_varlen_forward_backward(fwd_tree, bwd_tree, monkeypatch):
    """Packed sequences of 5, 65 and 80 tokens (several 64-token chunks, partial ones, a chunk that is
    mostly padding), GVA, -1000 gates: forward and every gradient against float64; the tree levels on
    16-row sub-chunk tiles (the defaults at 64-row chunks) or as masked [64, 64] products
    (``KIMI_LINEAR_KDA_TREE=masked``, ``KIMI_LINEAR_KDA_PREP_BWD_TREE=pass2``, as at 32 and 128 rows);
    checks which kernels ran."""
    from kimi_linear.ops.kda.triton import chunk_fwd, prep_bwd

    for name, val in (("KIMI_LINEAR_KDA_TREE", fwd_tree), ("KIMI_LINEAR_KDA_PREP_BWD_TREE", bwd_tree)):
        if val is None:  # the defaults
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, val)
    cu = [0, 5, 70, 150]
    inp64 = make_inputs(B=1, T=150, H=1, HV=2, K=20, V=24, gate="lower_bound", extreme_gate_frac=0.03, seed=9,
                        cu_seqlens=cu, requires_grad=True, dtype=torch.float64)
    o_err, s_err, errs = _fp32_vs_float64(inp64, seed=1)
    assert o_err < TOL and s_err < TOL
    assert max(errs) < TOL, errs
    masked = fwd_tree == "masked"
    assert chunk_fwd.LAUNCHED["tree_fn"] is (chunk_fwd._chunk_tree_kernel if masked else
                                             chunk_fwd._chunk_tree_subchunk_kernel)
    assert (prep_bwd.LAUNCHED["tree_kernel_nk"] == 0) == masked


@pytest.mark.parametrize("bwd_tree", ["kernel", "pass2"])
def test_training_at_32_rows(bwd_tree, monkeypatch):
    """Forward + backward at 32-row kernel chunks (``KIMI_LINEAR_KDA_BT=32``, not the default for training):
    the pair kernels take the one tree level in both directions (``_chunk_pair_subchunk_kernel``,
    ``_prep_bwd_pair_kernel``), or pass 2 keeps it (``KIMI_LINEAR_KDA_PREP_BWD_TREE=pass2``); packed
    sequences of 5, 65 and 80 tokens, GVA, -1000 gates, every gradient against float64."""
    from kimi_linear.ops.kda.triton import chunk_fwd, prep_bwd

    monkeypatch.setenv("KIMI_LINEAR_KDA_BT", "32")
    monkeypatch.setenv("KIMI_LINEAR_KDA_PREP_BWD_TREE", bwd_tree)
    prep_bwd.LAUNCHED.pop("tree_fn", None)
    cu = [0, 5, 70, 150]
    inp64 = make_inputs(B=1, T=150, H=1, HV=2, K=20, V=24, gate="softplus", extreme_gate_frac=0.03, seed=9,
                        cu_seqlens=cu, requires_grad=True, dtype=torch.float64)
    o_err, s_err, errs = _fp32_vs_float64(inp64, seed=1)
    assert o_err < TOL and s_err < TOL and max(errs) < TOL, (o_err, s_err, errs)
    assert chunk_fwd.LAUNCHED["tree_fn"] is chunk_fwd._chunk_pair_subchunk_kernel
    assert (prep_bwd.LAUNCHED["tree_kernel_nk"] > 0) == (bwd_tree == "kernel")
    assert prep_bwd.LAUNCHED.get("tree_fn") is (prep_bwd._prep_bwd_pair_kernel if bwd_tree == "kernel" else None)


@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
def test_inference_forward(gate, monkeypatch):
    """A forward without gradients runs 32-row kernel chunks (``INFERENCE_BT``; the pair kernel for the
    blocks between its sub-chunks), one that needs them 64-row ones; both against float64 on packed
    sequences of odd lengths (partial chunks, a 1-token sequence), GVA, -1000 gates; KIMI_LINEAR_KDA_BT
    forces the chunk length (16: no pair launch; 32 with ``KIMI_LINEAR_KDA_TREE=masked``: the masked
    tree kernel; 32 with the gate and the norms in-register: no pre-pass but the gate's chunk sums)."""
    from kimi_linear.ops.kda import triton_backend
    from kimi_linear.ops.kda.triton import chunk_fwd

    seen = []
    layout = triton_backend.chunk_layout

    def recording(shapes, cu_seqlens, BT, device):
        seen.append(BT)
        return layout(shapes, cu_seqlens, BT, device)

    monkeypatch.setattr(triton_backend, "chunk_layout", recording)
    cu = [0, 1, 38, 107]
    inp64 = make_inputs(B=1, T=cu[-1], H=1, HV=2, K=20, V=24, gate=gate, extreme_gate_frac=0.05, seed=5,
                        cu_seqlens=cu, dtype=torch.float64)
    ref_o, ref_s = reference(inp64)
    x = inp64.cast(torch.float32)
    with torch.no_grad():
        o, s = x.call(chunk_kda)
    assert seen == [32] and chunk_fwd.LAUNCHED["tree_fn"] is chunk_fwd._chunk_pair_subchunk_kernel
    assert rel_rms(o, ref_o) < TOL and rel_rms(s, ref_s) < TOL
    for t in x.tensors():
        t.requires_grad_(True)
    o2, s2 = x.call(chunk_kda)
    assert seen == [32, 64]
    assert rel_rms(o2, ref_o) < TOL and rel_rms(s2, ref_s) < TOL
    for t in x.tensors():
        t.requires_grad_(False)
    for bt, tree, fn in (("16", None, None), ("32", "fused", chunk_fwd._chunk_pair_subchunk_kernel),
                         ("32", "masked", chunk_fwd._chunk_tree_kernel)):
        monkeypatch.setenv("KIMI_LINEAR_KDA_BT", bt)
        for name in ("KIMI_LINEAR_KDA_GATE_PASS", "KIMI_LINEAR_KDA_NORM_PASS"):  # (gate, norms in-register)
            monkeypatch.setenv(name, "fused" if tree == "fused" else "once")
        if tree == "masked":
            monkeypatch.setenv("KIMI_LINEAR_KDA_TREE", tree)
        chunk_fwd.LAUNCHED.pop("tree_fn", None)
        with torch.no_grad():
            o3, s3 = x.call(chunk_kda)
        assert seen[-1] == int(bt) and chunk_fwd.LAUNCHED.get("tree_fn") is fn
        assert rel_rms(o3, ref_o) < TOL and rel_rms(s3, ref_s) < TOL


def test_recur_wgmma_falls_back_off_the_gpu(monkeypatch):
    """``KIMI_LINEAR_KDA_RECUR=wgmma`` asks for the Gluon recurrence, which runs only on a Hopper GPU: under
    the interpreter the Triton recurrence runs instead (``LAUNCHED["recur_impl"]``), with the same result."""
    from kimi_linear.ops.kda.triton import chunk_fwd

    monkeypatch.setenv("KIMI_LINEAR_KDA_RECUR", "wgmma")
    inp64 = make_inputs(B=1, T=45, H=1, HV=2, K=64, V=64, gate="softplus", seed=3, dtype=torch.float64)
    ref_o, ref_s = reference(inp64)
    with torch.no_grad():
        o, s = inp64.cast(torch.float32).call(chunk_kda)
    assert chunk_fwd.LAUNCHED["recur_impl"] == "triton"
    assert rel_rms(o, ref_o) < TOL and rel_rms(s, ref_s) < TOL


@pytest.mark.parametrize("K,V", [(256, 256), (200, 136)])
def test_wide_heads(K, V):
    """Heads up to the issue's K = V = 256, and wide ones that are not powers of two: the training
    forward + backward (64-row chunks), the inference forward (16-row chunks) and decode against float64,
    with -1000 gates."""
    inp64 = make_inputs(B=1, T=40, H=1, K=K, V=V, gate="softplus", extreme_gate_frac=0.05, seed=2,
                        requires_grad=True, scale=0.3, dtype=torch.float64)
    o_err, s_err, errs = _fp32_vs_float64(inp64, seed=0)
    assert o_err < TOL and s_err < TOL and max(errs) < TOL, (o_err, s_err, errs)
    ref_o, ref_s = reference(inp64)
    x = inp64.cast(torch.float32)
    with torch.no_grad():
        for fn in (chunk_kda, fused_recurrent_kda):
            o, s = x.call(fn)
            assert rel_rms(o, ref_o) < TOL and rel_rms(s, ref_s) < TOL, fn.__name__


def test_wide_state_slices():
    """The recurrence's state slices past K = 128 are [256, 64] whatever the batch: [256, 16] slices at
    one pipeline stage read outside their shared memory on the card (H100, triton 3.6.0, session 14),
    which the interpreter cannot show; up to K = 128 the measured choice stands."""
    from kimi_linear.ops.kda.triton.chunk_fwd import recur_bv

    for programs in (1, 2, 16, 64):
        assert recur_bv(256, programs, 256) == 64 and recur_bv(136, programs, 256) == 64
    assert recur_bv(128, 64, 128) == 32 and recur_bv(128, 2, 128) == 16


@pytest.mark.parametrize("gate", ["softplus", "lower_bound", "pregated"])
def test_gate_chunk_prepass(gate, monkeypatch):
    """``gate_chunk_prepass``: the activated gate and its sum within each chunk (packed sequences, partial
    chunks, K = 20 in K blocks of 16) against PyTorch; and the w/u launch reading that sum
    (``KIMI_LINEAR_KDA_GATE_CUMSUM=prepass``, the default) against summing itself (``kernel``), -1000
    gates included: after those, G_C - G_i cancels (an exponent error of about |G| 2^-24)."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.gate import kda_gate
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_layout
    from kimi_linear.ops.kda.triton.utils import gate_chunk_prepass, gate_code

    monkeypatch.setenv("KIMI_LINEAR_KDA_GATE_BK", "16")
    cu = [0, 5, 70, 150]
    x = make_inputs(B=1, T=cu[-1], H=1, HV=2, K=20, V=24, gate=gate, extreme_gate_frac=0.03, seed=6,
                    cu_seqlens=cu, dtype=torch.float64).cast(torch.float32)
    lb = -5.0 if gate == "lower_bound" else None
    code = gate_code(gate != "pregated", lb)
    shapes = KDAShapes(B=1, T=cu[-1], H=1, HV=2, K=20, V=24, N=3)
    info, _ = chunk_layout(shapes, torch.tensor(cu), 64, "cpu")
    act, cum = gate_chunk_prepass(x.g, x.A_log if code else None, x.dt_bias if code else None, lb, code, info, 64,
                                  store_act=code != 0)
    want = kda_gate(x.g, x.A_log, x.dt_bias, lb) if code else x.g
    if code:
        assert rel_rms(act, want) < 1e-6
    else:
        assert act is None
    for row0, rows in info.tolist():
        ref = want[:, row0 : row0 + rows].double().cumsum(1)
        assert rel_rms(cum[:, row0 : row0 + rows], ref) < 1e-6, (row0, rows)
    results = {}
    for mode in ("prepass", "kernel"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_GATE_CUMSUM", mode)
        for t in x.tensors():
            t.requires_grad_(True)
        o, s = x.call(chunk_kda)
        results[mode] = (o, s)
    for a, b in zip(results["prepass"], results["kernel"]):
        assert rel_rms(a, b) < 1e-4


@pytest.mark.parametrize("C,cu", [(16, [0, 1, 16, 50]), (128, [0, 130, 300, 301])])
def test_varlen_and_interior_states(C, cu):
    """Packed sequences and the state at every chunk boundary (C=128 runs as 64-row kernel chunks and
    keeps every other state)."""
    inp = make_inputs(B=1, T=cu[-1], H=2, K=16, V=16, gate="lower_bound", seed=3, cu_seqlens=cu,
                      dtype=torch.float64).cast(torch.float32)
    ref_o, ref_s, ref_all = reference(inp, return_all_states=True)
    o, s, states = inp.call(chunk_kda, chunk_size=C, return_intermediate_states=True)
    assert rel_rms(o, ref_o) < TOL and rel_rms(s, ref_s) < TOL
    want = []
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        want.append(inp.initial_state[n : n + 1].double())
        want += [ref_all[n][:, c - 1] for c in range(C, b - a, C)]
    assert states.shape == (1, len(want), 2, 16, 16)
    assert rel_rms(states, torch.cat(want, 0).unsqueeze(0)) < TOL


def _one_sequence_paths_vs_float64(monkeypatch):
    """The paths a launch mode for one sequence must keep exact, on one odd-length sequence against float64:
    forward + backward with the forward's T kept and rebuilt (``KIMI_LINEAR_KDA_BWD_RECOMPUTE``), then the
    inference forward and the interior states at 32-row chunks."""
    inp64 = make_inputs(B=1, T=203, H=2, K=20, V=24, gate="softplus", seed=4, extreme_gate_frac=0.02,
                        requires_grad=True, dtype=torch.float64)
    for recompute in ("partial", "full"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_RECOMPUTE", recompute)
        o_err, s_err, errs = _fp32_vs_float64(inp64, seed=2)
        assert o_err < TOL and s_err < TOL and max(errs) < 2 * TOL, (recompute, o_err, s_err, errs)
    x = inp64.cast(torch.float32)
    for t in x.tensors():
        t.requires_grad_(False)
    with torch.no_grad():
        ref_o, ref_s, ref_all = reference(inp64, return_all_states=True)
        o, s = x.call(chunk_kda)
        o2, s2, states = x.call(chunk_kda, chunk_size=32, return_intermediate_states=True)
    for a, b in ((o, ref_o), (s, ref_s), (o2, ref_o), (s2, ref_s)):
        assert rel_rms(a, b) < TOL
    want = torch.cat([x.initial_state.double()] + [ref_all[:, c - 1] for c in range(32, 203, 32)])
    assert rel_rms(states[0], want) < TOL


def test_streamed_wy_and_recurrence(monkeypatch):
    """The w/u launch and the recurrence streamed side by side (``KIMI_LINEAR_KDA_STREAM=1``; on a GPU the
    recurrence waits on per-(group, head) counts the w/u kernel raises chunk by chunk; the interpreter runs
    the two one after the other): every count reaches its group's chunks (partial last groups too), and
    the inference forward and the interior states at 32-row chunks (streamed) and forward + backward (not
    streamed) match float64. Training (64-row chunks) and several sequences are not streamed
    (``overlap.stream_group``)."""
    from kimi_linear.ops.kda.triton import overlap

    plans = []
    run = overlap.run_streamed

    def recording(group, n_chunks, HV, device, prep, recur):
        def keep(plan):
            plans.append((n_chunks, plan))
            return prep(plan)
        return run(group, n_chunks, HV, device, keep, recur)

    monkeypatch.setattr(overlap, "run_streamed", recording)
    monkeypatch.setenv("KIMI_LINEAR_KDA_STREAM", "1")
    monkeypatch.setenv("KIMI_LINEAR_KDA_STREAM_GROUP", "3")
    _one_sequence_paths_vs_float64(monkeypatch)
    # only the two 32-row forwards (7 chunks, in groups of 3, 3, 1): training runs 64-row chunks
    assert [n for n, _ in plans] == [7, 7]
    for n, plan in plans:
        per_group = [min(3, n - g0) for g0 in range(0, n, 3)]
        assert plan.group == 3 and plan.ready.tolist() == [c for c in per_group for _ in range(2)]
    two = make_inputs(B=2, T=70, H=2, K=20, V=24, gate="softplus", seed=4, dtype=torch.float64).cast(torch.float32)
    with torch.no_grad():
        two.call(chunk_kda)
    assert len(plans) == 2  # (several sequences: not streamed)


def test_decode_state_pool():
    """Token-by-token decode through a state pool (in place), per-token states, untouched slots."""
    B, T, H, K, V = 2, 5, 2, 12, 20
    inp = make_inputs(B=B, T=T, H=H, K=K, V=V, gate="softplus", seed=5, dtype=torch.float64).cast(torch.float32)
    ref_o, ref_s, ref_all = reference(inp, return_all_states=True)
    pool = torch.full((4, H, K, V), 1e30)
    slots = torch.tensor([3, 0])
    pool[slots] = inp.initial_state
    kw = {k: v for k, v in inp.kwargs.items() if k != "output_final_state"}
    outs, states = [], []
    for t in range(T):
        sl = slice(t, t + 1)
        o_t, _, all_t = fused_recurrent_kda(
            inp.q[:, sl], inp.k[:, sl], inp.v[:, sl], inp.g[:, sl], inp.beta[:, sl], A_log=inp.A_log,
            dt_bias=inp.dt_bias, initial_state=pool, ssm_state_indices=slots, inplace_final_state=True,
            return_all_states=True, **kw)
        outs.append(o_t)
        states.append(all_t)
    assert rel_rms(torch.cat(outs, 1), ref_o) < TOL
    assert rel_rms(torch.cat(states, 1), ref_all) < TOL
    assert rel_rms(pool[slots], ref_s) < TOL
    assert torch.all(pool[[1, 2]] == 1e30)
    # several tokens per call equal the token loop
    o_all, s_all = inp.call(fused_recurrent_kda)
    assert rel_rms(o_all, ref_o) < TOL and rel_rms(s_all, ref_s) < TOL


def test_decode_state_pool_in_16_bits():
    """The decode kernel reads a 16-bit pool into float32 and writes it back rounded (``kda_utils``).
    float16 here: the interpreter rounds float32 to bfloat16 toward zero, not to nearest as the GPU and
    torch do (the GPU suite runs bfloat16)."""
    check_half_state_pool(fused_recurrent_kda, torch.float16)


def _prep_reference(inp, BT):
    """Chunk-local quantities of one sequence straight from the definitions, in float64."""
    kw = inp.kwargs
    x = inp.cast(torch.float64, torch.float64, torch.float64)
    q, k, v, g, beta = x.q[0], x.k[0], x.v[0], x.g[0], x.beta[0]  # [T, H, .]
    q, k = l2norm(q), l2norm(k)
    g = kda_gate(g, x.A_log, x.dt_bias, kw.get("lower_bound"))
    beta = torch.sigmoid(beta)
    scale = q.shape[-1] ** -0.5
    out = {n: [] for n in ("w", "u", "qg", "kg", "aqk", "decay", "t")}
    for c0 in range(0, q.shape[0], BT):
        sl = slice(c0, min(c0 + BT, q.shape[0]))
        n = sl.stop - sl.start
        qc, kc, vc, gc, bc = (t[sl].transpose(0, 1) for t in (q, k, v, g, beta))  # [H, n, .]
        G = gc.cumsum(1)
        P = torch.exp((G[:, :, None, :] - G[:, None, :, :]).clamp(max=0.0))  # [H, i, j, d], used for j <= i
        lower = torch.ones(n, n, dtype=torch.bool).tril()
        aqk = torch.einsum("hid,hjd,hijd->hij", qc, kc, P) * scale * lower
        akk = torch.einsum("hid,hjd,hijd->hij", kc, kc, P) * bc[..., None] * lower.tril(-1)
        t = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + akk)
        pad = lambda m, rows=BT, cols=None: torch.nn.functional.pad(  # noqa: E731
            m, (0, (cols or m.shape[-1]) - m.shape[-1], 0, rows - m.shape[-2]))
        out["w"].append(pad(t @ (kc * torch.exp(G) * bc[..., None])))
        out["u"].append(pad(t @ (vc * bc[..., None])))
        out["qg"].append(pad(qc * torch.exp(G) * scale))
        out["kg"].append(pad(kc * torch.exp(G[:, -1:] - G)).transpose(-1, -2))
        out["aqk"].append(pad(aqk, BT, BT))
        out["decay"].append(torch.exp(G[:, -1]))
        eye = torch.eye(BT, dtype=torch.float64).expand(t.shape[0], BT, BT).clone()
        eye[:, :n, :n] = t
        out["t"].append(eye)
    return {n: torch.stack(v) for n, v in out.items()}


def _softplus_prep(inp, BT, **kw):
    """chunk_prep of one float32 sequence with the softplus gate, L2 norm and beta sigmoid in the kernels,
    padded layout. Returns (outputs, chunk_info)."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_layout, chunk_prep
    from kimi_linear.ops.kda.triton.utils import GATE_SOFTPLUS

    _, T, H, K = inp.q.shape
    shapes = KDAShapes(1, T, H, H, K, inp.v.shape[-1], 1)
    info, _ = chunk_layout(shapes, None, BT, "cpu")
    return chunk_prep(inp.q, inp.k, inp.v, inp.g, inp.beta, info, scale=K ** -0.5, shapes=shapes,
                      gate=GATE_SOFTPLUS, A_log=inp.A_log, dt_bias=inp.dt_bias, lower_bound=None, l2norm=True,
                      beta_sigmoid=True, neg_eigval=False, BT=BT, pad=True, **kw), info


PREP_CASES = [(bt, e) for bt in (16, 64, 128) for e in (0.0, 0.02)] + [(32, 0.0), (32, 1.0)]


@pytest.mark.parametrize("BT,extreme,path", [(bt, e, p) for bt, e in PREP_CASES for p in ("default", "exact")])
def test_prep_kernel_definitions(BT, extreme, path, monkeypatch):
    """The prep launches' outputs (incl. T) against their definitions, with a partial last chunk and K/V
    not powers of two; moderate gates, +1000 raw gates in some rows, or in every one (BT=32). ``path``:
    the default split of the sub-chunk pairs (tensor cores where the log-decay span is <= 120 nats, the
    exact column-by-column kernel for the rest), or every sub-chunk down the exact path; the share of wide
    sub-chunks is checked so each path is really taken."""
    from kimi_linear.ops.kda.triton import chunk_fwd

    if path.endswith("exact"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_DIAG_SPAN", "-1")
    T, H, K, V = BT + 21, 2, 20, 24
    inp = make_inputs(B=1, T=T, H=H, K=K, V=V, gate="softplus", seed=7, extreme_gate_frac=extreme,
                      dtype=torch.float64).cast(torch.float32)
    got, _ = _softplus_prep(inp, BT, dtype=torch.float32, store_t=True)
    ref = _prep_reference(inp, BT)
    for name, x in zip(("w", "u", "qg", "kg", "aqk", "decay", "t"), got):
        r = ref[name]
        if name in ("w", "qg", "decay"):
            assert torch.all(x[..., K:] == 0), name  # padding is written as zeros
            x = x[..., :K]
        elif name == "u":
            x = x[..., :V]
        elif name == "kg":
            x = x[:, :, :K]
        assert torch.isfinite(x).all(), name
        assert rel_rms(x, r) < TOL, (name, rel_rms(x, r))
    wide = chunk_fwd.LAUNCHED["diag_wide"].float().mean().item()
    if path == "exact":
        assert wide == 1
    elif extreme == 0:
        assert wide == 0
    elif extreme < 1:
        assert 0 < wide < 1


@pytest.mark.parametrize("tree", ["masked", "subchunk"])
def test_prep_blocks_weak_decay(tree, monkeypatch):
    """Aqk and T block by block (16 x 16) with weak decays (A_log = -8), where the blocks far from the
    diagonal are not negligible, so an error there cannot hide under the near blocks in a whole-matrix
    norm; the tree levels in the sub-chunk kernel (the default) or the [64, 64] masked one
    (``KIMI_LINEAR_KDA_TREE=masked``)."""
    from kimi_linear.ops.kda.triton import chunk_fwd

    monkeypatch.setenv("KIMI_LINEAR_KDA_TREE", tree)
    BT = 64
    inp = make_inputs(B=1, T=128, H=2, K=20, V=24, gate="softplus", seed=11, dtype=torch.float64)
    inp.A_log = torch.full_like(inp.A_log, -8.0)
    inp = inp.cast(torch.float32)
    got, _ = _softplus_prep(inp, BT, dtype=torch.float32, store_t=True)
    ref = _prep_reference(inp, BT)
    want_kernel = chunk_fwd._chunk_tree_subchunk_kernel if tree == "subchunk" else chunk_fwd._chunk_tree_kernel
    assert chunk_fwd.LAUNCHED["tree_fn"] is want_kernel
    for name, x in (("aqk", got[4]), ("t", got[6])):
        r = ref[name]
        for i in range(4):
            for j in range(4):
                blk = (..., slice(16 * i, 16 * i + 16), slice(16 * j, 16 * j + 16))
                if j > i:
                    assert torch.all(x[blk] == 0), (name, i, j)
                    continue
                assert r[blk].abs().max() > 1e-3, (name, i, j)  # the block matters
                assert rel_rms(x[blk], r[blk]) < TOL, (name, i, j, rel_rms(x[blk], r[blk]))


@pytest.mark.parametrize("switch,gate", [("KIMI_LINEAR_KDA_GATE_PASS", "softplus"),
                                         ("KIMI_LINEAR_KDA_GATE_PASS", "lower_bound"),
                                         ("KIMI_LINEAR_KDA_NORM_PASS", "softplus")])
def test_gate_and_norms_once(switch, gate, monkeypatch):
    """The in-kernel gate activated, and the L2-norm factors computed, once for the chunk-local kernels
    (``=once``, the defaults) or in-register by each of them (``=fused``): the same output and gradients,
    -1000 gates included (the interpreter runs the same float32 operations either way, up to the order
    of the norms' sums). And the two pre-passes against PyTorch."""
    from kimi_linear.ops.kda.gate import kda_gate, l2norm
    from kimi_linear.ops.kda.triton.utils import activate_gate, gate_code, qk_norms

    results = {}
    for mode in ("once", "fused"):
        monkeypatch.setenv(switch, mode)
        x = make_inputs(B=1, T=85, H=1, HV=2, K=20, V=24, gate=gate, extreme_gate_frac=0.03, seed=4,
                        requires_grad=True, dtype=torch.float64).cast(torch.float32)
        o, s = x.call(chunk_kda)
        gen = torch.Generator().manual_seed(0)
        loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
        results[mode] = [o, s, *torch.autograd.grad(loss, x.tensors())]
    for a, b in zip(results["once"], results["fused"]):
        assert rel_rms(a, b) < 1e-6
    lb = -5.0 if gate == "lower_bound" else None
    got = activate_gate(x.g.detach(), x.A_log, x.dt_bias, lb, gate_code(True, lb))
    assert got.dtype == torch.float32 and rel_rms(got, kda_gate(x.g.detach(), x.A_log, x.dt_bias, lb)) < 1e-6
    q, k = x.q.detach(), x.k.detach()
    norms = qk_norms(q, k)
    assert norms.shape == (*q.shape[:3], 2) and norms.dtype == torch.float32
    assert rel_rms(q * norms[..., :1], l2norm(q)) < 1e-6 and rel_rms(k * norms[..., 1:], l2norm(k)) < 1e-6


@pytest.mark.parametrize("name", ["KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT", "KIMI_LINEAR_KDA_TREE",
                                  "KIMI_LINEAR_KDA_PREP_BWD_TREE", "KIMI_LINEAR_KDA_STORE",
                                  "KIMI_LINEAR_KDA_GATE_PASS", "KIMI_LINEAR_KDA_NORM_PASS",
                                  "KIMI_LINEAR_KDA_PREP_BWD_FINAL", "KIMI_LINEAR_KDA_BWD_HANDOFF",
                                  "KIMI_LINEAR_KDA_BT",
                                  "KIMI_LINEAR_KDA_GATE_CUMSUM", "KIMI_LINEAR_KDA_STREAM",
                                  "KIMI_LINEAR_KDA_RECUR", "KIMI_LINEAR_KDA_SWEEP"])
def test_unknown_switch_value(name, monkeypatch):
    """A mode switch set to an unknown value is an error naming the variable, not a silent fall back."""
    monkeypatch.setenv(name, "bogus")
    x = torch.randn(1, 70, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        o, s = chunk_kda(x, x, x, -torch.rand(1, 70, 2, 16), torch.rand(1, 70, 2), output_final_state=True)
        (o.sum() + s.sum()).backward()


@pytest.mark.parametrize("mode,want", [(None, (torch.bfloat16, torch.float32)),  # the default: u32
                                       ("0", (torch.float32, torch.float32)),
                                       ("1", (torch.bfloat16, torch.bfloat16)),
                                       ("u32", (torch.bfloat16, torch.float32))])
def test_rebuild_storage(mode, want, monkeypatch):
    """KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT picks the rebuild's storage types (w, qg, kg; u) for 16-bit
    inputs, and chunk_prep honours a separate u type: the same values as an all-float32 run, bit for bit
    in float32 and within one bf16 unit in the last place in 16 bits (the interpreter's conversion does
    not round to nearest as the card's does). Rows past the sequence's end are scratch and not compared."""
    from kimi_linear.ops.kda.triton.chunk_bwd import recompute_dtypes

    if mode is None:
        monkeypatch.delenv("KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT", raising=False)
    else:
        monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT", mode)
    assert recompute_dtypes(torch.zeros(1, dtype=torch.bfloat16)) == want
    assert recompute_dtypes(torch.zeros(1)) == (torch.float32, torch.float32)  # float32 inputs: always
    BT = 64
    inp = make_inputs(B=1, T=85, H=2, K=20, V=24, gate="softplus", seed=5, dtype=torch.float64).cast(torch.float32)
    full, info = _softplus_prep(inp, BT, dtype=torch.float32)
    dtype, u_dtype = want
    mixed, _ = _softplus_prep(inp, BT, dtype=dtype, u_dtype=u_dtype)
    valid = torch.arange(BT)[None, :] < info[:, 1:].long()  # [chunks, rows]: rows past T are scratch
    for name, a, b in zip(("w", "u", "qg", "kg"), mixed, full):
        assert a.dtype == (u_dtype if name == "u" else dtype), name
        a, b = (x.transpose(-1, -2) if name == "kg" else x for x in (a, b))
        a, b = a.transpose(1, 2)[valid], b.transpose(1, 2)[valid]
        if a.dtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            assert torch.all((a.float() - b).abs() <= 2.0 ** -7 * b.abs() + 1e-30), name  # (denormals flushed)


def test_backward_keeps_forward_intermediates(monkeypatch):
    """The forward keeps Aqk, T, the activated gate and the L2-norm factors for the backward: gradients
    equal the full recompute's exactly, the pre-passes run once per forward + backward instead of twice,
    and a second backward through a retained graph (the kept T must not be reused as scratch) gives the
    same gradients again."""
    from kimi_linear.ops.kda import triton_backend
    from kimi_linear.ops.kda.triton import chunk_bwd, chunk_fwd, prep_bwd, utils

    calls = {"activate_gate": 0, "gate_chunk_prepass": 0, "qk_norms": 0}

    originals = {name: getattr(utils, name) for name in calls}

    def counting(name):
        fn = originals[name]

        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper

    for name in calls:
        for mod in (utils, triton_backend, chunk_bwd, chunk_fwd, prep_bwd):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, counting(name))
    results = {}
    for mode in ("partial", "full"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_RECOMPUTE", mode)
        x = make_inputs(B=1, T=70, H=1, HV=2, K=20, V=24, gate="softplus", extreme_gate_frac=0.03, seed=2,
                        requires_grad=True, dtype=torch.float64).cast(torch.float32)
        calls.update(activate_gate=0, gate_chunk_prepass=0, qk_norms=0)
        o, s = x.call(chunk_kda)
        gen = torch.Generator().manual_seed(0)
        loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
        first = torch.autograd.grad(loss, x.tensors(), retain_graph=True)
        once = 1 if mode == "partial" else 2  # (forward, and the backward's rebuild unless kept)
        # (the forward's gate pre-pass is gate_chunk_prepass, which also sums the gate within chunks)
        assert calls == {"activate_gate": once - 1, "gate_chunk_prepass": 1, "qk_norms": once}, (mode, calls)
        second = torch.autograd.grad(loss, x.tensors())
        assert all(torch.equal(a, b) for a, b in zip(first, second)), mode
        results[mode] = first
    assert all(torch.equal(a, b) for a, b in zip(results["partial"], results["full"]))


@pytest.mark.parametrize("raw,want", [(None, ""), ("all", "all"), ("none", ""), ("ds,du", "ds,du"),
                                     ("states+ grads", "states,grads")])
def test_handoff_switch(raw, want, monkeypatch):
    """KIMI_LINEAR_KDA_BWD_HANDOFF names the backward hand-offs kept in bf16 for 16-bit inputs (none by
    default); float32 inputs hand over float32; an unknown name is an error naming the variable."""
    from kimi_linear.ops.kda.triton.chunk_bwd import HANDOFFS, handoff_dtypes

    if raw is None:
        monkeypatch.delenv("KIMI_LINEAR_KDA_BWD_HANDOFF", raising=False)
    else:
        monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_HANDOFF", raw)
    names = HANDOFFS if want == "all" else tuple(filter(None, want.split(",")))
    for dt in (torch.bfloat16, torch.float16):
        got = handoff_dtypes(torch.zeros(1, dtype=dt))
        assert got == {x: torch.bfloat16 if x in names else torch.float32 for x in HANDOFFS}
    assert set(handoff_dtypes(torch.zeros(1)).values()) == {torch.float32}
    monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_HANDOFF", "states,dv")
    with pytest.raises(ValueError, match="KIMI_LINEAR_KDA_BWD_HANDOFF.*dv"):
        handoff_dtypes(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("H,HV,l2norm", [(2, 2, True), (1, 2, False)])
def test_backward_16bit_handoffs(H, HV, l2norm, monkeypatch):
    """fp16 inputs, forward + backward with the backward's hand-offs (states, dS, v_new, du, dqg / dkg /
    dw) in 16 bits against the same run with them in float32, and both against float64. float16 stands
    in for the card's bf16 (bf16 products are wrong in the interpreter). Covers the gradient kernel's
    16-bit products, pass 1 / 2 reading 16-bit hand-offs, and pass 2 / 3 writing dq, dk in the inputs'
    type (H == HV) or through the float32 GVA sum (HV > H)."""
    from kimi_linear.ops.kda.triton import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "HANDOFF_16BIT", torch.float16)
    inp64 = make_inputs(B=1, T=90, H=H, HV=HV, K=20, V=24, gate="softplus", extreme_gate_frac=0.02, seed=4,
                        l2norm_in_kernel=l2norm, requires_grad=True, dtype=torch.float64)
    ref_o, ref_s = reference(inp64)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64)
    gref = torch.autograd.grad((ref_o * do).sum() + ref_s.sum(), inp64.tensors())
    x = inp64.cast(torch.float16)
    runs = {}
    for mode in ("none", "all"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_BWD_HANDOFF", mode)
        o, s = x.call(chunk_kda)
        runs[mode] = torch.autograd.grad((o.float() * do.float()).sum() + s.float().sum(), x.tensors())
    for a, b, ref in zip(runs["all"], runs["none"], gref):
        assert a.dtype == b.dtype
        # fp16 inputs: errors of ~1e-3 against float64; the 16-bit hand-offs move them by far less.
        assert rel_rms(a, b) < 2e-3 and rel_rms(a, ref) < 5e-3, (rel_rms(a, b), rel_rms(a, ref))


def test_gradient_kernel_k_blocks(monkeypatch):
    """The chunk-parallel gradient kernel split over K blocks (``KIMI_LINEAR_KDA_GRADS_BK=16`` at K = 40:
    three programs per chunk, the last partial) gives the default single block's gradients. Every K block
    forms dAqk and only the first stores it (session 19: under ``if i_k == 0`` ptxas serialised the
    kernel's warp-group MMAs)."""
    x = make_inputs(B=1, T=45, H=1, HV=2, K=40, V=24, gate="softplus", extreme_gate_frac=0.02, seed=9,
                    requires_grad=True, dtype=torch.float64).cast(torch.float32)
    gen = torch.Generator().manual_seed(1)
    runs = {}
    for bk in ("128", "16"):
        monkeypatch.setenv("KIMI_LINEAR_KDA_GRADS_BK", bk)
        o, s = x.call(chunk_kda)
        do = torch.randn(o.shape, generator=gen.manual_seed(1))
        runs[bk] = torch.autograd.grad((o * do).sum() + s.sum(), x.tensors())
    for a, b in zip(runs["16"], runs["128"]):
        assert torch.isfinite(a).all() and rel_rms(a, b) < 1e-5, rel_rms(a, b)


def test_sweep_reads_padded_layout():
    """The reverse sweep and the gradient kernel give the same results from the padded intermediates
    (K, V widened to powers of two: the layout of 16-bit recomputes) as from the unpadded ones."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.triton.chunk_bwd import chunk_recur_bwd
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_layout, chunk_prep, chunk_recur
    from kimi_linear.ops.kda.triton.utils import GATE_SOFTPLUS

    T, H, K, V, BT = 90, 2, 20, 24, 32
    inp = make_inputs(B=1, T=T, H=H, K=K, V=V, gate="softplus", seed=5, extreme_gate_frac=0.02,
                      dtype=torch.float64).cast(torch.float32)
    shapes = KDAShapes(1, T, H, H, K, V, 1)
    info, seq = chunk_layout(shapes, None, BT, "cpu")
    do = torch.randn(1, T, H, V, generator=torch.Generator().manual_seed(0))
    results = []
    for pad in (False, True):
        outs = chunk_prep(inp.q, inp.k, inp.v, inp.g, inp.beta, info, scale=K ** -0.5, shapes=shapes,
                          gate=GATE_SOFTPLUS, A_log=inp.A_log, dt_bias=inp.dt_bias, lower_bound=None, l2norm=True,
                          beta_sigmoid=True, neg_eigval=False, BT=BT, dtype=torch.float32, pad=pad)
        assert (outs[0].shape[-1], outs[1].shape[-1]) == ((32, 32) if pad else (K, V))
        v_new = torch.empty(info.shape[0], H, BT, V)
        _, _, states = chunk_recur(*outs, info, seq, shapes=shapes, initial_state=inp.initial_state,
                                   out=torch.empty(1, T, H, V), store_final=False, store_states=True, BT=BT,
                                   v_new=v_new)
        w, _, qg, kg, aqk, decay = outs
        results.append(chunk_recur_bwd(w, qg, kg, aqk, decay, info, seq, states, v_new, None, do, shapes=shapes,
                                       BT=BT))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
