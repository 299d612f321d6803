"""KimiLinearConfig: the official config.json round-trips; layer maps; validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimi_linear.models import KimiLinearConfig

OFFICIAL = Path(__file__).parent / "data" / "kimi_linear_48b_a3b_config.json"

KDA_0BASED = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25]
MLA_0BASED = [3, 7, 11, 15, 19, 23, 26]


def test_official_config_reads_every_key():
    cfg = KimiLinearConfig.from_json_file(OFFICIAL)
    assert cfg.num_experts == 256 and cfg.num_experts_per_token == 8 and cfg.moe_renormalize is True
    assert cfg.routed_scaling_factor == 2.446 and cfg.first_k_dense_replace == 1 and cfg.mla_use_nope is True
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (163584, 163586, 163839)
    assert cfg.tie_word_embeddings is False
    assert cfg.kda_num_heads == 32 and cfg.kda_head_dim == 128 and cfg.kda_conv_kernel_size == 4
    assert cfg.gate_lower_bound is None and cfg.moe_biased_router_weights is False


def test_official_config_writes_back_unchanged(tmp_path):
    original = json.loads(OFFICIAL.read_text())
    cfg = KimiLinearConfig.from_json_file(OFFICIAL)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == original
    # and again, through transformers' own from_pretrained path
    again = KimiLinearConfig.from_pretrained(tmp_path)
    assert again.to_dict() == original


def test_48b_layer_maps_match_spec():
    cfg = KimiLinearConfig.from_json_file(OFFICIAL)
    assert cfg.kda_layers == KDA_0BASED and cfg.mla_layers == MLA_0BASED
    assert len(cfg.kda_layers) == 20 and len(cfg.mla_layers) == 7
    assert cfg.ffn_types == ["dense"] + ["moe"] * 26
    assert cfg.mixer_types[:8] == ["kda", "kda", "kda", "mla"] * 2 and cfg.mixer_types[24:] == ["kda", "kda", "mla"]


def test_optional_lower_bound_is_written_only_when_set(tmp_path):
    cfg = KimiLinearConfig.tiny(gate_lower_bound=-5.0)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["gate_lower_bound"] == -5.0
    assert KimiLinearConfig.from_json_file(tmp_path / "config.json").gate_lower_bound == -5.0
    assert "gate_lower_bound" not in KimiLinearConfig.tiny().to_dict()


@pytest.mark.parametrize(
    "lac, message",
    [
        ({"kda_layers": [0, 1, 2], "full_attn_layers": [3, 4], "num_heads": 2, "head_dim": 8}, "1-based"),
        ({"kda_layers": [1, 2, 3], "full_attn_layers": [3, 4], "num_heads": 2, "head_dim": 8}, "exactly once"),
        ({"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 8}, "missing 'num_heads'"),
    ],
)
def test_bad_layer_lists_are_rejected(lac, message):
    with pytest.raises(ValueError, match=message):
        KimiLinearConfig.tiny(num_hidden_layers=4, linear_attn_config=lac)


def test_other_invalid_fields_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="gate_lower_bound"):
        KimiLinearConfig.tiny(gate_lower_bound=0.5)
    with pytest.raises(ValueError, match="q_lora_rank"):
        KimiLinearConfig.tiny(q_lora_rank=64)
    bad = json.loads(OFFICIAL.read_text())
    bad["model_type"] = "deepseek_v3"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="model_type is 'deepseek_v3'"):
        KimiLinearConfig.from_json_file(tmp_path / "config.json")
