"""Per-kernel GPU time of chunk_kda (torch.profiler), for the defaults and switch sets, in one process.

    python benchmarks/kda_profile.py [RECUR=wgmma "BT=64,RECUR=wgmma" ...] [--t 8192] [--train] [--dists init stress]

B=1, H=32, K=V=128, bf16, softplus gate with the gate, L2 norm and beta sigmoid in-kernel (kda_gpu.py's
inputs). Without ``--train``: the inference forward. With it: forward + backward, whose loss
(``o.float().sum() + s.sum()``) adds a few PyTorch copy and reduction kernels of its own. Switches
(``KEY=VALUE``, ``KIMI_LINEAR_KDA_`` optional) are set around each measurement; the kernels read them at
launch. Prints us per call and kernel, largest first. Needs a CUDA GPU; installs nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def profile(step, reps: int) -> collections.Counter:
    import torch

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    total = collections.Counter()
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t:
            total[e.key] += t / reps
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="KEY=VALUE[,KEY=VALUE...] switch sets (KIMI_LINEAR_KDA_ optional)")
    ap.add_argument("--t", type=int, default=8192, help="sequence length (B=1, H=32)")
    ap.add_argument("--train", action="store_true", help="forward + backward instead of the inference forward")
    ap.add_argument("--dists", nargs="+", default=["init", "stress"], choices=["init", "stress"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    from kda_variants import parse, switches

    envs = [("defaults", {})] + [(v, parse(v)) for v in args.variants]

    import torch

    from kda_gpu import inputs
    from kimi_linear.ops import chunk_kda

    if not torch.cuda.is_available():
        raise SystemExit("kda_profile.py needs a CUDA GPU")
    print(f"card: {torch.cuda.get_device_name()}; T={args.t}, {'forward + backward' if args.train else 'inference forward'}")
    for dist in args.dists:
        ts, kw, leaves = inputs(1, args.t, "softplus", grad=args.train, dist=dist)

        if args.train:
            wrt = [x for x in leaves if x is not None and x.requires_grad]

            def step():
                o, s = chunk_kda(*ts, **kw)
                torch.autograd.grad(o.float().sum() + s.sum(), wrt)
        else:
            def step():
                with torch.no_grad():
                    chunk_kda(*ts, **kw)

        for name, env in envs:
            with switches(env):
                total = profile(step, args.reps)
            print(f"## {dist} gates, {name}: {sum(total.values()):.0f} us of kernel time")
            for key, us in total.most_common():
                print(f"  {us:8.1f}  {key[:100]}")


if __name__ == "__main__":
    main()
