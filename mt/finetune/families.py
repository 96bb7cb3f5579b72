"""The model families `mt finetune` trains, by config.architectures[0] (a static map, as mt/convert/arch).

Each entry lists the decoder's linear layers (what `--target all-linear` resolves to) and so the short names
--target takes (each name without "_proj": q,k,v,o,gate,up,down; Phi-3: qkv,o,gate_up,down). Phi-3 fuses q, k, v
into qkv_proj and gate, up into gate_up_proj: a LoRA there adapts the fused projection as one, so --target q (or
q_proj, gate, ...) on Phi-3 is an error that names the fused layer to target instead. Which modules take mt's
Triton kernels is mt/finetune/patch.py's table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mt.errors import CheckpointError, TrainingError, UnsupportedArchitecture

DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PHI3_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}


def short_name(module: str) -> str:
    return module.removesuffix("_proj")


@dataclass(frozen=True)
class Family:
    linear: tuple[str, ...]
    fused_into: dict[str, str] = field(default_factory=dict, hash=False)  # q_proj -> qkv_proj where fused

    @property
    def short_names(self) -> dict[str, str]:
        return {short_name(name): name for name in self.linear}


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(DECODER_LINEAR),
    "MistralForCausalLM": Family(DECODER_LINEAR),
    "Qwen2ForCausalLM": Family(DECODER_LINEAR),
    "Qwen3ForCausalLM": Family(DECODER_LINEAR),  # q_norm/k_norm are RMSNorms, not trained
    "Gemma2ForCausalLM": Family(DECODER_LINEAR),
    "Gemma3ForCausalLM": Family(DECODER_LINEAR),  # the text-only class; Gemma3ForConditionalGeneration is not here
    "Phi3ForCausalLM": Family(PHI3_LINEAR, PHI3_FUSED),
}


def base_architecture(base: Path) -> str:
    """config.architectures[0] of a checkpoint folder, checked against FAMILIES before any weight is loaded."""
    config_file = base / "config.json"
    if not base.is_dir():
        raise CheckpointError(f"{base} is not a folder",
                              "pass a local checkpoint folder (huggingface-cli download REPO --local-dir DIR)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{base} has no config.json", "pass a Hugging Face checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})", "download the checkpoint again") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch not in FAMILIES:
        raise UnsupportedArchitecture(f"mt finetune does not train {arch or 'a model without config.architectures'}",
                                      f"it trains {', '.join(sorted(FAMILIES))}")
    return arch


def _fused_error(spec: str, fused: list[str], family: Family) -> TrainingError:
    into = sorted({family.fused_into[name] for name in fused})
    return TrainingError(
        f"--target {spec!r}: this model fuses {', '.join(short_name(n) for n in fused)} into "
        f"{', '.join(into)} (one linear layer, trained as one)",
        f"target {','.join(short_name(n) for n in into)} instead, or all-linear")


def resolve_targets(spec: str, family: Family) -> list[str]:
    """--target: 'all-linear' or a comma list of the family's short (q,k,v,o,gate,up,down) or full (q_proj, ...)
    names."""
    if spec.strip() == "all-linear":
        return list(family.linear)
    short = family.short_names
    names = [short.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
    fused = [n for n in (f"{n}_proj" if f"{n}_proj" in family.fused_into else n for n in names)
             if n in family.fused_into]
    if fused:
        raise _fused_error(spec, list(dict.fromkeys(fused)), family)
    unknown = [n for n in names if n not in family.linear]
    if unknown or not names:
        raise TrainingError(
            f"--target {spec!r}: {', '.join(unknown) or 'no module'} is not a linear layer of this model",
            f"use all-linear or some of {','.join(short)} (or {', '.join(family.linear)})")
    return list(dict.fromkeys(names))

