"""Every Triton kernel of the chunked forward and backward compiles for Hopper (sm_90a) on the CPU.

The interpreter tests check what the kernels compute, not that Triton can lower them for the GPU; this
compiles each one ahead of time with the bundled ptxas (``benchmarks/kda_ptxas.py``, no GPU needed) at
the benchmark configuration, and checks the reported registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _ptxas_lines(*args, env=None):
    """Run benchmarks/kda_ptxas.py with ``args`` (and extra environment) and return its per-kernel lines;
    skips where the Triton wheel ships no ptxas."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton wheel ships no ptxas ({ptxas})")
    # TRITON_INTERPRET=0: real JIT functions, not the interpreter's
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kda_ptxas.py"), *args],
                         env=dict(os.environ, TRITON_INTERPRET="0", **(env or {})), cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return [ln for ln in out.stdout.splitlines() if "warp(s):" in ln], out.stdout


def test_kernels_compile_for_hopper():
    lines, out = _ptxas_lines()
    # 17 chunk kernels (the gate pre-pass, the state rebuild and the 32-row inference launches too) and the
    # decode kernel
    assert len(lines) == 18, out
    for line in lines:
        m = re.search(r"warp\(s\):\s+(\d+) regs", line)
        assert m, line  # "failed: ..." otherwise
        assert 0 < int(m.group(1)) <= 255, line
        # ptxas serialises warp-group MMAs it cannot prove idle where their registers are touched; the
        # gradient kernel's dAqk under ``if i_k == 0`` did so until session 19
        assert "C7517" not in line, line


@pytest.mark.parametrize("env,only,n", [
    ({"KIMI_LINEAR_KDA_BWD_HANDOFF": "all"}, ["rebuild", "sweep", "gradients", "pass"], 5),
    ({"KIMI_LINEAR_KDA_BT": "32"}, ["bwd pairs"], 1),  # training at 32-row chunks: the backward's pair kernel
    ({"KIMI_LINEAR_KDA_STREAM": "1"}, ["streamed"], 2),  # w/u and recurrence side by side, with their flags
    ({"KIMI_LINEAR_KDA_PTXAS_VARLEN": "1"}, ["varlen-ordered"], 2),  # varlen programs longest first
    ({"KIMI_LINEAR_KDA_RECUR": "wgmma"}, ["wgmma"], 4),  # the recurrence in Gluon (inference, interior states,
    # training, rebuild)
    ({"KIMI_LINEAR_KDA_SWEEP": "wgmma"}, ["wgmma"], 3),  # the reverse sweep in Gluon (float32 and 16-bit
    # hand-offs, varlen order)
], ids=["handoff16", "bwd_pairs32", "streamed", "varlen_ordered", "recur_wgmma", "sweep_wgmma"])
def test_opt_in_kernels_compile_for_hopper(env, only, n):
    """The opt-in launches (not run by default, so not covered above) compile for sm_90a too."""
    lines, out = _ptxas_lines("--only", *only, env=env)
    assert len(lines) == n, out
    assert all(re.search(r"warp\(s\):\s+\d+ regs", ln) for ln in lines), out


def test_kernels_fit_at_widest_heads():
    """At the issue's widest heads (K = V = 256) every launch compiles with the launchers' settings and
    its shared memory fits one block on an H100 / H200 (227 KB), else the launch would fail on the card."""
    lines, out = _ptxas_lines("--kv", "256")
    assert len(lines) == 18, out
    for line in lines:
        m = re.search(r"shared (\d+) B", line)
        assert m, line  # "failed: ..." otherwise
        assert int(m.group(1)) <= 227 * 1024, line


def test_loop_mix_parses_the_largest_loop():
    """``--loops``' parser: the largest backward branch's span, its instructions (predicated ones too) and the
    counted kinds; a SASS without a loop says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kda_ptxas import loop_mix

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/              @!P0 LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64] ;
        /*0040*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   BRA 0x60 ;
        /*0070*/                   EXIT ;
    """
    assert loop_mix(sass) == "loop 5 instructions: HMMA 1, HGMMA 1, BAR 1, LDGSTS 1"
    assert loop_mix("        /*0000*/                   EXIT ;") == "no loop"


def test_recurrence_loop_report():
    """``--loops`` on the inference recurrence: its chunk loop runs tensor-core products and barriers."""
    lines, out = _ptxas_lines("--only", "inference recurrence", "--loops")
    assert len(lines) == 1, out
    m = re.search(r"loop (\d+) instructions: (.*)$", lines[0])
    assert m and int(m.group(1)) > 0, lines[0]
    assert re.search(r"H(G)?MMA \d+", m.group(2)) and re.search(r"BAR \d+", m.group(2)), lines[0]


@pytest.mark.parametrize("bt", ["16", "32", "64"])
def test_wgmma_recurrence_keeps_its_chain_in_registers(bt):
    """The Gluon recurrence (``KIMI_LINEAR_KDA_RECUR=wgmma``) compiles for sm_90a at every kernel chunk length,
    and its chunk loop is what it was written for: warp-group MMAs with their left operands in registers
    (no mma.sync; shared-memory matrix stores only for the output tile's change to a store layout, one per
    16 rows: the chain's operands never go through shared memory), the loads arriving by cp.async, at most
    four barriers per step, one proxy fence (MEMBAR) per step in the inference forward (the copy wait's: copies
    issued between products made Triton fence the state's product too, on the chain; session 20), and no
    wait that ptxas injects (C7517: touching a register an in-flight product
    defines made it wait for S^T qg^T too, serialising it with the chain; session 19). Below 64-row chunks
    nothing spills. The training forward's variant (float32 Aqk, rounded in shared memory for its product,
    64-row chunks; one barrier more for that copy), the forward with interior states and the backward's
    state rebuild (chunk states and v_new stored, no output) compile too."""
    lines, out = _ptxas_lines("--only", "wgmma", "--loops", env={"KIMI_LINEAR_KDA_RECUR": "wgmma",
                                                                  "KIMI_LINEAR_KDA_BT": bt})
    assert len(lines) == 4 and "interior" in lines[1] and "training" in lines[2] and "rebuild" in lines[3], out
    for line in lines[1:]:
        loop = dict((op, int(n)) for op, n in re.findall(r"([A-Z]+) (\d+)", line.split("loop", 1)[1]))
        assert loop.get("HGMMA", 0) >= 10 and "HMMA" not in loop and loop.get("BAR", 0) <= 5, out
        assert "C7517" not in line, out
    loop = dict((op, int(n)) for op, n in re.findall(r"([A-Z]+) (\d+)", lines[0].split("loop", 1)[1]))
    assert loop.get("HGMMA", 0) >= 10 and loop.get("LDGSTS", 0) > 0 and "HMMA" not in loop, out
    assert loop.get("STSM", 0) <= int(bt) // 16, out
    assert loop.get("BAR", 0) <= 4 and loop.get("MEMBAR", 0) == 1 and "C7517" not in out, out
    if bt != "64":
        assert "spill stores/loads 0/0 B" in lines[0], out


def test_wgmma_sweep_keeps_its_chain_in_registers():
    """The Gluon reverse sweep (``KIMI_LINEAR_KDA_SWEEP=wgmma``, 64-row chunks as training runs): warp-group
    MMAs only, their register operands never through shared memory, cp.async loads, at most four barriers and
    two proxy fences per step (the copy wait's and the float32 Aqk's rounding: none between dv's wait and the
    product on it), no wait that ptxas injects (C7517: the decay's multiply while dv's products ran made
    ptxas wait for them), and nothing spilled inside the loop (the spills ptxas reports are before and after
    it)."""
    lines, out = _ptxas_lines("--only", "wgmma", "--loops", env={"KIMI_LINEAR_KDA_SWEEP": "wgmma"})
    assert len(lines) == 3, out
    for line in lines:
        loop = dict((op, int(n)) for op, n in re.findall(r"([A-Z]+) (\d+)", line.split("loop", 1)[1]))
        assert loop.get("HGMMA", 0) >= 16 and "HMMA" not in loop and loop.get("LDGSTS", 0) > 0, line
        assert loop.get("BAR", 0) <= 4 and loop.get("MEMBAR", 0) <= 2 and "C7517" not in line, line
        assert "STL" not in loop and "LDL" not in loop, line
