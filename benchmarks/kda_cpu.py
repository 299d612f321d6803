"""CPU speed of the KDA operator: our chunked path against our token loop and against the pure-PyTorch
KDA functions that ship with transformers 5.24 (the fallback its Kimi Linear model uses without a GPU).

All timings come from this one run on this machine; the ratios are the result.

    python benchmarks/kda_cpu.py                  # T = 1024 and 4096, B=1, H=4, K=V=128
    python benchmarks/kda_cpu.py --lengths 512 --heads 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.modules.setdefault("fla", None)  # transformers would pick fla's GPU kernels if it were importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kimi_linear.ops import chunk_kda, fused_recurrent_kda  # noqa: E402
from kimi_linear.utils import median_seconds, relative_rms_error  # noqa: E402


def transformers_kda():
    import transformers
    from transformers.models.kimi_linear import modeling_kimi_linear as m

    # The decorators wrap the torch fallbacks; the undecorated functions are what runs on CPU.
    chunk = getattr(m.chunk_kimi_delta_attention, "__wrapped__", m.chunk_kimi_delta_attention)
    recurrent = getattr(m.recurrent_kimi_delta_attention, "__wrapped__", m.recurrent_kimi_delta_attention)
    return transformers.__version__, chunk, recurrent


def make_inputs(B, T, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.randn(B, T, H, D, generator=gen)
    v = torch.randn(B, T, H, D, generator=gen)
    g = -F.softplus(torch.randn(B, T, H, D, generator=gen)) * 0.1  # pre-gated log decay
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return q, k, v, g, beta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    tf_version, tf_chunk, tf_recurrent = transformers_kda()
    print(f"torch {torch.__version__}, transformers {tf_version}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; B={args.batch} H={args.heads} K=V={args.head_dim}, fp32, "
          f"L2 norm in kernel; medians of {args.repeat}")
    rows = []
    for T in args.lengths:
        q, k, v, g, beta = make_inputs(args.batch, T, args.heads, args.head_dim, seed=T)
        kw = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)
        ours_chunk = lambda: chunk_kda(q, k, v, g, beta, **kw)  # noqa: E731
        ours_loop = lambda: fused_recurrent_kda(q, k, v, g, beta, **kw)  # noqa: E731
        theirs_chunk = lambda: tf_chunk(q, k, v, g, beta, output_final_state=True,  # noqa: E731
                                        use_qk_l2norm_in_kernel=True)
        theirs_loop = lambda: tf_recurrent(q, k, v, g, beta, None, True,  # noqa: E731
                                           use_qk_l2norm_in_kernel=True)
        with torch.no_grad():
            o_ref, _ = ours_loop()
            err_chunk = relative_rms_error(ours_chunk()[0], o_ref)
            err_tf = relative_rms_error(theirs_chunk()[0], o_ref)
            t = {name: median_seconds(fn, repeat=args.repeat)
                 for name, fn in [("chunk", ours_chunk), ("loop", ours_loop), ("tf_chunk", theirs_chunk),
                                  ("tf_loop", theirs_loop)]}

        # Forward + backward, ours against transformers' chunked function.
        def fwd_bwd(fn):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
            o, s = fn(*leaves)
            (o.sum() + s.sum()).backward()

        t["chunk_fb"] = median_seconds(lambda: fwd_bwd(lambda *a: chunk_kda(*a, **kw)), repeat=args.repeat)
        t["tf_chunk_fb"] = median_seconds(
            lambda: fwd_bwd(lambda *a: tf_chunk(*a, output_final_state=True, use_qk_l2norm_in_kernel=True)),
            repeat=args.repeat)
        rows.append(dict(T=T, err_chunk_vs_loop=err_chunk, err_tf_chunk_vs_loop=err_tf, **t))

    header = (f"{'T':>6} | {'ours chunk':>10} | {'ours loop':>10} | {'loop/chunk':>10} | {'tf chunk':>10} | "
              f"{'tf/ours':>7} | {'tf loop':>9} | {'fwd+bwd ours':>12} | {'tf fwd+bwd':>10} | {'tf/ours':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['T']:>6} | {r['chunk'] * 1e3:>8.1f}ms | {r['loop'] * 1e3:>8.1f}ms | "
              f"{r['loop'] / r['chunk']:>9.1f}x | {r['tf_chunk'] * 1e3:>8.1f}ms | "
              f"{r['tf_chunk'] / r['chunk']:>6.2f}x | {r['tf_loop'] * 1e3:>7.1f}ms | "
              f"{r['chunk_fb'] * 1e3:>10.1f}ms | {r['tf_chunk_fb'] * 1e3:>8.1f}ms | "
              f"{r['tf_chunk_fb'] / r['chunk_fb']:>6.2f}x")
    for r in rows:
        print(f"T={r['T']}: relative RMS error vs token loop: ours chunk {r['err_chunk_vs_loop']:.1e}, "
              f"transformers chunk {r['err_tf_chunk_vs_loop']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
