"""Which of the backward's rebuilt intermediates can be stored in 16 bits without breaking a gradient?

Runs chunk_kda forward + backward (our kernels: on the GPU, or on the CPU under the Triton interpreter)
on float32 inputs that hold bf16 values, with chosen rebuilt tensors (w, u, qg, kg: what
``KIMI_LINEAR_KDA_BWD_RECOMPUTE_16BIT=1`` stores in 16 bits) rounded to bf16 right after the rebuild, and
prints every gradient's relative RMS error against the float64 token loop. The case is the one the 16-bit
rebuild fails on the GPU: ``tests/gpu test_chunk_variants[extreme-softplus]`` (B=2, T=200, H=2,
K=V=64, 5% of raw gates at +1000).

    python benchmarks/kda_rebuild_rounding.py "" w,u,qg,kg u w,qg,kg          # GPU
    TRITON_INTERPRET=1 KIMI_LINEAR_KDA_BACKEND=triton python benchmarks/kda_rebuild_rounding.py ...  # CPU

On the CPU the products are exact float32; on the GPU the inputs' float32 type makes the kernels use
tf32x3 products, unlike the bf16 run of the suite (tf32), so run both before drawing conclusions.
Installs nothing; about 20 s per variant on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kda_utils import KDAInputs, make_inputs, reference, rel_rms  # noqa: E402

from kimi_linear.ops import chunk_kda  # noqa: E402
from kimi_linear.ops.kda.triton import chunk_bwd  # noqa: E402

NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0")
REBUILT = ("w", "u", "qg", "kg")  # the first four outputs of chunk_prep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", default=["", "w,u,qg,kg"],
                    help='comma-separated subsets of w,u,qg,kg to round ("" for none)')
    ap.add_argument("--t", type=int, default=200)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rounded: set[str] = set()
    rebuild = chunk_bwd.chunk_prep

    def rounding_rebuild(*a, **kw):
        outs = rebuild(*a, **kw)
        for name, x in zip(REBUILT, outs):
            if name in rounded:
                x.copy_(x.to(torch.bfloat16).to(x.dtype))
        return outs

    chunk_bwd.chunk_prep = rounding_rebuild  # the backward's rebuild only (the forward imports it itself)

    inp64 = make_inputs(B=2, T=args.t, H=2, K=64, V=64, gate="softplus", dtype=torch.float64, seed=7,
                        extreme_gate_frac=0.05)
    gold = inp64.cast(torch.bfloat16).cast(torch.float64, torch.float64, torch.float64)
    for t in gold.tensors():
        t.requires_grad_(True)
    ref_o, ref_s = reference(gold)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ref_s.shape, generator=gen, dtype=torch.float64)
    gref = torch.autograd.grad((ref_o * do).sum() + (ref_s * dht).sum(), gold.tensors())
    print(f"device {dev}; relative RMS error against float64 per gradient")
    for spec in args.variants:
        bad = set(filter(None, spec.split(","))) - set(REBUILT)
        if bad:
            raise SystemExit(f"unknown tensors {sorted(bad)}: choose from {','.join(REBUILT)}")
        rounded.clear()
        rounded.update(filter(None, spec.split(",")))
        x = gold.cast(torch.float32)

        def on_dev(t):
            return None if t is None else t.detach().to(dev).requires_grad_(True)

        xs = KDAInputs(*(on_dev(t) for t in (x.q, x.k, x.v, x.g, x.beta, x.A_log, x.dt_bias, x.initial_state)),
                       dict(x.kwargs))
        t0 = time.time()
        o, s = xs.call(chunk_kda, chunk_size=64)
        loss = (o.double().cpu() * do).sum() + (s.double().cpu() * dht).sum()
        got = torch.autograd.grad(loss, xs.tensors())
        errs = " ".join(f"{n}={rel_rms(a.detach().cpu().double(), b):.1e}" for n, a, b in zip(NAMES, got, gref))
        print(f"{spec or 'none':12s} {errs} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
