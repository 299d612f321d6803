"""Test-session set-up that must happen before any project or third-party module is imported."""

import os
import sys

# Nothing may download at run time: make Hugging Face code fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
        return False


if not _has_cuda():
    # Triton kernels run through the interpreter on CPU machines; the variable must be set before any
    # @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # transformers uses the `fla` package when importable, and it needs a GPU: hide it.
    sys.modules.setdefault("fla", None)
