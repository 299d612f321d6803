"""Models built from ``kimi_linear.layers``."""

from .kimi_linear import (
    KimiLinearCache,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    KimiLinearModel,
    register_auto_classes,
    unregister_auto_classes,
)

__all__ = [
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "register_auto_classes",
    "unregister_auto_classes",
]
