"""Bad input to the KDA operator raises an error that names the argument, before any arithmetic."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops import chunk_kda, fused_recurrent_kda

from kda_utils import make_inputs


def base(**over):
    x = make_inputs(B=2, T=10, H=2, K=8, V=8, seed=0)
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, initial_state=x.initial_state, A_log=x.A_log,
                dt_bias=x.dt_bias, **x.kwargs)
    args.update(over)
    return args


def varlen_base(cu, **over):
    x = make_inputs(B=1, T=10, H=2, K=8, V=8, seed=0, cu_seqlens=[0, 4, 10])
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, A_log=x.A_log, dt_bias=x.dt_bias, **x.kwargs)
    args["cu_seqlens"] = cu
    args.update(over)
    return args


def call(fn, args):
    args = dict(args)
    q, k, v, g, beta = (args.pop(n) for n in ("q", "k", "v", "g", "beta"))
    return fn(q, k, v, g, beta, **args)


FN = [chunk_kda, fused_recurrent_kda]


@pytest.mark.parametrize("fn", FN)
@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(q=torch.randn(2, 10, 2)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(2, 10, 2, 9)), ValueError, "k must have q's shape"),
        (dict(v=torch.randn(2, 11, 2, 8)), ValueError, "v must be [B, T, HV, V]"),
        (dict(v=torch.randn(2, 10, 3, 8)), ValueError, "multiple of q's"),
        (dict(g=torch.randn(2, 10, 2, 7)), ValueError, "g must be [B, T, HV, K]"),
        (dict(beta=torch.randn(2, 10, 2, 1)), ValueError, "beta must be [B, T, HV]"),
        (dict(q=torch.randint(0, 3, (2, 10, 2, 8))), TypeError, "q must be a floating-point"),
        (dict(k=torch.randn(2, 10, 2, 8, dtype=torch.float64)), TypeError, "q and k must share a dtype"),
        (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
        (dict(scale="big"), TypeError, "scale must be a float"),
        (dict(initial_state=torch.randn(2, 2, 8, 8, dtype=torch.float64)), TypeError, "initial_state must be float32"),
        (dict(initial_state=torch.randn(3, 2, 8, 8)), ValueError, "initial_state must be [N, HV, K, V]"),
        (dict(A_log=None), ValueError, "needs A_log"),
        (dict(A_log=torch.randn(3)), ValueError, "A_log must hold HV=2"),
        (dict(dt_bias=torch.randn(8)), ValueError, "dt_bias must hold HV*K=16"),
        (dict(lower_bound=-6.0), ValueError, "lower_bound must be a number in [-5, 0)"),
        (dict(lower_bound=0.0), ValueError, "lower_bound must be a number in [-5, 0)"),
        (dict(use_gate_in_kernel=False), ValueError, "A_log, dt_bias given but use_gate_in_kernel=False"),
        (dict(chunk_size=48), ValueError, "chunk_size must be one of"),
        (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, "batch size must be 1"),
        (dict(allow_neg_eigval=True, use_beta_sigmoid_in_kernel=False), ValueError, "allow_neg_eigval"),
    ],
)
def test_bad_arguments_are_named(fn, over, exc, words):
    with pytest.raises(exc) as info:
        call(fn, base(**over))
    assert words in str(info.value)


@pytest.mark.parametrize("fn", FN)
@pytest.mark.parametrize(
    "cu, exc, words",
    [
        (torch.tensor([1, 4, 10]), ValueError, "must start at 0"),
        (torch.tensor([0, 6, 4, 10]), ValueError, "non-decreasing"),
        (torch.tensor([0, 4, 9]), ValueError, "must end at T=10"),
        (torch.tensor([0.0, 4.0, 10.0]), TypeError, "cu_seqlens must be"),
        (torch.tensor([[0, 4, 10]]), ValueError, "1-D"),
        ([0, 4, 10], TypeError, "cu_seqlens must be a torch.Tensor"),
    ],
)
def test_bad_cu_seqlens(fn, cu, exc, words):
    with pytest.raises(exc) as info:
        call(fn, varlen_base(cu))
    assert words in str(info.value)


def test_cu_seqlens_cpu_copy_is_checked_and_used():
    with pytest.raises(ValueError, match="cu_seqlens_cpu must have cu_seqlens' shape"):
        call(chunk_kda, varlen_base(torch.tensor([0, 4, 10]), cu_seqlens_cpu=torch.tensor([0, 10])))
    with pytest.raises(ValueError, match="must start at 0"):  # the checks read the CPU copy
        call(chunk_kda, varlen_base(torch.tensor([0, 4, 10]), cu_seqlens_cpu=torch.tensor([1, 4, 10])))


def test_checks_hand_the_host_offsets_on():
    """The checks' host copy of cu_seqlens (or the caller's cu_seqlens_cpu, read instead of the device
    tensor) travels in the shapes, so the GPU path builds its chunk layout without a second copy."""
    from kimi_linear.ops.kda.checks import check_kda_inputs

    a = varlen_base(torch.tensor([0, 4, 10]))
    args = (a["q"], a["k"], a["v"], a["g"], a["beta"], None, None, a["cu_seqlens"], True, a["A_log"], a["dt_bias"], None)
    assert check_kda_inputs(*args).cu == (0, 4, 10)
    # (the device tensor is not read when the CPU copy is given: these offsets are wrong on purpose)
    wrong = args[:7] + (torch.tensor([0, 9, 10]),) + args[8:]
    shapes = check_kda_inputs(*wrong, cu_seqlens_cpu=torch.tensor([0, 4, 10]))
    assert shapes.cu == (0, 4, 10) and shapes.N == 2
    assert check_kda_inputs(*args[:7], None, *args[8:]).cu is None


def test_varlen_chunk_layout_from_host_offsets_and_cached():
    """The chunk layout comes from the shapes' host offsets (cu_seqlens itself is not read then), equals
    the one built from cu_seqlens, and is built once per offsets and chunk length."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.triton import chunk_fwd

    cu = (0, 1, 33, 100)
    with_host = KDAShapes(B=1, T=100, H=1, HV=1, K=8, V=8, N=3, cu=cu)
    without = KDAShapes(B=1, T=100, H=1, HV=1, K=8, V=8, N=3)
    chunk_fwd._LAYOUTS.clear()
    info, seq = chunk_fwd.chunk_layout(with_host, torch.tensor([0, 50, 60, 100]), 32, "cpu")
    # (chunks per sequence: 1, 1, 3; then the order the recurrence's programs take them: longest first)
    assert seq.tolist() == [0, 1, 2, 5, 2, 0, 1]
    assert info.tolist() == [[0, 1], [1, 32], [33, 32], [65, 32], [97, 3]]  # (first token, rows)
    chunk_fwd._LAYOUTS.clear()
    info2, seq2 = chunk_fwd.chunk_layout(without, torch.tensor(cu), 32, "cpu")
    assert torch.equal(info, info2) and torch.equal(seq, seq2)
    again = chunk_fwd.chunk_layout(with_host, torch.tensor(cu), 32, "cpu")
    assert again[0] is info2 and again[1] is seq2  # (cached by the offsets' values)
    assert chunk_fwd.chunk_layout(with_host, torch.tensor(cu), 16, "cpu")[0] is not info2


def test_varlen_program_order(monkeypatch):
    """Varlen batches run their sequences' programs longest first (ties in batch order); equal lengths,
    one sequence and ``KIMI_LINEAR_KDA_SEQ_ORDER=given`` keep the plain offsets."""
    from kimi_linear.ops.kda.checks import KDAShapes
    from kimi_linear.ops.kda.triton import chunk_fwd

    def seq_of(cu):
        shapes = KDAShapes(B=1, T=cu[-1], H=1, HV=1, K=8, V=8, N=len(cu) - 1, cu=tuple(cu))
        return chunk_fwd.chunk_layout(shapes, torch.tensor(cu), 16, "cpu")[1].tolist()

    assert seq_of([0, 16, 80, 96, 150]) == [0, 1, 5, 6, 10, 1, 3, 0, 2]
    assert seq_of([0, 16, 32]) == [0, 1, 2]
    assert seq_of([0, 100]) == [0, 7]
    monkeypatch.setenv("KIMI_LINEAR_KDA_SEQ_ORDER", "given")
    assert seq_of([0, 16, 80, 96, 150]) == [0, 1, 5, 6, 10]
    monkeypatch.setenv("KIMI_LINEAR_KDA_SEQ_ORDER", "shortest")
    with pytest.raises(ValueError, match="KIMI_LINEAR_KDA_SEQ_ORDER"):
        seq_of([0, 16, 80, 96, 150])


def test_varlen_initial_state_must_have_one_row_per_sequence():
    with pytest.raises(ValueError, match=r"initial_state must be \[N, HV, K, V\] = \[2, 2, 8, 8\]"):
        call(chunk_kda, varlen_base(torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 8, 8)))


def test_state_pool_errors():
    args = base(initial_state=torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="ssm_state_indices must be"):
        call(fused_recurrent_kda, dict(args, ssm_state_indices=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="pool has 4 slots"):
        call(fused_recurrent_kda, dict(args, ssm_state_indices=torch.tensor([0, 4])))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        call(fused_recurrent_kda, dict(args, ssm_state_indices=torch.tensor([-1, 2])))
    with pytest.raises(ValueError, match="inplace_final_state=True needs initial_state"):
        call(fused_recurrent_kda, base(initial_state=None, inplace_final_state=True))
    with pytest.raises(ValueError, match="out must be a tensor of shape"):
        call(fused_recurrent_kda, base(out=torch.empty(2, 10, 2, 7)))


def test_context_parallel_is_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="cp_context"):
        call(chunk_kda, base(cp_context=object()))
    with pytest.raises(NotImplementedError, match="use_graph=True"):
        call(chunk_kda, base(use_graph=True))


def test_16_bit_state_only_for_decode():
    """fused_recurrent_kda takes a 16-bit state pool (as fla's does); chunk_kda keeps float32 states."""
    with pytest.raises(TypeError, match="initial_state must be float32"):
        call(chunk_kda, base(initial_state=torch.randn(2, 2, 8, 8, dtype=torch.bfloat16)))
    o, s = call(fused_recurrent_kda, base(initial_state=torch.randn(2, 2, 8, 8, dtype=torch.bfloat16)))
    assert s.dtype == torch.float32


@pytest.mark.parametrize("fn", FN)
def test_state_layout_named_twice_is_refused(fn):
    with pytest.raises(ValueError, match="state_v_first or its deprecated name"):
        call(fn, base(state_v_first=True, transpose_state_layout=True))


def test_forcing_triton_on_unsupported_inputs_is_refused(monkeypatch):
    monkeypatch.setenv("KIMI_LINEAR_KDA_BACKEND", "triton")
    x = make_inputs(B=1, T=4, H=1, K=8, V=8, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton kernels take"):
        x.call(chunk_kda)
    x = make_inputs(B=1, T=2, H=1, K=260, V=8, seed=0)
    with pytest.raises(ValueError, match="K=260"):
        x.call(fused_recurrent_kda)
