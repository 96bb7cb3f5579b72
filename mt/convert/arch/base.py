"""What every architecture module provides: hyperparameter keys, a tensor-name table, transforms."""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
from gguf import GGUFWriter

from mt.convert.vocab import VocabSummary, write_vocab
from mt.errors import UnknownTensor

# A transform takes the tensor (storage dtype, full) and the config and returns the new tensor.
Transform = Callable[[np.ndarray, dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor the converter generates rather than reads (e.g. rope_freqs)."""

    name: str
    make: Callable[[], np.ndarray]  # float32
    shape: tuple[int, ...]


def find_key(config: dict[str, Any], keys: Iterable[str]) -> Any:
    return next((config[k] for k in keys if k in config), None)


class NameTable:
    """HF tensor names -> GGUF names, from patterns with `{bid}`; suffixes .weight/.bias carry over."""

    def __init__(self, table: dict[str, str], dropped: Iterable[str] = ()) -> None:
        self._exact = {hf: gg for hf, gg in table.items() if "{bid}" not in hf}
        self._patterns = [
            (re.compile(re.escape(hf).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$"), gg)
            for hf, gg in table.items()
            if "{bid}" in hf
        ]
        self._dropped = tuple(re.compile(re.escape(d).replace(r"\{bid\}", r"\d+") + "$") for d in dropped)

    def is_dropped(self, name: str) -> bool:
        return any(p.match(name) for p in self._dropped)

    def map(self, name: str) -> str:
        stem, dot, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            stem, dot, suffix = name, "", ""
        if stem in self._exact:
            return self._exact[stem] + dot + suffix
        for pattern, gg in self._patterns:
            if m := pattern.match(stem):
                return gg.format(bid=int(m["bid"])) + dot + suffix
        raise UnknownTensor(
            f"tensor {name!r} is not in the name table of this architecture",
            "the checkpoint may hold a variant mt does not support yet; please report it",
        )


class Architecture:
    """One model family. Subclasses fill in the class attributes and may override the hooks."""

    gguf_arch: ClassVar[str]
    names: ClassVar[NameTable]
    # gguf-name suffix -> transform, applied to whole tensors (e.g. Q/K row permutation)
    transforms: ClassVar[dict[str, Transform]] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def block_count(self) -> int:
        return int(find_key(self.config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers")))

    def write_hparams(self, w: GGUFWriter, file_type: int) -> None:
        raise NotImplementedError

    def transform_for(self, gguf_name: str) -> Transform | None:
        return next((t for suffix, t in self.transforms.items() if gguf_name.endswith(suffix)), None)

    def extra_tensors(self) -> list[ExtraTensor]:
        return []

    def write_tensor_pass_keys(self, w: GGUFWriter) -> None:
        """Keys llama.cpp's converter adds while it generates the tensors, i.e. before general.type and the
        hyperparameters (and not in a vocab-only file)."""

    vocab_loaders: ClassVar[tuple[str, ...]] = ("gpt2",)

    def write_vocab(self, folder: Path, w: GGUFWriter) -> VocabSummary:
        return write_vocab(folder, self.config, w, self.vocab_loaders)
