"""Decode-kernel launch sweep on a GPU: V-slice width and warps per program, timed under CUDA graphs.

    python benchmarks/kda_decode_sweep.py

For each (BV, warps) and batch it checks the output and the written pool slots against the PyTorch
path (float32 relative RMS error) and prints the kernel time and the state traffic as a share of the
device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import itertools
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
    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {bw:.2f} TB/s")
    print("| batch | BV | warps | graph us | % of copy | err o | err state |")
    print("|---|---|---|---|---|---|---|")
    for B in (1, 64, 256):
        x, pool0, idx, kw = case(B)
        os.environ["KIMI_LINEAR_KDA_BACKEND"] = "torch"
        ref_pool = pool0.clone()
        o_ref, _ = fused_recurrent_kda(*x, initial_state=ref_pool, ssm_state_indices=idx, inplace_final_state=True, **kw)
        os.environ["KIMI_LINEAR_KDA_BACKEND"] = "auto"
        for bv, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
            os.environ["KIMI_LINEAR_KDA_DECODE_BV"], os.environ["KIMI_LINEAR_KDA_DECODE_WARPS"] = str(bv), str(warps)
            pool = pool0.clone()
            out = torch.empty_like(x[2])
            run = lambda: fused_recurrent_kda(*x, initial_state=pool, ssm_state_indices=idx,  # noqa: E731
                                              inplace_final_state=True, out=out, **kw)
            try:
                run()
                err_o = ((out.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
                err_s = ((pool[idx] - ref_pool[idx]).norm() / ref_pool[idx].norm()).item()
                us = bench(captured(run).replay) * 1e3
            except Exception as e:  # noqa: BLE001
                print(f"| {B} | {bv} | {warps} | failed: {type(e).__name__} | | | |")
                continue
            frac = 2 * B * H * D * D * 4 / (us * 1e-6) / 1e12 / bw
            print(f"| {B} | {bv} | {warps} | {us:.1f} | {100 * frac:.0f}% | {err_o:.1e} | {err_s:.1e} |", flush=True)
    for name in ("KIMI_LINEAR_KDA_DECODE_BV", "KIMI_LINEAR_KDA_DECODE_WARPS"):
        os.environ.pop(name, None)


if __name__ == "__main__":
    main()
