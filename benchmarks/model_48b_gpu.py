"""Kimi-Linear-48B-A3B at full size, weights initialised on the GPU (no download): a 4K-token prefill
and 64 cached decode steps. Prints time and peak memory; writes JSON to $OUT/model_48b_gpu.json if $OUT is set.

    python benchmarks/model_48b_gpu.py                  # on an H200 (needs ~100 GB: 49.1 B params in bf16)
    python benchmarks/model_48b_gpu.py --tiny           # CPU smoke test of the same code path

The model is built on the meta device (no memory), allocated once on the GPU in bf16 with ``to_empty``
(A_log/dt_bias stay float32), then initialised in place with small random values. Weights are random,
so the generated tokens mean nothing; only speed and memory are measured.

Runs on the GPU stack (torch 2.11, triton 3.6, Python 3.12, transformers 5.17) as on the CPU stack.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_linear.models import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test)")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup-len", type=int, default=256, help="prompt length of the untimed warm-up pass")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if args.tiny:
        config = KimiLinearConfig.tiny(num_hidden_layers=8, hidden_size=128, num_heads=4, head_dim=32,
                                       vocab_size=512, num_experts=16, top_k=4)
        args.prompt_len = min(args.prompt_len, 200)
        args.warmup_len = min(args.warmup_len, 32)
    else:
        config = KimiLinearConfig.kimi_linear_48b()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    model.to(dtype)  # still meta: only dtypes change (A_log/dt_bias keep float32)
    model.to_empty(device=device)
    model.init_weights(std=0.02)
    model.eval()
    sync(device)
    init_s = time.perf_counter() - t0
    n_params = model.num_parameters()
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"built {n_params:,} parameters ({gib(weights_bytes)} GiB) on {device} in {init_s:.1f} s", flush=True)

    vocab = config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    prompt = torch.randint(0, vocab - 1, (args.batch, args.prompt_len), generator=gen).to(device)

    with torch.no_grad():
        # Untimed warm-up: cuBLAS/cuDNN handles, Triton compilation of the KDA kernels (if present).
        warm = model.new_cache(args.batch, capacity=args.warmup_len + 2)
        out = model(prompt[:, : args.warmup_len], cache=warm, logits_to_keep=1)
        model(out.logits[:, -1].argmax(-1, keepdim=True), cache=warm, logits_to_keep=1)
        del warm, out
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        cache = model.new_cache(args.batch, capacity=args.prompt_len + args.decode_steps)
        sync(device)
        t0 = time.perf_counter()
        logits = model(prompt, cache=cache, logits_to_keep=1).logits
        sync(device)
        prefill_s = time.perf_counter() - t0
        peak_prefill = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

        step_times, tokens = [], []
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.decode_steps):
            tokens.append(token)
            t0 = time.perf_counter()
            logits = model(token, cache=cache, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            step_times.append(time.perf_counter() - t0)
        peak_total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    assert cache.seq_len == args.prompt_len + args.decode_steps
    assert torch.isfinite(logits.float()).all(), "non-finite logits"

    kda_backend = "torch"
    if device.type == "cuda" and os.environ.get("KIMI_LINEAR_KDA_BACKEND", "auto") != "torch":
        try:  # the operator dispatches CUDA tensors to this module when it imports (ops/kda/api.py)
            importlib.import_module("kimi_linear.ops.kda.triton_backend")
            kda_backend = "triton"
        except ImportError as e:
            kda_backend = f"torch (triton backend unavailable: {e})"
    result = {
        "model": "Kimi-Linear-48B-A3B (random weights)" if not args.tiny else "tiny smoke config",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "kda_backend": kda_backend,
        "parameters": n_params,
        "weights_gib": gib(weights_bytes),
        "init_s": round(init_s, 2),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(args.batch * args.prompt_len / prefill_s, 1),
        "decode_steps": args.decode_steps,
        "decode_ms_median": round(1e3 * statistics.median(step_times), 3),
        "decode_ms_mean": round(1e3 * statistics.fmean(step_times), 3),
        "decode_tokens_per_s": round(args.batch / statistics.median(step_times), 2),
        "peak_mem_prefill_gib": gib(peak_prefill) if peak_prefill is not None else None,
        "peak_mem_total_gib": gib(peak_total) if peak_total is not None else None,
        "cache_gib": gib(cache.nbytes()),
        "first_tokens": torch.cat(tokens, 1)[0, :8].tolist(),
    }
    print(json.dumps(result, indent=2))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        name = "model_48b_gpu.json" if not args.tiny else "model_48b_gpu_tiny.json"
        (Path(out_dir) / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
