"""``benchmarks/kda_ncu.py``'s table from Nsight Compute's raw CSV (no GPU: a trimmed real export).

The sample holds five launches from an H200 profile of one forward + backward at T=8K (session 11):
the w/u kernel and the gate pre-pass twice each, the reverse sweep once; times in ns, bytes in bytes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "ncu_raw_sample.csv"


def _module():
    spec = importlib.util.spec_from_file_location("kda_ncu", ROOT / "benchmarks" / "kda_ncu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_sums_launches_and_converts_units():
    rows = _module().report(str(SAMPLE)).splitlines()[2:]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["_chunk_wy_kernel", "_chunk_recur_bwd_kernel", "_gate_kernel"]  # slowest first
    cells = {n: [c.strip() for c in r.split("|")[2:-1]] for n, r in zip(names, rows)}
    launches, us = cells["_chunk_wy_kernel"][0], float(cells["_chunk_wy_kernel"][1])
    assert launches == "2" and 690 < us < 715  # two launches of ~350 us, ns summed into us
    assert cells["_chunk_recur_bwd_kernel"][0] == "1" and 500 < float(cells["_chunk_recur_bwd_kernel"][1]) < 525
    read, written = (float(x) for x in cells["_chunk_wy_kernel"][7].split("/"))
    assert 800 < read < 850 and 550 < written < 590  # MB, from bytes
    assert cells["_chunk_wy_kernel"][8].startswith("long_scoreboard")  # the dominant stall first
