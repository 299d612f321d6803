"""Host-side cost of the KDA Triton path: what a call costs the CPU before the GPU does any work.

Session 16 found the 8K inference forward's eager call spending 0.90 ms of host time for 1.13 ms of GPU
time (H100), and the since-removed opt-in ``KIMI_LINEAR_KDA_OVERLAP`` (more, smaller launches) 3.1 ms:
host-bound.

    # GPU: per switch set, host time per call (launches queued, no sync), eager time (do_bench), the
    # same call replayed from a CUDA graph (no host work at all), and the graph output's difference
    python benchmarks/kda_host.py gpu [--t 8192] [--profile] "" STREAM=1 "STREAM=1,GATE_PASS=fused"
    # CPU, no GPU: our own Python per call, with every Triton launch replaced by a no-op (Triton's own
    # launch cost, about 10-30 us per launch, comes on top), and the launches each call makes
    python benchmarks/kda_host.py cpu [--t 256] [--profile]

The CPU mode times only the Python around the launches (argument checks, layouts, allocations, switch
reads); on CPU tensors the allocations are host mallocs, not the CUDA caching allocator, so compare its
numbers with each other, not with the GPU mode's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "KIMI_LINEAR_KDA_"


def _profile(fn, n: int, top: int = 20) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# CPU: the Python around the launches
# ----------------------------------------------------------------------------------------------

def cpu_calls(T: int = 256, H: int = 4, D: int = 128, repeat: int = 100, profile: bool = False) -> dict:
    """Per case (inference forward, training forward + backward, a varlen inference forward of up to nine
    sequences with cu_seqlens_cpu, one decode step at batch 64): microseconds
    of host time per call with the Triton launches replaced by no-ops, and the kernels launched per call
    (in order). Small shapes by default: the Python does not depend on them, and large CPU tensors would add
    the host's own tensor work (on the GPU that is kernels). Restores the launch path before returning."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from kimi_linear.ops import chunk_kda, fused_recurrent_kda

    launched: list = []

    class _NoLaunch:
        def __init__(self, fn):
            self.name = fn.__name__

        def __call__(self, *args, **kwargs):
            launched.append(self.name)

    # (kernels are InterpretedFunction objects under TRITON_INTERPRET=1, as in the test suite)
    classes = (JITFunction, InterpretedFunction)
    saved = [cls.__dict__.get("__getitem__") for cls in classes]  # (None: inherited)
    saved_backend = os.environ.get(PREFIX + "BACKEND")
    for cls in classes:
        cls.__getitem__ = lambda self, grid: _NoLaunch(self.fn)
    os.environ[PREFIX + "BACKEND"] = "triton"
    try:
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, grad=False):
            return torch.randn(*shape, generator=gen).to(torch.bfloat16).requires_grad_(grad)

        kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                  A_log=torch.zeros(H), dt_bias=torch.zeros(H * D), output_final_state=True)
        inf = [rand(1, T, H, D) for _ in range(4)] + [rand(1, T, H)]
        train = [rand(1, T, H, D, grad=True) for _ in range(4)] + [rand(1, T, H, grad=True)]
        do = torch.zeros(1, T, H, D, dtype=torch.bfloat16)
        B = 64
        dec = [rand(B, 1, H, D) for _ in range(4)] + [rand(B, 1, H)]
        pool = torch.zeros(B, H, D, D)
        idx = torch.arange(B, dtype=torch.int32)

        def inference():
            with torch.no_grad():
                chunk_kda(*inf, **kw)

        def training():
            o, s = chunk_kda(*train, **kw)
            # (the no-op launches leave o empty: backward through it with a zero gradient of o's shape)
            torch.autograd.backward([o], [do])

        # (nine sequences packed as in kda_gpu.py's varlen row, scaled to T; the host copy given, as an
        # engine does)
        cu = sorted({c for c in [0, 1, 15, T] + [T * f // 32 for f in (1, 4, 5, 9, 16, 20)] if c <= T})
        var_kw = dict(kw, cu_seqlens=torch.tensor(cu), cu_seqlens_cpu=torch.tensor(cu),
                      initial_state=torch.zeros(len(cu) - 1, H, D, D))

        def varlen():
            with torch.no_grad():
                chunk_kda(*inf, **var_kw)

        def decode():
            fused_recurrent_kda(*dec, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                **{key: val for key, val in kw.items() if key != "output_final_state"})

        result = {}
        for name, fn, n in (("inference forward", inference, repeat), ("training forward + backward", training,
                                                                       max(repeat // 4, 5)),
                            ("varlen inference forward", varlen, repeat), ("decode step, batch 64", decode, repeat)):
            for _ in range(3):
                fn()
            launched.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            us = (time.perf_counter() - t0) / n * 1e6
            per_call = launched[: len(launched) // n]
            result[name] = {"us": us, "launches": per_call}
            if profile:
                result[name]["profile"] = _profile(fn, n)
        return result
    finally:
        for cls, getitem in zip(classes, saved):
            if getitem is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = getitem
        if saved_backend is None:
            os.environ.pop(PREFIX + "BACKEND", None)
        else:
            os.environ[PREFIX + "BACKEND"] = saved_backend


# ----------------------------------------------------------------------------------------------
# GPU: host time, eager time, CUDA-graph replay
# ----------------------------------------------------------------------------------------------

def _gpu_child():
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kda_gpu import bench, inputs  # benchmarks/kda_gpu.py

    from kimi_linear.ops import chunk_kda

    ts, kw, _ = inputs(1, int(os.environ["KDA_HOST_T"]), "softplus", grad=False, dist="init")

    def run():
        with torch.no_grad():
            return chunk_kda(*ts, **kw)

    ref = run()[0].float()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    eager = bench(run)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # (warm-up on a side stream, as torch.cuda.graphs asks)
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    diff = ((out[0].float() - ref).norm() / ref.norm()).item()
    replay = bench(graph.replay)
    prof = _profile(run, 50) if os.environ.get("KDA_HOST_PROFILE") == "1" else ""
    torch.cuda.synchronize()
    print(json.dumps({"host": host, "eager": eager, "graph": replay, "diff": diff, "profile": prof}))


def gpu_table(specs, T: int, profile: bool) -> None:
    from kda_variants import parse  # (benchmarks/: the switch sets' KEY=VALUE syntax, one parser)

    print(f"## chunk_kda inference forward, B=1 T={T} H=32 K=V=128 bf16, softplus gate, init-like gates; ms "
          "(host: per call, launches queued without a sync; eager: do_bench median; graph: the call replayed "
          "from a CUDA graph; diff: relative RMS of the graph's output from the eager one)")
    print("| variant | host | eager | graph | diff |\n|---|---|---|---|---|")
    for spec in specs:
        env = dict(os.environ, KDA_HOST_CHILD="1", KDA_HOST_T=str(T), KDA_HOST_PROFILE="1" if profile else "0",
                   **parse(spec))
        name = spec or "defaults"
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                               timeout=300)
        except subprocess.TimeoutExpired:
            print(f"| {name} | timed out | | | |", flush=True)
            continue
        if p.returncode:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | failed: {tail[:120]} | | | |", flush=True)
            continue
        d = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"| {name} | {d['host']:.3f} | {d['eager']:.3f} | {d['graph']:.3f} | {d['diff']:.1e} |", flush=True)
        if d["profile"]:
            print(d["profile"], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("gpu", "cpu"))
    ap.add_argument("specs", nargs="*", help="gpu: switch sets KEY=VAL[,KEY=VAL] ('' = the defaults)")
    ap.add_argument("--t", type=int, help="sequence length (gpu: 8192, cpu: 256)")
    ap.add_argument("--repeat", type=int, default=100, help="cpu: calls timed per case")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions by own time")
    args = ap.parse_args(argv)
    if args.mode == "cpu":
        for name, d in cpu_calls(args.t or 256, repeat=args.repeat, profile=args.profile).items():
            print(f"{name}: {d['us']:.0f} us of Python per call, {len(d['launches'])} launches: "
                  f"{' '.join(d['launches'])}")
            if "profile" in d:
                print(d["profile"])
        return
    gpu_table(args.specs or [""], args.t or 8192, args.profile)


if __name__ == "__main__":
    if os.environ.get("KDA_HOST_CHILD") == "1":
        _gpu_child()
    else:
        main()
