"""Registration with transformers' Auto classes.

transformers (>= 5.x) ships its *own* ``kimi_linear`` model type (a different module layout that loads
the official checkpoint through a conversion mapping). Registering ours under the same name therefore
replaces transformers' native classes for ``AutoConfig``/``AutoModel``/``AutoModelForCausalLM`` in this
process. Importing kimi_linear never does that silently; call ``register_auto_classes()`` explicitly
(and ``unregister_auto_classes()`` to restore the native ones). On a transformers without the model
type, registration simply adds it. Our classes also have their own ``from_pretrained`` that needs no
registration at all.
"""

from __future__ import annotations

from .configuration import MODEL_TYPE, KimiLinearConfig
from .modeling import KimiLinearForCausalLM, KimiLinearModel


def _auto():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: PLC0415
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: PLC0415

    return AutoConfig, AutoModel, AutoModelForCausalLM, CONFIG_MAPPING


def register_auto_classes() -> bool:
    """Make ``AutoConfig``/``AutoModel``/``AutoModelForCausalLM.from_pretrained(local_dir)`` return our classes
    for ``model_type == "kimi_linear"``. Returns True when a native transformers model type was shadowed."""
    AutoConfig, AutoModel, AutoModelForCausalLM, CONFIG_MAPPING = _auto()
    shadowed = MODEL_TYPE in CONFIG_MAPPING._mapping  # transformers' own entry (not an earlier registration)
    AutoConfig.register(MODEL_TYPE, KimiLinearConfig, exist_ok=True)
    AutoModel.register(KimiLinearConfig, KimiLinearModel, exist_ok=True)
    AutoModelForCausalLM.register(KimiLinearConfig, KimiLinearForCausalLM, exist_ok=True)
    return shadowed


def unregister_auto_classes() -> None:
    """Undo ``register_auto_classes`` (transformers' native kimi_linear classes, if any, apply again)."""
    AutoConfig, AutoModel, AutoModelForCausalLM, CONFIG_MAPPING = _auto()
    CONFIG_MAPPING._extra_content.pop(MODEL_TYPE, None)
    for auto in (AutoModel, AutoModelForCausalLM):
        auto._model_mapping._extra_content.pop(KimiLinearConfig, None)
