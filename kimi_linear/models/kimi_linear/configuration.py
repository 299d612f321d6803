"""KimiLinearConfig: reads the official ``config.json`` of Kimi-Linear-48B-A3B as published and writes
it back with the same keys and values.

It subclasses transformers' ``PreTrainedConfig`` so it can be registered with the Auto classes, but it
keeps the checkpoint's own key names (``num_experts``, ``num_experts_per_token``, ``moe_renormalize``,
``linear_attn_config`` with 1-based layer lists, ...) as the source of truth. Derived, 0-based views
(``kda_layers``, ``mla_layers``, ``is_moe_layer``) are computed, never stored.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from transformers import PretrainedConfig

MODEL_TYPE = "kimi_linear"

# Keys this class owns, with the 48B-A3B values as defaults (architecture.md section 1).
_DEFAULTS: dict[str, Any] = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "intermediate_size": 9216,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 72,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "model_max_length": 1048576,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "head_dim": 128,
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32,
        "short_conv_kernel_size": 4,
    },
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "use_cache": True,
}
# Written only when set (absent from the 48B checkpoint's config).
_OPTIONAL_KEYS = ("gate_lower_bound", "moe_biased_router_weights")
# Unused by the math (NoPE) and intercepted by transformers' base class (rope_scaling is a deprecated
# property there): kept aside verbatim so they are written back unchanged.
_PASSTHROUGH_KEYS = ("rope_theta", "rope_scaling")
# Keys transformers' base class manages; written back only if they came in.
_BASE_KEYS = ("dtype", "torch_dtype", "transformers_version", "model_type")


class KimiLinearConfig(PretrainedConfig):
    """Configuration of Kimi Linear. Defaults are the 48B-A3B checkpoint's values.

    Extra, optional fields (not in the 48B config):
        gate_lower_bound: float in [-5, 0) selects the bounded KDA gate of newer checkpoints
            (``lower_bound * sigmoid(exp(A_log) * (a + dt_bias))``); None is the softplus gate.
        moe_biased_router_weights: reproduce the shipped remote code's router weights (score + bias);
            False (default) uses the unbiased scores like vLLM and transformers.
    """

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        given = set(kwargs)
        values = copy.deepcopy(_DEFAULTS)
        for key in list(kwargs):
            if key in values:
                values[key] = kwargs.pop(key)
        self._passthrough = {key: values.pop(key) for key in _PASSTHROUGH_KEYS}
        for key, value in values.items():
            if key not in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "architectures"):
                setattr(self, key, value)
        self.gate_lower_bound = kwargs.pop("gate_lower_bound", None)
        self.moe_biased_router_weights = bool(kwargs.pop("moe_biased_router_weights", False))
        # Remember which optional/base keys were present so the file is written back unchanged.
        self._keys_given = sorted(given & set(_BASE_KEYS))
        self._transformers_version_in = kwargs.get("transformers_version")
        super().__init__(
            bos_token_id=values["bos_token_id"],
            eos_token_id=values["eos_token_id"],
            pad_token_id=values["pad_token_id"],
            tie_word_embeddings=values["tie_word_embeddings"],
            architectures=values["architectures"],
            **kwargs,
        )
        self.tie_word_embeddings = values["tie_word_embeddings"]
        self._validate()

    # ------------------------------------------------------------------------------------------
    # Derived views
    @property
    def kda_layers(self) -> list[int]:
        """0-based indices of the KDA layers (the file lists them 1-based)."""
        return sorted(i - 1 for i in self.linear_attn_config.get("kda_layers", []))

    @property
    def mla_layers(self) -> list[int]:
        """0-based indices of the MLA (full attention) layers."""
        return sorted(i - 1 for i in self.linear_attn_config.get("full_attn_layers", []))

    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def kda_conv_kernel_size(self) -> int:
        return int(self.linear_attn_config.get("short_conv_kernel_size", 4))

    def is_kda_layer(self, layer_idx: int) -> bool:
        return (layer_idx + 1) in self.linear_attn_config["kda_layers"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def mixer_types(self) -> list[str]:
        return ["kda" if self.is_kda_layer(i) else "mla" for i in range(self.num_hidden_layers)]

    @property
    def ffn_types(self) -> list[str]:
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    # ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        n = self.num_hidden_layers
        lac = self.linear_attn_config
        if not isinstance(lac, dict):
            raise TypeError(f"linear_attn_config must be a dict, got {type(lac).__name__}")
        for key in ("kda_layers", "full_attn_layers", "num_heads", "head_dim"):
            if key not in lac:
                raise ValueError(f"linear_attn_config is missing '{key}'")
        kda, full = list(lac["kda_layers"]), list(lac["full_attn_layers"])
        bad = [i for i in kda + full if not (isinstance(i, int) and 1 <= i <= n)]
        if bad:
            raise ValueError(f"linear_attn_config layer ids are 1-based in [1, {n}]; got out-of-range {bad}")
        if sorted(kda + full) != list(range(1, n + 1)):
            raise ValueError(
                "linear_attn_config.kda_layers and full_attn_layers must together list every layer 1..{} "
                "exactly once; got kda_layers={} full_attn_layers={}".format(n, kda, full)
            )
        if not self.mla_use_nope:
            raise ValueError("mla_use_nope=False (rotary MLA) is not implemented; Kimi Linear uses NoPE")
        if self.q_lora_rank is not None:
            raise ValueError("q_lora_rank must be null: Kimi Linear's MLA uses a plain q_proj")
        if self.moe_router_activation_func != "sigmoid":
            raise ValueError(f"moe_router_activation_func must be 'sigmoid', got {self.moe_router_activation_func!r}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("MLA has no GQA: num_key_value_heads must equal num_attention_heads")
        if self.gate_lower_bound is not None and not (-5.0 <= float(self.gate_lower_bound) < 0.0):
            raise ValueError(f"gate_lower_bound must be in [-5, 0) or null, got {self.gate_lower_bound}")
        if self.num_experts and self.num_experts % self.num_expert_group:
            raise ValueError("num_experts must be divisible by num_expert_group")

    # ------------------------------------------------------------------------------------------
    # Serialisation: the official keys, nothing else (transformers' bookkeeping keys are dropped).
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        for key in _DEFAULTS:
            value = self._passthrough[key] if key in _PASSTHROUGH_KEYS else getattr(self, key)
            out[key] = copy.deepcopy(value)
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key)
            if value not in (None, False):
                out[key] = value
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)
            out["torch_dtype" if "torch_dtype" in self._keys_given and "dtype" not in self._keys_given else "dtype"] = name
        if self._transformers_version_in is not None:
            out["transformers_version"] = self._transformers_version_in
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> "KimiLinearConfig":
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{json_file}: config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"{json_file}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        return cls(**{k: v for k, v in data.items() if k != "model_type"})

    # ------------------------------------------------------------------------------------------
    @classmethod
    def kimi_linear_48b(cls, **overrides) -> "KimiLinearConfig":
        """The published 48B-A3B configuration (Instruct and Base share it)."""
        return cls(dtype="bfloat16", transformers_version="4.57.1", **overrides)

    @classmethod
    def tiny(
        cls,
        num_hidden_layers: int = 4,
        hidden_size: int = 64,
        num_heads: int = 4,
        head_dim: int = 16,
        vocab_size: int = 256,
        num_experts: int = 8,
        top_k: int = 2,
        kda_layers: list[int] | None = None,
        **overrides,
    ) -> "KimiLinearConfig":
        """A small config with the 48B's structure (KDA/MLA 3:1, dense layer 0, MoE after) for tests
        and training. Layer lists are 1-based, as in the file. MLA widths are scaled to head_dim."""
        n = num_hidden_layers
        if kda_layers is None:
            kda_layers = [i for i in range(1, n + 1) if i % 4 != 0 and i != n] or [1]
        full = [i for i in range(1, n + 1) if i not in kda_layers]
        args = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=n,
            intermediate_size=hidden_size * 4,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            head_dim=hidden_size // num_heads,
            kv_lora_rank=2 * head_dim,
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=head_dim // 2,
            v_head_dim=head_dim,
            model_max_length=4096,
            linear_attn_config={
                "full_attn_layers": full,
                "head_dim": head_dim,
                "kda_layers": list(kda_layers),
                "num_heads": num_heads,
                "short_conv_kernel_size": 4,
            },
            num_experts=num_experts,
            num_experts_per_token=top_k,
            moe_intermediate_size=hidden_size,
            routed_scaling_factor=2.446,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=vocab_size - 1,
        )
        args.update(overrides)
        return cls(**args)
