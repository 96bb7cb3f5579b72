"""Architecture registry: a static map from `config.architectures[0]` to a module, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

from mt.convert.arch.base import Architecture
from mt.convert.arch.family import Family
from mt.errors import UnsupportedArchitecture

MODULES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "TadaForCausalLM": "tada",
    "Decoder": "tada_codec",  # HumeAI/tada-codec's decoder subfolder (save_pretrained names its class, Decoder)
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "SmolLM3ForCausalLM": "smollm3",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}


def supported() -> list[str]:
    return sorted(MODULES)


def load_architecture(hf_arch: str, config: dict[str, Any]) -> Architecture:
    module = MODULES.get(hf_arch)
    if module is None:
        raise UnsupportedArchitecture(
            f"architecture {hf_arch!r} is not supported",
            f"mt converts {', '.join(supported())}",
        )
    cls = importlib.import_module(f"mt.convert.arch.{module}").ARCH
    return cls(config)


def families() -> dict[str, Family]:
    """Every architecture's family record, by config.architectures[0]."""
    return {hf_arch: importlib.import_module(f"mt.convert.arch.{module}").FAMILY for hf_arch, module in MODULES.items()}
