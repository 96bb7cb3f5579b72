"""Vision-language checkpoints: the text model seen on its own (converted as its text family is), and the vision
tower with its projector, which llama.cpp reads from a separate `mmproj` GGUF (architecture `clip`) as
convert_hf_to_gguf.py --mmproj writes it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.arch.base import Architecture, NameTable, Transform
from mt.io.checkpoint import Checkpoint, LazyTensor, TensorView, renamed
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
    write_metadata: Callable[[GGUFContents, VisionConfig], None]  # the family's keys, after the projector type
    forced_type: ForcedType
    vision_defaults: dict[str, Any]  # transformers' vision config class defaults for the keys read
    skipped_prefixes: tuple[str, ...] = ()  # stored tensors the projector does not use
    transforms: dict[str, Transform] = field(default_factory=dict)  # GGUF-name suffix -> transform
    # a stored tensor the converter writes as several (a fused qkv split in three): (name, piece) for each
    pieces: Callable[[str, LazyTensor], list[tuple[str, LazyTensor]]] | None = None
    # the vision config under the names the mmproj header is written from (image_size, num_hidden_layers …)
    vision_keys: Callable[[dict[str, Any]], dict[str, Any]] = lambda vision: vision

    def transform_for(self, gguf_name: str) -> Transform | None:
        return next((t for suffix, t in self.transforms.items() if gguf_name.endswith(suffix)), None)

    def written(self, tensors: dict[str, LazyTensor]) -> Iterator[tuple[str, str, LazyTensor]]:
        """(name, GGUF name, tensor) of every tensor the mmproj file holds, in the order the converter writes them;
        a name the table does not know raises UnknownTensor."""
        for stored, tensor in tensors.items():
            if stored.startswith(self.skipped_prefixes):
                continue
            for name, piece in self.pieces(stored, tensor) if self.pieces is not None else [(stored, tensor)]:
                yield name, self.names.map(name), piece


@dataclass(frozen=True)
class RowRange(TensorView):
    """Rows [start, stop) of `source` (one of a fused q, k, v)."""

    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.source.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.source.nbytes // self.source.shape[0] * (self.stop - self.start)

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.shape[0] if stop is None else stop
        return self.source.read_rows(self.start + start, self.start + stop)


@dataclass(frozen=True)
class AxisSlice(TensorView):
    """`source[..., index, ...]` along `axis` (not the first): a Conv3d kernel's temporal plane."""

    axis: int
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.source.shape) if i != self.axis)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes // self.source.shape[self.axis]

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(np.take(self.source.read_rows(start, stop), self.index, axis=self.axis))


@dataclass(frozen=True)
class Multimodal:
    """How a vision-language architecture splits: which stored tensors are the vision part (`vision_prefixes`),
    how their names read in the released checkpoints' spelling (`vision_name`), the family converting the text model
    and, where transformers' class for it differs from the text config's, the model_type of a text-only model that
    computes the same on text (`text_model_type`, for the references that build one)."""

    text_arch: type[Architecture]
    vision_prefixes: tuple[str, ...]
    vision_name: Callable[[str], str]
    projector: Projector
    text_model_type: str | None = None
    text_config_fix: Callable[[dict[str, Any]], dict[str, Any]] = lambda text: text  # as that text-only model reads it

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.vision_prefixes)


def common_forced_type(hf_name: str, gguf_name: str, file_type: LlamaFileType) -> T | None:
    """MmprojModel's rule: the patch embedding (and a patch merger) F16 in an F16 file, else F32."""
    del hf_name
    if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name:
        return T.F16 if file_type == LlamaFileType.MOSTLY_F16 else T.F32
    return None


def text_config(config: dict[str, Any], multimodal: Multimodal) -> dict[str, Any]:
    """The text model's config as the converter reads it: the top-level keys overridden by text_config's (it keeps
    the checkpoint's architecture, which names the family)."""
    top = {k: v for k, v in config.items() if k not in SUB_CONFIGS}
    text = {**top, **(config.get("text_config") or {})}
    if multimodal.text_model_type is not None:
        text["model_type"] = multimodal.text_model_type
    return multimodal.text_config_fix(text)


def text_name(name: str) -> str:
    """A text tensor's name without the wrapper's `language_model.` (language_model.model.X and
    model.language_model.X are both model.X), as the converter strips it."""
    return name.replace("language_model.", "", 1)


def split(ckpt: Checkpoint, multimodal: Multimodal) -> Checkpoint:
    """The text model of `ckpt` (its config written as config.json for readers of folders), holding the vision
    part under `parts[VISION_PART]`."""
    if VISION_PART in ckpt.parts:
        return ckpt
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
    vision = projector.vision_keys({**projector.vision_defaults, **(config.get("vision_config") or {})})
    return VisionConfig(config, vision, int(text.get("hidden_size", text.get("n_embd", 0))), preprocessor)
