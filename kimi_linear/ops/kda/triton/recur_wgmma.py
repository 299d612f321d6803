"""The chunk recurrence on Hopper's warp-group MMA, written in Gluon (opt-in, ``KIMI_LINEAR_KDA_RECUR=wgmma``):
the inference and training forwards, interior states, and the backward's state rebuild.

Same math as ``chunk_fwd._chunk_recur_kernel``, on the transposed state: one program per (V slice of 64,
sequence, head) holds S^T [64, K] in float32 registers, in the accumulator layout of ``wgmma``, and per
chunk computes

    P^T   = S^T w^T                   v_new^T = u^T - P^T
    o^T   = S^T qg^T + v_new^T Aqk^T
    S^T  <- S^T Diag(e^gC) + v_new^T kg        (e^gC as the prep stores it: the chunk's decay)

Every product takes its left operand from registers (S^T, then v_new^T, converted in registers from the
accumulator layout, with no shared-memory round trip) and its right operand (w^T, qg^T, Aqk^T, kg, views of
the chunk's tiles) from shared memory. Why: Triton gave the transposed state of session 14 the same
products but routed the operand through shared memory with a wait after each product (1.57x slower);
Gluon fixes the layouts by hand. wgmma needs M >= 64, so the V slices are 64 wide: 64 programs at H = 32
and V = 128 against the Triton kernel's 128, each on its own SM, so a step that does twice the Triton
kernel's columns gains if it is still shorter than the Triton kernel's (about 1.3 us per 32-row chunk on
an H100). On the tensor cores one step is about 0.5 M multiply-adds on the chain (w, then kg) and 0.3 M
off it (qg, Aqk), roughly 500 and 300 cycles at an SM's ~1000 per cycle.

The tiles of the chunk STAGES - 1 ahead are copied into shared memory (cp.async) while the current chunk's
products run: three stages by default (``KIMI_LINEAR_KDA_RECUR_STAGES=2`` for two; 206 KB of shared memory
at 64-row chunks with three), so each copy has two steps to land, since at about 0.5 us a step the
copies run near the memory's rate. They are issued after the last product, off the chain: Triton cannot
tell the stages apart, so it adds a barrier beside them and fences any product issued after them (a proxy
fence, MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC in SASS). Only P^T is on the chain: the step waits for it alone while
the tensor cores go on with S^T qg^T.

Rounding is the Triton kernel's: S and v_new in the intermediates' 16-bit type for the products (a
training forward's float32 Aqk too, rounded in shared memory), float32 accumulation and state. The output,
the state entering each chunk and v_new are each optional, as in the Triton kernel; the rebuild takes the
last two without the first, from its float32 u.

The loop as ptxas builds it (sm_90a, 32-row chunks, session 20): 255 registers, no spills, 360 instructions
per step with 20 HGMMA, 3 barriers and one proxy fence (the copy wait's), and between P^T's wait and the
state's product only v_new's subtraction and conversion. Session 19's issued the copies between the two pairs
of products, so Triton fenced the state's product, on the chain (367 instructions, 4 barriers, 2 fences).
Session 18's version took the decay's exp in the loop and wrote the decay between the products' issue and
their wait: 539 instructions, 60 B of spills, and a wait for both products that ptxas injected (C7517), so
S^T qg^T ran on the chain. ``tests/test_kda_ptxas.py`` keeps it so.

Gluon runs only on a GPU (not under ``TRITON_INTERPRET=1``): the CPU tests compile this kernel for
sm_90a (``tests/test_kda_ptxas.py``), and the GPU suite checks it against float64.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .utils import dummy, env_choice

# (the CTA barrier is gl.thread_barrier in triton 3.6, the GPU machines' version, and gl.barrier in 3.7)
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BV = gl.constexpr(64)  # the warp group's M: 4 warps x 16 rows
WARPS = gl.constexpr(4)


@gluon.constexpr_function
def tile_layout(rows, cols, elem_bytes=2):
    """A blocked layout for loading a [rows, cols] tile with one warp group: 16 B of contiguous values per
    thread along the columns where they fit."""
    per = min(16 // elem_bytes, cols)
    across = min(32, cols // per)
    return gl.BlockedLayout([1, per], [32 // across, across], [WARPS.value, 1], [1, 0])


@gluon.jit
def tile_offsets(R: gl.constexpr, C: gl.constexpr, stride, col0, ELEM_BYTES: gl.constexpr = 2):
    """Offsets r * stride + col0 + c of an [R, C] tile in ``tile_layout(R, C)`` (recomputed at each use:
    held across the loop they would cost about 90 registers)."""
    layout: gl.constexpr = tile_layout(R, C, ELEM_BYTES)
    r = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    c = col0 + gl.arange(0, C, layout=gl.SliceLayout(0, layout))
    return r[:, None] * stride + c[None, :]


@gluon.jit
def copy_chunk_tiles(w, qg, kg, aqk, decay, base, stage, w_s, q_s, k_s, a_s, d_s, SK: gl.constexpr,
                     BT: gl.constexpr, WITH_QA: gl.constexpr = True):
    """Start the asynchronous copies of chunk ``base``'s tiles that both Gluon kernels read into stage
    ``stage`` of ``chunk_tiles``' buffers: w [BT, SK]; kg as stored, [SK, BT]; e^gC [SK]; and with
    ``WITH_QA`` qg [BT, SK] and Aqk [BT, BT]. The caller adds its own tiles and commits the group."""
    A_BYTES: gl.constexpr = aqk.dtype.element_ty.primitive_bitwidth // 8
    offs_a = tile_offsets(BT, SK, SK, 0)
    async_copy.async_copy_global_to_shared(w_s.index(stage), w + base * (BT * SK) + offs_a)
    if WITH_QA:
        async_copy.async_copy_global_to_shared(q_s.index(stage), qg + base * (BT * SK) + offs_a)
        async_copy.async_copy_global_to_shared(a_s.index(stage),
                                               aqk + base * (BT * BT) + tile_offsets(BT, BT, BT, 0, A_BYTES))
    async_copy.async_copy_global_to_shared(k_s.index(stage), kg + base * (BT * SK) + tile_offsets(SK, BT, BT, 0))
    k_lay: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    async_copy.async_copy_global_to_shared(d_s.index(stage), decay + base * SK + gl.arange(0, SK, layout=k_lay))


@gluon.jit
def _issue_copies(w, u, qg, kg, aqk, decay, base, stage, w_s, q_s, k_s, a_s, u_s, d_s, i_v,
                  SK: gl.constexpr, SV: gl.constexpr, BT: gl.constexpr, STORE_O: gl.constexpr):
    """Start the asynchronous copies of one chunk's tiles into shared-memory stage ``stage``: those of
    ``copy_chunk_tiles`` (qg and Aqk only where the output is formed), and the V slice of u [BT, BV] (SV a
    multiple of 64, so no mask: cp.async copies 16 B at a time only where the whole vector is kept)."""
    U_BYTES: gl.constexpr = u.dtype.element_ty.primitive_bitwidth // 8
    copy_chunk_tiles(w, qg, kg, aqk, decay, base, stage, w_s, q_s, k_s, a_s, d_s, SK, BT, STORE_O)
    async_copy.async_copy_global_to_shared(u_s.index(stage),
                                           u + base * (BT * SV) + tile_offsets(BT, BV, SV, i_v * BV, U_BYTES))
    async_copy.commit_group()


@gluon.jit
def state_offsets(i_nh, i_v, K, V, SK: gl.constexpr, layout: gl.constexpr):
    """Offsets and mask of this program's S^T [BV, SK] in a [N * HV, K, V] state (h0, ht)."""
    v = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(1, layout))
    k = gl.arange(0, SK, layout=gl.SliceLayout(0, layout))
    return (i_nh.to(gl.int64) * K + k[None, :]) * V + v[:, None], (k < K)[None, :] & (v < V)[:, None]


@gluon.jit
def load_state(ptr, HAS: gl.constexpr, i_nh, i_v, K, V, SK: gl.constexpr, layout: gl.constexpr):
    """This program's S^T [BV, SK] of a [N * HV, K, V] state (h0, or the sweep's dht) in float32, zeros
    past K and V or where there is none (``HAS`` false)."""
    x = gl.zeros([BV, SK], gl.float32, layout=layout)
    if HAS:
        p_s, m_s = state_offsets(i_nh, i_v, K, V, SK, layout)
        x = gl.load(ptr + p_s, mask=m_s, other=0.0).to(gl.float32)
    return x


@gluon.jit
def store_rows(sm, x_t, ptr, row_stride, n_rows, i_v, V, BT: gl.constexpr):
    """Store x^T ([BV, BT], an accumulator layout) as BT rows of this program's BV channels at
    ``ptr + t * row_stride + v``, rows t < n_rows: through the shared tile ``sm`` as [BT, BV], read back 16 B
    of channels per thread (o and v_new are stored channels fastest; the accumulator's own layout would
    scatter them across rows). Freeing ``sm`` for the next step is the caller's (its top barrier)."""
    sm.permute((1, 0)).store(x_t.to(sm.dtype))
    cta_barrier()
    flush_rows(sm, ptr, row_stride, n_rows, i_v, V, BT)


@gluon.jit
def flush_rows(sm, ptr, row_stride, n_rows, i_v, V, BT: gl.constexpr):
    """The second half of ``store_rows``, for a tile written into ``sm`` before a barrier: its BT rows
    t < n_rows to ``ptr + t * row_stride + v``, 16 B of channels per thread."""
    T: gl.constexpr = sm.dtype
    layout: gl.constexpr = tile_layout(BT, BV, T.primitive_bitwidth // 8)
    t = gl.arange(0, BT, layout=gl.SliceLayout(1, layout))
    v = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, layout))
    gl.store(ptr + t[:, None] * row_stride + v[None, :], sm.load(layout),
             mask=(t < n_rows)[:, None] & (v < V)[None, :])


@gluon.jit
def chunk_tiles(DT: gl.constexpr, AT: gl.constexpr, STAGES: gl.constexpr, BT: gl.constexpr, SK: gl.constexpr):
    """The shared-memory stages of a chunk's tiles that both Gluon kernels read: w and qg [BT, SK], kg as
    stored [SK, BT], Aqk [BT, BT] in its own type AT, the decay e^gC [SK]; and the one 16-bit copy of a
    float32 Aqk (``round_aqk``). The copies run STAGES - 1 chunks ahead of the products."""
    w_s = gl.allocate_shared_memory(DT, [STAGES, BT, SK], gl.NVMMASharedLayout.get_default_for([BT, SK], DT))
    q_s = gl.allocate_shared_memory(DT, [STAGES, BT, SK], gl.NVMMASharedLayout.get_default_for([BT, SK], DT))
    k_s = gl.allocate_shared_memory(DT, [STAGES, SK, BT], gl.NVMMASharedLayout.get_default_for([SK, BT], DT))
    a_s = gl.allocate_shared_memory(AT, [STAGES, BT, BT], gl.NVMMASharedLayout.get_default_for([BT, BT], AT))
    a16_s = gl.allocate_shared_memory(DT, [BT, BT], gl.NVMMASharedLayout.get_default_for([BT, BT], DT))
    d_s = gl.allocate_shared_memory(gl.float32, [STAGES, SK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    return w_s, q_s, k_s, a_s, a16_s, d_s


@gluon.jit
def row_tile(T: gl.constexpr, R: gl.constexpr):
    """A shared [R, BV] tile of type T that a result goes out through (``store_rows``, ``flush_rows``)."""
    return gl.allocate_shared_memory(T, [R, BV], gl.NVMMASharedLayout.get_default_for([R, BV], T))


@gluon.jit
def round_aqk(a_s, a16_s, DT: gl.constexpr, BT: gl.constexpr):
    """A float32 Aqk tile (a training forward keeps it for the backward) rounded to DT in shared memory for
    its product, as the Triton kernels round it (Triton's wgmma takes no tf32 operand from registers). Every
    warp's part is written before the product reads it; the caller's earlier barrier freed ``a16_s``."""
    a16_s.store(a_s.load(tile_layout(BT, BT, 4)).to(DT))
    fence_async_shared()
    cta_barrier()


@gluon.jit
def sequence_program(seq_chunks, HV, ORDERED: gl.constexpr):
    """This program's V slice, (sequence, head) index, value head and its sequence's chunks [c0, c1), as
    ``utils.sequence_program`` (with ORDERED, the varlen programs' sequence order after the offsets)."""
    i_v = gl.program_id(0)
    i_nh = gl.program_id(1)
    i_n = i_nh // HV
    if ORDERED:
        i_n = gl.load(seq_chunks + gl.num_programs(1) // HV + 1 + i_n)
        i_nh = i_n * HV + i_nh % HV
    return i_v, i_nh, i_nh % HV, gl.load(seq_chunks + i_n), gl.load(seq_chunks + i_n + 1)


@gluon.jit
def recur_wgmma_kernel(
    w, u, qg, kg, aqk, decay, chunk_info, seq_chunks, h0, ht, o, states, v_new_out,
    HV, K, V,
    SK: gl.constexpr, SV: gl.constexpr, BT: gl.constexpr, DT: gl.constexpr,
    HAS_H0: gl.constexpr, STORE_HT: gl.constexpr, ORDERED: gl.constexpr, STAGES: gl.constexpr = 3,
    STORE_O: gl.constexpr = True, STORE_STATES: gl.constexpr = False, STORE_VNEW: gl.constexpr = False,
):
    """Grid (V slices of 64, sequences * HV), one warp group per program. The chunk-major inputs are
    ``chunk_fwd.chunk_prep``'s with ``pad=True`` (K, V padded to SK, SV; kg stored [SK, BT] per chunk; Aqk
    in w's 16-bit type or float32; u in w's type or float32, as the backward's rebuild keeps it). Each of
    the output (``STORE_O``), the state entering every chunk (``STORE_STATES``, [chunks * HV, K, V]) and
    v_new (``STORE_VNEW``, [chunks, HV, BT, V]) is optional, as in ``chunk_fwd._chunk_recur_kernel``; the
    backward's rebuild takes the last two without the first."""
    i_v, i_nh, i_hv, c0, c1 = sequence_program(seq_chunks, HV, ORDERED)

    acc_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, SK, 16])
    acc_t: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BT, 16])
    op_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_s, k_width=2)  # A of [BV, BT] x [BT, SK]
    op_t: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_t, k_width=2)  # A of [BV, *] x [*, BT]
    # (a float32 Aqk, a training forward's, is copied as it is and rounded in shared memory: ``round_aqk``)
    A32: gl.constexpr = aqk.dtype.element_ty == gl.float32
    w_s, q_s, k_s, a_s, a16_s, d_s = chunk_tiles(DT, aqk.dtype.element_ty, STAGES, BT, SK)
    u_s = gl.allocate_shared_memory(u.dtype.element_ty, [STAGES, BT, BV], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # the shared tiles o and v_new go out through (``store_rows``)
    o_sm = row_tile(o.dtype.element_ty, BT)
    n_sm = row_tile(v_new_out.dtype.element_ty, BT)
    # and the chunk states', [SK, BV]: written at the end of a step (nothing in flight then), stored to memory
    # by the next one while its products run, 16 B a thread (from the accumulator's layout they went out 4 B
    # at a time, with an address each, at the step's top; session 20)
    ST: gl.constexpr = states.dtype.element_ty
    st_sm = row_tile(ST, SK)
    St = load_state(h0, HAS_H0, i_nh, i_v, K, V, SK, acc_s)
    if STORE_STATES:  # (the first chunk's, visible after its top barrier)
        st_sm.permute((1, 0)).store(St.to(ST))
    # (the first STAGES - 1 chunks' copies, a group each; past the end the last chunk's again, and an empty
    # sequence copies a valid chunk it does not use)
    for s in gl.static_range(STAGES - 1):
        cn = gl.maximum(gl.minimum(c0 + s, c1 - 1), 0)
        _issue_copies(w, u, qg, kg, aqk, decay, (cn * HV + i_hv).to(gl.int64), s, w_s, q_s, k_s, a_s, u_s, d_s,
                      i_v, SK, SV, BT, STORE_O)
    for c in range(c0, c1):
        stage = (c - c0) % STAGES
        async_copy.wait_group(STAGES - 2)  # this thread's copies of this chunk are done (the oldest group),
        # and every thread's; the barrier also means every warp has finished the previous step, so the
        # stage it read and o_sm are free
        cta_barrier()
        fence_async_shared()  # and visible to the tensor cores' reads
        base = (c * HV + i_hv).to(gl.int64)
        s_a = gl.convert_layout(St.to(DT), op_t)
        zero = gl.zeros([BV, BT], gl.float32, layout=acc_t)
        p_t = warpgroup_mma(s_a, w_s.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
        if STORE_O:
            o_t = warpgroup_mma(s_a, q_s.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
        if STORE_STATES:  # (the state entering the chunk, float32 or the hand-off's 16 bits, while they run)
            flush_rows(st_sm, states + base * K * V, V, K, i_v, V, SK)
        if A32 and STORE_O:
            round_aqk(a_s.index(stage), a16_s, DT, BT)
        u_t = u_s.index(stage).permute((1, 0)).load(acc_t).to(gl.float32)
        d_t = d_s.index(stage).load(gl.SliceLayout(0, acc_s))
        # Only P^T is on the chain: wait for it alone (the products complete in issue order) and let the
        # tensor cores run S^T qg^T while v_new is formed. Register operands stay in the waits' deps while
        # an issued product may still read them.
        p_t, s_a = warpgroup_mma_wait(num_outstanding=1 if STORE_O else 0, deps=(p_t, s_a))
        vn = u_t - p_t
        vd = vn.to(DT)
        # (the decay written after that wait, loaded before it: ptxas then schedules the multiplies while
        # the products run. Written between the issues with its exp, it made ptxas wait for both products
        # first, "warpgroup.wait is injected" C7517, and the loop had 539 instructions with spills, not 373)
        St = St * d_t[None, :]
        v_s_op = gl.convert_layout(vd, op_s)
        St = warpgroup_mma(v_s_op, k_s.index(stage).permute((1, 0)), St, is_async=True)
        if STORE_O:
            v_t_op = gl.convert_layout(vd, op_t)
            o_t = warpgroup_mma(v_t_op, (a16_s if A32 else a_s.index(stage)).permute((1, 0)), o_t, is_async=True)
        # The copies of chunk c + STAGES - 1 into the stage the previous step read, while the products run.
        # Issued after the last product (session 20): copies into shared memory before a product make Triton
        # fence that product (it cannot tell the stages apart), and between P^T's wait and the state's
        # product that fence (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC) sat on the chain. Before the top barrier
        # they were on the chain too (session 19).
        cn = gl.minimum(c + STAGES - 1, c1 - 1)
        _issue_copies(w, u, qg, kg, aqk, decay, (cn * HV + i_hv).to(gl.int64), (stage + STAGES - 1) % STAGES,
                      w_s, q_s, k_s, a_s, u_s, d_s, i_v, SK, SV, BT, STORE_O)
        if STORE_VNEW:  # (u - w S unrounded, every row of the chunk, while the products run)
            store_rows(n_sm, vn, v_new_out + base * BT * V, V, BT, i_v, V, BT)
        if STORE_O:
            St, o_t, s_a, v_s_op, v_t_op = warpgroup_mma_wait(num_outstanding=0, deps=(St, o_t, s_a, v_s_op, v_t_op))
            row0 = gl.load(chunk_info + 2 * c).to(gl.int64)
            n_rows = gl.load(chunk_info + 2 * c + 1)
            store_rows(o_sm, o_t, o + (row0 * HV + i_hv) * V, HV * V, n_rows, i_v, V, BT)
        else:
            St, s_a, v_s_op = warpgroup_mma_wait(num_outstanding=0, deps=(St, s_a, v_s_op))
        if STORE_STATES:  # (the next chunk's; o's or v_new's barrier above followed every read of st_sm)
            if not (STORE_O or STORE_VNEW):
                cta_barrier()
            st_sm.permute((1, 0)).store(St.to(ST))
    async_copy.wait_group(0)
    if STORE_HT:
        p_s, m_s = state_offsets(i_nh, i_v, K, V, SK, acc_s)
        gl.store(ht + p_s, St, mask=m_s)


SHARED_LIMIT = 227 * 1024  # (an H100's / H200's shared memory for one block)


def shared_bytes(SK: int, BT: int, stages: int, aqk_bytes: int = 2, u_bytes: int = 2, store_o: bool = True,
                 vnew_bytes: int = 0, states_bytes: int = 0) -> int:
    """The kernel's shared memory: per stage w, kg (16-bit), u's slice of 64 and the decay, and with an
    output qg and Aqk; the output's tile and its 16-bit copy of a float32 Aqk; v_new's and the chunk
    states' tiles where stored."""
    stage = 2 * BT * SK * 2 + BT * BV.value * u_bytes + SK * 4 + (BT * SK * 2 + BT * BT * aqk_bytes if store_o else 0)
    out = (BT * BV.value * 2 + (BT * BT * 2 if aqk_bytes == 4 else 0)) if store_o else 0
    return stages * stage + out + BT * BV.value * vnew_bytes + SK * BV.value * states_bytes


def stage_count(SK: int, BT: int, **nbytes) -> int:
    """The copy stages a launch takes (``KIMI_LINEAR_KDA_RECUR_STAGES``, default 3), or two where three
    would not fit in shared memory (a training forward's float32 Aqk at 64-row chunks: 234 KB); ``nbytes``
    as ``shared_bytes`` takes them."""
    stages = int(env_choice("KIMI_LINEAR_KDA_RECUR_STAGES", "3", ("2", "3")))
    return 2 if shared_bytes(SK, BT, stages, **nbytes) > SHARED_LIMIT else stages


def applies(w, u, aqk, BT: int, n_chunks: int, output: bool = True) -> bool:
    """Whether this kernel can run a recurrence: a Hopper GPU, 16-bit w, qg, kg padded to K of 64 or 128, u
    in their type or float32 (the backward's rebuild), with an ``output`` Aqk in their type (the inference
    forward's) or float32 (a training forward's), chunks of 16, 32 or 64 rows, V padded to a multiple of
    64, and at least one chunk."""
    return (w.is_cuda and torch.cuda.get_device_capability(w.device)[0] == 9 and w.dtype in (torch.bfloat16, torch.float16)
            and u.dtype in (w.dtype, torch.float32) and (not output or aqk.dtype in (w.dtype, torch.float32))
            and w.shape[-1] in (64, 128) and u.shape[-1] % BV.value == 0 and BT in (16, 32, 64) and n_chunks > 0)


def launch(w, u, qg, kg, aqk, decay, chunk_info, seq_chunks, *, shapes, initial_state, out, ht, BT: int,
           ordered: bool, states=None, v_new=None):
    """Run the recurrence for ``chunk_fwd.chunk_recur``: the output where ``out`` is given, the final state
    into ``ht``, the chunk states into ``states`` and v_new into ``v_new`` where given."""
    dt = gl.bfloat16 if w.dtype == torch.bfloat16 else gl.float16
    grid = (triton.cdiv(shapes.V, BV.value), shapes.N * shapes.HV)
    stages = stage_count(w.shape[-1], BT, aqk_bytes=aqk.element_size() if out is not None else 2,
                         u_bytes=u.element_size(), store_o=out is not None,
                         vnew_bytes=v_new.element_size() if v_new is not None else 0,
                         states_bytes=states.element_size() if states is not None else 0)
    d = dummy(w.device)
    return recur_wgmma_kernel[grid](
        w, u, qg, kg, aqk if out is not None else d, decay, chunk_info, seq_chunks,
        initial_state if initial_state is not None else d, ht if ht is not None else d,
        out if out is not None else d, states if states is not None else d, v_new if v_new is not None else d,
        shapes.HV, shapes.K, shapes.V, SK=w.shape[-1], SV=u.shape[-1], BT=BT, DT=dt,
        HAS_H0=initial_state is not None, STORE_HT=ht is not None, ORDERED=ordered, STAGES=stages,
        STORE_O=out is not None, STORE_STATES=states is not None, STORE_VNEW=v_new is not None,
        num_warps=WARPS.value,
    )
