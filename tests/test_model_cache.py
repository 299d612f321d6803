"""Prefill N tokens then decode M through the cache == one forward over N+M tokens."""

from __future__ import annotations

import pytest
import torch

from model_utils import rel_err, tiny_model

TOL = 1e-5  # float32; the two paths differ in KDA kernel (chunk vs recurrent) and MLA form (expanded vs absorbed)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.mark.parametrize("N, M, step", [(20, 12, 1), (70, 9, 1), (33, 16, 5)])
def test_prefill_then_decode_equals_full_forward(model, N, M, step):
    torch.manual_seed(N)
    ids = torch.randint(0, 255, (3, N + M))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, capacity=8)  # small on purpose: the MLA latent store must grow
        parts = [model(ids[:, :N], cache=cache).logits]
        for t in range(N, N + M, step):
            parts.append(model(ids[:, t:t + step], cache=cache).logits)
    assert cache.seq_len == N + M and cache.capacity >= N + M
    assert rel_err(torch.cat(parts, 1), full) < TOL


def test_absorbed_and_expanded_decode_agree(model):
    ids = torch.randint(0, 255, (2, 30), generator=torch.Generator().manual_seed(5))
    outs = {}
    with torch.no_grad():
        for absorb in (True, False):
            cache = model.new_cache(2)
            model(ids[:, :20], cache=cache)
            outs[absorb] = torch.cat([model(ids[:, t:t + 1], cache=cache, absorb=absorb).logits for t in range(20, 30)], 1)
    assert rel_err(outs[True], outs[False]) < TOL


def test_cache_layout_and_select(model):
    cfg = model.config
    cache = model.new_cache(3)
    assert set(cache.conv_states) == set(cfg.kda_layers) and set(cache.latents) == set(cfg.mla_layers)
    C = cfg.kda_num_heads * cfg.kda_head_dim
    assert cache.conv_states[0].shape == (3, 3 * C, 4)
    assert cache.recurrent_states[0].shape == (3, cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_head_dim)
    assert cache.recurrent_states[0].dtype == torch.float32
    assert cache.latents[3].shape[2] == cfg.kv_lora_rank and cache.k_pe[3].shape[2] == cfg.qk_rope_head_dim
    ids = torch.randint(0, 255, (3, 15), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        sub = cache.select([2, 0])
        a = torch.cat([model(ids[[2, 0], t:t + 1], cache=sub).logits for t in range(10, 15)], 1)
        b = model(ids[[2, 0]]).logits[:, 10:]
    assert rel_err(a, b) < TOL
    with pytest.raises(ValueError, match="cache holds 2 sequences but the input has 3"):
        model(ids[:, :1], cache=sub)


def test_loss_is_shifted_cross_entropy_and_trains(model):
    ids = torch.randint(0, 255, (2, 16), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    model.train()
    try:
        model(ids, labels=labels).loss.backward()
    finally:
        model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if "experts" not in n)  # every dense weight gets a gradient
    model.zero_grad(set_to_none=True)
