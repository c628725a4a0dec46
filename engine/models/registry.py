"""Hugging Face `architectures` names -> Tandem model classes, imported lazily."""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

# One Llama-family implementation covers these; config switches select the variant.
MODELS = MappingProxyType(
    {
        "LlamaForCausalLM": "tandem.engine.models.llama:LlamaForCausalLM",
        "MistralForCausalLM": "tandem.engine.models.llama:LlamaForCausalLM",
        "Qwen2ForCausalLM": "tandem.engine.models.llama:LlamaForCausalLM",
        "Qwen3ForCausalLM": "tandem.engine.models.llama:LlamaForCausalLM",
    }
)


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message is one line naming what is missing or
    unsupported (meant to be shown to the user as is, without a traceback)."""


def supported_architectures() -> list[str]:
    return sorted(MODELS)


def resolve_model_class(hf_config: Any) -> type:
    """The model class for hf_config.architectures (the first supported name wins)."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODELS:
            module_name, _, cls_name = MODELS[name].partition(":")
            return getattr(importlib.import_module(module_name), cls_name)
    shown = ", ".join(names) if names else "none listed in config.json"
    raise ModelLoadError(
        f"unsupported model architecture ({shown}); supported: "
        f"{', '.join(supported_architectures())}"
    )
