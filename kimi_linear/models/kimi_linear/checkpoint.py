"""Checkpoint I/O in the official Kimi-Linear layout: ``config.json`` + sharded safetensors +
``model.safetensors.index.json``, with the official tensor names (architecture.md section 2).

Loading is lazy and single-copy: the model is built on the ``meta`` device, allocated once on the target
device in the target dtype (``to_empty``), and each tensor is read from its memory-mapped shard and
copied straight into its parameter, one shard at a time. A_log and dt_bias stay float32.

Everything is checked before a single value is copied: shard files exist and are not truncated, the
index agrees with the shards, and the set of names and every shape match the model. Errors list all
problems at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .configuration import MODEL_TYPE, KimiLinearConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Stacked expert parameters <-> per-expert official names.
_EXPERT_STACK = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<w>w[123])$")
_FP32_NAMES = (".A_log", ".dt_bias")
_LIST_LIMIT = 20


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model (names, shapes, files)."""


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LIST_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{title} ({len(items)}):\n    " + "\n    ".join(shown) + more


# ----------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------

def official_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Official checkpoint name -> the tensor in ``model`` holding it (a row of a stack for experts).

    Tied weights appear once (under their first name).
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        m = _EXPERT_STACK.match(name)
        if m:
            for e in range(p.shape[0]):
                out[f"{prefix}{m['prefix']}.{e}.{m['w']}.weight"] = p[e]
        else:
            out[prefix + name] = p
    return out


def _keeps_fp32(name: str) -> bool:
    return name.endswith(_FP32_NAMES)


# ----------------------------------------------------------------------------------------------
# Reading and checking files
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking the file holds all the bytes it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated: header declares {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {8 + n + data_end} bytes but the file has {size} "
            f"({8 + n + data_end - size} missing)"
        )
    for name, v in header.items():
        start, end = v["data_offsets"]
        numel = 1
        for s in v["shape"]:
            numel *= s
        if v["dtype"] in _ST_DTYPES and end - start != numel * _ST_DTYPES[v["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes, expected {numel} x {v['dtype']}")
    return header


def read_config(path: str | os.PathLike) -> KimiLinearConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with {CONFIG_NAME})")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}")
    with open(cfg_file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{cfg_file}: unknown model_type {model_type!r}; this loader reads {MODEL_TYPE!r}")
    return KimiLinearConfig.from_json_file(cfg_file)


def shard_table(path: str | os.PathLike) -> dict[Path, dict[str, dict]]:
    """Shard file -> its header table, from the index (or the single-file layout), all checked."""
    path = Path(path)
    index_file = path / INDEX_NAME
    if index_file.is_file():
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"{path}: " + _listing("shard files named in the index are missing", missing))
        table = {path / name: read_safetensors_header(path / name) for name in files}
        problems = [
            f"{name} (index says {file})" for name, file in weight_map.items() if name not in table[path / file]
        ]
        if problems:
            raise CheckpointError(f"{path}: " + _listing("tensors listed in the index but absent from their shard", problems))
        return table
    single = path / SINGLE_NAME
    if single.is_file():
        return {single: read_safetensors_header(single)}
    raise CheckpointError(f"{path}: no {INDEX_NAME} and no {SINGLE_NAME}")


def check_names_and_shapes(expected: dict[str, torch.Tensor], table: dict[Path, dict[str, dict]],
                           ignore: tuple[str, ...] = ()) -> None:
    found: dict[str, tuple[Path, list[int]]] = {}
    duplicates = []
    for file, header in table.items():
        for name, v in header.items():
            if name in found:
                duplicates.append(f"{name} (in {found[name][0].name} and {file.name})")
            found[name] = (file, v["shape"])
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and n not in ignore]
    shapes = [
        f"{n}: checkpoint {found[n][1]}, model {list(t.shape)}"
        for n, t in expected.items()
        if n in found and list(found[n][1]) != list(t.shape)
    ]
    parts = []
    if missing:
        parts.append(_listing("missing tensors", missing))
    if unexpected:
        parts.append(_listing("unexpected tensors", unexpected))
    if shapes:
        parts.append(_listing("wrongly shaped tensors", shapes))
    if duplicates:
        parts.append(_listing("tensors stored twice", duplicates))
    if parts:
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(parts))


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------

def _resolve_dtype(dtype, config: KimiLinearConfig) -> torch.dtype:
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return dtype


@torch.no_grad()
def load_state(model: torch.nn.Module, path: str | os.PathLike, prefix: str = "", ignore: tuple[str, ...] = ()) -> None:
    """Copy an official-layout checkpoint into an allocated ``model`` (all checks first)."""
    table = shard_table(path)
    expected = official_tensors(model, prefix)
    check_names_and_shapes(expected, table, ignore)
    # A progress bar on terminals only (disable=None): a 48B checkpoint is 20 shards and minutes of I/O.
    for file, header in tqdm(table.items(), desc="loading shards", unit="shard", disable=None):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in header:
                if name in expected:
                    expected[name].copy_(f.get_tensor(name))  # casts and moves in one step, tensor by tensor


def load_pretrained(cls, path, dtype=None, device="cpu", config: KimiLinearConfig | None = None):
    """Build ``cls`` (KimiLinearForCausalLM or KimiLinearModel) from a local checkpoint directory."""
    path = Path(path)
    file_config = read_config(path)
    config = file_config if config is None else config
    dtype = _resolve_dtype(dtype, config)
    table = shard_table(path)  # fail on files before allocating anything
    del table
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)  # on meta: no memory; A_log/dt_bias stay float32 (KimiDeltaAttention._apply)
    model.to_empty(device=device)
    is_base = not hasattr(model, "lm_head")
    load_state(model, path, prefix="model." if is_base else "", ignore=("lm_head.weight",) if is_base else ())
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json, ``model-XXXXX-of-YYYYY.safetensors`` shards and the index, official names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    is_base = not hasattr(model, "lm_head")
    tensors = official_tensors(model, prefix="model." if is_base else "")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    # Write everything into a staging folder beside the target, then move it in with the index and config
    # last: a save that fails half-way leaves an existing checkpoint in `path` as it was.
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
    try:
        for k, names in enumerate(tqdm(shards, desc="saving shards", unit="shard", disable=None), start=1):
            file = f"model-{k:05d}-of-{n:05d}.safetensors"
            # clone(): expert rows share their stack's storage, which safetensors refuses to save as-is.
            data = {name: tensors[name].detach().to("cpu").clone() for name in names}
            save_file(data, str(staging / file), metadata={"format": "pt"})
            for name in names:
                weight_map[name] = file
                total += data[name].numel() * data[name].element_size()
            del data
        with open(staging / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
        config: KimiLinearConfig = model.config
        config.dtype = model.model.embed_tokens.weight.dtype if not is_base else model.embed_tokens.weight.dtype
        config.to_json_file(staging / CONFIG_NAME)
        for name in sorted(set(weight_map.values())) + [INDEX_NAME, CONFIG_NAME]:
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
