"""A PEFT LoRA adapter folder: its config and its weights, read as per-module low-rank deltas.

peft saves, under the prefix `base_model.model.`:
  <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]   a Linear target
  <module>.lora_B.bias [out]                                       lora_bias=True
  <module>.lora_magnitude_vector [out]                             DoRA (use_dora)
  <module>.lora_embedding_A [r, vocab], <module>.lora_embedding_B [dim, r]   an Embedding target
  <module>.base_layer.weight                                       the layer it was trained on (embeddings, resized vocab)
  <module>.weight / .bias                                          modules_to_save: the whole trained module
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mt.io.dtypes import to_f32
from mt.errors import AdapterError
from mt.io.safetensors import TensorRef, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")

_LORA_PARTS = {
    "lora_A.weight": "a", "lora_B.weight": "b", "lora_B.bias": "bias",
    "lora_embedding_A": "embedding_a", "lora_embedding_B": "embedding_b", "lora_magnitude_vector": "magnitude",
}
_UNSUPPORTED_OPTIONS = {
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D) adapters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices (trainable tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
}


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    alpha_pattern: dict[str, float]
    base_model_class: str | None
    # an activated LoRA (aLoRA) applies only after these tokens; as written in the config, checked where used
    alora_invocation_tokens: object = None
    invocation_string: object = None

    @property
    def activated(self) -> bool:
        return bool(self.alora_invocation_tokens or self.invocation_string)

    def scaling(self, module: str, rank: int) -> float:
        """peft's `lora_alpha / r` (rsLoRA: `/ sqrt(r)`), with alpha_pattern matched as peft matches it."""
        alpha = self.alpha_pattern[key] if (key := _pattern_key(self.alpha_pattern, module)) else self.alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


@dataclass
class LoraDelta:
    """One target module's update. Linear: W [out, in] += scale * B @ A; Embedding: W [vocab, dim] += scale * (B @ A).T.
    DoRA then rescales each output row of the sum to `magnitude`."""

    module: str
    a: np.ndarray
    b: np.ndarray
    scale: float
    embedding: bool = False
    magnitude: np.ndarray | None = None
    bias: np.ndarray | None = None
    # the base weight it updates when that is not module + ".weight": the fused weight `module` is a part of
    # (mt/merge/fused.py), and then b spans all of that weight's rows, zero outside the part's
    target: str | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.embedding:
            return (self.a.shape[1], self.b.shape[0])
        return (self.b.shape[0], self.a.shape[1])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """scale * (rows [start, stop) of the low-rank product), float32."""
        if self.embedding:
            product = self.a[:, start:stop].T @ self.b.T  # [rows, r] @ [r, dim]
        else:
            product = self.b[start:stop] @ self.a  # [rows, r] @ [r, in]
        return product * np.float32(self.scale)

    def apply(self, weight_rows: np.ndarray, start: int) -> np.ndarray:
        """weight rows [start, start + len) of the base (float32) -> the merged rows, as peft merges them."""
        merged = weight_rows + self.rows(start, start + weight_rows.shape[0])
        if self.magnitude is None:
            return merged
        norm = np.linalg.norm(merged, axis=1)  # DoRA: norm of each output row of W + delta
        return merged * (self.magnitude[start:start + len(merged)] / norm)[:, None]


@dataclass
class Adapter:
    folder: Path
    config: LoraConfig
    deltas: dict[str, LoraDelta]  # base weight name (module + ".weight") -> delta
    bias_deltas: dict[str, LoraDelta]  # base bias name -> the delta carrying lora_B.bias
    replacements: dict[str, TensorRef]  # base tensor name -> the tensor saved in the adapter
    trained_modules: set[str]  # replacements that are trained copies (modules_to_save), not the base layer saved again
    tokenizer_files: list[Path] = field(default_factory=list)


def open_adapter(folder: Path) -> Adapter:
    folder = Path(folder)
    config = read_lora_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{folder} holds adapter_model.bin, a pickle that can run code when loaded",
                "save the adapter as safetensors (peft: save_pretrained(dir, safe_serialization=True))",
            )
        raise AdapterError(f"no {WEIGHTS_NAME} in {folder}", "point at a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    refs, _ = read_header(weights)
    deltas, replacements, trained = _parse_weights(refs, config, weights.name)
    bias_deltas = {d.module + ".bias": d for d in deltas.values() if d.bias is not None}
    tokenizer = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    return Adapter(folder, config, deltas, bias_deltas, replacements, trained, tokenizer)


def read_lora_config(folder: Path) -> LoraConfig:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterError(f"adapter {folder} is not a folder", "pass the folder peft's save_pretrained wrote")
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {folder}", "point at a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e})", "fix or re-save the adapter") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} is not a JSON object", "fix or re-save the adapter")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{path.name} says peft_type {peft_type!r}; mt merges LoRA adapters (LoRA, rsLoRA, DoRA) only",
            "merge this adapter with peft's merge_and_unload instead",
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise AdapterError(f"the adapter uses {what}, which mt cannot merge", "merge it with peft's merge_and_unload instead")
    try:
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path.name} lacks a numeric 'r' and 'lora_alpha'", "fix or re-save the adapter") from None
    if r <= 0:
        raise AdapterError(f"{path.name} says r = {r}; a LoRA rank is at least 1", "fix or re-save the adapter")
    _check_patterns(path.name, raw)
    auto = raw.get("auto_mapping") or {}
    return LoraConfig(
        r=r, alpha=alpha, use_rslora=bool(raw.get("use_rslora")), use_dora=bool(raw.get("use_dora")),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model_class=auto.get("base_model_class") if isinstance(auto, dict) else None,
        alora_invocation_tokens=raw.get("alora_invocation_tokens"), invocation_string=raw.get("invocation_string"),
    )


def _check_patterns(file: str, raw: dict) -> None:
    """alpha_pattern / rank_pattern: module-name regular expressions (as peft matches them) with numeric values."""
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = raw.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{file}'s {key} is {patterns!r}, not an object", "fix or re-save the adapter")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"{file}'s {key} has {pattern!r}, not a regular expression ({e})",
                                   "fix or re-save the adapter") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise AdapterError(f"{file}'s {key} gives {pattern!r} the value {value!r}, not a positive number",
                                   "fix or re-save the adapter")


def _parse_weights(refs: dict[str, TensorRef], config: LoraConfig, file: str
                   ) -> tuple[dict[str, LoraDelta], dict[str, TensorRef], set[str]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    replacements: dict[str, TensorRef] = {}
    trained: set[str] = set()
    for key, ref in refs.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{file} holds {key!r}, not under {PREFIX!r}", "save the adapter with peft's save_pretrained")
        name = key[len(PREFIX):]
        module, part = _split_lora_key(name)
        if part is not None:
            parts.setdefault(module, {})[part] = _read_f32(ref)
        elif ".lora_" in name:
            raise AdapterError(f"{file} holds {key!r}, a LoRA part mt does not know", "merge this adapter with peft instead")
        elif ".original_module." not in name:  # the untrained copy peft keeps beside a module it saves whole
            wrapped = ".base_layer." in name or ".modules_to_save." in name
            target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            if not wrapped or target not in replacements:
                replacements[target] = ref
            if ".base_layer." not in name:
                trained.add(target)
    deltas = {module + ".weight": _delta(module, p, config, file) for module, p in parts.items()}
    if not deltas and not replacements:
        raise AdapterError(f"{file} holds no LoRA weights", "the adapter was saved empty; save it again after training")
    return deltas, replacements, trained


def _split_lora_key(name: str) -> tuple[str, str | None]:
    for suffix, part in _LORA_PARTS.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    return name, None


def _delta(module: str, parts: dict[str, np.ndarray], config: LoraConfig, file: str) -> LoraDelta:
    embedding = "embedding_a" in parts or "embedding_b" in parts
    a, b = (parts.get("embedding_a"), parts.get("embedding_b")) if embedding else (parts.get("a"), parts.get("b"))
    if a is None or b is None:
        raise AdapterError(f"{file} has only one of lora_A/lora_B for {module}", "the adapter is incomplete; save it again")
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1] == 0:
        raise AdapterError(f"{file}: {module} has an empty lora_A {list(a.shape)} and lora_B {list(b.shape)} (rank 0)",
                           "the adapter is damaged; save it again")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{file}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not share a rank",
            "the adapter is damaged; save it again",
        )
    delta = LoraDelta(module, a, b, config.scaling(module, a.shape[0]), embedding=embedding,
                      magnitude=parts.get("magnitude"), bias=parts.get("bias"))
    if delta.magnitude is not None and delta.embedding:
        raise AdapterError(f"{module} is a DoRA embedding, which mt cannot merge", "merge it with peft's merge_and_unload instead")
    return delta


def _read_f32(ref: TensorRef) -> np.ndarray:
    if ref.dtype not in ("F32", "F16", "BF16", "F64"):
        raise AdapterError(f"adapter tensor {ref.name!r} has dtype {ref.dtype}", "LoRA weights must be float")
    return to_f32(ref.read(), ref.dtype)
