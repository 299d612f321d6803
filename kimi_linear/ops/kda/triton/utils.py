"""Helpers shared by the KDA Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Gate forms (constexpr GATE in the kernels).
GATE_NONE = 0  # g is already the log decay
GATE_SOFTPLUS = 1  # -exp(A_log) * softplus(g + dt_bias), threshold 20
GATE_LOWER = 2  # lower_bound * sigmoid(exp(A_log) * (g + dt_bias))

SOFTPLUS_THRESHOLD = 20.0
L2_EPS = 1e-6


def gate_code(use_gate_in_kernel: bool, lower_bound) -> int:
    if not use_gate_in_kernel:
        return GATE_NONE
    return GATE_SOFTPLUS if lower_bound is None else GATE_LOWER


def env_choice(name: str, default: str, choices: tuple) -> str:
    """A mode switch read from the environment at launch time; an unknown value is an error naming the
    variable and its choices (not a silent fall back to some other path)."""
    val = os.environ.get(name, default)
    if val not in choices:
        raise ValueError(f"{name}={val!r}: expected one of {', '.join(map(repr, choices))}")
    return val


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (and >= 1). Plain integer arithmetic: ``triton.next_power_of_2`` and
    ``triton.cdiv`` go through Triton's constexpr-function wrapper, about 3 us a call on the host, and a
    forward made 17 such calls (session 16, ``benchmarks/kda_host.py cpu``)."""
    return 1 << (max(int(x), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b, on the host (see ``next_pow2``)."""
    return -(-a // b)


_DUMMIES: dict = {}


def dummy(device) -> torch.Tensor:
    """A 1-element tensor to pass where an optional pointer argument is unused (cached: no allocation
    on later calls, so launches stay capturable in CUDA graphs without touching the allocator)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(1, dtype=torch.float32, device=device)
    return _DUMMIES[key]


@triton.jit
def l2_norm_factor(sum_sq):
    """The L2-norm factor 1 / sqrt(sum x^2 + 1e-6) of a row (FLA's form: eps inside the root)."""
    return 1.0 / tl.sqrt(sum_sq + 1e-6)


@triton.jit
def load_bias(dt_bias, i_hv, K, o_k, m_k, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dt_bias[i_hv, o_k] in fp32 (zeros without a bias)."""
    bias = tl.zeros([BK], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    return bias


@triton.jit
def head_a_log(A_log, i_hv, HAS_A: tl.constexpr):
    """A_log of value head i_hv in fp32 (0 without an in-kernel A)."""
    a = 0.0
    if HAS_A:
        a = tl.load(A_log + i_hv).to(tl.float32)
    return a


@triton.jit
def block_channels(dt_bias, kb, m_r, i_hv, K, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The K block starting at kb: its channels o_k, their mask, the (rows m_r) x channel mask and the
    block's dt_bias."""
    o_k = kb + tl.arange(0, BK)
    m_k = o_k < K
    return o_k, m_k, m_r[:, None] & m_k[None, :], load_bias(dt_bias, i_hv, K, o_k, m_k, BK, HAS_BIAS)


@triton.jit
def chunk_rows(chunk_info, c):
    """(first flattened token, number of valid rows) of chunk c in a ``chunk_layout`` list."""
    return tl.load(chunk_info + 2 * c).to(tl.int64), tl.load(chunk_info + 2 * c + 1)


@triton.jit
def chunk_program(chunk_info, H, HV, HEAD_FIRST_GRID: tl.constexpr = False):
    """Program ids of the chunk-parallel kernels, grid (chunks, HV) (or (HV, chunks) with
    ``HEAD_FIRST_GRID``: programs then run chunk by chunk, every head of a chunk before the next chunk):
    the chunk, the value head, its q/k head (GVA), the chunk's first token and valid rows, and the
    (chunk, head) index of chunk-major buffers."""
    if HEAD_FIRST_GRID:
        i_c = tl.program_id(1)
        i_hv = tl.program_id(0)
    else:
        i_c = tl.program_id(0)
        i_hv = tl.program_id(1)
    row0, n_rows = chunk_rows(chunk_info, i_c)
    return i_c, i_hv, i_hv // (HV // H), row0, n_rows, i_c.to(tl.int64) * HV + i_hv


@triton.jit
def subchunk_program(chunk_info, A_log, H, HV, BT: tl.constexpr, HAS_A: tl.constexpr):
    """Program ids of the sub-chunk kernels, grid (chunks * BT / 16, HV): the value head, its q/k head,
    the sub-chunk s of the chunk, the (chunk, head) index of chunk-major buffers, the sub-chunk's first
    token, its rows r = 0 .. 15 with their validity mask (none past a partial last chunk), and A_log of
    the head (0 without)."""
    i_x = tl.program_id(0)
    i_hv = tl.program_id(1)
    i_c = i_x // (BT // 16)
    s = i_x % (BT // 16)
    row0, n_rows = chunk_rows(chunk_info, i_c)
    r = tl.arange(0, 16)
    return (i_hv, i_hv // (HV // H), s, i_c.to(tl.int64) * HV + i_hv, row0 + s * 16, r, r < n_rows - s * 16,
            head_a_log(A_log, i_hv, HAS_A))


@triton.jit
def wide_flag(wide):
    """This sub-chunk program's entry of the int8 [HV, chunks * BT / 16] buffer in which the tensor-core
    sub-chunk kernels mark the sub-chunks they leave to the exact ones."""
    return wide + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def gate_span(g, dt_bias, rows0, r, m_r, i_hv, a, lower_bound, HV, K, BK: tl.constexpr,
              GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The widest channel's log-decay span over the pairs of the rows r (a sub-chunk;
    ``tile_span``), from the gates alone, over all K blocks."""
    span = tl.zeros([], dtype=tl.float32)
    for kb in range(0, K, BK):
        o_k, _, m_rk, bias = block_channels(dt_bias, kb, m_r, i_hv, K, BK, HAS_BIAS)
        _, bg = load_gate(g, rows0, r, i_hv, o_k, m_rk, a, bias, lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
        span = tl.maximum(span, tile_span(bg, r))
    return span


@triton.jit
def subchunk_column(E, dec, bk, r, j: tl.constexpr):
    """One column step of the sub-chunk kernels (columns j from the last): E_i becomes the product of the
    decays of rows j+1 .. i (factors <= 1, so exact for any gate); returns it, its copy masked to the rows
    i > j of the column's pairs, and row j of ``bk`` for every row (masked sums inside the warp)."""
    below = (r > j)[:, None]
    E = E * tl.where(below, tl.sum(tl.where((r == j + 1)[:, None], dec, 0.0), axis=0)[None, :], 1.0)
    kj = tl.sum(tl.where((r == j)[:, None], bk, 0.0), axis=0)
    return E, tl.where(below, E, 0.0), kj


# Widest log-decay span (nats, per channel, over the pairs of a 16-row sub-chunk) that the kernels take
# on tensor cores (``midpoint_factors``): factors exp(+-(G - mid)) stay within e^(+-60), far from fp32's
# overflow (e^88.7) and, times q or k entries down to ~1e-12, from its smallest normal numbers (e^-87.3),
# so nothing is lost to overflow or flushing. Wider sub-chunks take the exact column-by-column path.
# KIMI_LINEAR_KDA_DIAG_SPAN lowers the limit (a negative value sends every sub-chunk down the exact path:
# tests and benchmarks).
DIAG_SPAN_MAX = 120.0


def diag_span_max() -> float:
    return min(float(os.environ.get("KIMI_LINEAR_KDA_DIAG_SPAN", DIAG_SPAN_MAX)), DIAG_SPAN_MAX)


@triton.jit
def subchunk_takes_fast_path(g, dt_bias, wide, rows0, r, m_r, i_hv, a, lower_bound, span_max, HV, K,
                             BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Whether a 16-row sub-chunk program takes the tensor-core path (span within ``span_max``); marks
    it in ``wide`` for the exact kernels otherwise."""
    ok = gate_span(g, dt_bias, rows0, r, m_r, i_hv, a, lower_bound, HV, K, BK, GATE, HAS_A, HAS_BIAS) <= span_max
    tl.store(wide_flag(wide), (~ok).to(tl.int8))
    return ok  # False for NaN spans too


@triton.jit
def _cumgate(bg, r):
    """Cumulative log decay of a tile of rows r from row 1 (row 0's own gate enters no pair): same-sign
    sums of the tile's gates."""
    return tl.cumsum(tl.where((r == 0)[:, None], 0.0, bg), axis=0)


@triton.jit
def tile_span(bg, r):
    """The widest channel's log-decay span over the pairs of a tile of rows r (inf or NaN for infinite or
    NaN gates: compare it with DIAG_SPAN_MAX, which is False for NaN)."""
    G = _cumgate(bg, r)
    return tl.max(tl.max(G, axis=0) - tl.min(G, axis=0), axis=0)


@triton.jit
def midpoint_factors(bg, r):
    """Per-row factors of a tile (rows r, log decays bg; a 16-row sub-chunk) with
    exp(G_i - G_j) = ea_i * eb_j for every pair: G (``_cumgate``) measured from the per-channel midpoint of
    its range, so ea, eb lie within exp(+-span / 2)."""
    G = _cumgate(bg, r)
    mid = 0.5 * (tl.max(G, axis=0) + tl.min(G, axis=0))
    return tl.exp(G - mid[None, :]), tl.exp(mid[None, :] - G)


@triton.jit
def load_gate(g, row0, r, i_hv, o_k, m_rk, a, bias, lower_bound, HV, K,
              GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Raw gate of rows r (chunk-relative) and channels o_k, and its activated log decay (0 where masked)."""
    xg = tl.load(g + ((row0 + r)[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    bg = tl.where(m_rk, apply_gate(xg, a, bias[None, :], lower_bound, GATE, HAS_A, HAS_BIAS), 0.0)
    return xg, bg


@triton.jit
def load_qkg(q, k, g, row0, i_h, i_hv, o_k, m_rk, rq, rk, a, bias, lower_bound,
             H, HV, K,
             GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr, r):
    """q, k of rows r scaled by their L2-norm factors rq, rk, and the activated log decay (all fp32)."""
    p_qk = ((row0 + r)[:, None] * H + i_h) * K + o_k[None, :]
    bq = tl.load(q + p_qk, mask=m_rk, other=0.0).to(tl.float32) * rq[:, None]
    bk = tl.load(k + p_qk, mask=m_rk, other=0.0).to(tl.float32) * rk[:, None]
    _, bg = load_gate(g, row0, r, i_hv, o_k, m_rk, a, bias, lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
    return bq, bk, bg


@triton.jit
def load_qkg_block(q, k, g, dt_bias, kb, row0, r, m_r, i_h, i_hv, rq, rk, a, lower_bound, H, HV, K,
                   BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The K block starting at kb of rows r (valid where m_r): its channels o_k, the row x channel mask,
    and ``load_qkg``'s q, k (L2-normalised) and activated log decay."""
    o_k, _, m_rk, bias = block_channels(dt_bias, kb, m_r, i_hv, K, BK, HAS_BIAS)
    bq, bk, bg = load_qkg(q, k, g, row0, i_h, i_hv, o_k, m_rk, rq, rk, a, bias, lower_bound,
                          H, HV, K, GATE, HAS_A, HAS_BIAS, r)
    return o_k, m_rk, bq, bk, bg


@triton.jit
def load_next_gate(g, row0, r, n_rows, i_hv, o_k, m_k, a, bias, lower_bound, HV, K,
                   GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Activated log decay of the row after each row r (0 past the chunk's n_rows valid rows): the column
    side of the tree factors sums the gates after a row."""
    _, bgn = load_gate(g, row0 + 1, r, i_hv, o_k, ((r + 1) < n_rows)[:, None] & m_k[None, :], a, bias,
                       lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
    return bgn


@triton.jit
def load_qkg_next(q, k, g, dt_bias, kb, row0, r, m_r, n_rows, i_h, i_hv, rq, rk, a, lower_bound, H, HV, K,
                  BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The K block at kb of rows r (valid where m_r) for the tree factors: ``block_channels``' channels,
    masks and dt_bias, ``load_qkg``'s q, k and log decays, and ``load_next_gate``'s next rows' decays."""
    o_k, m_k, m_rk, bias = block_channels(dt_bias, kb, m_r, i_hv, K, BK, HAS_BIAS)
    bq, bk, bg = load_qkg(q, k, g, row0, i_h, i_hv, o_k, m_rk, rq, rk, a, bias, lower_bound,
                          H, HV, K, GATE, HAS_A, HAS_BIAS, r)
    bgn = load_next_gate(g, row0, r, n_rows, i_hv, o_k, m_k, a, bias, lower_bound, HV, K, GATE, HAS_A, HAS_BIAS)
    return o_k, m_k, m_rk, bias, bq, bk, bg, bgn


@triton.jit
def subchunk_tiles(q, k, g, dt_bias, row0, n_rows, i_h, i_hv, kb, rq, rk, a, lower_bound, H, HV, K,
                   S: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """Sub-chunk S (rows 16 S ... 16 S + 15 of a chunk) in the K block at kb, for the kernels that hold a
    64-row chunk as four [16, BK] tiles: rows r, channels o_k, the row x channel mask, q and k
    (L2-normalised with the rows' factors rq, rk), log decays, and the two sums a tree level's factors
    take inside the sub-chunk: from its start to the row (inclusive; the row side) and after the row to
    its end (the column side; from the next rows' gates, not "total minus self")."""
    r = S * 16 + tl.arange(0, 16)
    o_k, _, m_rk, _, bq, bk, bg, bgn = load_qkg_next(q, k, g, dt_bias, kb, row0, r, r < n_rows, n_rows, i_h, i_hv,
                                                     rq, rk, a, lower_bound, H, HV, K, BK, GATE, HAS_A, HAS_BIAS)
    after = tl.cumsum(tl.where((tl.arange(0, 16) == 15)[:, None], 0.0, bgn), axis=0, reverse=True)
    return r, m_rk, o_k, bq, bk, bg, tl.cumsum(bg, axis=0), after


@triton.jit
def subchunk_block(I: tl.constexpr, J: tl.constexpr, BT: tl.constexpr = 64):
    """Offsets of the [16, 16] block (rows of sub-chunk I, columns of sub-chunk J) of a BT-row chunk's
    [BT, BT] matrix, and its row indices."""
    a = tl.arange(0, 16)
    return (I * 16 + a)[:, None] * BT + (J * 16 + a)[None, :], I * 16 + a


@triton.jit
def inverse_step(Tm, L, PREC: tl.constexpr):
    """One tree step of T = (I + Akk)^-1: T_2B = T_B - T_B L_B T_B, with L_B the pairs of level B."""
    return Tm - tl.dot(Tm, tl.dot(L, Tm, input_precision=PREC), input_precision=PREC)


@triton.jit
def block_sums(bg, bgn, r, BT: tl.constexpr, BK: tl.constexpr, B: tl.constexpr):
    """Log-decay sums inside each B-row block of a chunk tile (rows r, gates bg, next row's gates bgn):
    fwd = inclusive cumulative sum from the block start, rev = the sum after the row to the block end
    (from the next rows' gates, not "total minus self", which cancels after a -1000 gate). Every sum adds
    same-sign terms of one block only, so exp(fwd_i) * exp(rev_j) is exact for any gate."""
    fwd = tl.reshape(tl.cumsum(tl.reshape(bg, (BT // B, B, BK)), axis=1), (BT, BK))
    gz = tl.where(((r % B) == B - 1)[:, None], 0.0, bgn)
    rev = tl.reshape(tl.cumsum(tl.reshape(gz, (BT // B, B, BK)), axis=1, reverse=True), (BT, BK))
    return fwd, rev


@triton.jit
def block_cumsum(x, BT: tl.constexpr, BK: tl.constexpr, B: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive cumulative sum of x [BT, BK] inside each B-row block (REVERSE: from the block end)."""
    return tl.reshape(tl.cumsum(tl.reshape(x, (BT // B, B, BK)), axis=1, reverse=REVERSE), (BT, BK))


@triton.jit
def tree_pairs(r, B: tl.constexpr):
    """Pairs (i, j) of tree level B: i in an odd B-row block, j in the even block just before it. Over
    B = 1, 2, ..., BT/2 every pair i > j of a chunk belongs to exactly one level."""
    return (((r[:, None] // B) % 2) == 1) & ((r[None, :] // B) == (r[:, None] // B) - 1)


@triton.jit
def tree_factor(bg, bgn, r, BT: tl.constexpr, BK: tl.constexpr, B: tl.constexpr):
    """Per-row decay factors of tree level B, all <= 1: exp(fwd) on rows of odd B-blocks (the row side of
    the level's pairs), exp(rev) on rows of even ones (the column side), so that for a pair (i, j) of the
    level exp(G_i - G_j) = f_i * f_j."""
    fwd, rev = block_sums(bg, bgn, r, BT, BK, B)
    return tl.exp(tl.minimum(tl.where((((r // B) % 2) == 1)[:, None], fwd, rev), 0.0))


@triton.jit
def sequence_program(seq_chunks, HV, ORDERED: tl.constexpr = False):
    """Program ids of the sequential kernels, grid (V slices, N * HV): the V slice, the (sequence, head)
    index, the value head, and the sequence's chunk range [c0, c1). ``ORDERED``: seq_chunks holds, after
    its N + 1 chunk offsets, the sequences in the order their programs take them (``chunk_fwd.
    _varlen_layout``: longest first, so that the longest chains start first when the programs outnumber
    the GPU's slots)."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    if ORDERED:
        i_n = tl.load(seq_chunks + tl.num_programs(1) // HV + 1 + i_n)
        i_nh = i_n * HV + i_nh % HV
    return i_v, i_nh, i_nh % HV, tl.load(seq_chunks + i_n), tl.load(seq_chunks + i_n + 1)


def seq_ordered(seq_chunks, N: int) -> bool:
    """Whether a chunk layout's ``seq_chunks`` carries a program order after its N + 1 offsets."""
    return seq_chunks.numel() > N + 1


@triton.jit
def apply_gate(x, a, bias, lower_bound, GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Activated log decay from the raw gate input x (fp32). a = A_log[h] (scalar), bias = dt_bias slice."""
    if GATE == 0:
        out = x
    else:
        if HAS_BIAS:
            x = x + bias
        if GATE == 1:
            sp = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
            out = -tl.exp(a) * sp
        else:
            if HAS_A:
                x = tl.exp(a) * x
            out = lower_bound * tl.sigmoid(x)
    return out


@triton.jit
def apply_beta(b, SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    if SIGMOID:
        b = tl.sigmoid(b)
        if NEG_EIGVAL:
            b = b * 2.0
    return b


@triton.jit
def _gate_kernel(g, A_log, dt_bias, out, lower_bound, n_rows, HV, K,
                 BR: tl.constexpr, BK: tl.constexpr,
                 GATE: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The activated log decay of BR rows ([token, value head] pairs) of the raw gate, in float32: the
    same ``apply_gate`` the other kernels run in-register."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m = (rows < n_rows)[:, None] & (o_k < K)[None, :]
    hv = rows % HV
    p = rows.to(tl.int64)[:, None] * K + o_k[None, :]
    x = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
    a = tl.zeros([BR], dtype=tl.float32)
    if HAS_A:
        a = tl.load(A_log + hv, mask=rows < n_rows, other=0.0).to(tl.float32)
    bias = tl.zeros([BR, BK], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(dt_bias + hv[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out + p, apply_gate(x, a[:, None], bias, lower_bound, GATE, HAS_A, HAS_BIAS), mask=m)


@triton.jit
def _gate_chunk_kernel(g, A_log, dt_bias, chunk_info, act_out, cum_out, lower_bound, HV, K,
                       BT: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr, HAS_A: tl.constexpr,
                       HAS_BIAS: tl.constexpr, STORE_ACT: tl.constexpr):
    """One (chunk, value head, K block): the activated log decay (``apply_gate``, stored if STORE_ACT) and
    its inclusive sum over the chunk's rows, both float32 and laid out like g."""
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1)
    row0, n_rows = chunk_rows(chunk_info, i_c)
    r = tl.arange(0, BT)
    o_k = tl.program_id(2) * BK + tl.arange(0, BK)
    m = (r < n_rows)[:, None] & (o_k < K)[None, :]
    bias = load_bias(dt_bias, i_hv, K, o_k, o_k < K, BK, HAS_BIAS)
    _, bg = load_gate(g, row0, r, i_hv, o_k, m, head_a_log(A_log, i_hv, HAS_A), bias, lower_bound, HV, K,
                      GATE, HAS_A, HAS_BIAS)
    p = ((row0 + r)[:, None] * HV + i_hv) * K + o_k[None, :]
    if STORE_ACT:
        tl.store(act_out + p, bg, mask=m)
    tl.store(cum_out + p, tl.cumsum(bg, axis=0), mask=m)


def gate_cumsum_mode() -> str:
    """Where the w/u launch gets the within-chunk cumulative log decay: summed by itself (``kernel``), or
    from ``gate_chunk_prepass`` (``prepass``, ``KIMI_LINEAR_KDA_GATE_CUMSUM``)."""
    return env_choice("KIMI_LINEAR_KDA_GATE_CUMSUM", "prepass", ("prepass", "kernel"))


def gate_chunk_prepass(g, A_log, dt_bias, lower_bound, gate, chunk_info, BT, store_act):
    """The float32 activated gate (None unless ``store_act``) and its inclusive cumulative sum within each
    chunk of ``chunk_info``, from one launch over (chunk, value head, K block). The w/u kernel reads the
    sums instead of forming them twice per K block (a third of its time; H200, session 13)."""
    HV, K = g.shape[2], g.shape[3]
    cum = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    act = torch.empty_like(cum) if store_act else None
    NC = chunk_info.shape[0]
    if NC:
        d = dummy(g.device)
        # (H200, session 13, T=8K inference forward: K blocks of 64 0.98x the time of 32, 16 1.08x)
        BK = min(next_pow2(K), int(os.environ.get("KIMI_LINEAR_KDA_GATE_BK", 64)))
        _gate_chunk_kernel[(NC, HV, cdiv(K, BK))](
            g, A_log if A_log is not None else d, dt_bias if dt_bias is not None else d, chunk_info,
            act if act is not None else d, cum, float(lower_bound) if lower_bound is not None else 0.0, HV, K,
            BT=BT, BK=BK, GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
            STORE_ACT=store_act, num_warps=4,
        )
    return act, cum


def gate_once(gate: int) -> bool:
    """Whether the in-kernel gate is activated once, by ``activate_gate``, for all chunk-local kernels
    (``KIMI_LINEAR_KDA_GATE_PASS=once``, the default) rather than in-register by each of them (``fused``).
    The backward's pass 2 always activates it itself: it needs the activation's derivative."""
    mode = env_choice("KIMI_LINEAR_KDA_GATE_PASS", "once", ("once", "fused"))  # (checked even when unused)
    return gate != 0 and mode == "once"


def activate_gate(g, A_log, dt_bias, lower_bound, gate):
    """The activated log decay of the raw gate g ([B, T, HV, K]) as a float32 tensor of g's shape."""
    B, T, HV, K = g.shape
    out = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    n_rows = B * T * HV
    if n_rows == 0:
        return out
    d = dummy(g.device)
    BK = next_pow2(K)
    BR = max(1, 4096 // BK)
    _gate_kernel[(cdiv(n_rows, BR),)](
        g, A_log if A_log is not None else d, dt_bias if dt_bias is not None else d, out,
        float(lower_bound) if lower_bound is not None else 0.0, n_rows, HV, K, BR=BR, BK=BK,
        GATE=gate, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None, num_warps=4,
    )
    return out


@triton.jit
def _qk_norms_kernel(q, k, out, n_rows, K, BR: tl.constexpr, BK: tl.constexpr):
    """L2-norm factors (``l2_norm_factor``) of BR rows ([token, head] pairs) of q and k, float32,
    stored as out[row] = (q factor, k factor)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_r = rows < n_rows
    m = m_r[:, None] & (o_k < K)[None, :]
    p = rows.to(tl.int64)[:, None] * K + o_k[None, :]
    bq = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
    bk = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
    tl.store(out + rows.to(tl.int64) * 2, l2_norm_factor(tl.sum(bq * bq, axis=1)), mask=m_r)
    tl.store(out + rows.to(tl.int64) * 2 + 1, l2_norm_factor(tl.sum(bk * bk, axis=1)), mask=m_r)


def gate_prepass(g, A_log, dt_bias, lower_bound, gate, given=None):
    """The float32 activated gate the chunk-local launches read when ``gate_once(gate)``: ``given`` (the
    same computed earlier, e.g. kept by the forward) or ``activate_gate``'s now; None otherwise (the
    kernels then activate the raw gate themselves)."""
    if not gate_once(gate):
        return None
    return given if given is not None else activate_gate(g, A_log, dt_bias, lower_bound, gate)


def norm_prepass(q, k, l2norm, given=None):
    """The float32 L2-norm factors the forward's chunk-local launches read when the norm runs in-kernel
    and ``norm_once()``: ``given`` (computed earlier) or ``qk_norms``' now; None otherwise."""
    if not norm_once() or not l2norm:  # (the switch checked even when unused)
        return None
    return given if given is not None else qk_norms(q, k)


def norm_once() -> bool:
    """Whether the in-kernel L2 norm's factors are computed once, by ``qk_norms``, for the forward's
    chunk-local launches (``KIMI_LINEAR_KDA_NORM_PASS=once``, the default) rather than by each of them
    (``fused``)."""
    return env_choice("KIMI_LINEAR_KDA_NORM_PASS", "once", ("once", "fused")) == "once"


def qk_norms(q, k):
    """The L2-norm factors of q and k ([B, T, H, K]) as a float32 [B, T, H, 2] tensor."""
    B, T, H, K = q.shape
    out = torch.empty(B, T, H, 2, device=q.device, dtype=torch.float32)
    n_rows = B * T * H
    if n_rows:
        BK = next_pow2(K)
        BR = max(1, 2048 // BK)
        _qk_norms_kernel[(cdiv(n_rows, BR),)](q, k, out, n_rows, K, BR=BR, BK=BK, num_warps=4)
    return out
