"""KDA GPU benchmark: our Triton kernels against flash-linear-attention (fla-core), same run, same card.

    python benchmarks/kda_gpu.py            # full table (needs fla-core importable; installs nothing)
    python benchmarks/kda_gpu.py --quick    # T = 8K cases only

Prints, per case, our time, fla's time and the ratio (fla / ours, > 1 means we are faster) for the
forward and forward + backward, then decode: state bandwidth against the card's measured copy
bandwidth, and the batch-1 decode step replayed from a CUDA graph. Medians of triton.testing.do_bench,
fresh random non-zero inputs per case, bf16, H = 32, K = V = 128, gate / L2 norm / beta sigmoid in-kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimi_linear.ops import chunk_kda, fused_recurrent_kda  # noqa: E402

try:
    import fla
    from fla.ops.kda import chunk_kda as fla_chunk_kda
    from fla.ops.kda import fused_recurrent_kda as fla_recurrent_kda
except Exception as e:  # noqa: BLE001
    fla = None
    print(f"fla not importable ({e!r}): reporting our times only")

H, D = 32, 128
DT = torch.bfloat16


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def inputs(B, T, gate, cu=None, grad=False, seed=0, dist="stress"):
    """Random inputs. ``dist`` picks the gate parameters: "stress" (raw gate and dt_bias ~ N(0, 1) and
    N(0, 0.25), A in U(1, 16): mean log decay about -6.7 per token, most 16-token sub-chunks beyond what
    a midpoint factoring can take) or "init" (the Mamba-style initialisation of trained checkpoints:
    softplus(dt_bias) log-uniform in [1e-3, 1e-1], A in U(1, 16))."""
    torch.manual_seed(seed)
    dev = "cuda"
    N = B if cu is None else len(cu) - 1
    q = torch.randn(B, T, H, D, device=dev, dtype=DT)
    k = torch.randn(B, T, H, D, device=dev, dtype=DT)
    v = torch.randn(B, T, H, D, device=dev, dtype=DT)
    g = torch.randn(B, T, H, D, device=dev, dtype=DT)
    beta = torch.randn(B, T, H, device=dev, dtype=DT)
    A_log = torch.log(torch.empty(H, device=dev).uniform_(1, 16))
    if dist == "stress":
        dt_bias = torch.randn(H * D, device=dev) * 0.5
    else:
        dt = torch.exp(torch.empty(H * D, device=dev).uniform_(math.log(1e-3), math.log(1e-1)))
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
    h0 = torch.randn(N, H, D, D, device=dev) * 0.1
    ts = [q, k, v, g, beta]
    if grad:
        for t in ts + [A_log, dt_bias, h0]:
            t.requires_grad_(True)
    kw = dict(A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
              use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, device=dev, dtype=torch.int64)
        # (the host copy, as an engine passes it: neither library then waits for the device to read it)
        kw["cu_seqlens_cpu"] = torch.tensor(cu, dtype=torch.int64)
    if gate == "lower_bound":
        kw["lower_bound"] = -5.0
    return ts, kw, [q, k, v, g, beta, A_log, dt_bias, h0]


def fla_kw(kw, gate):
    kw = dict(kw)
    if gate == "lower_bound":
        kw["safe_gate"] = True
    return kw


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def time_case(name, B, T, gate, cu=None, do_bwd=True, dist="stress"):
    try:
        return _time_case(name, B, T, gate, cu, do_bwd, dist)
    except Exception as e:  # noqa: BLE001  (report and go on with the other cases)
        print(f"{name}: failed with {e!r}")
        torch.cuda.empty_cache()
        return {"case": name + " (failed)", "fwd_ours": float("nan")}


def _time_case(name, B, T, gate, cu=None, do_bwd=True, dist="stress"):
    row = {"case": name}
    ts, kw, leaves = inputs(B, T, gate, cu, dist=dist)
    with torch.no_grad():
        ours = lambda: chunk_kda(*ts, **kw)  # noqa: E731
        o, s = ours()
        # Timed twice, the first discarded: fla's first forward of a run measured 1.6-2x its later ones
        # (session 8), the same for ours is a precaution.
        bench(ours)
        row["fwd_ours"] = bench(ours)
        if fla is not None:
            theirs = lambda: fla_chunk_kda(*ts, **fla_kw(kw, gate))  # noqa: E731
            o2, s2 = theirs()
            row["agree_o"] = rel(o, o2)
            bench(theirs)
            row["fwd_fla"] = bench(theirs)
    del ts, leaves
    if do_bwd:
        ts, kw, leaves = inputs(B, T, gate, cu, grad=True, dist=dist)
        do = torch.randn(B, T, H, D, device="cuda", dtype=DT)

        def fb(fn, kwargs):
            o, s = fn(*ts, **kwargs)
            torch.autograd.backward([o, s], [do, torch.ones_like(s)])

        row["fb_ours"] = bench(lambda: fb(chunk_kda, kw), leaves)
        if fla is not None:
            row["fb_fla"] = bench(lambda: fb(fla_chunk_kda, fla_kw(kw, gate)), leaves)
        del ts, leaves, do
    torch.cuda.empty_cache()
    return row


def captured(fn):
    """fn captured in a CUDA graph (after one warm-up call on a side stream); returns the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_bandwidth():
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e9  # TB/s (read + write)


def decode_case(B, gate, copy_bw, pool_dtype=torch.float32):
    torch.manual_seed(B)
    dev = "cuda"
    q = torch.randn(B, 1, H, D, device=dev, dtype=DT)
    k, v, g = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
    beta = torch.randn(B, 1, H, device=dev, dtype=DT)
    A_log = torch.log(torch.empty(H, device=dev).uniform_(1, 16))
    dt_bias = torch.randn(H * D, device=dev) * 0.5
    pool = (torch.randn(B, H, D, D, device=dev) * 0.1).to(pool_dtype)
    idx = torch.randperm(B, device=dev)
    out = torch.empty(B, 1, H, D, device=dev, dtype=DT)
    kw = dict(A_log=A_log, dt_bias=dt_bias, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True)
    if gate == "lower_bound":
        kw["lower_bound"] = -5.0
    ours = lambda: fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=idx,  # noqa: E731
                                       inplace_final_state=True, out=out, **kw)
    ours()
    pool_name = "" if pool_dtype == torch.float32 else f" {str(pool_dtype).split('.')[-1]} pool"
    row = {"case": f"decode B={B} {gate}{pool_name}", "fwd_ours": bench(ours)}
    state_bytes = 2 * pool.numel() * pool.element_size()
    row["bw_ours"] = state_bytes / row["fwd_ours"] / 1e9
    row["bw_frac"] = row["bw_ours"] / copy_bw
    if fla is not None:
        h0 = pool.clone()
        try:
            theirs = lambda: fla_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,  # noqa: E731
                                               **kw)
            theirs()
            row["fwd_fla"] = bench(theirs)
        except Exception as e:  # noqa: BLE001
            print(f"fla decode failed: {e!r}")
    # Kernel time without host overhead: replay a captured graph.
    row["graph_us"] = bench(captured(ours).replay) * 1e3
    row["graph_bw_frac"] = state_bytes / (row["graph_us"] * 1e-6) / 1e12 / copy_bw
    return row


def kernel_info(kern):
    """Registers and spills of a compiled Triton kernel (where the launch returned one)."""
    try:
        return f"{kern.n_regs} regs, {kern.n_spills} spills"
    except Exception:  # noqa: BLE001
        return "n/a"


def kernel_times(fn, reps=5, device_kernels=True):
    """Time per kernel name in us per call of ``fn`` (summed over its launches, mean over ``reps`` calls),
    from torch.profiler: where a forward or forward + backward spends its device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device_kernels:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if device_kernels else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if device_kernels:
            torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) if device_kernels \
            else getattr(e, "cpu_time_total", 0)
        if t > 0:
            out[e.key] = out.get(e.key, 0.0) + t / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def gate_share(g, A_log, dt_bias, lower_bound, span=120.0):
    """Share of 16-row sub-chunks whose log-decay span exceeds ``span`` nats in some channel: those a
    midpoint factoring (fla's safe path, our session-2 kernels) cannot take; the tree kernels are exact
    for them too, at the same cost."""
    from kimi_linear.ops.kda.gate import kda_gate

    B, T, Hh, Dd = g.shape
    x = kda_gate(g[:, : T // 16 * 16].float(), A_log, dt_bias, lower_bound)
    x = x.reshape(B, T // 16, 16, Hh, Dd)[:, :, 1:].sum(2)  # rows 1..15 (row 0 cancels in every pair)
    return float((x.abs().amax(-1) > span).float().mean())


def breakdown(T, gate, dist="stress", parts=("bwd",)):
    """Time the forward's launches separately (where the forward time goes) and the pieces of the
    backward (with prep_bwd launch variants)."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.triton import chunk_fwd
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_layout, chunk_prep, chunk_recur

    ts, kw, _ = inputs(1, T, gate, dist=dist)
    q, k, v, g, beta = ts
    shapes = KDAShapes(B=1, T=T, H=H, HV=H, K=D, V=D, N=1)
    info, seq = chunk_layout(shapes, None, 64, q.device)
    lb = kw.get("lower_bound")
    res = {"pairwise_share": gate_share(g, kw["A_log"], kw["dt_bias"], lb)}
    common = dict(scale=D**-0.5, shapes=shapes, gate=1 if lb is None else 2, A_log=kw["A_log"],
                  dt_bias=kw["dt_bias"], lower_bound=lb, l2norm=True, beta_sigmoid=True, neg_eigval=False)
    prep = lambda: chunk_prep(q, k, v, g, beta, info, BT=64, pad=True, dtype=DT, **common)  # noqa: E731
    ref = prep()
    o = torch.empty_like(v)
    rec = lambda: chunk_recur(*ref, info, seq, shapes=shapes, initial_state=kw["initial_state"], out=o,  # noqa: E731
                              store_final=True, store_states=False, BT=64)
    res["recur_ms"] = bench(rec)
    res["recur_kernel"] = kernel_info(chunk_fwd.LAUNCHED.get("recur"))
    res["prep_ms"] = bench(prep)  # all launches
    res["wide_subchunk_share"] = float(chunk_fwd.LAUNCHED["diag_wide"].float().mean())
    for name in ("diag_fast", "diag", "tree", "wy"):
        res[f"{name}_kernel"] = kernel_info(chunk_fwd.LAUNCHED.get(name))
    if "variants" in parts:
        res.update(_fwd_variants(prep, ref))
    if "bwd" in parts:
        res.update(_bwd_pieces(q, k, v, g, beta, kw, info, seq, shapes, common, lb, T, "variants" in parts))
    if "kernels" in parts:  # every kernel of chunk_kda's forward, then of forward + backward, by name; fla's too
        impls = [("", chunk_kda, kw)] + ([("fla_", fla_chunk_kda, fla_kw(kw, gate))] if fla is not None else [])
        for prefix, fn, fkw in impls:
            try:
                res[f"{prefix}fwd_kernels_us"] = kernel_times(lambda: fn(*ts, **fkw))
                ts2, _, leaves = inputs(1, T, gate, grad=True, dist=dist)
                do = torch.randn_like(v)

                def fb():
                    o2, s2 = fn(*ts2, **dict(fkw, A_log=leaves[5], dt_bias=leaves[6], initial_state=leaves[7]))
                    torch.autograd.backward([o2, s2], [do, torch.ones_like(s2)])
                    for x in leaves:
                        x.grad = None

                res[f"{prefix}fwd_bwd_kernels_us"] = kernel_times(fb)
            except Exception as e:  # noqa: BLE001  (keep the timings above)
                res[f"{prefix}kernels"] = f"failed: {e!r}"
    return res


@contextlib.contextmanager
def _switches(prefix: str, variant: dict):
    """Set a variant's KIMI_LINEAR_KDA_* switches for the block, yielding its result tag. The tag is printed
    before the variant runs: one that faults the device (session 6: an illegal memory access in a variant
    loop) kills every later launch, and the log then shows which one it was."""
    tag = prefix + "_".join(f"{key.lower()}{val}" for key, val in variant.items())
    print(f"  (running {tag})", flush=True)
    os.environ.update({"KIMI_LINEAR_KDA_" + key: val for key, val in variant.items()})
    try:
        yield tag
    finally:
        for key in variant:
            os.environ.pop("KIMI_LINEAR_KDA_" + key)


def _fwd_variants(prep, ref):
    """Launch variants of the forward prep (opt-outs and other settings), timed against the default, with
    their output agreement."""
    from kimi_linear.ops.kda.triton import chunk_fwd

    res = {}
    # (Dropped after measuring slower: DIAG_FAST_BK 64, DIAG_FAST_WARPS 2, PREP_BK 16 and pipeline stages
    # in session 7; the whole-chunk kernel and w/u fused into the tree kernel in session 8, with their
    # switches; docs/benchmarks.md.)
    for variant in ({"DIAG_SPAN": "-1"}, {"TREE": "masked"}, {"TREE_WARPS": "4"}):
        kernels = ("diag_fast", "diag", "tree", "wy")
        for name in kernels:  # so that only this variant's launches are reported below, none of an earlier one's
            chunk_fwd.LAUNCHED.pop(name, None)
        with _switches("prep_", variant) as tag:
            try:
                got = prep()
                res[f"{tag}_ms"] = bench(prep)
                res[f"{tag}_vs_default"] = max(rel(x.float(), y.float()) for x, y in zip(got, ref))
                for name in kernels:
                    if chunk_fwd.LAUNCHED.get(name) is not None:
                        res[f"{tag}_{name}_kernel"] = kernel_info(chunk_fwd.LAUNCHED[name])
            except Exception as e:  # noqa: BLE001
                res[tag] = f"failed: {e!r}"
    return res


def _bwd_pieces(q, k, v, g, beta, kw, info, seq, shapes, common, lb, T, variants=True):
    """Backward pieces (the recompute as chunk_kda_bwd does it, in the storage types that
    KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT picks)."""
    from kimi_linear.ops.kda.triton import chunk_bwd, chunk_fwd
    from kimi_linear.ops.kda.triton.chunk_fwd import chunk_prep, chunk_recur

    res = {}
    dtype, u_dtype = chunk_bwd.recompute_dtypes(q)
    rec = dict(common, dtype=dtype, pad=dtype != torch.float32, aqk_dtype=torch.float32, u_dtype=u_dtype)
    pre = lambda: chunk_prep(q, k, v, g, beta, info, BT=64, store_t=True, **rec)  # noqa: E731
    outs = pre()
    res["bwd_recompute_prep_ms"] = bench(pre)  # KIMI_LINEAR_KDA_BWD_RECOMPUTE=full
    res["bwd_wy_kernel"] = kernel_info(chunk_fwd.LAUNCHED.get("wy"))
    kept_t = outs[6].clone()
    res["bwd_wy_from_kept_t_ms"] = bench(  # the default: T and Aqk kept by the forward, only w/u rebuilt
        lambda: chunk_prep(q, k, v, g, beta, info, BT=64, t_given=kept_t, **rec))
    handoff = chunk_bwd.handoff_dtypes(q)  # the backward's hand-off storage types, as chunk_kda_bwd picks them
    v_new = torch.empty(info.shape[0], H, 64, D, device=q.device, dtype=handoff["vnew"])
    states_fn = lambda: chunk_recur(*outs[:6], info, seq, shapes=shapes, initial_state=kw["initial_state"],  # noqa: E731
                                    out=None, store_final=False, store_states=True, BT=64, v_new=v_new,
                                    states_dtype=handoff["states"])
    states = states_fn()[2]
    res["bwd_recompute_states_ms"] = bench(states_fn)
    do = torch.randn_like(v)
    w_, _, qg_, kg_, aqk_, gc_ = outs[:6]
    sweep = lambda: chunk_bwd.chunk_recur_bwd(w_, qg_, kg_, aqk_, gc_, info, seq, states, v_new, None, do,  # noqa: E731
                                              shapes=shapes, BT=64, handoff=handoff)
    grads = sweep()
    res["bwd_sweep_ms"] = bench(sweep)  # the reverse sweep and the gradient kernel
    du, dqg, dkg, dw, daqk, dgc, _ = grads
    cfg = type("Cfg", (), dict(shapes=shapes, BT=64, scale=D**-0.5, gate=common["gate"], lower_bound=lb, l2norm=True,
                               beta_sigmoid=True, neg_eigval=False))()
    tinv = outs[6]
    pb = lambda: chunk_bwd.chunk_prep_bwd(q, k, v, g, beta, kw["A_log"], kw["dt_bias"], info, tinv.clone(), dw, du,  # noqa: E731
                                          dqg, dkg, daqk, dgc, cfg=cfg, overwrite_t=True)
    pb()
    res["bwd_prep_bwd_ms"] = bench(pb)
    from kimi_linear.ops.kda.triton import prep_bwd

    for name in ("wy", "diag_fast", "diag", "tree", "pairs"):
        res[f"bwd_prep_bwd_{name}_kernel"] = kernel_info(prep_bwd.LAUNCHED.get(name))
    # Launch variants, then leave-one-stage-out (KIMI_LINEAR_KDA_PREP_BWD_ABLATE bits, see prep_bwd.py:
    # 1 the tree levels inside pass 2, so with PREP_BWD_TREE=pass2; 16 the L2-norm pass).
    variants = [{"DIAG_SPAN": "-1"}, {"PREP_BWD_STAGES": "1"}, {"PREP_BWD_TREE_WARPS": "4"},
                {"PREP_BWD_TREE": "pass2", "PREP_BWD_WARPS": "4"},
                {"PREP_BWD_TREE": "pass2", "PREP_BWD_WARPS": "4", "PREP_BWD_ABLATE": "1"}] if variants else []
    for variant in variants:
        with _switches("bwd_prep_bwd_", variant) as tag:
            try:
                pb()
                res[f"{tag}_ms"] = bench(pb)
                if "PREP_BWD_TREE" in variant:  # registers and spills of pass 2 with its levels
                    res[f"{tag}_pairs_kernel"] = kernel_info(prep_bwd.LAUNCHED.get("pairs"))
            except Exception as e:  # noqa: BLE001
                res[tag] = f"failed: {e!r}"
    return res


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--max-bwd-t", type=int, default=32768, help="longest T timed with the backward")
    ap.add_argument("--lengths", type=int, nargs="+", help="B=1 sequence lengths (default 8K 32K 128K)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-launch breakdown and prep variants")
    ap.add_argument("--breakdown-t", type=int, default=32768, help="sequence length of the per-launch breakdown")
    ap.add_argument("--breakdown-parts", nargs="+", default=["bwd"], help="bwd: the backward's pieces; variants: prep and prep_bwd launch variants; kernels: "
                         "per-kernel device times (torch.profiler) of the forward and forward + backward, ours and "
                         "fla's")
    ap.add_argument("--breakdown-dists", nargs="+", default=["stress", "init"])
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--pool-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                    help="decode: the state pool's type (16-bit pools halve the state traffic)")
    ap.add_argument("--rows", nargs="+", default=["b1", "b8", "varlen"], choices=["b1", "b8", "varlen"],
                    help="table rows per gate case: B=1 at each length, B=8 at 4K, the varlen batch (--quick: b1)")
    ap.add_argument("--gates", nargs="+", default=["softplus", "lower_bound", "softplus-init"],
                    help="gate cases: softplus / lower_bound with the stress parameters, softplus-init with "
                         "initialisation-like ones (see inputs())")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"card: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
          f"fla-core {getattr(fla, '__version__', 'n/a') if fla else 'n/a'}")
    bw = copy_bandwidth()
    print(f"measured device copy bandwidth: {bw:.2f} TB/s")
    for dist in () if args.no_breakdown else args.breakdown_dists:
        try:
            res = breakdown(args.breakdown_t, "softplus", dist, args.breakdown_parts)
            print(f"breakdown T={args.breakdown_t // 1024}K softplus, {dist} gates (ms per launch):")
            for key, val in res.items():
                if isinstance(val, dict):
                    print(f"  {key}:")
                    for name, us in val.items():
                        print(f"    {us:10.1f} us  {name}")
                else:
                    print(f"  {key}: {round(val, 3) if isinstance(val, float) else val}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"breakdown failed: {e!r}")
    Ts = args.lengths or ([8192] if args.quick else [8192, 32768, 131072])
    rows = []
    for case in args.gates:
        gate, dist = (case.split("-") + ["stress"])[:2]
        for T in Ts if "b1" in args.rows else ():
            rows.append(time_case(f"B=1 T={T // 1024}K {case}", 1, T, gate,
                                  do_bwd=not args.no_bwd and T <= args.max_bwd_t, dist=dist))
            print(rows[-1], flush=True)
        if not args.quick and "b8" in args.rows:
            rows.append(time_case(f"B=8 T=4K {case}", 8, 4096, gate, do_bwd=not args.no_bwd, dist=dist))
            print(rows[-1], flush=True)
        if not args.quick and "varlen" in args.rows:
            cu = [0, 1, 15, 1000, 4096, 4200, 9000, 16384, 20000, 32768]
            rows.append(time_case(f"varlen 9 seqs (32K) {case}", 1, cu[-1], gate, cu=cu, do_bwd=not args.no_bwd,
                                  dist=dist))
            print(rows[-1], flush=True)
    dec = []
    for pool_dtype in (getattr(torch, name) for name in args.pool_dtypes):
        for B in () if args.no_decode else (1, 64, 256):
            for gate in ("softplus", "lower_bound"):
                dec.append(decode_case(B, gate, bw, pool_dtype))
                print(dec[-1], flush=True)

    print()
    print(f"## {dev}: chunk_kda, bf16, H={H}, K=V={D}, times in ms (median), ratio = fla / ours")
    print("| case | fwd ours | fwd fla | fwd ratio | fwd+bwd ours | fwd+bwd fla | fwd+bwd ratio | rel diff o vs fla |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fr = r["fwd_fla"] / r["fwd_ours"] if "fwd_fla" in r else None
        br = r["fb_fla"] / r["fb_ours"] if "fb_fla" in r and "fb_ours" in r else None
        print(f"| {r['case']} | {fmt(r['fwd_ours'])} | {fmt(r.get('fwd_fla'))} | {fmt(fr, '.2f')} | "
              f"{fmt(r.get('fb_ours'))} | {fmt(r.get('fb_fla'))} | {fmt(br, '.2f')} | {fmt(r.get('agree_o'), '.1e')} |")
    print()
    print(f"## decode (fused_recurrent_kda, T=1, H={H}, state pool in place, float32 unless named; state bytes "
          f"in the pool's type); copy ceiling {bw:.2f} TB/s")
    print("| case | ours us | fla us | ratio | state TB/s ours | % of copy | CUDA graph us | % of copy (graph) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in dec:
        ratio = r["fwd_fla"] / r["fwd_ours"] if "fwd_fla" in r else None
        print(f"| {r['case']} | {fmt(r['fwd_ours'] * 1e3, '.1f')} | {fmt(r.get('fwd_fla', 0) * 1e3 or None, '.1f')} | "
              f"{fmt(ratio, '.2f')} | {r['bw_ours']:.2f} | {100 * r['bw_frac']:.0f}% | {fmt(r.get('graph_us'), '.1f')} | "
              f"{fmt(100 * r['graph_bw_frac'] if 'graph_bw_frac' in r else None, '.0f')}% |")


if __name__ == "__main__":
    main()
