"""Nsight Compute profile of every launch of one chunk_kda forward + backward, ours and (if importable)
flash-linear-attention's, on the same inputs: per kernel its time, DRAM and SM throughput, achieved
occupancy, registers, DRAM bytes, and the warp stall reasons that dominate.

    python benchmarks/kda_ncu.py [--t 8192] [--dist init|stress] [--fwd] [--no-fla] [--csv out.csv]

Runs itself under ``ncu`` (which must be on PATH or in /usr/local/cuda/bin; clocks left alone, so times
match kda_gpu.py's) with the profiled range limited to the timed call: the inputs, compiles and fla's
autotuning happen in a warm-up call outside it. Needs a CUDA GPU; installs nothing.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

TENSOR = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed"
PCT_METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               TENSOR, "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum") + PCT_METRICS
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def _child(args):
    """Inside ncu: a warm-up call (compiles, autotuning), then the profiled call."""
    import torch

    from kda_gpu import inputs  # benchmarks/kda_gpu.py (adds the repo to sys.path)
    from kimi_linear.ops import chunk_kda

    if args.child == "fla":
        from fla.ops.kda import chunk_kda as fn
    else:
        fn = chunk_kda
    ts, kw, leaves = inputs(1, args.t, "softplus", grad=not args.fwd, dist=args.dist)
    do = torch.randn_like(ts[2])

    def call(fn):
        if args.fwd:
            with torch.no_grad():
                fn(*ts, **kw)
            return
        for x in leaves:
            x.grad = None
        o, s = fn(*ts, **kw)
        torch.autograd.backward([o, s], [do, torch.ones_like(s)])

    call(fn)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call(fn)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _ncu() -> str:
    found = shutil.which("ncu") or ("/usr/local/cuda/bin/ncu" if os.path.exists("/usr/local/cuda/bin/ncu") else None)
    if not found:
        sys.exit("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin")
    return found


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def report(path: str) -> str:
    """Per-kernel table from ncu's raw CSV (one row per launch; launches of one kernel summed or averaged)."""
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("==")]
    rows = list(csv.reader(lines))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    stalls = [n for n in header if n.startswith(STALL_PREFIX) and n.endswith(STALL_SUFFIX)
              and "not_issued" not in n]
    time_scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[
        units[col["gpu__time_duration.sum"]]]
    byte_scale = {"byte": 1e-6, "Kbyte": 1e-3, "KB": 1e-3, "Mbyte": 1.0, "MB": 1.0, "Gbyte": 1e3, "GB": 1e3}
    agg = defaultdict(lambda: defaultdict(float))
    order = []
    for row in data:
        key = row[col["Kernel Name"]].split("(")[0].split("<")[0].removeprefix("void ").strip()
        if key not in agg:
            order.append(key)
        a = agg[key]
        a["n"] += 1
        t = _number(row[col["gpu__time_duration.sum"]]) * time_scale
        a["us"] += t
        for m in ("dram__bytes_read.sum", "dram__bytes_write.sum"):
            a[m] += _number(row[col[m]]) * byte_scale.get(units[col[m]], 1e-6)
        for m in PCT_METRICS:
            a[m] += _number(row[col[m]]) * t  # time-weighted
        for s in stalls:
            a[s] += _number(row[col[s]]) * t
    out = ["| kernel | launches | us | DRAM % | SM % | tensor pipe % | occupancy % | regs | DRAM MB read / written | "
           "top stalls (cycles per issued instruction) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(order, key=lambda k: -agg[k]["us"]):
        a = agg[key]
        t = a["us"] or 1.0
        top = sorted(((a[s] / t, s[len(STALL_PREFIX):-len(STALL_SUFFIX)]) for s in stalls), reverse=True)[:3]
        dram, sm, tensor, occupancy, regs = (a[m] / t for m in PCT_METRICS)
        out.append(
            f"| {key} | {int(a['n'])} | {a['us']:.1f} | {dram:.0f} | {sm:.0f} | {tensor:.0f} | {occupancy:.0f} | "
            f"{regs:.0f} | {a['dram__bytes_read.sum']:.0f} / {a['dram__bytes_write.sum']:.0f} | "
            + ", ".join(f"{n} {v:.1f}" for v, n in top) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--dist", default="init", choices=("init", "stress"))
    ap.add_argument("--fwd", action="store_true", help="forward only")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--csv", help="keep ncu's raw CSVs here (a path prefix: PREFIX_ours.csv, PREFIX_fla.csv)")
    ap.add_argument("--report", help="only print the table of an existing raw CSV")
    ap.add_argument("--child", choices=("ours", "fla"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.report:
        print(report(args.report))
        return
    impls = ["ours"]
    if not args.no_fla:
        if importlib.util.find_spec("fla") is not None:
            impls.append("fla")
        else:
            print("fla not importable: profiling ours only", file=sys.stderr)
    prefix = args.csv or os.path.join(tempfile.mkdtemp(), "kda_ncu")
    for impl in impls:
        path = f"{prefix}_{impl}.csv"
        cmd = [_ncu(), "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
               "--log-file", path]
        for s in SECTIONS:
            cmd += ["--section", s]
        cmd += ["--metrics", ",".join(METRICS)]
        child = [sys.executable, os.path.abspath(__file__), "--child", impl, "--t", str(args.t), "--dist", args.dist]
        child += ["--fwd"] * args.fwd
        # Compile and autotune outside ncu first (autotuning under ncu takes minutes); the profiled run
        # then finds the caches, with TRITON_CACHE_AUTOTUNING=1 for fla's autotuner.
        env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1")
        subprocess.run(child, check=True, env=env)
        subprocess.run(cmd + child, check=True, env=env)
        print(f"\n## ncu, {impl}: chunk_kda {'forward' if args.fwd else 'forward + backward'}, B=1 T={args.t} "
              f"H=32 K=V=128 bf16, softplus gate, {args.dist} gates (one profiled call)")
        print(report(path))


if __name__ == "__main__":
    main()
