"""Layers against independent references: short conv, norms, MoE routing and experts, KDA, MLA forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.layers import (
    GatedRMSNorm, KimiDeltaAttention, MultiHeadLatentAttention, RMSNorm, ShortConvolution, SparseMoE,
)
from kimi_linear.layers.moe import GroupedExperts
from model_utils import rel_err


def test_short_conv_matches_formula_and_decode_matches_prefill():
    torch.manual_seed(0)
    B, T, C, W = 2, 9, 6, 4
    conv = ShortConvolution(C, W).double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    y = conv(x)
    # y_t[c] = silu(sum_i w[c,0,i] x_{t-W+1+i}[c]), zeros before the start
    xp = F.pad(x, (0, 0, W - 1, 0))
    ref = torch.stack([(xp[:, t:t + W] * conv.weight[:, 0].T).sum(1) for t in range(T)], 1)
    torch.testing.assert_close(y, F.silu(ref), rtol=1e-12, atol=1e-12)
    # prefill 5 then three steps of 1 and one of 1 with the state, equals the full sequence
    state = torch.zeros(B, C, W, dtype=torch.float64)
    parts = [conv(x[:, :5], state)] + [conv(x[:, t:t + 1], state) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[:, -W:].transpose(1, 2))  # the last W pre-conv inputs


def test_rmsnorm_and_gated_norm():
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-5).double()
    gated = GatedRMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gated.weight.uniform_(0.5, 1.5)
    xhat = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), norm.weight * xhat)
    torch.testing.assert_close(gated(x, g), gated.weight * xhat * torch.sigmoid(g))  # sigmoid gate, not SiLU


def _moe(biased=False, groups=1, topk_group=1):
    torch.manual_seed(0)
    moe = SparseMoE(32, 24, num_experts=8, top_k=3, num_expert_group=groups, topk_group=topk_group,
                    routed_scaling_factor=2.446, biased_router_weights=biased).double()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
        for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            w.normal_(0, 0.2)
    return moe


def _moe_reference(moe: SparseMoE, x: torch.Tensor, biased: bool, groups: int = 1, topk_group: int = 1):
    """Token-by-token loop, written from architecture.md section 5."""
    out = torch.zeros_like(x)
    g = moe.gate
    for n in range(x.shape[0]):
        s = torch.sigmoid(g.weight @ x[n])
        sb = s + g.e_score_correction_bias
        per = sb.view(groups, -1)
        gscore = per.topk(2, dim=-1).values.sum(-1)
        allowed = torch.zeros(groups, dtype=torch.bool)
        allowed[gscore.topk(topk_group).indices] = True
        masked = per.masked_fill(~allowed[:, None], float("-inf")).view(-1)
        ids = masked.topk(g.top_k).indices
        w = (sb if biased else s)[ids]
        w = w / (w.sum() + 1e-20) * g.routed_scaling_factor
        for wi, e in zip(w, ids):
            h = F.silu(moe.experts.w1[e] @ x[n]) * (moe.experts.w3[e] @ x[n])
            out[n] += wi * (moe.experts.w2[e] @ h)
    return out + moe.shared_experts(x)


@pytest.mark.parametrize("biased", [False, True])
def test_moe_matches_token_loop_reference(biased):
    moe = _moe(biased)
    x = torch.randn(37, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _moe_reference(moe, x, biased), rtol=1e-10, atol=1e-10)


def test_moe_biased_flag_changes_weights_not_selection():
    unbiased, biased = _moe(False), _moe(True)
    x = torch.randn(20, 32, dtype=torch.float64)
    with torch.no_grad():
        w0, i0 = unbiased.gate(x)
        w1, i1 = biased.gate(x)
    assert torch.equal(i0.sort(-1).values, i1.sort(-1).values)
    assert (w0 - w1).abs().max() > 1e-3  # non-zero bias: the two rules weigh experts differently


def test_moe_group_limited_routing():
    moe = _moe(False, groups=4, topk_group=2)
    x = torch.randn(25, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _moe_reference(moe, x, False, 4, 2), rtol=1e-10, atol=1e-10)
        _, ids = moe.gate(x)
    assert max(len(set((row // 2).tolist())) for row in ids) <= 2  # at most topk_group groups used


def test_grouped_mm_and_loop_paths_agree():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 32, 16)
    x = torch.randn(50, 32)
    counts = torch.tensor([10, 0, 5, 20, 0, 0, 15, 0])
    with torch.no_grad():
        fast = experts(x, counts)  # grouped matmul (no grad, fp32, aligned): torch._grouped_mm if present
    slow = experts(x, counts).detach()  # grad enabled -> per-expert loop
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    start = 0
    for e, n in enumerate(counts.tolist()):
        xs = x[start:start + n]
        ref = (F.silu(xs @ experts.w1[e].T) * (xs @ experts.w3[e].T)) @ experts.w2[e].T
        torch.testing.assert_close(slow[start:start + n], ref.detach(), rtol=1e-5, atol=1e-6)
        start += n


def _kda_layer(lower_bound=None):
    torch.manual_seed(0)
    layer = KimiDeltaAttention(48, num_heads=3, head_dim=16, gate_lower_bound=lower_bound).eval()
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_kda_layer_state_continuation_and_kernel_choice(lower_bound):
    layer = _kda_layer(lower_bound)
    B, T = 2, 80
    x = torch.randn(B, T, 48)
    with torch.no_grad():
        full_chunk = layer(x)  # T > 64: chunked operator
        conv = torch.zeros(B, 3 * 48, 4)
        rec = torch.zeros(B, 3, 16, 16)
        a = layer(x[:, :50], conv, rec)  # recurrent operator
        b = layer(x[:, 50:70], conv, rec)
        c = torch.cat([layer(x[:, t:t + 1], conv, rec) for t in range(70, T)], 1)
    assert rel_err(torch.cat([a, b, c], 1), full_chunk) < 1e-5


def test_kda_gate_params_stay_fp32():
    layer = _kda_layer().to(torch.bfloat16)
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    assert layer.q_proj.weight.dtype == torch.bfloat16
    assert tuple(layer.A_log.shape) == (1, 1, 3, 1) and tuple(layer.dt_bias.shape) == (48,)
    with torch.device("meta"):
        meta = KimiDeltaAttention(48, 3, 16)
    meta.to(torch.bfloat16).to_empty(device="cpu")
    assert meta.A_log.dtype == torch.float32 and meta.A_log.device.type == "cpu"


def _mla(dtype=torch.float64):
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(48, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                   v_head_dim=16).to(dtype)
    with torch.no_grad():
        mla.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return mla


def test_mla_scale_and_eps():
    mla = _mla()
    assert mla.scale == pytest.approx(24 ** -0.5) and mla.kv_a_layernorm.eps == 1e-6
    full = MultiHeadLatentAttention(2304, 32)
    assert full.scale == pytest.approx(192 ** -0.5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mla_absorbed_equals_expanded(dtype, tol):
    mla = _mla(dtype)
    B, T = 2, 11
    x = torch.randn(B, T, 48, dtype=dtype)
    with torch.no_grad():
        expanded = mla(x, absorb=False)
        absorbed = mla(x, absorb=True)
        assert rel_err(absorbed, expanded) < tol
        # with a latent cache: prefill 7 (expanded), then decode 4 tokens absorbed, against the full forward
        lat, kpe = torch.zeros(B, T, 32, dtype=dtype), torch.zeros(B, T, 8, dtype=dtype)
        pre = mla(x[:, :7], lat, kpe, past_len=0, absorb=False)
        steps = [mla(x[:, t:t + 1], lat, kpe, past_len=t, absorb=True) for t in range(7, T)]
        steps_exp = mla(x[:, 7:], lat, kpe, past_len=7, absorb=False)
    assert rel_err(torch.cat([pre, *steps], 1), expanded) < tol
    assert rel_err(steps_exp, expanded[:, 7:]) < tol


def test_mla_cache_errors():
    mla = _mla()
    x = torch.randn(1, 5, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="latent cache holds 4 positions, need 5"):
        mla(x, torch.zeros(1, 4, 32, dtype=torch.float64), torch.zeros(1, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="past_len > 0 needs"):
        mla(x, past_len=3)
