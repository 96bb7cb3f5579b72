"""`mt quantize`: an F32/F16/BF16 GGUF -> a quantized GGUF laid out as llama-quantize writes it.

llama.cpp copies the metadata in order, moves general.quantization_version and general.file_type
to the end, and writes the tensors in its weights_map order (`mix.llama_order`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.errors import MtError, NonFiniteWeights
from mt.io.dtypes import STORAGE_DTYPES, first_non_finite, to_f32
from mt.io.gguf_in import GGUFHeader, TensorInfo, read_header
from mt.io.atomic import atomic_path, check_output
from mt.io.gguf_out import GGUFContents, write_gguf
from mt.io.stream import Prefetcher, grouped, row_ranges
from mt.quant.choose import Writer, tensor_types
from mt.quant.mix import FILE_TYPES, MixOptions, ModelFacts, TensorSpec, check_imatrix_given, header_facts, llama_order
from mt.quant.outtypes import by_file_type
from mt.quant.imatrix import Imatrix, load_imatrix, output_keys
from mt.quant.device import GPU_TYPES, GpuQuantizer, select_device
from mt.quant.types import quant_type
from mt.quant.weighted import quantize_weighted, uses_weights

MOVED_TO_END = ("general.quantization_version", "general.file_type")
SET_BY_WRITER = ("general.architecture",)
SOURCE_TYPES = (T.F32, T.F16, T.BF16)
ROWS_PER_STEP_BYTES = 16 << 20


@dataclass
class QuantizeResult:
    output: Path
    file_type: LlamaFileType
    types: dict[str, T]
    nbytes: int


def parse_file_type(name: str) -> LlamaFileType:
    try:
        return FILE_TYPES[name.lower()]
    except KeyError:
        raise MtError(f"unknown quantization type {name!r}", f"choose one of {', '.join(t.upper() for t in FILE_TYPES)}") from None


def text(value: object) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value  # type: ignore[return-value]


UNLOADABLE = "llama.cpp cannot load such a file; convert the model again"


def check_vocabulary(header: GGUFHeader) -> None:
    """What llama.cpp's loader asserts of a vocabulary (it aborts otherwise): every token string once, the per-token
    arrays as long as the token list, special token ids inside it."""
    tokens = header.value("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if len(set(tokens)) != len(tokens):
        seen: set = set()
        twice = next(t for t in tokens if t in seen or seen.add(t))
        raise MtError(f"{header.path}: the token {text(twice)!r} appears twice in tokenizer.ggml.tokens",
                      UNLOADABLE)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = header.value(key)
        if values is not None and len(values) != len(tokens):
            raise MtError(f"{header.path}: {key} has {len(values)} entries for {len(tokens)} tokens",
                          UNLOADABLE)
    for key, (_, value) in header.kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int) \
                and not 0 <= value < len(tokens):
            raise MtError(f"{header.path}: {key} is {value}, outside the {len(tokens)} tokens",
                          UNLOADABLE)


def check_tensor_names(header: GGUFHeader, facts: ModelFacts) -> None:
    """Every tensor one of the architecture's (gguf-py's table of them) with its layer below block_count, and every
    layer holding the same tensors: what llama.cpp's loader needs of a file (it refuses it otherwise)."""
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(facts.arch)
    if arch is None or arch not in gguf.MODEL_TENSORS:
        return  # an architecture gguf-py does not list: nothing to judge by
    templates = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]]
    pattern = re.compile("^(?:" + "|".join(re.escape(t).replace(r"\{bid\}", r"(?P<bid%d>\d+)" % i)
                                          for i, t in enumerate(templates)) + r")\.(?:weight|bias)$")
    layers: dict[int, set[str]] = {}
    for t in header.tensors:
        found = pattern.match(t.name)
        if found is None:
            raise MtError(f"{header.path}: tensor {t.name!r} is not one of a {facts.arch} model's",
                          UNLOADABLE)
        bid = next((int(v) for v in found.groupdict().values() if v is not None), None)
        if bid is not None:
            if bid >= facts.n_layer:
                raise MtError(f"{header.path}: tensor {t.name!r} is in layer {bid}, but {facts.arch}.block_count is "
                              f"{facts.n_layer}", UNLOADABLE)
            layers.setdefault(bid, set()).add(t.name.split(".", 2)[2])
    every = set().union(*layers.values()) if layers else set()
    for bid in range(facts.n_layer if layers else 0):
        if lacking := sorted(every - layers.get(bid, set())):
            raise MtError(f"{header.path}: tensor 'blk.{bid}.{lacking[0]}' is missing (the other layers have it)",
                          UNLOADABLE)


def check_loadable(header: GGUFHeader) -> ModelFacts:
    """What llama.cpp's loader needs of a model file (check_vocabulary, check_tensor_names); the model's facts."""
    check_vocabulary(header)
    facts = model_facts(header)
    check_tensor_names(header, facts)
    return facts


def load_problem(header: GGUFHeader) -> str | None:
    """Why llama.cpp's loader would refuse the file, or abort on it (check_loadable); None when it finds nothing.
    Only model files are judged: an adapter's or an importance matrix's general.type says what else a file is."""
    if text(header.value("general.type", "model")) != "model":
        return None
    try:
        check_loadable(header)
    except MtError as e:
        return e.problem
    return None


def model_facts(header: GGUFHeader) -> ModelFacts:
    arch = text(header.value("general.architecture"))
    if arch is None:
        raise MtError(f"{header.path} has no general.architecture", "quantize a GGUF written by mt convert or llama.cpp")
    return header_facts(header.value)


def plan_types(header: GGUFHeader, facts: ModelFacts, file_type: LlamaFileType, options: MixOptions) -> tuple[list[TensorInfo], dict[str, T]]:
    by_name = {t.name: t for t in header.tensors}
    ordered = [by_name[n] for n in llama_order(list(by_name))]
    specs = [TensorSpec(t.name, t.shape, t.type) for t in ordered]
    out = by_file_type(file_type)
    assert out is not None and out.quantizer, file_type
    types = tensor_types(out, Writer.QUANTIZER, specs, facts, options)
    for t in ordered:
        if types[t.name] != t.type and t.type not in SOURCE_TYPES:
            raise MtError(
                f"tensor {t.name!r} is already {t.type.name}; mt does not re-quantize",
                "quantize from the F32, F16 or BF16 GGUF (mt convert --outtype bf16)",
            )
    return ordered, types


FLOAT_NAMES = {T.BF16: "BF16", T.F16: "F16", T.F32: "F32"}  # a float GGML type -> its storage dtype name
STORAGE = {t: (name, STORAGE_DTYPES[name]) for t, name in FLOAT_NAMES.items()}


def _f32(values: np.ndarray, src: T) -> np.ndarray:
    """Decode a chunk of source values (in a pool thread)."""
    return to_f32(values, STORAGE[src][0])


def tensor_weights(imx: Imatrix, ordered: list[TensorInfo], types: dict[str, T]) -> dict[str, np.ndarray]:
    """The imatrix rows of each tensor that is converted, looked up (and size-checked) as llama-quant.cpp
    does before any data is written; types without an imatrix path ignore them."""
    found = {t.name: imx.weights_for(t.name, t.shape) for t in ordered if types[t.name] != t.type}
    return {name: w for name, w in found.items() if w is not None and uses_weights(types[name])}


def put_quantization_keys_last(w: GGUFContents, file_type: LlamaFileType) -> None:
    """llama-quantize re-sets these two keys, which moves them after all the copied metadata."""
    for key in MOVED_TO_END:
        w.remove(key)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(int(file_type))


def tensor_chunks(info: TensorInfo, new_type: T, weights: np.ndarray | None = None,
                  gpu: GpuQuantizer | None = None, check_finite: bool = True) -> Iterator[np.ndarray]:
    """Output bytes of one tensor, a slab of rows at a time; weights [n_mat, ne0] from an imatrix; on the GPU
    where `gpu` handles the type (the imatrix path runs on the CPU). `check_finite`: a NaN or Inf in a tensor that
    is quantized is an error naming its first place."""
    n_rows = info.n_elements // info.shape[0]
    rows_per_matrix = info.shape[1] if len(info.shape) > 1 else 1
    row_bytes = info.nbytes // max(1, n_rows)
    with open(info.path, "rb") as f:
        for start, stop in row_ranges(n_rows, row_bytes, ROWS_PER_STEP_BYTES):
            count = stop - start
            f.seek(info.offset + start * row_bytes)
            raw = np.frombuffer(f.read(count * row_bytes), dtype=np.uint8)
            if new_type == info.type:
                yield raw
                continue
            if weights is None and gpu is not None and gpu.handles(new_type, info.shape[0]):
                yield gpu.quantize(raw, STORAGE[info.type][0], new_type, info.shape[0], tensor_name=info.name)
                continue
            values = raw.view(STORAGE[info.type][1]).reshape(count, info.shape[0])
            if check_finite and (bad := first_non_finite(values, STORAGE[info.type][0])) is not None:
                raise NonFiniteWeights(info.name, (start + bad // info.shape[0], bad % info.shape[0]))
            if weights is None:  # decoding runs chunk by chunk on the quantizer's thread pool
                yield quant_type(new_type).quantize(values, lambda chunk: _f32(chunk, info.type))
            else:
                yield from _quantize_by_matrix(new_type, _f32(values, info.type), start, rows_per_matrix, weights)


def _quantize_by_matrix(new_type: T, values: np.ndarray, first_row: int, rows_per_matrix: int, weights: np.ndarray) -> Iterator[np.ndarray]:
    """Rows first_row.. of a tensor, each quantized with its matrix's (expert's) imatrix row."""
    row = 0
    while row < values.shape[0]:
        matrix = (first_row + row) // rows_per_matrix
        end = min(values.shape[0], (matrix + 1) * rows_per_matrix - first_row)
        yield quantize_weighted(new_type, values[row:end], weights[matrix])
        row = end


def quantize_gguf(src: Path, out: Path, file_type: str, *, options: MixOptions | None = None, force: bool = False,
                  progress: Callable[[int, int], None] | None = None, imatrix: str | Path | None = None,
                  device: str = "auto", allow_non_finite: bool = False) -> QuantizeResult:
    """`imatrix`: an importance-matrix file (GGUF or legacy .dat); the path is recorded as given.
    `allow_non_finite`: quantize NaN/Inf weights as they come instead of refusing them."""
    ftype = parse_file_type(file_type)
    options = options or MixOptions()
    header = read_header(src, raw_strings=True)
    check_output(out, force)
    facts = check_loadable(header)
    imx = load_imatrix(Path(imatrix)) if imatrix is not None else None
    if imx is not None:
        options = replace(options, has_imatrix=True)
    ordered, types = plan_types(header, facts, ftype, options)
    weights = tensor_weights(imx, ordered, types) if imx is not None else {}
    check_imatrix_given(types, ftype, weights if imx is not None else None)
    uses_gpu_types = any(types[t.name] in GPU_TYPES and types[t.name] != t.type for t in ordered)
    gpu = select_device(device) if device == "cuda" or uses_gpu_types else None
    w = GGUFContents(facts.arch)
    if (alignment := header.value("general.alignment")) is not None:
        w.data_alignment = int(alignment)
    for key, (vtype, value) in header.kv.items():
        if key not in SET_BY_WRITER:
            w.add_key_value(key, value, vtype, sub_type=header.array_types.get(key))
    put_quantization_keys_last(w, ftype)
    if imx is not None:
        for key, vtype, value in output_keys(imx, str(imatrix)):
            w.remove(key)  # llama.cpp re-sets the key: it moves to the end
            w.add_key_value(key, value, vtype)
    sizes = {t.name: quant_type(types[t.name]).nbytes(tuple(reversed(t.shape))) for t in ordered}
    for t in ordered:
        w.add_slot(t.name, tuple(reversed(t.shape)), types[t.name], sizes[t.name])
    total = sum(sizes.values())
    with atomic_path(out) as tmp:
        # reading and quantizing run one slab ahead on a worker thread while this one writes
        producer = Prefetcher(((i, chunk) for i, t in enumerate(ordered)
                               for chunk in tensor_chunks(t, types[t.name], weights.get(t.name), gpu,
                                                                   not allow_non_finite)), depth=2)
        try:
            write_gguf(tmp, w, _reported(grouped(ordered, producer), sizes, total, progress))
        finally:
            producer.close()
    return QuantizeResult(out, ftype, types, total)


def _reported(tensors: Iterator[tuple[TensorInfo, Iterator[np.ndarray]]], sizes: dict[str, int], total: int,
              progress: Callable[[int, int], None] | None) -> Iterator[Iterator[np.ndarray]]:
    """Each tensor's chunks; `progress` hears of a tensor once its chunks are all written."""
    for t, chunks in tensors:
        yield chunks
        if progress is not None:
            progress(sizes[t.name], total)
