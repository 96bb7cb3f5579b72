"""The tensor plan: every output tensor (name, shape, type, source) decided before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.convert.arch.base import Architecture, Companion, ExtraTensor, Transform
from mt.errors import MtError, NonFiniteWeights
from mt.io.checkpoint import Checkpoint, LazyTensor
from mt.io.dtypes import FLOAT_DTYPE_NAMES, FLOAT_DTYPES, NON_FINITE_EXPONENT, first_non_finite, place_of, to_f32
from mt.io.gguf_out import GGUFContents, write_gguf
from mt.io.safetensors import FileSpan
from mt.io.stream import Chunk, Prefetcher, Progress, grouped, reporting, row_ranges
from mt.quant.choose import Writer, tensor_types
from mt.quant.imatrix import GivenImatrix, output_keys
from mt.quant.mix import MixOptions, ModelFacts, TensorSpec, check_imatrix_given, llama_order
from mt.quant.outtypes import CONVERT_CHOICES, CONVERTER_TYPES, QUANTIZER_TYPES, OutType, by_file_type
from mt.quant.types import quant_type
from mt.quant.weighted import quantize_weighted, uses_weights

if TYPE_CHECKING:
    from mt.quant.device import GpuQuantizer



@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    qtype: T
    source: LazyTensor | None = None
    extra: ExtraTensor | None = None
    transform: Transform | None = None
    weights: np.ndarray | None = field(default=None, compare=False)  # the imatrix's column weights [ne0], if used

    @property
    def nbytes(self) -> int:
        return quant_type(self.qtype).nbytes(self.shape)

    @property
    def source_name(self) -> str:
        return self.source.name if self.source is not None else "(generated)"


@dataclass
class TensorPlan:
    file_type: LlamaFileType
    entries: list[PlanEntry]
    # a llama.cpp mix (Q4_K_M …) is laid out as llama-quantize writes it from the F32 conversion:
    # the hyperparameters carry that file's type, and the final type goes last in the metadata
    llama_quantize_layout: bool = False
    imatrix_keys: list[tuple[str, Any, object]] = field(default_factory=list)  # quantize.imatrix.*, after the rest

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def resolve_outtype(outtype: str, ckpt: Checkpoint) -> OutType:
    if outtype == "auto":
        first = next((t for t in ckpt.tensors.values() if len(t.shape) >= 2), None)
        outtype = {"BF16": "bf16", "F16": "f16"}.get(first.dtype if first else "", "f16")
    out = CONVERTER_TYPES.get(outtype)
    if out is None:
        raise MtError(f"unknown --outtype {outtype!r}", f"choose one of {', '.join(CONVERT_CHOICES)}")
    return out


def is_mix(outtype: str) -> bool:
    """A llama.cpp mix (Q4_K_M …), which llama-quantize writes; the other types are the converter's."""
    return outtype in QUANTIZER_TYPES and outtype not in CONVERTER_TYPES


def build_plan(ckpt: Checkpoint, arch: Architecture, outtype: str, imatrix: GivenImatrix | None = None) -> TensorPlan:
    """The converter's plan, or for a llama.cpp mix the plan llama-quantize makes from the F32 file (with
    `imatrix`, as `llama-quantize --imatrix` makes it; the converter's types take none)."""
    outtype = arch.check_outtype(outtype)
    if is_mix(outtype):
        mix = QUANTIZER_TYPES[outtype].file_type
        return mix_plan(_converter_plan(ckpt, arch, "f32"), mix, arch.model_facts(), imatrix)
    return _converter_plan(ckpt, arch, outtype)


def mix_plan(f32_plan: TensorPlan, file_type: LlamaFileType, facts: ModelFacts,
             imatrix: GivenImatrix | None = None) -> TensorPlan:
    by_name = {e.name: e for e in f32_plan.entries}
    ordered = [by_name[n] for n in llama_order(list(by_name))]
    out = by_file_type(file_type)
    assert out is not None and out.quantizer, file_type
    types = tensor_types(out, Writer.QUANTIZER, [_spec(e) for e in ordered], facts,
                         MixOptions(has_imatrix=imatrix is not None))
    for e in ordered:
        if e.qtype in QUANTIZED_SOURCES.values() and types[e.name] != e.qtype:
            raise MtError(f"{e.name} is {e.qtype.name} in the checkpoint and {file_type.name} would make it "
                          f"{types[e.name].name}; llama-quantize requantizes only with --allow-requantize",
                          "choose a type that keeps it (mxfp4_moe, or f16, bf16, q8_0)")
    entries = [replace(e, qtype=types[e.name], weights=_imatrix_weights(imatrix, e, types[e.name])) for e in ordered]
    check_imatrix_given(types, file_type, None if imatrix is None else {e.name for e in entries if e.weights is not None})
    keys = output_keys(imatrix.imatrix, imatrix.given_as) if imatrix is not None else []
    return TensorPlan(file_type, entries, llama_quantize_layout=True, imatrix_keys=keys)


def _imatrix_weights(imatrix: GivenImatrix | None, entry: PlanEntry, qtype: T) -> np.ndarray | None:
    """As llama-quant.cpp: every tensor it converts is looked up (a misfitting entry is an error), and the weights
    are used by the types that take them."""
    if imatrix is None or qtype == entry.qtype:
        return None
    found = imatrix.imatrix.weights_for(entry.name, tuple(reversed(entry.shape)))
    if found is None or not uses_weights(qtype):
        return None
    if found.shape[0] != 1:
        raise MtError(f"{entry.name} holds {found.shape[0]} matrices (experts), each with its own imatrix weights",
                      "convert to bf16, then mt quantize --imatrix")
    return found[0]


NOT_DATA_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # buffers, not weights


def main_file_tensors(arch: Architecture, tensors: Mapping[str, LazyTensor]) -> Iterator[tuple[str, str, LazyTensor]]:
    """(checkpoint name, GGUF name, tensor) of every tensor the main file holds: buffers, dropped tensors and the
    companions' left out; a name the family does not know raises UnknownTensor."""
    for hf_name, ref in arch.source_tensors(tensors).items():
        if hf_name.endswith(NOT_DATA_SUFFIXES):
            continue
        if arch.names.is_dropped(hf_name) or any(c.takes(hf_name) for c in arch.companions):
            continue
        yield hf_name, arch.names.map(hf_name), ref


# checkpoint tensors already in a GGML type (gpt-oss's MXFP4 experts): carried as they are, whatever the out type
QUANTIZED_SOURCES = {"MXFP4": T.MXFP4}


def _converter_plan(ckpt: Checkpoint, arch: Architecture, outtype: str) -> TensorPlan:
    out = resolve_outtype(outtype, ckpt)
    entries = [PlanEntry(x.name, x.shape, T.F32, extra=x) for x in arch.extra_tensors()]
    for hf_name, name, ref in main_file_tensors(arch, ckpt.tensors):
        check_float(hf_name, ref)
        qtype = QUANTIZED_SOURCES.get(ref.dtype, T.F32)
        entries.append(PlanEntry(name, ref.shape, qtype, source=ref, transform=arch.transform_for(name)))
    types = tensor_types(out, Writer.CONVERTER, [_spec(e) for e in entries])
    return TensorPlan(converter_file_type(out, ckpt.config), [replace(e, qtype=types[e.name]) for e in entries])


def converter_file_type(out: OutType, config: dict[str, Any]) -> LlamaFileType:
    """The file type the converter records: a float file of a checkpoint quantized to MXFP4 (gpt-oss) is labelled
    MXFP4_MOE, the experts being carried in it."""
    floats = (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_BF16)
    if out.file_type in floats and (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        return LlamaFileType.MOSTLY_MXFP4_MOE
    return out.file_type


def _spec(entry: PlanEntry) -> TensorSpec:
    return TensorSpec(entry.name, tuple(reversed(entry.shape)), entry.qtype)


def check_float(hf_name: str, ref: LazyTensor, remedy: str = "mt converts float checkpoints (F32/F16/BF16)") -> None:
    if ref.dtype not in FLOAT_DTYPES and ref.dtype not in QUANTIZED_SOURCES:
        raise MtError(f"tensor {hf_name!r} has dtype {ref.dtype}", remedy)


def companion_plans(ckpt: Checkpoint, arch: Architecture, outtype: str) -> list[tuple[Companion, TensorPlan]]:
    """One plan per companion file of `arch`: its tensors in checkpoint order, never quantized."""
    return [(c, companion_plan(ckpt, arch, c, outtype)) for c in arch.companions]


def companion_plan(ckpt: Checkpoint, arch: Architecture, companion: Companion, outtype: str) -> TensorPlan:
    """Weights of 2+ dims F16 (F32 when `outtype` is f32), everything else F32, whatever the main file's type."""
    all_f32 = outtype == "f32"
    entries = []
    for hf_name, ref in arch.source_tensors(ckpt.tensors).items():
        if not companion.takes(hf_name):
            continue
        check_float(hf_name, ref)
        qtype = T.F16 if len(ref.shape) >= 2 and not all_f32 else T.F32
        entries.append(PlanEntry(companion.tensor_name(hf_name), ref.shape, qtype, source=ref))
    return TensorPlan(LlamaFileType.ALL_F32 if all_f32 else LlamaFileType.MOSTLY_F16, entries)


def _bf16_has_nan(bits: np.ndarray) -> bool:
    return bits.size > 0 and _bf16_nan_from_max(int(bits.max()), int(bits.view(np.int16).max()))


def _bf16_nan_from_max(max_u16: int, max_i16: int) -> bool:
    # positive NaNs are 0x7f81..0x7fff (int16 > 0x7f80), negative ones 0xff81..0xffff (uint16 > 0xff80)
    return max_i16 > 0x7F80 or max_u16 > 0xFF80


def _passes_through(dtype: str, qtype: T) -> bool:
    return (dtype, qtype) in (("BF16", T.BF16), ("F16", T.F16), ("F32", T.F32)) or QUANTIZED_SOURCES.get(dtype) == qtype


def encode(raw: np.ndarray, dtype: str, qtype: T, gpu: GpuQuantizer | None = None,
           weights: np.ndarray | None = None) -> np.ndarray:
    """Source values in their storage dtype -> output bytes of `qtype`, as llama.cpp's converter writes them (with
    an imatrix's column `weights`, as llama-quantize --imatrix does, on the CPU)."""
    if weights is not None:
        return quantize_weighted(qtype, raw.reshape(-1, raw.shape[-1]), weights, lambda chunk: to_f32(chunk, dtype))
    if _passes_through(dtype, qtype) and not (dtype == "BF16" and _bf16_has_nan(raw)):
        return raw
    if gpu is not None and gpu.handles(qtype, raw.shape[-1]):
        return gpu.quantize(raw, dtype, qtype, raw.shape[-1]).reshape(*raw.shape[:-1], -1)
    return quant_type(qtype).quantize(raw, lambda chunk: to_f32(chunk, dtype))




def start_producing(plan: TensorPlan, config: dict, depth: int = 2, gpu: GpuQuantizer | None = None,
                    check_finite: bool = True) -> "Prefetcher":
    """Start computing every entry's chunks on a worker thread now, `depth` chunks ahead of the writer,
    so reading and quantizing overlap with the metadata work and with writing (numpy and file I/O
    release the GIL)."""
    return Prefetcher(((i, chunk) for i, e in enumerate(plan.entries)
                       for chunk in produce(e, config, gpu, check_finite)), depth)


def by_entry(plan: TensorPlan, prefetcher: "Prefetcher") -> Iterator[tuple[PlanEntry, Iterator[Chunk]]]:
    """Each entry with its own chunks, read off the prefetcher in order."""
    return grouped(plan.entries, prefetcher)


def payloads(plan: TensorPlan, producer: Prefetcher, progress: Progress | None, total: int) -> Iterator[Iterator[Chunk]]:
    """Each entry's chunks off `producer`, reported to `progress` against `total` (the bytes of every file written)."""
    for _, chunks in by_entry(plan, producer):
        yield reporting(chunks, progress, total)


def write_planned(path: Path, contents: GGUFContents, plan: TensorPlan, config: dict, progress: Progress | None,
                  total: int, check_finite: bool = True) -> int:
    """A file of `contents` whose tensors `plan` produces, read and encoded on a worker thread as they are written."""
    producer = start_producing(plan, config, check_finite=check_finite)
    try:
        return write_gguf(path, contents, payloads(plan, producer, progress, total))
    finally:
        producer.close()


def read_whole(src: LazyTensor, transform: Transform | None, config: dict) -> tuple[np.ndarray, str]:
    """A tensor read whole and through its transform, with the storage dtype name of what came out (a transform may
    widen, e.g. bf16 -> float32, as the converter does)."""
    raw = src.read()
    if transform is None:
        return raw, src.dtype
    raw = transform(raw, config)
    return raw, FLOAT_DTYPE_NAMES[raw.dtype]


def produce(entry: PlanEntry, config: dict, gpu: GpuQuantizer | None = None, check_finite: bool = True) -> Iterator[Chunk]:
    """Output bytes of one entry, in row slabs where the tensor needs no whole-tensor transform."""
    for chunks in produce_types(entry, (entry.qtype,), config, gpu, (entry.weights,), check_finite):
        yield chunks[0]


def produce_types(entry: PlanEntry, qtypes: Sequence[T], config: dict, gpu: GpuQuantizer | None = None,
                  weights: Sequence[np.ndarray | None] | None = None, check_finite: bool = True) -> Iterator[list[Chunk]]:
    """Output bytes of one entry for each of `qtypes` (with the imatrix `weights` given for it), from one read of
    the source: a list per row slab. `check_finite`: a NaN or Inf in the source, or a value a float output type
    cannot hold, is an error naming the tensor and the first place (read as the slab streams past, never again)."""
    targets = list(zip(qtypes, weights or [None] * len(qtypes)))
    if entry.extra is not None:
        yield _encode_each(entry.extra.make(), "F32", targets, gpu)
        return
    src = entry.source
    assert src is not None
    checked = _FiniteCheck(entry, src.shape) if check_finite else _UNCHECKED
    if entry.transform is not None or len(src.shape) < 2:
        raw, dtype = read_whole(src, entry.transform, config)
        checked.source(raw, dtype, 0)
        yield checked.outputs(_encode_each(raw, dtype, targets, gpu), targets, dtype, 0)
        return
    for start, stop in row_ranges(src.shape[0], src.nbytes // src.shape[0]):
        copied = all(w is None and _passes_through(src.dtype, q) for q, w in targets) and hasattr(src, "span")
        span = src.span(start, stop) if copied else None
        if span is not None and checked.copyable(span, src.dtype, start):
            yield [span] * len(targets)
            continue
        raw = src.read_rows(start, stop)
        checked.source(raw, src.dtype, start)
        yield checked.outputs(_encode_each(raw, src.dtype, targets, gpu), targets, src.dtype, start)


class _Unchecked:
    """--allow-non-finite: values go through as they are (a BF16 NaN still takes ggml's quieting, so its span is not
    copied as is)."""

    def source(self, raw: np.ndarray, dtype: str, start: int) -> None:
        pass

    def copyable(self, span: FileSpan, dtype: str, start: int) -> bool:
        return not (dtype == "BF16" and span.nbytes and _bf16_nan_from_max(*span.max_u16_and_i16()))

    def outputs(self, chunks: list[np.ndarray], targets: list[tuple[T, np.ndarray | None]], dtype: str,
                start: int) -> list[np.ndarray]:
        return chunks


_UNCHECKED = _Unchecked()


class _FiniteCheck(_Unchecked):
    """Where the first NaN or Inf of a tensor is, in the source's shape, from the slab that holds it."""

    def __init__(self, entry: PlanEntry, shape: tuple[int, ...]) -> None:
        # a transformed tensor (rows reordered …) is placed in the file's tensor, not the checkpoint's
        self.name = entry.source_name if entry.transform is None else f"{entry.name} (from {entry.source_name})"
        self.shape = shape

    def _where(self, start: int, flat: int) -> tuple[int, ...]:
        return place_of(self.shape, start, flat)

    def source(self, raw: np.ndarray, dtype: str, start: int) -> None:
        if dtype in NON_FINITE_EXPONENT and (bad := first_non_finite(raw, dtype)) is not None:
            raise NonFiniteWeights(self.name, self._where(start, bad))

    def copyable(self, span: FileSpan, dtype: str, start: int) -> bool:
        """A span with no NaN or Inf (so no BF16 NaN to quiet either) is copied as it is."""
        if (bad := span.first_non_finite(dtype)) is not None:
            raise NonFiniteWeights(self.name, self._where(start, bad))
        return True

    def outputs(self, chunks: list[np.ndarray], targets: list[tuple[T, np.ndarray | None]], dtype: str,
                start: int) -> list[np.ndarray]:
        """A float output narrower than its source (F32 -> F16 …) holds Inf where a value was too large."""
        for chunk, (q, _) in zip(chunks, targets):
            name = _FLOAT_OUTPUTS.get(q)
            narrower = name is not None and name != dtype and (name, dtype) != ("BF16", "F16")
            if narrower and (bad := first_non_finite(chunk, name)) is not None:
                raise NonFiniteWeights(self.name, self._where(start, bad), overflow=name)
        return chunks


_FLOAT_OUTPUTS = {T.F16: "F16", T.BF16: "BF16"}  # output types narrower than some source: F32 -> F16/BF16, BF16 -> F16


def _encode_each(raw: np.ndarray, dtype: str, targets: list[tuple[T, np.ndarray | None]],
                 gpu: GpuQuantizer | None) -> list[np.ndarray]:
    """`raw` encoded for each (type, weights); a pair asked for twice (Q6_K in Q4_K_M, Q5_K_M and Q6_K files) once."""
    done: dict[tuple[T, int], np.ndarray] = {}
    for q, w in targets:
        key = (q, id(w))
        if key not in done:
            done[key] = encode(raw, dtype, q, gpu, w)
    return [done[(q, id(w))] for q, w in targets]