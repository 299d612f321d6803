"""benchmarks/kda_host.py's CPU mode: the Python around the Triton launches, with the launches replaced by
no-ops. It records which kernels each call launches, so this also pins the launch sequence of the
inference forward, the training step and decode (a change that adds a launch shows up here)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
pytest.importorskip("triton")

import kda_host  # noqa: E402


def test_cpu_calls_launch_sequence_and_restore():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    before = (JITFunction.__dict__.get("__getitem__"), InterpretedFunction.__dict__.get("__getitem__"),
              os.environ.get("KIMI_LINEAR_KDA_BACKEND"))
    res = kda_host.cpu_calls(T=70, H=2, D=16, repeat=3)
    assert res["inference forward"]["launches"] == [
        "_gate_chunk_kernel", "_qk_norms_kernel", "_chunk_diag_fast_kernel", "_chunk_diag_kernel",
        "_chunk_pair_subchunk_kernel", "_chunk_wy_kernel", "_chunk_recur_kernel"]
    train = res["training forward + backward"]["launches"]
    # the forward at 64-row chunks, then the rebuild (w/u from the kept T, states), sweep, gradients, prep backward
    assert train[:7] == ["_gate_chunk_kernel", "_qk_norms_kernel", "_chunk_diag_fast_kernel", "_chunk_diag_kernel",
                         "_chunk_tree_subchunk_kernel", "_chunk_wy_kernel", "_chunk_recur_kernel"]
    assert train[7:11] == ["_chunk_wy_kernel", "_chunk_recur_kernel", "_chunk_recur_bwd_kernel",
                           "_chunk_bwd_grads_kernel"]
    assert train[-1] == "_chunk_prep_bwd_kernel" and len(train) == 16
    assert res["varlen inference forward"]["launches"] == res["inference forward"]["launches"]
    assert res["decode step, batch 64"]["launches"] == ["_recurrent_kda_kernel"]
    assert all(d["us"] > 0 for d in res.values())
    after = (JITFunction.__dict__.get("__getitem__"), InterpretedFunction.__dict__.get("__getitem__"),
             os.environ.get("KIMI_LINEAR_KDA_BACKEND"))
    assert after == before  # the launch path and the backend switch are restored
