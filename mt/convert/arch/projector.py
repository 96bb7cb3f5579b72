"""Vision-language checkpoints: the text model seen on its own (converted as its text family is), and the vision
tower with its projector, which llama.cpp reads from a separate `mmproj` GGUF (architecture `clip`) as
convert_hf_to_gguf.py --mmproj writes it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.arch.base import NameTable, Transform
from mt.io.checkpoint import Checkpoint, LazyTensor, renamed
from mt.io.gguf_out import GGUFContents

SUB_CONFIGS = ("text_config", "vision_config", "audio_config")
VISION_PART = "vision"

# (checkpoint name, GGUF name, the file's type) -> the type the converter forces on it, or None
ForcedType = Callable[[str, str, LlamaFileType], "T | None"]


@dataclass(frozen=True)
class VisionConfig:
    """What the mmproj header is written from: the checkpoint's whole config, its vision_config with the defaults of
    transformers' config class, the text model's width and the image processor's settings."""

    config: dict[str, Any]
    vision: dict[str, Any]
    text_hidden_size: int
    preprocessor: dict[str, Any]


@dataclass(frozen=True)
class Projector:
    """A family's vision tower and projector as llama.cpp's clip reads them."""

    projector_type: str  # clip.projector_type
    names: NameTable  # the vision part's names (as `Multimodal.vision_name` spells them) -> GGUF names
    write_metadata: Callable[[GGUFContents, VisionConfig], None]  # the family's keys, after the common ones
    forced_type: ForcedType
    vision_defaults: dict[str, Any]  # transformers' vision config class defaults for the keys read
    skipped_prefixes: tuple[str, ...] = ()  # stored tensors the projector does not use
    transforms: dict[str, Transform] = field(default_factory=dict)  # GGUF-name suffix -> transform

    def transform_for(self, gguf_name: str) -> Transform | None:
        return next((t for suffix, t in self.transforms.items() if gguf_name.endswith(suffix)), None)


@dataclass(frozen=True)
class Multimodal:
    """How a vision-language architecture splits: which stored tensors are the vision part (`vision_prefixes`),
    how their names read in the released checkpoints' spelling (`vision_name`), the text model's architecture."""

    text_architecture: str
    vision_prefixes: tuple[str, ...]
    vision_name: Callable[[str], str]
    projector: Projector

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.vision_prefixes)


def common_forced_type(hf_name: str, gguf_name: str, file_type: LlamaFileType) -> T | None:
    """MmprojModel's rule: the patch embedding (and a patch merger) F16 in an F16 file, else F32."""
    del hf_name
    if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name:
        return T.F16 if file_type == LlamaFileType.MOSTLY_F16 else T.F32
    return None


def text_config(config: dict[str, Any], multimodal: Multimodal) -> dict[str, Any]:
    """The text model's config as the converter reads it: the top-level keys overridden by text_config's."""
    top = {k: v for k, v in config.items() if k not in SUB_CONFIGS}
    return {**top, **(config.get("text_config") or {}), "architectures": [multimodal.text_architecture]}


def text_name(name: str) -> str:
    """A text tensor's name without the wrapper's `language_model.` (language_model.model.X and
    model.language_model.X are both model.X), as the converter strips it."""
    return name.replace("language_model.", "", 1)


def split(ckpt: Checkpoint, multimodal: Multimodal) -> Checkpoint:
    """The text model of `ckpt` (its config written as config.json for readers of folders), holding the vision
    part under `parts[VISION_PART]`."""
    config = text_config(ckpt.config, multimodal)
    text: dict[str, LazyTensor] = {}
    vision: dict[str, LazyTensor] = {}
    for name, tensor in ckpt.tensors.items():
        if multimodal.is_vision(name):
            new = multimodal.vision_name(name)
            vision[new] = renamed(tensor, new)
        else:
            new = text_name(name)
            text[new] = renamed(tensor, new)
    replaced = {**ckpt.replaced_files, "config.json": (json.dumps(config, indent=2) + "\n").encode()}
    part = replace(ckpt, tensors=vision, parts={})
    return replace(ckpt, config=config, tensors=text, replaced_files=replaced, parts={**ckpt.parts, VISION_PART: part})


def vision_config(config: dict[str, Any], projector: Projector, preprocessor: dict[str, Any]) -> VisionConfig:
    text = {**config, **(config.get("text_config") or {})}
    vision = {**projector.vision_defaults, **(config.get("vision_config") or {})}
    return VisionConfig(config, vision, int(text.get("hidden_size", text.get("n_embd", 0))), preprocessor)
