"""Where two forward recurrences disagree: the Triton kernel against a switch set (the Gluon one by default).

    python benchmarks/kda_recur_diff.py [RECUR=wgmma "RECUR=wgmma,RECUR_STAGES=2" ...]

Runs the inference forward of small cases (one or several chunks, K and V padded or not, every kernel
chunk length) with the Triton recurrence and with each switch set, on the same inputs, and prints per case
the relative RMS difference of the outputs and final states, and where the largest differences sit: the
worst token rows (with their chunk), V columns, and the state's K rows and V columns. A layout slip in a
kernel shows as a pattern there (every second chunk, one V block of 8, one warp's 16 rows), where the GPU
test's pass / fail bound shows only a number. Needs a CUDA GPU; installs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kda_variants import parse, switches  # noqa: E402  (beside this script)

CASES = [  # (T, K, V, kernel chunk length)
    (32, 128, 128, "32"), (96, 128, 128, "32"), (64, 64, 64, "64"), (40, 128, 64, "16"), (200, 100, 60, "32"),
]


def worst(values, n=4):
    """The n largest entries of a 1-D tensor as 'index:value'."""
    top = values.topk(min(n, values.numel()))
    return " ".join(f"{i}:{v:.2e}" for v, i in zip(top.values.tolist(), top.indices.tolist()))


def run(env: dict, T, K, V, bt, seed=0):
    import torch

    from kimi_linear.ops import chunk_kda
    from kimi_linear.ops.kda.triton import chunk_fwd

    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, H = 1, 2
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).to(torch.bfloat16)
    g = -0.2 * torch.rand(B, T, H, K, device="cuda", generator=gen)
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(torch.bfloat16)
    h0 = torch.randn(B, H, K, V, device="cuda", generator=gen)
    with switches({**env, "KIMI_LINEAR_KDA_BT": bt}), torch.no_grad():
        o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.cuda.synchronize()
    return o.float(), s.float(), chunk_fwd.LAUNCHED.get("recur_impl")


def main():

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", default=["RECUR=wgmma"],
                    help="KEY=VALUE[,KEY=VALUE...] switch sets (KIMI_LINEAR_KDA_ optional)")
    args = ap.parse_args()
    for spec in args.variants:
        env = parse(spec)
        print(f"== {spec}")
        for T, K, V, bt in CASES:
            o1, s1, impl1 = run({"KIMI_LINEAR_KDA_RECUR": "triton"}, T, K, V, bt)
            o2, s2, impl2 = run(env, T, K, V, bt)
            do, ds = (o1 - o2).abs()[0], (s1 - s2).abs()[0]  # [T, H, V], [H, K, V]
            rel_o = ((o1 - o2).norm() / o1.norm()).item()
            rel_s = ((s1 - s2).norm() / s1.norm()).item()
            print(f"T={T} K={K} V={V} BT={bt} ({impl1} vs {impl2}): o {rel_o:.2e}, state {rel_s:.2e}, "
                  f"finite {bool(o2.isfinite().all() and s2.isfinite().all())}")
            print(f"   worst token rows (chunk = row // {bt}): {worst(do.amax(dim=(1, 2)))}")
            print(f"   worst o V columns: {worst(do.amax(dim=(0, 1)))}")
            print(f"   worst state K rows: {worst(ds.amax(dim=(0, 2)))};  V columns: {worst(ds.amax(dim=(0, 1)))}")


if __name__ == "__main__":
    main()
