"""Decode-kernel launch sweep on a GPU: V-slice width and warps per program, timed under CUDA graphs.

    python benchmarks/kda_decode_sweep.py [--batches 1 64 256] [--slices 16x2 32x2 32x4 ...]

For each launch variant and batch it checks the output and the written pool slots against the PyTorch
path (float32 relative RMS error) and prints the kernel time and the state traffic as a share of the
device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton

from kda_gpu import D, H, bench, captured, copy_bandwidth  # benchmarks/kda_gpu.py (adds the repo to sys.path)
from kimi_linear.ops import fused_recurrent_kda


def case(B, dt=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(B)
    q, k, v, g = (torch.randn(B, 1, H, D, device="cuda", dtype=dt, generator=gen) for _ in range(4))
    beta = torch.randn(B, 1, H, device="cuda", dtype=dt, generator=gen)
    A_log = torch.log(torch.rand(H, device="cuda", generator=gen) * 15 + 1)
    dt_bias = torch.randn(H * D, device="cuda", generator=gen) * 0.5
    pool = torch.randn(2 * B, H, D, D, device="cuda", generator=gen) * 0.1
    idx = torch.randperm(2 * B, device="cuda", generator=gen)[:B]
    kw = dict(A_log=A_log, dt_bias=dt_bias, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True)
    return (q, k, v, g, beta), pool, idx, kw


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--slices", nargs="+", default=["16x1", "16x2", "32x2", "32x4", "64x2", "64x4"],
                    help="BVxWARPS launch shapes")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {bw:.2f} TB/s")
    print("| batch | BV | warps | graph us | % of copy | err o | err state |")
    print("|---|---|---|---|---|---|---|")
    env = {"BV": "KIMI_LINEAR_KDA_DECODE_BV", "warps": "KIMI_LINEAR_KDA_DECODE_WARPS"}
    for B in args.batches:
        x, pool0, idx, kw = case(B)
        os.environ["KIMI_LINEAR_KDA_BACKEND"] = "torch"
        ref_pool = pool0.clone()
        o_ref, _ = fused_recurrent_kda(*x, initial_state=ref_pool, ssm_state_indices=idx, inplace_final_state=True, **kw)
        os.environ["KIMI_LINEAR_KDA_BACKEND"] = "auto"
        for shape in args.slices:
            bv, warps = shape.split("x")
            os.environ.update({env["BV"]: bv, env["warps"]: warps})
            pool = pool0.clone()
            out = torch.empty_like(x[2])
            run = lambda: fused_recurrent_kda(*x, initial_state=pool, ssm_state_indices=idx,  # noqa: E731
                                              inplace_final_state=True, out=out, **kw)
            tag = f"| {B} | {bv} | {warps} |"
            try:
                run()
                err_o = ((out.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
                err_s = ((pool[idx] - ref_pool[idx]).norm() / ref_pool[idx].norm()).item()
                us = bench(captured(run).replay) * 1e3
            except Exception as e:  # noqa: BLE001
                print(f"{tag} failed: {type(e).__name__} | | | |")
                continue
            frac = 2 * B * H * D * D * 4 / (us * 1e-6) / 1e12 / bw
            print(f"{tag} {us:.1f} | {100 * frac:.1f}% | {err_o:.1e} | {err_s:.1e} |", flush=True)
    for name in env.values():
        os.environ.pop(name, None)


if __name__ == "__main__":
    main()
