"""The backward's reverse sweep on Hopper's warp-group MMA, in Gluon (opt-in, ``KIMI_LINEAR_KDA_SWEEP=wgmma``).

Same math as ``chunk_bwd._chunk_recur_bwd_kernel``, on the transposed state gradient, as ``recur_wgmma`` runs
the forward: one program per (V slice of 64, sequence, head) holds dS^T [64, K] in float32 registers, in
wgmma's accumulator layout, and per chunk, from the last to the first,

    dv^T  = do^T Aqk + dS^T kg^T                       (stored: du)
    dS^T <- dS^T Diag(e^gC) + do^T qg - dv^T w         (the gradient entering the chunk; stored before)

Only the two products through dS are on the chain (dS^T kg^T, then dv^T w); do^T Aqk and do^T qg are issued
with them and run beside. do^T is read from shared memory by the products (the A operand transposed, as wgmma
takes 16-bit tiles); dS^T and dv^T are register operands, rounded to bf16 (Triton's wgmma takes no tf32
operand from registers; bf16 inputs only, since a state gradient can pass float16's range). The Triton sweep's
default rounds only Aqk, qg and do for their products and keeps dS and dv products in tf32; rounding those too
is its ``SWEEP_DOT=16bit`` opt-in (session 10: dbeta's worst suite error 7.8e-3 against 6.0e-3, within the
1e-2 bound). So this kernel carries that opt-in's rounding, and the GPU suite holds it to the same bounds.

The tiles of the chunk STAGES - 1 ahead (w, qg, kg, Aqk, e^gC, and do's rows of this V slice, zero past the
chunk's rows) are copied into shared memory while the current chunk's products run, as in ``recur_wgmma``.

Untimed, and never run on a card yet: the CPU tests compile it for sm_90a (``tests/test_kda_ptxas.py``), the
GPU suite checks it against float64 and the Triton sweep.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .recur_wgmma import (
    BV, SHARED_LIMIT, WARPS, chunk_tiles, copy_chunk_tiles, cta_barrier, flush_rows, load_state, round_aqk,
    row_tile, sequence_program, state_offsets, store_rows, tile_layout, tile_offsets,
)
from .utils import dummy, env_choice


@gluon.jit
def _issue_copies(w, qg, kg, aqk, decay, do, chunk_info, c, i_hv, HV, V, stage, w_s, q_s, k_s, a_s, d_s, do_s, i_v,
                  SK: gl.constexpr, BT: gl.constexpr):
    """Start the asynchronous copies of chunk c's tiles into stage ``stage``: those of
    ``recur_wgmma.copy_chunk_tiles`` (w, qg, kg, Aqk, e^gC), and do's rows of the chunk in this V slice
    [BT, BV], zero-filled past the chunk's rows (the next sequence's, or the end of the tensor)."""
    copy_chunk_tiles(w, qg, kg, aqk, decay, (c * HV + i_hv).to(gl.int64), stage, w_s, q_s, k_s, a_s, d_s, SK, BT)
    row0 = gl.load(chunk_info + 2 * c).to(gl.int64)
    n_rows = gl.load(chunk_info + 2 * c + 1)
    layout: gl.constexpr = tile_layout(BT, BV)
    t = gl.arange(0, BT, layout=gl.SliceLayout(1, layout))
    v = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, layout))
    async_copy.async_copy_global_to_shared(
        do_s.index(stage), do + (row0 * HV + i_hv) * V + tile_offsets(BT, BV, HV * V, i_v * BV),
        mask=(t < n_rows)[:, None] & (v < V)[None, :])
    async_copy.commit_group()


@gluon.jit
def sweep_wgmma_kernel(
    w, kg, aqk, decay, qg, chunk_info, seq_chunks, dht, do, du, ds_out, dh0,
    HV, K, V,
    SK: gl.constexpr, BT: gl.constexpr, DT: gl.constexpr, HAS_DHT: gl.constexpr, ORDERED: gl.constexpr,
    STAGES: gl.constexpr = 2,
):
    """Grid (V slices of 64, sequences * HV), one warp group per program. Inputs as for
    ``chunk_bwd._chunk_recur_bwd_kernel``: w, qg [chunks, HV, BT, SK] and kg [chunks, HV, SK, BT] in DT, Aqk
    [chunks, HV, BT, BT] in DT or float32, e^gC [chunks, HV, SK], do [rows, HV, V] in DT. Stores du
    [chunks, HV, BT, V] and dS entering each step [chunks * HV, K, V] in their buffers' types, and dh0."""
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV, ORDERED)

    acc_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, SK, 16])
    acc_t: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BT, 16])
    op_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_s, k_width=2)  # A of [BV, BT] x [BT, SK]
    op_t: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_t, k_width=2)  # A of [BV, SK] x [SK, BT]
    A32: gl.constexpr = aqk.dtype.element_ty == gl.float32  # (a training forward's: rounded, ``round_aqk``)
    w_s, q_s, k_s, a_s, a16_s, d_s = chunk_tiles(DT, aqk.dtype.element_ty, STAGES, BT, SK)
    do_s = gl.allocate_shared_memory(DT, [STAGES, BT, BV], gl.NVMMASharedLayout.get_default_for([BT, BV], DT))
    du_sm = row_tile(du.dtype.element_ty, BT)
    # dS goes out through a shared tile too, [SK, BV]: written at the end of a step (nothing in flight then),
    # stored to memory by the next one while its products run, 16 B per thread along V (the accumulator's
    # own layout would store it 4 B at a time, with an address each)
    ST: gl.constexpr = ds_out.dtype.element_ty
    ds_sm = row_tile(ST, SK)

    dSt = load_state(dht, HAS_DHT, i_nh, i_v, K, V, SK, acc_s)
    ds_sm.permute((1, 0)).store(dSt.to(ST))  # (the first step's, visible after its top barrier)
    # (the last STAGES - 1 chunks' copies, newest first; before the start the first chunk's again, and an
    # empty sequence copies a valid chunk it does not use)
    for s in gl.static_range(STAGES - 1):
        cn = gl.maximum(gl.minimum(gl.maximum(c1 - 1 - s, c0), c1 - 1), 0)
        _issue_copies(w, qg, kg, aqk, decay, do, chunk_info, cn, i_hv, HV, V, s, w_s, q_s, k_s, a_s, d_s, do_s, i_v,
                      SK, BT)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        stage = i % STAGES
        async_copy.wait_group(STAGES - 2)  # this chunk's copies (the oldest group), every thread's after the
        # barrier, which also frees the stage the previous step read and du_sm, and publishes ds_sm
        cta_barrier()
        fence_async_shared()
        base = (c * HV + i_hv).to(gl.int64)
        if A32:
            round_aqk(a_s.index(stage), a16_s, DT, BT)
        do_t = do_s.index(stage).permute((1, 0))  # do^T [BV, BT], read by the products from shared memory
        s_a = gl.convert_layout(dSt.to(DT), op_t)
        # The decay applied before any product is issued: ptxas waits for every product in flight where
        # registers a product defined are touched (C7517), and dS^T's are, by the last step's products.
        d_t = d_s.index(stage).load(gl.SliceLayout(0, acc_s))
        dSt = dSt * d_t[None, :]
        zero = gl.zeros([BV, BT], gl.float32, layout=acc_t)
        dv_t = warpgroup_mma(do_t, a16_s if A32 else a_s.index(stage), zero, use_acc=False, is_async=True)
        dv_t = warpgroup_mma(s_a, k_s.index(stage), dv_t, is_async=True)
        dSt = warpgroup_mma(do_t, q_s.index(stage), dSt, is_async=True)
        # dS after the chunk (this step's input) from its shared tile to memory, while the products run
        flush_rows(ds_sm, ds_out + base * K * V, V, K, i_v, V, SK)
        # dv^T's products complete before do^T qg (issue order): wait for them alone
        dv_t, s_a = warpgroup_mma_wait(num_outstanding=1, deps=(dv_t, s_a))
        v_op = gl.convert_layout((-dv_t).to(DT), op_s)
        dSt = warpgroup_mma(v_op, w_s.index(stage), dSt, is_async=True)
        # The copies of chunk c - (STAGES - 1) into the stage the previous step read, after the last product
        # is issued: copies into shared memory before a product make Triton fence the product (it cannot
        # tell the stages apart), and that fence would sit on the chain.
        cn = gl.maximum(c - (STAGES - 1), c0)
        _issue_copies(w, qg, kg, aqk, decay, do, chunk_info, cn, i_hv, HV, V, (stage + STAGES - 1) % STAGES,
                      w_s, q_s, k_s, a_s, d_s, do_s, i_v, SK, BT)
        # (du = dv, every row of the chunk; its barrier also frees ds_sm, read above, for the write below)
        store_rows(du_sm, dv_t, du + base * BT * V, V, BT, i_v, V, BT)
        dSt, v_op = warpgroup_mma_wait(num_outstanding=0, deps=(dSt, v_op))
        ds_sm.permute((1, 0)).store(dSt.to(ST))
    async_copy.wait_group(0)
    p_s, m_s = state_offsets(i_nh, i_v, K, V, SK, acc_s)
    gl.store(dh0 + p_s, dSt, mask=m_s)


def shared_bytes(SK: int, BT: int, stages: int, aqk_bytes: int = 4, du_bytes: int = 4, ds_bytes: int = 4) -> int:
    """The kernel's shared memory: per stage w, qg, kg, do's slice (16-bit), Aqk and the decay; the 16-bit
    copy of a float32 Aqk; du's and dS's tiles."""
    stage = 3 * BT * SK * 2 + BT * BV.value * 2 + BT * BT * aqk_bytes + SK * 4
    return (stages * stage + (BT * BT * 2 if aqk_bytes == 4 else 0) + BT * BV.value * du_bytes
            + SK * BV.value * ds_bytes)


def stage_count(SK: int, BT: int, **nbytes) -> int:
    """The copy stages a launch takes (``KIMI_LINEAR_KDA_SWEEP_WGMMA_STAGES``, default 3), or two where
    three would not fit in shared memory (at 64-row chunks and K = 128, three take 273 KB)."""
    stages = int(env_choice("KIMI_LINEAR_KDA_SWEEP_WGMMA_STAGES", "3", ("2", "3")))
    return 2 if shared_bytes(SK, BT, stages, **nbytes) > SHARED_LIMIT else stages


def applies(w, aqk, do, BT: int, n_chunks: int, K: int, V: int) -> bool:
    """Whether this kernel can run a sweep: a Hopper GPU, bf16 w, qg, kg with K of 64 or 128 (unpadded: the
    stored dS has K rows), do in bf16, Aqk in bf16 or float32, V a multiple of 64 (no masked columns), chunks
    of 16, 32 or 64 rows, and at least one chunk. Not float16: dS and dv are rounded to the operands' type
    for their products, and state gradients summed over a long sequence can pass float16's 65504 (the
    backward's hand-offs are bf16 for float16 inputs for the same reason)."""
    return (w.is_cuda and torch.cuda.get_device_capability(w.device)[0] == 9 and w.dtype == torch.bfloat16
            and do.dtype == w.dtype and aqk.dtype in (w.dtype, torch.float32) and K in (64, 128)
            and w.shape[-1] == K and V % BV.value == 0 and BT in (16, 32, 64) and n_chunks > 0)


def launch(w, qg, kg, aqk, decay, chunk_info, seq_chunks, dht, do, du, ds, dh0, *, HV: int, K: int, V: int, N: int,
           BT: int, ordered: bool):
    """Run the reverse sweep for ``chunk_bwd.chunk_recur_bwd``: du, the per-chunk dS and dh0 into their buffers."""
    dt = gl.bfloat16
    stages = stage_count(K, BT, aqk_bytes=aqk.element_size(), du_bytes=du.element_size(), ds_bytes=ds.element_size())
    return sweep_wgmma_kernel[(triton.cdiv(V, BV.value), N * HV)](
        w, kg, aqk, decay, qg, chunk_info, seq_chunks, dht if dht is not None else dummy(w.device), do, du, ds, dh0,
        HV, K, V, SK=K, BT=BT, DT=dt, HAS_DHT=dht is not None, ORDERED=ordered, STAGES=stages,
        num_warps=WARPS.value,
    )
