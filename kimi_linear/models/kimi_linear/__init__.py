"""The Kimi Linear model: config, cache, modules, checkpoint I/O and transformers Auto registration."""

from .cache import KimiLinearCache
from .configuration import KimiLinearConfig
from .modeling import CausalLMOutput, KimiLinearDecoderLayer, KimiLinearForCausalLM, KimiLinearModel
from .registration import register_auto_classes, unregister_auto_classes

__all__ = [
    "KimiLinearCache",
    "KimiLinearConfig",
    "CausalLMOutput",
    "KimiLinearDecoderLayer",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "register_auto_classes",
    "unregister_auto_classes",
]
