"""The w/u launch beside the sequential recurrence of one sequence (``KIMI_LINEAR_KDA_STREAM=1``, opt-in).

The recurrence of one sequence runs HV * V / BV programs (128 at 32 heads of 128 with V slices of 32):
one per SM, each waiting on the latency of its own dependency chain, with the SM's other slots empty.
The streamed mode lets the w/u kernel fill those slots with no extra launch: it runs chunk by chunk and
counts each chunk it has written in a flag per (group of chunks, head), and the recurrence, launched beside
it on a high-priority stream, waits on those flags before each group. Results are bitwise those of one
launch after the other. H100, 8K inference forward: 0.97-0.99x the defaults' time eager, 0.95x from a CUDA
graph (session 17). It stays opt-in for that small gain: one sequence only, and a GPU tool that serializes
kernels, such as compute-sanitizer, would hang on it.

(Session 15's other mode, cutting one sequence into chunk ranges with the prep of range p + 1 beside the
recurrence of range p, ``KIMI_LINEAR_KDA_OVERLAP``, was removed in session 18: host-bound eager, 2.7x the
defaults' time at 8K on an H100, and 0.984x even from a CUDA graph, since the prep kernels already fill
the GPU. It is in the history at 08af288.)
"""

from __future__ import annotations

import os

import torch

from .chunk_fwd import chunk_prep, chunk_recur, recur_bv
from .utils import cdiv, env_choice, next_pow2

_STREAMS: dict = {}


def recur_stream(device):
    """The side stream a streamed recurrence runs on, made once per device, at the highest priority (so its
    programs get SM slots before the w/u kernel's)."""
    key = str(device)
    if key not in _STREAMS:
        _, hi = torch.cuda.Stream.priority_range()
        _STREAMS[key] = torch.cuda.Stream(device=device, priority=hi)
    return _STREAMS[key]


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
    side = recur_stream(device)
    start = torch.cuda.Event()
    plan = StreamPlan(ready, group, lambda: start.record(main))
    outs = prep(plan)
    side.wait_event(start)
    with torch.cuda.stream(side):
        result = recur(plan, outs)
    main.wait_stream(side)
    for x in result:  # (made on the side stream, used on the caller's from here)
        if isinstance(x, torch.Tensor):
            x.record_stream(main)
    return outs, result


def prep_and_recur(q, k, v, g, beta, info, seq, prep_kw, *, h0, out, store_final, store_states, t_given=None,
                   aqk=None, v_new=None, states_dtype=torch.float32):
    """``chunk_prep`` (with ``prep_kw``) then ``chunk_recur`` over the chunks of ``info``, one after the
    other, or with the w/u launch and the recurrence streamed side by side where ``stream_group`` allows (a
    forward at 32-row chunks or less). ``t_given``: T kept by the forward (the prep runs only its w/u
    launch); ``aqk``: an Aqk to use in place of the prep's. Returns (the prep's outputs, final state or
    None, chunk states or None)."""
    shapes, BT = prep_kw["shapes"], prep_kw["BT"]
    recur_kw = dict(shapes=shapes, out=out, BT=BT, v_new=v_new, states_dtype=states_dtype)
    NC = info.shape[0]
    group = stream_group(shapes, NC, q.device, BT)

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
