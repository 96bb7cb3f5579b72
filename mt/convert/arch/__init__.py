"""Architecture registry: a static map from `config.architectures[0]` to a module, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

from mt.convert.arch.base import Architecture
from mt.convert.arch.family import Family
from mt.convert.arch.projector import Multimodal, split, text_config
from mt.errors import UnsupportedArchitecture
from mt.io.checkpoint import Checkpoint

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
    "Gemma3ForConditionalGeneration": "gemma3_vision",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


def supported() -> list[str]:
    return sorted(MODULES)


def _module(hf_arch: str) -> Any:
    module = MODULES.get(hf_arch)
    if module is None:
        raise UnsupportedArchitecture(
            f"architecture {hf_arch!r} is not supported",
            f"mt converts {', '.join(supported())}",
        )
    return importlib.import_module(f"mt.convert.arch.{module}")


def multimodal(hf_arch: str) -> Multimodal | None:
    """How a vision-language architecture splits into its text model and its projector; None for the others."""
    return getattr(_module(hf_arch), "MULTIMODAL", None) if hf_arch in MODULES else None


def load_architecture(hf_arch: str, config: dict[str, Any]) -> Architecture:
    """The family converting `hf_arch` (of a vision-language model: its text model's family, on its text config)."""
    found = multimodal(hf_arch)
    if found is not None:
        return found.text_arch(text_config(config, found))
    return _module(hf_arch).ARCH(config)


def as_text_model(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` itself, or for a vision-language model its text model, holding the vision part among its parts."""
    found = multimodal(ckpt.architecture)
    return ckpt if found is None else split(ckpt, found)


def families() -> dict[str, Family]:
    """Every architecture's family record, by config.architectures[0]."""
    return {hf_arch: importlib.import_module(f"mt.convert.arch.{module}").FAMILY for hf_arch, module in MODULES.items()}
