"""What every architecture module provides: hyperparameter keys, a tensor-name table, transforms."""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import numpy as np

from mt.io.gguf_out import GGUFContents
from mt.convert.vocab import VocabSummary, write_vocab
from mt.errors import MtError, UnknownTensor
from mt.quant.mix import ModelFacts

if TYPE_CHECKING:
    from mt.io.checkpoint import LazyTensor, SideFiles

# A transform takes the tensor (storage dtype, full) and the config and returns the new tensor.
Transform = Callable[[np.ndarray, dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor the converter generates rather than reads (e.g. rope_freqs)."""

    name: str
    make: Callable[[], np.ndarray]  # float32
    shape: tuple[int, ...]


HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "n_heads")
HEAD_COUNT_KV_KEYS = ("num_key_value_heads", "n_kv_heads")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


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


class KeptNames(NameTable):
    """A table that keeps the HF names (for files only mt's own readers open): a name must fully match one of
    `patterns` (regular expressions), else it is an unknown tensor."""

    def __init__(self, patterns: Iterable[str], dropped: Iterable[str] = ()) -> None:
        super().__init__({}, dropped)
        self._kept = tuple(re.compile(p) for p in patterns)

    def map(self, name: str) -> str:
        if any(p.fullmatch(name) for p in self._kept):
            return name
        return super().map(name)


GGUF_NAME_LIMIT = 63  # GGML_MAX_NAME - 1


@dataclass(frozen=True)
class Companion:
    """A second GGUF written beside the main one, `<stem><suffix>.gguf`, for the tensors the main file's llama.cpp
    architecture has no place for: those whose HF names start with one of `prefixes`. It keeps the HF names
    (checked by `names`), stores weights of 2+ dims as F16 (F32 with --outtype f32) and the rest as F32, never
    quantized, and carries the model's own hyperparameters (`write_metadata`) under its `gguf_arch`."""

    suffix: str
    prefixes: tuple[str, ...]
    gguf_arch: str
    names: NameTable
    write_metadata: Callable[[GGUFContents, dict[str, Any], SideFiles], None]  # (writer, config, tokenizer files)

    def takes(self, hf_name: str) -> bool:
        return hf_name.startswith(self.prefixes)

    def path_beside(self, out: Path) -> Path:
        return out.with_name(f"{out.stem}{self.suffix}{out.suffix or '.gguf'}")

    def tensor_name(self, hf_name: str) -> str:
        name = self.names.map(hf_name)
        if len(name.encode()) > GGUF_NAME_LIMIT:
            raise MtError(f"tensor name {name!r} is longer than GGUF's {GGUF_NAME_LIMIT} bytes",
                          "this companion layout cannot hold it; please report it")
        return name


class Architecture:
    """One model family. Subclasses fill in the class attributes and may override the hooks."""

    gguf_arch: ClassVar[str]
    names: ClassVar[NameTable]
    # gguf-name suffix -> transform, applied to whole tensors (e.g. Q/K row permutation)
    transforms: ClassVar[dict[str, Transform]] = {}
    # extra GGUF files beside the main one (tensors they take are left out of the main plan)
    companions: ClassVar[tuple[Companion, ...]] = ()
    # --outtype values this family accepts (None: all); "auto" resolves to `auto_outtype` when set
    outtypes: ClassVar[tuple[str, ...] | None] = None
    auto_outtype: ClassVar[str | None] = None
    # a decoder whose config.json gives hidden_size, heads, layers, vocab_size: its tensors are checked against them
    decoder_config: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def block_count(self) -> int:
        return int(find_key(self.config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers")))

    def model_facts(self) -> ModelFacts:
        """What llama-quantize's rules would read from the converted file's header."""
        n_head = find_key(self.config, HEAD_COUNT_KEYS)
        n_head_kv = find_key(self.config, HEAD_COUNT_KV_KEYS)
        n_head = int(n_head) if isinstance(n_head, int) else 0
        n_expert = find_key(self.config, EXPERT_COUNT_KEYS)  # the expert_count the converter writes
        return ModelFacts(self.gguf_arch, self.block_count(), n_expert=int(n_expert) if isinstance(n_expert, int) else 0,
                          n_head=n_head, n_head_kv=int(n_head_kv) if isinstance(n_head_kv, int) else n_head)

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        raise NotImplementedError

    def transform_for(self, gguf_name: str) -> Transform | None:
        return next((t for suffix, t in self.transforms.items() if gguf_name.endswith(suffix)), None)

    def extra_tensors(self) -> list[ExtraTensor]:
        return []

    def write_tensor_pass_keys(self, w: GGUFContents) -> None:
        """Keys llama.cpp's converter adds while it generates the tensors, i.e. before general.type and the
        hyperparameters (and not in a vocab-only file)."""

    def fused_parts(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Modules this family stores fused (the name after `model.layers.N.`) -> their parts in row order, each with
        its rows: where an adapter trained on an unfused copy of the model (a Llama-fied Phi-3) lands."""
        return {}

    def source_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        """The checkpoint's tensors as this family converts them (a hook to fold or leave out stored tensors)."""
        return tensors

    def transformers_tensors(self, tensors: Mapping[str, LazyTensor]) -> Mapping[str, LazyTensor]:
        """The checkpoint's tensors under the names and shapes of transformers' parameters, for the references that
        load them one by one (a mixture of experts' experts stacked as transformers 5 holds them)."""
        return tensors

    def check_outtype(self, outtype: str) -> str:
        """`outtype` with "auto" resolved for this family, or a typed error when the family cannot take it."""
        if outtype == "auto" and self.auto_outtype is not None:
            return self.auto_outtype
        if self.outtypes is not None and outtype not in (*self.outtypes, "auto"):
            raise MtError(f"--outtype {outtype} does not apply to {self.gguf_arch} files",
                          f"choose one of {', '.join(self.outtypes)}")
        return outtype

    vocab_loaders: ClassVar[tuple[str, ...]] = ("gpt2",)

    def write_vocab(self, files: SideFiles, w: GGUFContents) -> VocabSummary | None:
        return write_vocab(files, self.config, w, self.vocab_loaders)
