"""Checkpoint I/O: bit-exact round trip, lazy typed loading, clear errors, Auto registration, 48B counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_linear.models import (
    KimiLinearConfig, KimiLinearForCausalLM, KimiLinearModel, register_auto_classes, unregister_auto_classes,
)
from kimi_linear.models.kimi_linear.checkpoint import CheckpointError, official_tensors
from model_utils import tiny_model

OFFICIAL = Path(__file__).parent / "data" / "kimi_linear_48b_a3b_config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(seed=8)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, max_shard_bytes=100_000)
    return model, path


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_save_load_round_trip_is_bit_exact(saved, tmp_path):
    model, path = saved
    loaded = KimiLinearForCausalLM.from_pretrained(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and saving the loaded model gives the same files' contents
    loaded.save_pretrained(tmp_path / "again", max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index2 = json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())
    assert index == index2
    for file in set(index["weight_map"].values()):
        x, y = load_file(path / file), load_file(tmp_path / "again" / file)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_official_names_count_and_fp32_gate_params(saved):
    model, path = saved
    names = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(official_tensors(model))
    cfg = model.config
    n_kda, n_mla, n_moe = len(cfg.kda_layers), len(cfg.mla_layers), cfg.num_hidden_layers - 1
    assert len(names) == 15 * n_kda + 5 * n_mla + n_moe * (2 + 3 * cfg.num_experts + 3) + 3 + 2 * cfg.num_hidden_layers + 3
    bf16 = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    attn = bf16.model.layers[0].self_attn
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(attn.A_log, model.model.layers[0].self_attn.A_log)  # not rounded through bf16
    base = KimiLinearModel.from_pretrained(path)
    assert torch.equal(base.norm.weight, model.model.norm.weight)


def test_missing_shard_file(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(CheckpointError, match="shard files named in the index are missing"):
        KimiLinearForCausalLM.from_pretrained(path)


def test_truncated_shard(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: .*100 missing"):
        KimiLinearForCausalLM.from_pretrained(path)


def _edit_tensor_files(path: Path, edits: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or delete (None) named tensors in whichever shards hold them; keep the index in step."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    for name, value in edits.items():
        file = wm.get(name, sorted(set(wm.values()))[0])
        tensors = load_file(path / file)
        if value is None:
            del tensors[name], wm[name]
        else:
            tensors[name] = value
            wm[name] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_wrong_shape_missing_and_unexpected_tensors_are_listed(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    _edit_tensor_files(path, {
        "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(7, 7),
        "model.layers.3.self_attn.o_proj.weight": None,
        "model.layers.3.self_attn.rotary_emb.inv_freq": torch.zeros(4),
    })
    with pytest.raises(CheckpointError) as err:
        KimiLinearForCausalLM.from_pretrained(path)
    msg = str(err.value)
    assert "missing tensors (1):\n    model.layers.3.self_attn.o_proj.weight" in msg
    assert "unexpected tensors (1):\n    model.layers.3.self_attn.rotary_emb.inv_freq" in msg
    assert "model.layers.3.self_attn.kv_b_proj.weight: checkpoint [7, 7], model [" in msg


def test_unknown_model_type_and_missing_files(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        KimiLinearForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "nowhere")
    path2 = _copy(saved[1], tmp_path / "b")
    for f in path2.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json and no model.safetensors"):
        KimiLinearForCausalLM.from_pretrained(path2)


def test_index_naming_a_tensor_absent_from_its_shard(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.norm.weight"] = first if index["weight_map"]["model.norm.weight"] != first else \
        sorted(set(index["weight_map"].values()))[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="absent from their shard"):
        KimiLinearForCausalLM.from_pretrained(path)


def test_transformers_auto_classes(saved):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model, path = saved
    shadowed = register_auto_classes()
    try:
        assert shadowed  # transformers 5.24 has its own kimi_linear, which we replace while registered
        assert type(AutoConfig.from_pretrained(path)) is KimiLinearConfig
        auto = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert type(auto) is KimiLinearForCausalLM
        assert torch.equal(auto.lm_head.weight, model.lm_head.weight)
        assert type(AutoModel.from_pretrained(path)) is KimiLinearModel
    finally:
        unregister_auto_classes()
    assert type(AutoConfig.from_pretrained(path)).__module__.startswith("transformers.")


def test_48b_parameter_count_on_meta():
    cfg = KimiLinearConfig.from_json_file(OFFICIAL)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    assert model.num_parameters() == 49_122_681_728
    assert len(official_tensors(model)) == 20_493
    layers = model.model.layers
    assert [i for i, l in enumerate(layers) if l.is_kda] == cfg.kda_layers
    assert [i for i, l in enumerate(layers) if not l.is_kda] == [3, 7, 11, 15, 19, 23, 26]
    assert [i for i, l in enumerate(layers) if not l.is_moe] == [0]
    kda = sum(p.numel() for p in layers[0].self_attn.parameters())
    mla = sum(p.numel() for p in layers[3].self_attn.parameters())
    moe = sum(p.numel() for p in layers[1].block_sparse_moe.parameters())
    assert (kda, mla, moe) == (39_514_272, 29_114_880, 1_819_607_296)
    assert sum(p.numel() for p in layers[0].mlp.parameters()) == 63_700_992


def test_failed_save_leaves_the_existing_checkpoint_intact(tmp_path, monkeypatch):
    import kimi_linear.models.kimi_linear.checkpoint as ckpt
    from model_utils import tiny_model

    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real_save_file = ckpt.save_file

    def failing_save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    other = tiny_model(seed=1)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path, max_shard_bytes=100_000)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before, "a failed save changed the checkpoint already in the folder"
