"""A base checkpoint with an adapter merged in, tensor by tensor, as lazy tensors: nothing is computed
until a writer (mt merge's safetensors shards or mt convert's GGUF) reads a slab of rows."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np

from mt.io.checkpoint import Checkpoint, LazyTensor
from mt.errors import AdapterError, NonFiniteWeights
from mt.io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES, f32_to_bf16_bits, first_non_finite, place_of, to_f32
from mt.merge.adapter import Adapter, LoraDelta
from mt.merge.fused import fuse_parts

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")
OUTPUT_NAME = "lm_head.weight"

BaseWrapper = Callable[[str, LazyTensor], LazyTensor]


@dataclass(frozen=True)
class MergedTensor:
    """`source` rows in float32, plus each LoRA delta (and lora_B bias), cast once to `dtype`. `check_finite`: a NaN
    or Inf in the rows read (the base's or the merge's doing) is an error naming the tensor and the first place."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: LazyTensor
    deltas: tuple[LoraDelta, ...] = ()
    bias_deltas: tuple[LoraDelta, ...] = ()
    check_finite: bool = True

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * STORAGE_DTYPES[self.dtype].itemsize

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = to_f32(self.source.read_rows(start, stop), self.source.dtype)
        for delta in self.deltas:
            rows = delta.apply(rows, start)
        for delta in self.bias_deltas:
            assert delta.bias is not None
            rows = rows + delta.bias[start:start + len(rows)] * np.float32(delta.scale)
        return self._cast(rows, start)

    def read(self) -> np.ndarray:
        return self.read_rows()

    def _cast(self, rows: np.ndarray, start: int) -> np.ndarray:
        if self.dtype == "BF16":
            out = f32_to_bf16_bits(rows)
        else:
            with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
                out = rows.astype(STORAGE_DTYPES[self.dtype], copy=False)
        if self.check_finite and (bad := first_non_finite(out, self.dtype)) is not None:
            self._refuse(rows, bad, start)
        return out

    def _refuse(self, rows: np.ndarray, flat: int, start: int) -> None:
        """The base's NaN/Inf is the checkpoint's fault; one the merge made (or an overflow of the cast) the adapter's."""
        where = place_of(self.shape, start, flat)
        base = self.source.read_rows(where[0], where[0] + 1) if len(where) == 2 else self.source.read()
        if not np.isfinite(to_f32(base, self.source.dtype).reshape(-1)[where[-1]]):
            raise NonFiniteWeights(self.name, where)
        overflow = f" in {self.dtype}" if np.isfinite(rows.reshape(-1)[flat]) else ""
        raise AdapterError(
            f"merging the adapter makes tensor {self.name!r} NaN or Inf{overflow} (first at {list(where)})",
            "the adapter is broken or its update overflows this dtype; check the adapter, merge with --dtype f32/bf16, "
            "or pass --allow-non-finite to write such values as they are")


def merge_checkpoint(base: Checkpoint, adapter: Adapter, dtype: str | None = None,
                     wrap_base: BaseWrapper | None = None, check_finite: bool = True) -> Checkpoint:
    """`base` with `adapter` merged in. `dtype` (F32/F16/BF16) casts every float tensor; None keeps each
    tensor's own dtype. `wrap_base` may replace a base tensor before merging (QLoRA's dequantized base).
    `check_finite`: a merged tensor that reads NaN or Inf raises (see MergedTensor)."""
    if adapter.config.activated:
        raise AdapterError("the adapter is an activated LoRA (alora_invocation_tokens): it acts only after its "
                           "invocation tokens, which a merged weight cannot do",
                           "convert it with mt convert-lora and load it in llama.cpp beside the base")
    base, (deltas, bias_deltas, replacements), vocab = _fit(base, adapter)
    tensors: dict[str, LazyTensor] = {}
    for name, ref in base.tensors.items():
        source = replacements.get(name, ref)
        if wrap_base is not None and name not in replacements:
            source = wrap_base(name, source)
        out_dtype = dtype if dtype is not None and ref.dtype in FLOAT_DTYPES else ref.dtype
        changed = name in deltas or name in bias_deltas or source is not ref or out_dtype != ref.dtype
        tensors[name] = MergedTensor(name, out_dtype, source.shape, source, tuple(deltas.get(name, ())),
                                     tuple(bias_deltas.get(name, ())), check_finite) if changed else ref
    return replace(base, config=merged_config(base.config, vocab, dtype), tensors=tensors)


def check_fits(base: Checkpoint, adapter: Adapter) -> None:
    """The checks merge_checkpoint makes before it merges: architecture, target modules and their shapes,
    vocabulary resizes. For callers that use the adapter without merging it (mt convert-lora)."""
    _fit(base, adapter)


def _fit(base: Checkpoint, adapter: Adapter) -> tuple[Checkpoint, Targets, int | None]:
    """(the base as merged: untied where the adapter trains its own lm_head, the adapter's tensors by the base
    tensor they change (parts of a fused weight: that weight), the new vocabulary size or None), after checking the
    adapter fits the base."""
    _check_architecture(base, adapter)
    adapter = fuse_parts(base, adapter)
    base = _drop_ignored_output(_untie_if_replaced(base, adapter))
    targets = _retarget_tied(base, adapter)
    _check_targets(base, *targets)
    return base, targets, _new_vocab_size(base, targets[2])


def merged_config(config: dict[str, Any], vocab_size: int | None, dtype: str | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    if vocab_size is not None:
        holder = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
        holder["vocab_size"] = vocab_size
    if dtype is not None:
        torch_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = torch_name
    return config


def _check_architecture(base: Checkpoint, adapter: Adapter) -> None:
    wanted = adapter.config.base_model_class
    if wanted and wanted != base.architecture:
        raise AdapterError(
            f"the adapter was trained on a {wanted} but {base.folder} is a {base.architecture}",
            "pass the base checkpoint the adapter was trained on",
        )


Targets = tuple[dict[str, list[LoraDelta]], dict[str, list[LoraDelta]], dict[str, LazyTensor]]


# transformers 5 holds a vision-language model's parts under model.* (the names peft saves); the checkpoints store
# them otherwise: the text layers as language_model.model.* (Gemma 3) or model.* (Qwen2.5-VL), the tower without it
STORED_SPELLINGS = {
    "model.language_model.": ("language_model.model.", "model."),
    "model.vision_tower.": ("vision_tower.vision_model.", "vision_tower."),
    "model.multi_modal_projector.": ("multi_modal_projector.",),
    "model.visual.": ("visual.",),
}


def stored_name(name: str, tensors: Mapping[str, LazyTensor]) -> str:
    """`name` as the checkpoint stores it."""
    if name in tensors:
        return name
    for prefix, spellings in STORED_SPELLINGS.items():
        if name.startswith(prefix):
            found = (spelling + name.removeprefix(prefix) for spelling in spellings)
            return next((candidate for candidate in found if candidate in tensors), name)
    return name


def _retarget_tied(base: Checkpoint, adapter: Adapter) -> Targets:
    """With tied embeddings the checkpoint stores one tensor for the input embedding and lm_head, and peft merges
    an lm_head update into that shared weight; so lm_head's deltas land on the embedding tensor. Names peft saves
    as transformers holds the model land on the tensors as the checkpoint stores them."""
    tied_to = tied_embedding(base)

    def target(name: str) -> str:
        return tied_to if tied_to is not None and name == OUTPUT_NAME else stored_name(name, base.tensors)

    deltas: dict[str, list[LoraDelta]] = {}
    bias_deltas: dict[str, list[LoraDelta]] = {}
    # peft merges modules in the model's order, so the embedding's own delta goes before a tied lm_head's
    for name, delta in sorted(adapter.deltas.items(), key=lambda item: item[0] == OUTPUT_NAME):
        deltas.setdefault(target(delta.target or name), []).append(delta)
    for name, delta in adapter.bias_deltas.items():
        bias_deltas.setdefault(target(name), []).append(delta)
    replacements: dict[str, LazyTensor] = {}
    for name, ref in adapter.replacements.items():
        if target(name) in replacements and name == OUTPUT_NAME:
            continue  # the tied pair saved twice: the embedding's copy wins
        replacements[target(name)] = ref
    return deltas, bias_deltas, replacements


def _untie_if_replaced(base: Checkpoint, adapter: Adapter) -> Checkpoint:
    """A tied base whose adapter saves a whole lm_head of its own (modules_to_save) gets an lm_head tensor and
    tie_word_embeddings false; peft's merged save_pretrained would drop that lm_head again."""
    embedding = tied_embedding(base)
    if embedding is None or OUTPUT_NAME not in adapter.trained_modules:
        return base
    config = {**base.config, "tie_word_embeddings": False}
    return replace(base, config=config, tensors={**base.tensors, OUTPUT_NAME: base.tensors[embedding]})


def tied_embedding(base: Checkpoint) -> str | None:
    """The input embedding's tensor name when lm_head shares it (tied embeddings), else None: the checkpoint stores no
    lm_head.weight, or stores one beside `tie_word_embeddings: true`, which transformers (and so peft) then ignores."""
    if OUTPUT_NAME in base.tensors and base.config.get("tie_word_embeddings") is not True:
        return None
    return next((n for n in EMBEDDING_NAMES if n in base.tensors), None)


def _drop_ignored_output(base: Checkpoint) -> Checkpoint:
    """A stored lm_head.weight that the config ties to the embedding is left out, as peft's merged save_pretrained
    leaves it out (its lm_head is the embedding)."""
    if OUTPUT_NAME not in base.tensors or tied_embedding(base) is None:
        return base
    return replace(base, tensors={n: t for n, t in base.tensors.items() if n != OUTPUT_NAME})


def _check_targets(base: Checkpoint, deltas: dict[str, list[LoraDelta]], bias_deltas: dict[str, list[LoraDelta]],
                   replacements: dict[str, LazyTensor]) -> None:
    for name in bias_deltas:
        if name not in base.tensors:
            raise AdapterError(f"the adapter trains a bias for {name.rsplit('.', 1)[0]} (lora_bias) but the base layer has none",
                               "pass the base checkpoint the adapter was trained on")
    for name in [*deltas, *replacements]:
        if name not in base.tensors:
            module = name.rsplit(".", 1)[0]
            raise AdapterError(
                f"the adapter changes {module}, which {base.folder.name} does not have",
                "the adapter was made for another model; pass the base checkpoint it was trained on",
            )
    for name, items in deltas.items():
        shape = tuple(replacements[name].shape if name in replacements else base.tensors[name].shape)
        for delta in items:
            if delta.weight_shape != shape:
                raise AdapterError(
                    f"the adapter's update for {name} is {list(delta.weight_shape)} but the tensor is {list(shape)}"
                    + _resize_hint(base, delta, shape),
                    "pass the base checkpoint the adapter was trained on",
                )
            if delta.magnitude is not None and delta.magnitude.shape != (shape[0],):
                raise AdapterError(f"the adapter's DoRA magnitude for {name} has {delta.magnitude.size} entries, not {shape[0]}",
                                   "pass the base checkpoint the adapter was trained on")
    for name, items in bias_deltas.items():
        for delta in items:
            if delta.bias is not None and delta.bias.shape != tuple(base.tensors[name].shape):
                raise AdapterError(f"the adapter's lora_B bias for {name} has {delta.bias.size} entries, not {base.tensors[name].shape}",
                                   "pass the base checkpoint the adapter was trained on")


def _resize_hint(base: Checkpoint, delta: LoraDelta, shape: tuple[int, ...]) -> str:
    if delta.weight_shape[1:] == shape[1:] and shape[0] == _vocab_size(base.config):
        return (f" (the adapter was trained on a vocabulary resized to {delta.weight_shape[0]} tokens, and does not"
                " carry the resized embedding: save it with modules_to_save or save_embedding_layers=True)")
    return ""


def _vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def _new_vocab_size(base: Checkpoint, replacements: dict[str, LazyTensor]) -> int | None:
    """The vocabulary size after replacements that resize it; every vocabulary-sized tensor must agree."""
    old = _vocab_size(base.config)
    resized: dict[str, int] = {}
    for name, ref in replacements.items():
        want = tuple(base.tensors[name].shape)
        if tuple(ref.shape) == want:
            continue
        if old is None or len(want) != 2 or want[0] != old or tuple(ref.shape[1:]) != want[1:]:
            raise AdapterError(f"the adapter's {name} is {list(ref.shape)} but the base's is {list(want)}",
                               "pass the base checkpoint the adapter was trained on")
        resized[name] = int(ref.shape[0])
    if not resized:
        return None
    sizes = set(resized.values())
    vocab_tensors = [n for n, t in base.tensors.items() if len(t.shape) == 2 and t.shape[0] == old]
    missing = [n for n in vocab_tensors if n not in resized]
    if len(sizes) > 1 or missing:
        raise AdapterError(
            f"the adapter resizes the vocabulary to {max(sizes)} tokens in {', '.join(sorted(resized))} but not in "
            f"{', '.join(missing) or 'all of them alike'}",
            "save every vocabulary-sized module (embed_tokens and lm_head) in the adapter: modules_to_save",
        )
    return sizes.pop()
