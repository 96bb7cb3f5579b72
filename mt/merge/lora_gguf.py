"""`mt convert-lora`: a PEFT LoRA adapter -> a GGUF LoRA adapter that llama.cpp applies to the base's GGUF.

What llama.cpp expects (src/llama-adapter.cpp, llama-graph.cpp), and so what is written, in the order
convert_lora_to_gguf.py writes it:
- metadata: general.architecture (the base's), general.type = "adapter", adapter.type = "lora", the
  model-card keys (general.name … from the adapter folder), adapter.lora.alpha (float32),
  [adapter.alora.invocation_tokens], general.quantization_version. No hyperparameters, no vocabulary.
- per target, `<gguf name>.lora_a` then `.lora_b`, targets in the order of the adapter's sorted keys.
  Linear: lora_a = A [r, in], lora_b = B [out, r], B's rows put in the order the base's transform puts the
  weight's rows (Q/K rope permutation). token_embd: lora_a = A.T [vocab, r] (llama.cpp gathers its rows by
  token), lora_b = B [dim, r].
- llama.cpp adds scale * B (A x) with scale = alpha / rank, rank = lora_b's column count (alpha 0: scale 1).
  Where peft's scale for a module differs (rsLoRA, alpha_pattern), the ratio is folded into lora_b.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from mt.convert.arch import load_architecture
from mt.convert.arch.base import Architecture
from mt.io.checkpoint import Checkpoint, LazyTensor, folder_name, open_checkpoint
from mt.convert.general import write_general_metadata
from mt.convert.plan import encode, read_whole
from mt.io.stream import row_ranges
from mt.io.dtypes import to_f32
from mt.errors import AdapterError, UnknownTensor
from mt.io.atomic import atomic_path, check_output
from mt.io.gguf_out import GGUFContents, write_gguf
from mt.merge.adapter import CONFIG_NAME, PREFIX, Adapter, LoraConfig, LoraDelta, open_adapter
from mt.merge.fused import fuse_parts
from mt.merge.merged import OUTPUT_NAME, check_fits, tied_embedding
from mt.quant.choose import Writer, tensor_types
from mt.quant.mix import TensorSpec
from mt.quant.outtypes import CONVERTER_TYPES, OutType
from mt.quant.types import quant_type

ALORA_TOKENS_KEY = "alora_invocation_tokens"
# llama.cpp's tensor names for the input embedding and the output projection (LLM_TENSOR_TOKEN_EMBD / OUTPUT)
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
MERGE_INSTEAD = "merge it into the model instead: mt merge BASE ADAPTER -o DIR, or mt convert BASE --adapter ADAPTER -o OUT.gguf"
COMPARE_BYTES = 16 << 20


@dataclass(frozen=True)
class LoraTensor:
    """One output tensor: its GGUF name, type and float32 values (numpy shape; ggml's is reversed)."""

    name: str
    qtype: T
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return quant_type(self.qtype).nbytes(self.shape)


@dataclass
class LoraGGUFResult:
    output: Path
    arch: str
    alpha: float
    tensors: list[LoraTensor]
    nbytes_written: int


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f32", *, force: bool = False) -> LoraGGUFResult:
    """Write `adapter_dir` (a PEFT LoRA folder) as a GGUF LoRA adapter for the GGUF of `base_dir`. The base folder
    gives the architecture, name table and Q/K permutation, and its tensors' shapes (and, for tensors the adapter
    saves whole, values) are checked against the adapter before anything is written."""
    out_type = _outtype(outtype)
    base = open_checkpoint(base_dir)
    adapter = fuse_parts(base, open_adapter(adapter_dir))
    arch = load_architecture(base.architecture, base.config)
    check_expressible(base, adapter, arch)
    tensors = plan_norm_copies(adapter, arch) + plan_lora_tensors(adapter, arch, out_type)
    check_output(out, force)
    contents = _contents(adapter, base, arch, tensors)
    with atomic_path(out) as tmp:
        written = write_gguf(tmp, contents, ([encode(t.values, "F32", t.qtype)] for t in tensors))
    return LoraGGUFResult(out, arch.gguf_arch, adapter.config.alpha, tensors, written)


def _outtype(outtype: str) -> OutType:
    if outtype not in CONVERTER_TYPES:  # convert_lora_to_gguf.py's --outtype choices
        raise AdapterError(f"unknown --outtype {outtype!r} for a LoRA adapter", f"choose one of {', '.join(CONVERTER_TYPES)}")
    return CONVERTER_TYPES[outtype]


# ---------------------------------------------------------------- what a llama.cpp LoRA can carry


def check_expressible(base: Checkpoint, adapter: Adapter, arch: Architecture) -> None:
    """Raise AdapterError for an adapter that does not fit the base or that llama.cpp's LoRA cannot apply."""
    if adapter.config.use_dora or any(d.magnitude is not None for d in adapter.deltas.values()):
        raise AdapterError("the adapter uses DoRA, whose per-row magnitudes a llama.cpp LoRA adapter cannot carry", MERGE_INSTEAD)
    if adapter.bias_deltas:
        raise AdapterError(f"the adapter trains LoRA biases (lora_bias) on {_modules(adapter.bias_deltas)}, "
                           "which a llama.cpp LoRA adapter cannot carry", MERGE_INSTEAD)
    check_fits(base, adapter)
    _check_tied_output(base, adapter, arch)
    for name, saved in adapter.replacements.items():
        _check_same_as_base(name, saved, base)


def _modules(names: dict[str, LoraDelta]) -> str:
    modules = sorted(d.module for d in names.values())
    return ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")


def _check_tied_output(base: Checkpoint, adapter: Adapter, arch: Architecture) -> None:
    """With tied embeddings the base GGUF has no output.weight: llama.cpp multiplies by token_embd.weight, and
    applies token_embd's LoRA (embedding layout) there too, where ggml_mul_mat's shape assert aborts the process."""
    if any(_maps_to(arch, name, OUTPUT) for name in base.tensors):
        return
    for name, delta in adapter.deltas.items():
        weight = delta.target or name  # a weight the converter drops (Gemma 2's stored lm_head) has no GGUF tensor either
        target = _gguf_name(arch, weight) if weight in base.tensors and not arch.names.is_dropped(weight) else OUTPUT
        if target == OUTPUT:
            raise AdapterError(f"the adapter has a LoRA on {delta.module}, but {base.folder.name} ties its output to the "
                               "token embedding, so its GGUF has no output tensor for llama.cpp to apply it to", MERGE_INSTEAD)
        if delta.embedding and target == TOKEN_EMBD:
            raise AdapterError(f"the adapter has a LoRA on {delta.module}, and {base.folder.name} ties its output to that "
                               "embedding: llama.cpp would apply the LoRA to the output projection too, where its shapes "
                               "do not fit (llama.cpp aborts)", MERGE_INSTEAD)


def _gguf_name(arch: Architecture, hf_name: str) -> str:
    return arch.names.map(hf_name)


def _maps_to(arch: Architecture, hf_name: str, gguf_name: str) -> bool:
    if arch.names.is_dropped(hf_name):
        return False
    try:
        return arch.names.map(hf_name) == gguf_name
    except UnknownTensor:
        return False


def _check_same_as_base(name: str, saved: LazyTensor, base: Checkpoint) -> None:
    """A tensor the adapter saves whole (modules_to_save, or the base layer peft saves beside an embedding LoRA)
    is fine when it is the base's own tensor; a llama.cpp adapter has no way to replace a base tensor."""
    ref = base.tensors.get(tied_embedding(base) or name if name == OUTPUT_NAME else name)
    module = name.rsplit(".", 1)[0]
    assert ref is not None  # check_fits found every saved tensor in the base
    if tuple(saved.shape) != tuple(ref.shape):
        raise AdapterError(f"the adapter saves {module} as {list(saved.shape)} but the base's is {list(ref.shape)} "
                           "(a resized vocabulary); a llama.cpp LoRA adapter cannot resize the base", MERGE_INSTEAD)
    rows = ref.shape[0] if ref.shape else 1
    for start, stop in row_ranges(rows, ref.nbytes // rows, COMPARE_BYTES):
        if not np.array_equal(to_f32(saved.read_rows(start, stop), saved.dtype), to_f32(ref.read_rows(start, stop), ref.dtype),
                              equal_nan=True):
            raise AdapterError(f"the adapter saves a {module} of its own (modules_to_save, or the layer it was trained on), "
                               "which differs from the base's; a llama.cpp LoRA adapter carries only low-rank pairs", MERGE_INSTEAD)


# ---------------------------------------------------------------- the tensors


def plan_lora_tensors(adapter: Adapter, arch: Architecture, out: OutType) -> list[LoraTensor]:
    """lora_a/lora_b for every target, in convert_lora_to_gguf.py's order (the adapter's keys, sorted); the parts of a
    fused weight (mt/merge/fused.py) become one pair."""
    groups: dict[str, list[LoraDelta]] = {}
    for name, delta in sorted(adapter.deltas.items(), key=lambda item: _first_key(item[1])):
        groups.setdefault(_gguf_name(arch, delta.target or name), []).append(delta)
    tensors: list[LoraTensor] = []
    for gguf_name, deltas in groups.items():
        a, b = lora_pair(deltas, gguf_name, arch, adapter.config.alpha)
        tensors += [_tensor(f"{gguf_name}.lora_a", a, out), _tensor(f"{gguf_name}.lora_b", b, out)]
    return tensors


def plan_norm_copies(adapter: Adapter, arch: Architecture) -> list[LoraTensor]:
    """The norms the adapter saves whole (modules_to_save, mergekit-extract-lora), in F32 and converted as the base
    converts them (Gemma: 1 + w), ahead of the pairs: convert_lora_to_gguf.py writes them so, and llama.cpp skips
    every `*_norm.weight` of an adapter. check_expressible has refused copies that differ from the base's."""
    norms = sorted(name for name in adapter.replacements if _converter_keeps_whole(name))
    return [_norm_copy(arch, name, adapter.replacements[name]) for name in norms]


def _converter_keeps_whole(hf_name: str) -> bool:
    # convert_lora_to_gguf.py's test for the layernorms it passes through; it refuses any other whole tensor
    return "_layernorm" in hf_name or ".norm" in hf_name


def _norm_copy(arch: Architecture, hf_name: str, saved: LazyTensor) -> LoraTensor:
    gguf_name = _gguf_name(arch, hf_name)
    return LoraTensor(gguf_name, T.F32, to_f32(*read_whole(saved, arch.transform_for(gguf_name), arch.config)))


def _first_key(delta: LoraDelta) -> str:
    # lora_A sorts before lora_B, lora_embedding_A before lora_embedding_B
    return PREFIX + delta.module + (".lora_embedding_A" if delta.embedding else ".lora_A.weight")


def _tensor(name: str, values: np.ndarray, out: OutType) -> LoraTensor:
    """F16 where a quantized block does not divide the row (often B's rank)."""
    spec = TensorSpec(name, tuple(reversed(values.shape)), T.F32)
    return LoraTensor(name, tensor_types(out, Writer.LORA_CONVERTER, [spec])[name], values)


def lora_pair(deltas: list[LoraDelta], gguf_name: str, arch: Architecture, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as llama.cpp applies them to `gguf_name`, float32, with peft's scale made llama.cpp's. Several
    deltas on one weight (the parts of a fused one) stack: A's rows and B's columns side by side, so B A is their sum."""
    if deltas[0].embedding:
        (delta,) = deltas
        if arch.transform_for(gguf_name) is not None:
            raise AdapterError(f"the base transforms {gguf_name} on conversion, which its LoRA cannot follow", MERGE_INSTEAD)
        b = _scaled(delta, llama_cpp_scale(alpha, delta.rank))
        return np.ascontiguousarray(delta.a.T), np.ascontiguousarray(b, dtype=np.float32)  # [vocab, r], [dim, r]
    scale = llama_cpp_scale(alpha, sum(d.rank for d in deltas))
    a = np.concatenate([d.a for d in deltas])  # [r, in]
    b = np.concatenate([_scaled(d, scale) for d in deltas], axis=1)
    if (order := row_order(arch, gguf_name, b.shape[0])) is not None:
        b = b[order]  # [out, r]
    return a, np.ascontiguousarray(b, dtype=np.float32)


def _scaled(delta: LoraDelta, llama_cpp: float) -> np.ndarray:
    """B with the ratio of peft's scale to llama.cpp's folded in (B itself where they agree)."""
    ratio = delta.scale / llama_cpp
    return delta.b * np.float32(ratio) if ratio != 1.0 else delta.b


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """llama_adapter_lora_weight::get_scale at adapter scale 1: alpha / rank, or 1 when alpha is 0."""
    return alpha / rank if np.float32(alpha) != 0 else 1.0


def row_order(arch: Architecture, gguf_name: str, rows: int) -> np.ndarray | None:
    """The row permutation the architecture's transform applies to `gguf_name` (None: no transform), found by
    running the transform on the row indices; a transform that is not a row permutation cannot act on B alone."""
    transform = arch.transform_for(gguf_name)
    if transform is None:
        return None
    probe = np.arange(rows, dtype=np.float64)[:, None]
    moved = np.asarray(transform(probe, arch.config)).reshape(-1)
    order = moved.astype(np.int64)
    if moved.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)) or not np.array_equal(order, moved):
        raise AdapterError(f"the base's conversion of {gguf_name} is not a row permutation, so its LoRA cannot be converted",
                           MERGE_INSTEAD)
    return order


# ---------------------------------------------------------------- the file


def _contents(adapter: Adapter, base: Checkpoint, arch: Architecture, tensors: list[LoraTensor]) -> GGUFContents:
    w = GGUFContents(arch.gguf_arch)
    for t in tensors:
        w.add_slot(t.name, t.shape, t.qtype, t.nbytes)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    write_general_metadata(w, adapter.folder, fallback_name=folder_name(base.folder))
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.config.alpha)
    if tokens := alora_invocation_tokens(adapter.config):
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def alora_invocation_tokens(config: LoraConfig) -> list[int]:
    """An activated LoRA's (aLoRA) invocation token ids, which llama.cpp reads from adapter.alora.invocation_tokens."""
    tokens = config.alora_invocation_tokens
    if not tokens and config.invocation_string:
        raise AdapterError("the adapter is an activated LoRA given by invocation_string only",
                           f"add its token ids as {ALORA_TOKENS_KEY} to {CONFIG_NAME}")
    if tokens and not (isinstance(tokens, list) and all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens)):
        raise AdapterError(f"{CONFIG_NAME}: {ALORA_TOKENS_KEY} is not a list of token ids", "fix or re-save the adapter")
    return list(tokens or [])
