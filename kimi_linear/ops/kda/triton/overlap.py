"""The chunk-parallel prep of one chunk range beside the sequential recurrence of the range before it.

The recurrence of one sequence runs HV * V / BV programs (128 at 32 heads of 128 with V slices of 32):
one per SM, each waiting on the latency of its own dependency chain, with the SM's other slots empty.
Cutting the sequence into chunk ranges lets the prep of range p + 1 fill those slots while the
recurrence of range p runs: the preps go one after the other on a low-priority stream, each recurrence
waits for its range's prep on a high-priority stream (so its programs get SM slots first) and starts from
the state the range before it ended with. Results are the same as one launch of each: every kernel reads
and writes the same chunks, the state is carried in float32.

Cutting into ranges repeats the prep's host work per range, and on an H100 at 8K that made the call
host-bound (session 16: 3.06 ms of host time per call against 0.90); replayed from a CUDA graph it
was 0.984x the defaults' time (session 17), since the prep kernels already fill the GPU. The streamed
mode (``KIMI_LINEAR_KDA_STREAM=1``, opt-in; it takes precedence over the ranges) needs no extra launch:
the w/u kernel runs chunk by chunk and counts each chunk it has written in a flag per (group of chunks,
head), and the recurrence, launched beside it on the high-priority stream, waits on those flags before
each group (H100, 8K inference forward: 0.97-0.99x eager, 0.95x from a CUDA graph; session 17). It
stays opt-in for that small gain: one sequence only, and a GPU tool that serializes kernels, such as
compute-sanitizer, would hang on it.
"""

from __future__ import annotations

import os

import torch

from .chunk_fwd import chunk_prep, chunk_recur, prep_buffers, recur_bv
from .utils import cdiv, env_choice, next_pow2

_STREAMS: dict = {}


def side_streams(device):
    """(prep stream, recurrence stream) of a device, made once: the recurrence's at the highest priority."""
    key = str(device)
    if key not in _STREAMS:
        lo, hi = torch.cuda.Stream.priority_range()
        _STREAMS[key] = (torch.cuda.Stream(device=device, priority=lo), torch.cuda.Stream(device=device, priority=hi))
    return _STREAMS[key]


# Off by default until timed on a card (written in session 15, when no device could be had to time it).
OVERLAP_DEFAULT = "1"


def overlap_parts(shapes, n_chunks: int, device) -> int:
    """How many chunk ranges to cut one sequence into (``KIMI_LINEAR_KDA_OVERLAP``: a number of parts, or
    ``auto``: 4 for one sequence of at least 64 chunks on a CUDA device, else 1; default
    ``OVERLAP_DEFAULT``). Several sequences fill the card with their own recurrence programs, so they are
    never cut."""
    mode = os.environ.get("KIMI_LINEAR_KDA_OVERLAP", OVERLAP_DEFAULT)
    if mode == "auto":
        parts = 4 if n_chunks >= 64 and torch.device(device).type == "cuda" else 1
    else:
        try:
            parts = int(mode)
        except ValueError:
            raise ValueError(f"KIMI_LINEAR_KDA_OVERLAP={mode!r}: expected 'auto' or a number of parts") from None
        if parts < 1:
            raise ValueError(f"KIMI_LINEAR_KDA_OVERLAP={mode!r}: the number of parts must be at least 1")
    return min(parts, n_chunks) if shapes.N == 1 else 1


# Off by default: 1-5% on one sequence's inference forward (H100, session 17) is not worth a wait that
# kernel-serializing tools turn into a hang.
STREAM_DEFAULT = "0"
STREAM_GROUP_DEFAULT = 8


class StreamPlan:
    """The w/u launch and the recurrence of one sequence side by side, with no host work between them:
    ``ready`` (int32, [groups * HV], zeroed) counts the chunks the w/u kernel has written per (group of
    ``group`` chunks, value head); ``before_wy()`` runs just before the w/u launch."""

    def __init__(self, ready, group: int, before_wy):
        self.ready, self.group, self.before_wy = ready, group, before_wy


def stream_group(shapes, n_chunks: int, device, BT: int) -> int:
    """Chunks per group of the streamed w/u + recurrence (``KIMI_LINEAR_KDA_STREAM=1``, group size
    ``KIMI_LINEAR_KDA_STREAM_GROUP``, default 8), or 0 where it does not apply: off, several sequences,
    chunks of more than 32 rows, or on a card with fewer SMs than the recurrence has programs. The
    recurrence's programs wait in place for the w/u kernel's chunks, so they must all be resident beside
    it: with at most one program per SM the w/u programs always find room (at worst on the SMs left
    over). At 64-row chunks the recurrence holds 188 KB (the forward's) or 128 KB (the rebuild's) of
    shared memory, which leaves room for one w/u program (32 KB) beside it instead of about six: forward
    + backward at 8K took 1.74x the defaults' time streamed (H100, session 17); at 32 rows it holds 72 KB.
    The streamed w/u grid puts the chunks on its second axis, which CUDA limits to 65535."""
    if (env_choice("KIMI_LINEAR_KDA_STREAM", STREAM_DEFAULT, ("0", "1")) == "0" or shapes.N != 1 or BT > 32
            or not 2 <= n_chunks <= 65535):
        return 0
    try:
        group = int(os.environ.get("KIMI_LINEAR_KDA_STREAM_GROUP", STREAM_GROUP_DEFAULT))
    except ValueError:
        group = 0
    if group < 1:
        raise ValueError(f"KIMI_LINEAR_KDA_STREAM_GROUP={os.environ.get('KIMI_LINEAR_KDA_STREAM_GROUP')!r}: "
                         "expected a number of chunks >= 1")
    if torch.device(device).type == "cuda":
        BK = max(16, next_pow2(shapes.K))
        programs = cdiv(shapes.V, recur_bv(shapes.V, shapes.HV, BK)) * shapes.HV
        if programs > torch.cuda.get_device_properties(device).multi_processor_count:
            return 0
    return min(group, n_chunks)


def run_streamed(group: int, n_chunks: int, HV: int, device, prep, recur):
    """``prep(plan)`` (its w/u launch on the caller's stream, chunk by chunk) and ``recur(plan, prep's
    result)`` on the high-priority side stream, started just before that w/u launch so that it runs beside
    it; the caller's stream then waits for both. Off CUDA (the interpreter) they run one after the other.
    Returns (prep's result, recur's result)."""
    ready = torch.zeros(cdiv(n_chunks, group) * HV, dtype=torch.int32, device=device)
    if torch.device(device).type != "cuda":
        plan = StreamPlan(ready, group, lambda: None)
        outs = prep(plan)
        return outs, recur(plan, outs)
    main = torch.cuda.current_stream(device)
    _, recur_stream = side_streams(device)
    start = torch.cuda.Event()
    plan = StreamPlan(ready, group, lambda: start.record(main))
    outs = prep(plan)
    recur_stream.wait_event(start)
    with torch.cuda.stream(recur_stream):
        result = recur(plan, outs)
    main.wait_stream(recur_stream)
    for x in result:  # (made on the side stream, used on the caller's from here)
        if isinstance(x, torch.Tensor):
            x.record_stream(main)
    return outs, result


def run_overlapped(parts: int, n_chunks: int, device, prep, recur, h0):
    """Run ``prep(a, b)`` (chunks a .. b - 1) for each of ``parts`` ranges and ``recur(p, bounds, h)`` after
    it, where ``bounds`` is a 2-element int32 device tensor (a, b) (a sequence-chunk list of the one
    sequence's range) and h the state the previous range returned (``h0`` for the first). Returns the last
    range's state. Off CUDA (the interpreter) the ranges run one after the other."""
    cuts = [n_chunks * i // parts for i in range(parts + 1)]
    # (made on the device: no host copy, so the launches stay capturable in a CUDA graph)
    bounds = (torch.arange(parts + 1, device=device) * n_chunks // parts).to(torch.int32)
    ranges = list(zip(cuts, cuts[1:]))
    h = h0
    if torch.device(device).type != "cuda":
        for p, (a, b) in enumerate(ranges):
            prep(a, b)
            h = recur(p, bounds[p:p + 2], h)
        return h
    main = torch.cuda.current_stream(device)
    prep_stream, recur_stream = side_streams(device)
    prep_stream.wait_stream(main)
    recur_stream.wait_stream(main)
    done = []
    with torch.cuda.stream(prep_stream):
        for a, b in ranges:
            prep(a, b)
            done.append(torch.cuda.Event())
            done[-1].record(prep_stream)
    with torch.cuda.stream(recur_stream):
        for p, ev in enumerate(done):
            recur_stream.wait_event(ev)
            h = recur(p, bounds[p:p + 2], h)
    # The caller's stream waits for both, so whatever it allocated stays in use until then. What the side
    # streams allocated and hand back (the state) is used on the caller's stream from here.
    main.wait_stream(prep_stream)
    main.wait_stream(recur_stream)
    if h is not None:
        h.record_stream(main)
    return h


def prep_and_recur(q, k, v, g, beta, info, seq, prep_kw, *, h0, out, store_final, store_states, t_given=None,
                   aqk=None, v_new=None, states_dtype=torch.float32):
    """``chunk_prep`` (with ``prep_kw``) then ``chunk_recur`` over the chunks of ``info``, cut into
    ``overlap_parts`` ranges run side by side where that is more than one, or with the w/u launch and the
    recurrence streamed side by side where ``stream_group`` allows (a forward at 32-row chunks or
    less). ``t_given``: T kept by the forward (the prep runs only its w/u launch); ``aqk``: an Aqk to
    use in place of the prep's. Returns (the prep's outputs, final state or None, chunk states or None)."""
    shapes, BT = prep_kw["shapes"], prep_kw["BT"]
    recur_kw = dict(shapes=shapes, out=out, BT=BT, v_new=v_new, states_dtype=states_dtype)
    NC = info.shape[0]
    group = stream_group(shapes, NC, q.device, BT)
    parts = 1 if group else overlap_parts(shapes, NC, q.device)
    if parts == 1:
        def prep_whole(plan):  # (plan: a StreamPlan, or None for one launch after the other)
            return chunk_prep(q, k, v, g, beta, info, t_given=t_given, stream_plan=plan, **prep_kw)

        def recur_whole(plan, outs):
            return chunk_recur(*outs[:4], outs[4] if aqk is None else aqk, outs[5], info, seq, initial_state=h0,
                               store_final=store_final, store_states=store_states, stream_plan=plan, **recur_kw)

        if group:
            outs, (_, ht, states) = run_streamed(group, NC, shapes.HV, q.device, prep_whole, recur_whole)
        else:
            outs = prep_whole(None)
            _, ht, states = recur_whole(None, outs)
        return outs, ht, states
    outs = prep_buffers(NC, shapes, BT, prep_kw["dtype"], pad=prep_kw["pad"], aqk_dtype=prep_kw.get("aqk_dtype"),
                        u_dtype=prep_kw.get("u_dtype"), with_aqk=t_given is None, with_t=t_given is None,
                        device=q.device)
    if t_given is not None:
        outs = (*outs[:6], t_given)
    aqk = outs[4] if aqk is None else aqk
    states = None
    if store_states:
        states = torch.empty(NC, shapes.HV, shapes.K, shapes.V, device=q.device, dtype=states_dtype)

    def prep(a, b):
        chunk_prep(q, k, v, g, beta, info[a:b], out=tuple(None if x is None else x[a:b] for x in outs),
                   t_given=None if t_given is None else t_given[a:b], **prep_kw)

    def recur(p, bounds, h):  # (every range but the last hands its final state to the next)
        return chunk_recur(*outs[:4], aqk, outs[5], info, bounds, initial_state=h, store_final=True,
                           store_states=store_states, states=states, **recur_kw)[1]

    ht = run_overlapped(parts, NC, q.device, prep, recur, h0)
    return outs, (ht if store_final else None), states
