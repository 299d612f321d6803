"""Registers, spills and shared memory of our KDA Triton kernels for Hopper, without a GPU.

Every chunk-local kernel we profiled on the H200 is latency-bound at 255 registers with spills and one
or two blocks per SM (docs/benchmarks.md, session 5's ncu profile), so register pressure is the first
thing to check after a kernel change. This script compiles each kernel of the chunked forward and
backward ahead of time for sm_90a with the installed Triton (its bundled ptxas and cuobjdump; no driver, no
GPU) at the benchmark configuration (K = V = 128, 64-row chunks, bf16 inputs, softplus gate, L2 norm and beta
sigmoid in-kernel, the launchers' default blocks and warps) and prints what ``ptxas -v`` reports and
the static SASS instruction count.

    python benchmarks/kda_ptxas.py [--only diag tree] [--set KIMI_LINEAR_KDA_DIAG_BK=32 ...] [--loops]

The Triton version here may differ from the GPU machine's (the CPU pins triton 3.7.1, the H200 image
has 3.6.0): use it to compare variants, and confirm on the card.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K = V = 128
BT = 64
INTS = {"H", "HV", "K", "V"}
# The decode kernel's sequence length (elsewhere ``T`` is the inverse's pointer), and its state strides
# (a contiguous [P, HV, K, V] pool) as the launcher specialises them: the unit V stride as the constant 1
# (that is what lets the slice loads vectorize), the others divisible by 16.
PLAIN_INTS = {"_recurrent_kda_kernel": {"T"}}
STRIDES = {"s_h0_n", "s_h0_h", "s_h0_k", "s_ht_n", "s_ht_h", "s_ht_k", "s_as_k"}
UNIT_STRIDES = {"s_h0_v": 1, "s_ht_v": 1, "s_as_v": 1}
FLOATS = {"scale", "lower_bound", "span_max"}
BF16_PTRS = {"q", "k", "v", "g", "beta", "o", "do"}
# The forward's chunk intermediates are stored in the input's 16-bit type (Aqk too, except when the
# backward keeps it).
BF16_FWD = {"w", "u", "qg", "kg", "aqk", "aqk_out", "w_out", "u_out", "qg_out", "kg_out"}
INT_PTRS = {"chunk_info", "seq_chunks", "cu_seqlens", "indices", "ready"}
INT8_PTRS = {"wide"}


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def kernels():
    """(name, jit function, constexprs, num_warps[, num_stages[, pointer types]]) per launch, mirroring
    the launchers' defaults (one pipeline stage where none is given)."""
    from kimi_linear.ops.kda import triton_backend
    from kimi_linear.ops.kda.triton import chunk_bwd, chunk_fwd, prep_bwd, recurrent, utils
    from kimi_linear.ops.kda.triton.utils import env_choice, gate_once, norm_once

    gate = dict(GATE=1, HAS_A=True, HAS_BIAS=True, L2NORM=True, BETA_SIGMOID=True, NEG_EIGVAL=False)
    # The chunk-local launches before the backward's pass 2 read the gate activated once, in float32
    # (``gate_once``); the forward's read the L2-norm factors computed once (``norm_once``).
    pre_gate = dict(gate, GATE=0, HAS_A=False, HAS_BIAS=False) if gate_once(1) else gate
    g32 = {"g": "*fp32"} if gate_once(1) else {}
    fwd_gate = dict(pre_gate, L2NORM=2 if norm_once() else True)
    prep_bk = _env_int("KIMI_LINEAR_KDA_PREP_BK", 32)
    prep_warps = chunk_fwd.prep_warps(BT)
    prep_bv = _env_int("KIMI_LINEAR_KDA_PREP_BV", 64)
    yield ("fwd diag fast", chunk_fwd._chunk_diag_fast_kernel,
           dict(SK=K, BT=BT, BK=_env_int("KIMI_LINEAR_KDA_DIAG_FAST_BK", 32), PREC="tf32", INV_PREC="tf32",
                **fwd_gate), _env_int("KIMI_LINEAR_KDA_DIAG_FAST_WARPS", 1), 1, g32)
    yield ("fwd diag", chunk_fwd._chunk_diag_kernel,
           dict(SK=K, BT=BT, BK=_env_int("KIMI_LINEAR_KDA_DIAG_BK", 64), INV_PREC="tf32", **fwd_gate),
           _env_int("KIMI_LINEAR_KDA_DIAG_WARPS", 1), 1, g32)
    if os.environ.get("KIMI_LINEAR_KDA_TREE", "subchunk") == "subchunk":  # the tree levels on sub-chunk tiles
        yield ("fwd tree on sub-chunks", chunk_fwd._chunk_tree_subchunk_kernel,
               dict(BK=_env_int("KIMI_LINEAR_KDA_TREE_BK", 32), PREC="tf32", INV_PREC="tf32", **fwd_gate),
               _env_int("KIMI_LINEAR_KDA_TREE_WARPS", 2), _env_int("KIMI_LINEAR_KDA_TREE_STAGES", 2), g32)
    else:  # KIMI_LINEAR_KDA_TREE=masked (what 32- and 128-row chunks run)
        yield ("fwd tree (masked)", chunk_fwd._chunk_tree_kernel,
               dict(SK=K, BT=BT, BK=prep_bk, LEVELS=BT.bit_length() - 1, PREC="tf32", INV_PREC="tf32",
                    ABLATE=_env_int("KIMI_LINEAR_KDA_TREE_ABLATE", 0), **fwd_gate), prep_warps, 1, g32)
    # The forward's gate pre-pass with the sums within chunks (``gate_cumsum_mode() == "prepass"``), which
    # the w/u launch then reads (already activated: GATE 0, float32 g) instead of summing the gate itself.
    cumg = utils.gate_cumsum_mode() == "prepass"
    yield ("gate + chunk sums", utils._gate_chunk_kernel,
           dict(BT=BT, BK=_env_int("KIMI_LINEAR_KDA_GATE_BK", 64), STORE_ACT=True, **{
               k: gate[k] for k in ("GATE", "HAS_A", "HAS_BIAS")}), 4, 1, {"act_out": "*fp32", "cum_out": "*fp32"})
    wy_gate = dict(fwd_gate, GATE=0, HAS_A=False, HAS_BIAS=False) if cumg else fwd_gate
    wy_g = {"g": "*fp32"} if cumg else g32
    yield ("fwd w/u", chunk_fwd._chunk_wy_kernel,
           dict(SK=K, SV=V, BT=BT, BK=prep_bk, BV=prep_bv, WY_PREC="tf32", CUMG=cumg, **wy_gate),
           prep_warps, 1, wy_g)
    recur = dict(SK=K, SV=V, BT=BT, BK=K, BV=chunk_fwd.recur_bv(V, 32, K), HAS_H0=True)  # (B=1, H=32)
    recur_warps, recur_stages = chunk_fwd.recur_launch(torch.bfloat16, K, recur["BV"])  # (as chunk_recur's)
    yield ("fwd recurrence", chunk_fwd._chunk_recur_kernel,
           dict(recur, STORE_HT=True, STORE_STATES=False, DOT_DTYPE=tl.bfloat16, STORE_O=True), recur_warps,
           recur_stages)
    # A forward without gradients runs 32-row chunks (triton_backend.INFERENCE_BT): the tree's one level
    # in the pair kernel, 2x the recurrence's steps. (Its sub-chunk launches are the ones above.)
    ibt = triton_backend.kernel_chunk(training=False)
    if ibt == 32:
        yield (f"inference pairs ({ibt}-row chunks)", chunk_fwd._chunk_pair_subchunk_kernel,
               dict(BK=_env_int("KIMI_LINEAR_KDA_TREE_BK", 32), PREC="tf32", INV_PREC="tf32", **fwd_gate),
               _env_int("KIMI_LINEAR_KDA_TREE_WARPS", 1), _env_int("KIMI_LINEAR_KDA_TREE_STAGES", 2), g32)
    yield (f"inference w/u ({ibt}-row chunks)", chunk_fwd._chunk_wy_kernel,
           dict(SK=K, SV=V, BT=ibt, BK=prep_bk, BV=prep_bv, WY_PREC="tf32", CUMG=cumg, **wy_gate),
           chunk_fwd.prep_warps(ibt), 1, wy_g)
    yield (f"inference recurrence ({ibt}-row chunks)", chunk_fwd._chunk_recur_kernel,
           dict(recur, BT=ibt, STORE_HT=True, STORE_STATES=False, DOT_DTYPE=tl.bfloat16, STORE_O=True), recur_warps,
           recur_stages)
    if chunk_fwd.recur_impl() == "wgmma":  # opt-in: the forward recurrence on warp-group MMA (Gluon)
        from triton.experimental.gluon import language as gl

        from kimi_linear.ops.kda.triton import recur_wgmma

        def wgmma(name, bt, ptr_types, nbytes=None, **flags):
            """One build of the Gluon kernel, with the stages its launcher would take (``stage_count``)."""
            stages = recur_wgmma.stage_count(K, bt, **(nbytes or {}))
            return (f"{name}, wgmma ({bt}-row chunks)", recur_wgmma.recur_wgmma_kernel,
                    dict(dict(SK=K, SV=V, BT=bt, DT=gl.bfloat16, HAS_H0=True, STORE_HT=True, ORDERED=False,
                              STAGES=stages), **flags),
                    recur_wgmma.WARPS.value, 1, {**{n: "*bf16" for n in ("w", "u", "qg", "kg", "aqk", "o")},
                                                 **ptr_types})

        yield wgmma("inference recurrence", ibt, {})
        # with interior states (prefix caching): the state entering every chunk stored too
        yield wgmma("interior states", ibt, {"states": "*fp32"}, dict(states_bytes=4), STORE_STATES=True)
        # a training forward's: float32 Aqk at the training chunk length
        yield wgmma("training recurrence", BT, {"aqk": "*fp32"}, dict(aqk_bytes=4))
        # the backward's state rebuild: no output; the chunk states and v_new (float32 hand-offs), float32 u
        yield wgmma("rebuild", BT, {"u": "*fp32", "states": "*fp32", "v_new_out": "*fp32"},
                    dict(u_bytes=4, store_o=False, vnew_bytes=4, states_bytes=4), STORE_HT=False, STORE_O=False,
                    STORE_STATES=True, STORE_VNEW=True)
    if os.environ.get("KIMI_LINEAR_KDA_STREAM", "0") == "1":  # opt-in: w/u and recurrence side by side
        group = _env_int("KIMI_LINEAR_KDA_STREAM_GROUP", 8)
        yield (f"streamed w/u ({ibt}-row chunks)", chunk_fwd._chunk_wy_kernel,
               dict(SK=K, SV=V, BT=ibt, BK=prep_bk, BV=prep_bv, WY_PREC="tf32", CUMG=cumg, STREAM_GROUP=group,
                    **wy_gate), chunk_fwd.prep_warps(ibt), 1, {**wy_g, "ready": "*i32"})
        yield (f"streamed recurrence ({ibt}-row chunks)", chunk_fwd._chunk_recur_kernel,
               dict(recur, BT=ibt, STORE_HT=True, STORE_STATES=False, DOT_DTYPE=tl.bfloat16, STORE_O=True,
                    STREAM_GROUP=group, SPIN_LIMIT=2 ** 30), recur_warps, recur_stages, {"ready": "*i32"})
    if os.environ.get("KIMI_LINEAR_KDA_PTXAS_VARLEN", "0") == "1":  # varlen batches' programs longest first
        yield (f"varlen-ordered recurrence ({ibt}-row chunks)", chunk_fwd._chunk_recur_kernel,
               dict(recur, BT=ibt, STORE_HT=True, STORE_STATES=False, DOT_DTYPE=tl.bfloat16, STORE_O=True,
                    ORDERED=True), recur_warps, recur_stages)
        yield ("varlen-ordered reverse sweep", chunk_bwd._chunk_recur_bwd_kernel,
               dict(SK=K, BT=BT, BK=K, BV=_env_int("KIMI_LINEAR_KDA_SWEEP_BV", 32), HAS_DHT=True,
                    DOT16=chunk_bwd.sweep_dot16(torch.bfloat16), ORDERED=True),
               _env_int("KIMI_LINEAR_KDA_SWEEP_WARPS", 8), _env_int("KIMI_LINEAR_KDA_SWEEP_STAGES", 2),
               {name: "*bf16" for name in ("w", "qg", "kg")})
    # The backward's rebuild of the chunk states, no output, in the storage types the backward picks for
    # bf16 inputs (by default w, qg, kg in bf16 and u in float32; all float32: tf32 products, one stage).
    w_dtype, u_dtype = chunk_bwd.recompute_dtypes(torch.zeros(1, dtype=torch.bfloat16))
    rebuild_16 = w_dtype != torch.float32
    # The backward's hand-offs between launches (states, dS, v_new, du, dqg / dkg / dw) in their storage types.
    handoff = chunk_bwd.handoff_dtypes(torch.zeros(1, dtype=torch.bfloat16))
    ho = {name: "*bf16" if dt == torch.bfloat16 else "*fp32" for name, dt in handoff.items()}
    rebuild_ptrs = {"states": ho["states"], "v_new_out": ho["vnew"]}
    if rebuild_16 and u_dtype == torch.float32:
        rebuild_ptrs["u"] = "*fp32"
    yield ("bwd state rebuild", chunk_fwd._chunk_recur_kernel,
           dict(recur, STORE_HT=False, STORE_STATES=True, DOT_DTYPE=tl.bfloat16 if rebuild_16 else tl.float32,
                STORE_O=False, STORE_VNEW=True), recur_warps, recur_stages if rebuild_16 else 1, rebuild_ptrs)
    # The sweep reads the rebuilt w, qg, kg in their storage type (the float32 Aqk kept by the forward).
    yield ("bwd reverse sweep", chunk_bwd._chunk_recur_bwd_kernel,
           dict(SK=K, BT=BT, BK=K, BV=_env_int("KIMI_LINEAR_KDA_SWEEP_BV", 32), HAS_DHT=True,
                DOT16=chunk_bwd.sweep_dot16(w_dtype)),
           _env_int("KIMI_LINEAR_KDA_SWEEP_WARPS", 8), _env_int("KIMI_LINEAR_KDA_SWEEP_STAGES", 2),
           dict({name: "*bf16" for name in ("w", "qg", "kg")} if rebuild_16 else {}, du=ho["du"], ds_out=ho["ds"]))
    if chunk_bwd.sweep_impl() == "wgmma":  # opt-in: the reverse sweep on warp-group MMA (Gluon)
        from triton.experimental.gluon import language as glu

        from kimi_linear.ops.kda.triton import sweep_wgmma

        def sweep(name, du, ds, **flags):
            """One build of the Gluon sweep (float32 Aqk, as a training forward keeps it), with the stages its
            launcher would take."""
            stages = sweep_wgmma.stage_count(K, BT, aqk_bytes=4, du_bytes=4 if du == "*fp32" else 2,
                                             ds_bytes=4 if ds == "*fp32" else 2)
            return (f"{name}, wgmma ({BT}-row chunks)", sweep_wgmma.sweep_wgmma_kernel,
                    dict(dict(SK=K, BT=BT, DT=glu.bfloat16, HAS_DHT=True, ORDERED=False, STAGES=stages), **flags),
                    sweep_wgmma.WARPS.value, 1, {**{n: "*bf16" for n in ("w", "qg", "kg", "do")}, "aqk": "*fp32",
                                                 "du": du, "ds_out": ds})

        yield sweep("bwd reverse sweep", ho["du"], ho["ds"])
        yield sweep("bwd reverse sweep, 16-bit hand-offs", "*bf16", "*bf16")
        yield sweep("bwd reverse sweep, varlen-ordered", ho["du"], ho["ds"], ORDERED=True)
    g_bk, g_bv, g_warps, g_stages = chunk_bwd.grads_launch(K, K)
    b16 = {name: ho[name] == "*bf16" for name in ho}
    yield ("bwd gradients", chunk_bwd._chunk_bwd_grads_kernel,
           dict(SK=K, BT=BT, BK=g_bk, BV=g_bv, Q16=int(b16["states"]), K16=int(b16["vnew"] and b16["ds"]),
                W16=int(b16["du"] and b16["states"]), A16=int(b16["vnew"])), g_warps, g_stages,
           dict(states=ho["states"], ds=ho["ds"], dv=ho["du"], v_new=ho["vnew"], do="*bf16",
                **{name: ho["grads"] for name in ("dqg", "dkg", "dw")}))
    bwd_bk = _env_int("KIMI_LINEAR_KDA_PREP_BWD_BK", 16)
    bwd_stages = _env_int("KIMI_LINEAR_KDA_PREP_BWD_STAGES", 2)
    yield ("bwd prep pass 1 (w/u)", prep_bwd._prep_bwd_wy_kernel,
           dict(BT=BT, BK=bwd_bk, BV=_env_int("KIMI_LINEAR_KDA_PREP_BWD_BV", 32), **pre_gate), 4, bwd_stages,
           dict(g32, dw=ho["grads"], du=ho["du"]))
    no_norm = {k: v for k, v in pre_gate.items() if k != "L2NORM"}
    if triton_backend.kernel_chunk(training=True) == 32:  # (KIMI_LINEAR_KDA_BT=32: the backward's one level)
        yield ("bwd pairs (32-row chunks)", prep_bwd._prep_bwd_pair_kernel,
               dict(BK=_env_int("KIMI_LINEAR_KDA_PREP_BWD_TREE_BK", 32), PAIR_PREC="tf32", **no_norm),
               _env_int("KIMI_LINEAR_KDA_PREP_BWD_TREE_WARPS", 2), 1, g32)
    tree = os.environ.get("KIMI_LINEAR_KDA_PREP_BWD_TREE", "kernel") == "kernel"  # the tree levels on their own
    tree_bk = _env_int("KIMI_LINEAR_KDA_PREP_BWD_TREE_BK", 32)
    yield ("bwd diag fast", prep_bwd._prep_bwd_diag_fast_kernel,
           dict(BT=BT, BK=_env_int("KIMI_LINEAR_KDA_BWD_DIAG_FAST_BK", 32), **no_norm),
           _env_int("KIMI_LINEAR_KDA_BWD_DIAG_FAST_WARPS", 1), 1, g32)
    yield ("bwd diag", prep_bwd._prep_bwd_diag_kernel,
           dict(BT=BT, BK=_env_int("KIMI_LINEAR_KDA_BWD_DIAG_BK", 32), **no_norm),
           _env_int("KIMI_LINEAR_KDA_BWD_DIAG_WARPS", 1), 1, g32)
    tree_nk = 0
    if tree:
        tree_nk = K // tree_bk
        yield ("bwd tree levels", prep_bwd._prep_bwd_tree_kernel, dict(BK=tree_bk, PAIR_PREC="tf32", **no_norm),
               _env_int("KIMI_LINEAR_KDA_PREP_BWD_TREE_WARPS", 2), 1, g32)
    yield ("bwd prep pass 2 (pairs)", prep_bwd._chunk_prep_bwd_kernel,
           dict(BT=BT, BK=bwd_bk, PAIR_PREC="tf32", ABLATE=_env_int("KIMI_LINEAR_KDA_PREP_BWD_ABLATE", 0),
                TREE_KERNEL_NK=tree_nk, FINAL_OUT=int(env_choice("KIMI_LINEAR_KDA_PREP_BWD_FINAL", "1", ("1", "0")) == "1"),
                **gate),
           _env_int("KIMI_LINEAR_KDA_PREP_BWD_WARPS", 8), bwd_stages,
           dict(dqg=ho["grads"], dkg=ho["grads"], dq_out="*bf16", dk_out="*bf16"))
    # Decode into a state pool in place, as launched at batch >= 8 (V slices of 64, 2 warps).
    yield ("decode", recurrent._recurrent_kda_kernel,
           dict(UNIT_STRIDES, BK=K, BV=_env_int("KIMI_LINEAR_KDA_DECODE_BV", 64), **gate, VARLEN=False, HAS_H0=True,
                HAS_INDICES=True, STORE_HT=True, STORE_ALL=False, HT_IN_POOL=True),
           _env_int("KIMI_LINEAR_KDA_DECODE_WARPS", 2))


def signature(fn, consts, ptr_types=None):
    """Triton types of ``fn``'s arguments; ``ptr_types``: pointer types that differ from their kind's
    (the rebuild's float32 u and 16-bit w, the float32 activated gate)."""
    sig = {}
    for name in fn.arg_names:
        if ptr_types and name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in consts:
            sig[name] = "constexpr"
        elif name in INTS or name in PLAIN_INTS.get(fn.__name__, ()) or name in STRIDES:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INT_PTRS:
            sig[name] = "*i32"
        elif name in INT8_PTRS:
            sig[name] = "*i8"
        else:
            sig[name] = "*bf16" if name in BF16_PTRS or (name in BF16_FWD and consts.get("DOT_DTYPE", tl.float32) != tl.float32 or
                                                         name in BF16_FWD and "WY_PREC" in consts) else "*fp32"
    return sig


def loop_mix(sass: str) -> str:
    """The largest loop of the SASS (the span of its longest backward branch): instructions per pass (per
    warp) and the ones that set a step's latency: tensor-core ops, barriers, shared-memory and async copies.
    Session 16: the recurrence's chunk loop, against its measured time per step."""
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    best = None
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < int(addr, 16):
            span = (int(target.group(1), 16), int(addr, 16))
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return "no loop"
    ops = [op.split(".")[0] for addr, op, _ in ins if best[0] <= int(addr, 16) <= best[1]]
    # (MEMBAR: each proxy fence before a product that reads shared memory costs one, a CTA memory barrier;
    # STL / LDL: spills inside the loop)
    count = {key: sum(op == key for op in ops) for key in ("HMMA", "HGMMA", "BAR", "MEMBAR", "LDSM", "STSM", "LDS",
                                                             "STS", "LDGSTS", "LDG", "STL", "LDL")}
    return f"loop {len(ops)} instructions: " + ", ".join(f"{key} {n}" for key, n in count.items() if n)


def ptxas_report(fn, consts, warps, stages: int = 1, ptr_types=None, arch: str = "sm_90a", loops: bool = False) -> str:
    """Compile for Hopper and return ptxas -v's resource lines for the kernel (and with ``loops`` the
    instruction mix of its largest loop)."""
    # Arguments the launchers leave at their defaults: constexpr ones with their value, optional pointers
    # (default None) as None, as a launch passes them.
    consts = {**{p.name: p.default for p in fn.params if p.has_default and (p.is_constexpr or p.default is None)
                 and p.name not in (ptr_types or {})}, **consts}
    sig = signature(fn, consts, ptr_types)
    # As the launcher specialises them on the card: pointers and the head / width arguments divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in INTS or name in STRIDES}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # (a Gluon kernel: its own front end, same back end)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                 attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "--dump-sass",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stdout
    # Static SASS instruction count: the K-block loops are rolled, the column / level loops unrolled, so
    # it is a rough proxy for the issued instructions of these issue-bound kernels.
    n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.M))
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    smem = compiled.metadata.shared
    return (f"{regs.group(1) if regs else '?':>4} regs, spill stores/loads {spill.group(1) if spill else '?'}"
            f"/{spill.group(2) if spill else '?'} B, stack {stack.group(1) if stack else '?'} B, "
            f"shared {smem} B, {n_sass} SASS instructions" + (f"; {loop_mix(sass)}" if loops else "")
            # (ptxas waits for every warp-group MMA in flight where registers they define are touched:
            # the overlap the kernel was written for is then lost; session 19)
            + ("; wgmma serialised by ptxas (C7517)" if "C7517" in text else ""))


def main():
    global K, V
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="kernels whose name contains one of these words")
    ap.add_argument("--set", nargs="+", default=[], metavar="ENV=VALUE",
                    help="launcher environment overrides (block sizes, warps, ablation bits)")
    ap.add_argument("--kv", type=int, default=K, help="head width K = V (a power of two, as the launchers pad)")
    ap.add_argument("--loops", action="store_true",
                    help="also the instruction mix of each kernel's largest loop (SASS per warp and pass)")
    args = ap.parse_args()
    K = V = args.kv
    for item in args.set:
        key, _, val = item.partition("=")
        os.environ[key] = val
    print(f"triton {triton.__version__}, target sm_90a; K = V = {K}, BT = {BT}, bf16, softplus gate")
    for name, fn, consts, warps, *rest in kernels():
        if args.only and not any(w in name for w in args.only):
            continue
        try:
            report = ptxas_report(fn, consts, warps, *rest, loops=args.loops)
        except Exception as e:  # noqa: BLE001  (report and go on)
            report = f"failed: {str(e).splitlines()[0][:200] if str(e) else repr(e)}"
        print(f"{name:27s} {warps} warp(s): {report}", flush=True)


if __name__ == "__main__":
    main()
