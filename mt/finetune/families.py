"""The model families `mt finetune` trains, by config.architectures[0] (a static map, as mt/convert/arch).

Each entry, read from the family's record (mt/convert/arch/family.py), lists the decoder's linear layers (what
`--target all-linear` resolves to) and so the short names --target takes (each name without "_proj":
q,k,v,o,gate,up,down; Phi-3: qkv,o,gate_up,down). Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj:
a LoRA there adapts the fused projection as one, so --target q (or q_proj, gate, ...) on Phi-3 is an error that
names the fused layer to target instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mt.convert.arch import families
from mt.convert.arch import family as arch_family
from mt.errors import CheckpointError, TrainingError, UnsupportedArchitecture

def short_name(module: str) -> str:
    return module.removesuffix("_proj")


@dataclass(frozen=True)
class LoraTargets:
    linear: tuple[str, ...]
    fused_into: dict[str, str] = field(default_factory=dict, hash=False)  # q_proj -> qkv_proj where fused

    @property
    def short_names(self) -> dict[str, str]:
        return {short_name(name): name for name in self.linear}


def _module(path: str) -> str:
    return path.rpartition(".")[2]


def training_view(record: arch_family.Family) -> LoraTargets:
    """A family record's linear layers by module name (q_proj …), as LoRA targets them."""
    fused_into = {_module(part): _module(fused) for fused, parts in record.fused.items() for part in parts}
    return LoraTargets(tuple(_module(m) for m in record.linear), fused_into)


FAMILIES: dict[str, LoraTargets] = {hf_arch: training_view(f) for hf_arch, f in families().items() if f.trainable}


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})", "download the checkpoint again") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch not in FAMILIES:
        raise UnsupportedArchitecture(f"mt finetune does not train {arch or 'a model without config.architectures'}",
                                      f"it trains {', '.join(sorted(FAMILIES))}")
    return arch


def _fused_error(spec: str, fused: list[str], family: LoraTargets) -> TrainingError:
    into = sorted({family.fused_into[name] for name in fused})
    return TrainingError(
        f"--target {spec!r}: this model fuses {', '.join(short_name(n) for n in fused)} into "
        f"{', '.join(into)} (one linear layer, trained as one)",
        f"target {','.join(short_name(n) for n in into)} instead, or all-linear")


def resolve_targets(spec: str, family: LoraTargets) -> list[str]:
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

