"""End-to-end timing of launch variants: chunk_kda forward + backward (or forward only) with
``KIMI_LINEAR_KDA_*`` switches, each variant in its own process against the defaults measured in the
same run, with the gradients' (or the output's) largest relative difference from the defaults' run.

    python benchmarks/kda_variants.py SWEEP_WARPS=4 PREP_BWD_STAGES=1 "SWEEP_BV=16,SWEEP_WARPS=4" \
        [--t 8192] [--dists init stress] [--fwd]

One process per variant: a variant that faults the device (session 6 saw an illegal memory access in a
launch sweep) cannot take the others down, and each compiles its own kernels. B=1, H=32, K=V=128, bf16,
softplus gate with the gate, L2 norm and beta sigmoid in-kernel; ``init`` and ``stress`` gate parameters
as in kda_gpu.py. Needs a CUDA GPU; installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

PREFIX = "KIMI_LINEAR_KDA_"


def _child():
    """Run in the variant's process: time one configuration, save its gradients (or output)."""
    import torch

    from kda_gpu import bench, inputs  # benchmarks/kda_gpu.py (adds the repo to sys.path)
    from kimi_linear.ops import chunk_kda

    fwd_only = os.environ["KDA_VARIANT_FWD"] == "1"
    ts, kw, leaves = inputs(1, int(os.environ["KDA_VARIANT_T"]), "softplus", grad=not fwd_only,
                            dist=os.environ["KDA_VARIANT_DIST"])
    if fwd_only:
        with torch.no_grad():
            def run():
                return chunk_kda(*ts, **kw)[0]
            result = [run().float()]
            ms = bench(run)
    else:
        do = torch.randn_like(ts[2])

        def run():
            o, s = chunk_kda(*ts, **kw)
            torch.autograd.backward([o, s], [do, torch.ones_like(s)])

        run()
        result = [x.grad.detach().float().clone() for x in leaves]
        ms = bench(run, grad_to_none=leaves)
    torch.save(result, os.environ["KDA_VARIANT_SAVE"])
    print(json.dumps({"ms": ms}))


def parse(spec: str) -> dict:
    """"A=1,B=2" -> {"KIMI_LINEAR_KDA_A": "1", ...} (the prefix may be given or left out)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {spec!r}: expected KEY=VALUE pairs separated by commas")
        out[key if key.startswith(PREFIX) else PREFIX + key] = val
    return out


@contextlib.contextmanager
def switches(env: dict):
    """Set ``env`` (from ``parse``) in this process's environment for the block, then restore it: the
    kernels read their switches at launch."""
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, val in old.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="KEY=VALUE[,KEY=VALUE...] switch sets (KIMI_LINEAR_KDA_ optional)")
    ap.add_argument("--t", type=int, default=8192, help="sequence length (B=1, H=32)")
    ap.add_argument("--dists", nargs="+", default=["init", "stress"], choices=["init", "stress"])
    ap.add_argument("--fwd", action="store_true", help="time the forward only (and compare the output)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per variant process")
    args = ap.parse_args()
    import torch

    variants = [{}] + [parse(v) for v in args.variants]
    what = "forward" if args.fwd else "forward + backward"
    print(f"## chunk_kda {what}, B=1 T={args.t} H=32 K=V=128 bf16, softplus gate; ms (median); "
          f"diff = largest relative difference of the {'output' if args.fwd else 'gradients'} from the defaults")
    print("| gates | variant | ms | vs defaults | diff |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dist in args.dists:
            base_ms, base = None, None  # the defaults' run, first
            for var in variants:
                save = os.path.join(tmp, "result.pt")
                env = dict(os.environ, **var, KDA_VARIANT_CHILD="1", KDA_VARIANT_T=str(args.t), KDA_VARIANT_DIST=dist,
                           KDA_VARIANT_FWD="1" if args.fwd else "0", KDA_VARIANT_SAVE=save)
                name = ",".join(f"{k[len(PREFIX):]}={v}" for k, v in var.items()) or "defaults"
                try:
                    p = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                                       timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {dist} | {name} | timed out after {args.timeout:.0f} s | | |", flush=True)
                    continue
                if p.returncode != 0:
                    err = (p.stderr.strip().splitlines() or ["?"])[-1][:160]
                    print(f"| {dist} | {name} | failed (exit {p.returncode}): {err} | | |", flush=True)
                    continue
                ms = json.loads(p.stdout.strip().splitlines()[-1])["ms"]
                got = torch.load(save)
                if not var:
                    base_ms, base = ms, got
                if base is None:  # the defaults' run failed: nothing to compare with
                    print(f"| {dist} | {name} | {ms:.3f} | - | - |", flush=True)
                    continue
                diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, base))
                print(f"| {dist} | {name} | {ms:.3f} | {ms / base_ms:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _child() if os.environ.get("KDA_VARIANT_CHILD") == "1" else main()
