"""The model families `mt finetune` trains, by config.architectures[0] (a static map, as mt/convert/arch).

Each entry lists the decoder's linear layers (what `--target all-linear` and the short names q,k,v,o,gate,up,down
resolve to). Which modules take mt's Triton kernels is mt/finetune/patch.py's table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mt.errors import CheckpointError, TrainingError, UnsupportedArchitecture

DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_NAMES = {name.removesuffix("_proj"): name for name in DECODER_LINEAR}


@dataclass(frozen=True)
class Family:
    linear: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(DECODER_LINEAR),
    "MistralForCausalLM": Family(DECODER_LINEAR),
    "Qwen2ForCausalLM": Family(DECODER_LINEAR),
    "Qwen3ForCausalLM": Family(DECODER_LINEAR),  # q_norm/k_norm are RMSNorms, not trained
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


def resolve_targets(spec: str, family: Family) -> list[str]:
    """--target: 'all-linear' or a comma list of short (q,k,v,o,gate,up,down) or full (q_proj, ...) names."""
    if spec.strip() == "all-linear":
        return list(family.linear)
    names = [SHORT_NAMES.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in family.linear]
    if unknown or not names:
        raise TrainingError(
            f"--target {spec!r}: {', '.join(unknown) or 'no module'} is not a linear layer of this model",
            f"use all-linear or some of {','.join(SHORT_NAMES)} (or {', '.join(family.linear)})")
    return list(dict.fromkeys(names))
