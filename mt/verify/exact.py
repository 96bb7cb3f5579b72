"""Every tensor of the checked file against mt's own encoding of the source tensor at the type the file holds.

mt's quantizers write ggml's bytes, so this holds for files from llama-quantize too, with any per-tensor type
choices (--pure, --output-tensor-type …). llama-quantize may have read a 16-bit conversion of an F32 source:
each tensor is also tried from its values rounded to F16 and to BF16, and the report says which one matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as T

from mt.convert.plan import QUANTIZED_SOURCES, PlanEntry, read_whole
from mt.errors import QuantizationError
from mt.io.dtypes import bf16_bits_to_f32, f32_to_bf16_bits, to_f32
from mt.io.gguf_in import GGUFHeader, TensorInfo
from mt.io.stream import row_ranges
from mt.quant.imatrix import Imatrix
from mt.quant.types import quant_type
from mt.quant.weighted import quantize_weighted, uses_weights
from mt.verify.report import Check, Status

SLAB_BYTES = 32 << 20  # float32 source values per step


def _round_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


# what the quantizer read: the converted source values, or a 16-bit conversion of them
INTERMEDIATES = {"source": lambda x: x, "F16": _round_f16, "BF16": _round_bf16}
IDENTITY_FOR = {"F16": "F16", "BF16": "BF16"}  # rounding a source of this dtype to it changes nothing


@dataclass
class TensorReport:
    checked: int = 0
    intermediates: dict[str, int] = field(default_factory=dict)  # which values each checked tensor was made from
    problems: list[str] = field(default_factory=list)
    uncheckable: list[str] = field(default_factory=list)  # made with an importance matrix that was not given


def source_rows(entry: PlanEntry, config: dict) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 [rows, n]) slabs of the converted source tensor (generated ones and transformed ones whole)."""
    if entry.extra is not None:
        values = entry.extra.make().astype(np.float32)
    elif entry.transform is not None or len(entry.shape) != 2:
        raw, dtype = read_whole(entry.source, entry.transform, config)
        values = to_f32(raw, dtype)
    else:
        src = entry.source
        for start, stop in row_ranges(src.shape[0], src.shape[1] * 4, SLAB_BYTES):
            yield start, to_f32(src.read_rows(start, stop), src.dtype)
        return
    yield 0, values.reshape(-1, entry.shape[-1])


def _file_rows(f, info: TensorInfo, start: int, count: int) -> np.ndarray:
    row_bytes = info.nbytes // (info.n_elements // info.shape[0])
    f.seek(info.offset + start * row_bytes)
    return np.frombuffer(f.read(count * row_bytes), dtype=np.uint8).reshape(count, row_bytes)


def _encode(values: np.ndarray, qtype: T, weights: np.ndarray | None) -> np.ndarray:
    if weights is not None:
        return quantize_weighted(qtype, values, weights)
    return quant_type(qtype).quantize(values)


def _first_block(expected: np.ndarray, actual: np.ndarray, qtype: T, first_row: int, n_per_row: int) -> str:
    qt = quant_type(qtype)
    blocks_per_row = n_per_row // qt.block_size
    diff = (expected.reshape(-1, qt.type_size) != actual.reshape(-1, qt.type_size)).any(axis=1)
    block = int(np.argmax(diff))
    row, col = divmod(block, blocks_per_row)
    values = f"values {col * qt.block_size}..{(col + 1) * qt.block_size - 1}"
    return f"block {first_row * blocks_per_row + block} (row {first_row + row}, {values})"


class TensorChecker:
    """Compares tensor after tensor, remembering which intermediate the file's quantizer read."""

    def __init__(self, config: dict, imatrix: Imatrix | None, made_with_imatrix: bool) -> None:
        self.config = config
        self.imatrix = imatrix
        self.made_with_imatrix = made_with_imatrix
        self.preferred = "source"
        self.report = TensorReport()

    def _weights(self, info: TensorInfo) -> np.ndarray | None:
        if self.imatrix is None or not uses_weights(info.type):
            return None
        weights = self.imatrix.weights_for(info.name, info.shape)
        return None if weights is None else weights[0]

    def _candidates(self, entry: PlanEntry) -> list[str]:
        dtype = entry.source.dtype if entry.source is not None else "F32"
        order = [self.preferred] + [name for name in INTERMEDIATES if name != self.preferred]
        return [name for name in order if name == "source" or IDENTITY_FOR.get(name) != dtype]

    def check(self, entry: PlanEntry, info: TensorInfo) -> None:
        """One tensor: the first slab picks the intermediate that reproduces it, the rest must follow."""
        weights = self._weights(info)
        ambiguous = self.made_with_imatrix and self.imatrix is None and uses_weights(info.type)
        with open(info.path, "rb") as f:
            chosen: str | None = None
            for start, values in source_rows(entry, self.config):
                actual = _file_rows(f, info, start, values.shape[0])
                if chosen is None:
                    chosen = self._pick(entry, values, actual, info.type, weights)
                    if chosen is None:
                        return self._mismatch(entry, info, values, actual, start, weights, ambiguous)
                    continue
                expected = _encode(INTERMEDIATES[chosen](values), info.type, weights)
                if not np.array_equal(expected, actual):
                    return self._mismatch(entry, info, values, actual, start, weights, ambiguous, chosen)
        self.preferred = chosen or self.preferred
        self.report.checked += 1
        self.report.intermediates[self.preferred] = self.report.intermediates.get(self.preferred, 0) + 1

    def check_carried(self, entry: PlanEntry, info: TensorInfo) -> None:
        """A tensor the checkpoint holds in the file's type already (MXFP4 experts): its bytes, expert by expert."""
        src = entry.source
        assert src is not None
        rows = int(np.prod(entry.shape[1:-1], dtype=np.int64))
        with open(info.path, "rb") as f:
            for expert in range(entry.shape[0]):
                expected = src.read_rows(expert, expert + 1).reshape(rows, -1)
                if not np.array_equal(expected, _file_rows(f, info, expert * rows, rows)):
                    self.report.problems.append(f"{info.name} ({info.type.name}): expert {expert} differs from the "
                                                f"checkpoint's {info.type.name} blocks")
                    return
        self.report.checked += 1

    def _pick(self, entry: PlanEntry, values: np.ndarray, actual: np.ndarray, qtype: T,
              weights: np.ndarray | None) -> str | None:
        for name in self._candidates(entry):
            if np.array_equal(_encode(INTERMEDIATES[name](values), qtype, weights), actual):
                return name
        return None

    def _mismatch(self, entry: PlanEntry, info: TensorInfo, values: np.ndarray, actual: np.ndarray, start: int,
                  weights: np.ndarray | None, ambiguous: bool, chosen: str | None = None) -> None:
        if ambiguous:
            self.report.uncheckable.append(info.name)
            return
        name = chosen or self.preferred
        expected = _encode(INTERMEDIATES[name](values), info.type, weights)
        where = _first_block(expected, actual, info.type, start, info.shape[0])
        source = "the source" if name == "source" else f"the source rounded to {name}"
        self.report.problems.append(f"{info.name} ({info.type.name}): {where} differs from mt's {info.type.name} of {source}")


def _has_quantizer(qtype: T) -> bool:
    try:
        quant_type(qtype)
    except QuantizationError:
        return False
    return True


def check_tensors(header: GGUFHeader, entries: list[PlanEntry], config: dict, imatrix: Imatrix | None) -> Check:
    """Each tensor's name, shape and bytes against the reference plan (mt's conversion of the source)."""
    made_with_imatrix = any(k.startswith("quantize.imatrix.") for k in header.kv)
    checker = TensorChecker(config, imatrix, made_with_imatrix)
    by_name = {e.name: e for e in entries}
    in_file = {t.name for t in header.tensors}
    report = checker.report
    report.problems += [f"{name} is missing" for name in by_name if name not in in_file]
    for info in header.tensors:
        entry = by_name.get(info.name)
        if entry is None:
            report.problems.append(f"{info.name} is not in mt's conversion of the source")
        elif tuple(reversed(info.shape)) != entry.shape:
            report.problems.append(f"{info.name} has shape {tuple(reversed(info.shape))}, the source's is {entry.shape}")
        elif entry.qtype in QUANTIZED_SOURCES.values() and info.type == entry.qtype:
            checker.check_carried(entry, info)
        elif not _has_quantizer(info.type):
            report.uncheckable.append(info.name)
        else:
            checker.check(entry, info)
    return _summarize(report, len(header.tensors), made_with_imatrix)


def _summarize(report: TensorReport, n_tensors: int, made_with_imatrix: bool) -> Check:
    data = {"checked": report.checked, "tensors": n_tensors, "intermediates": report.intermediates,
            "uncheckable": report.uncheckable}
    if report.problems:
        return Check("tensors", Status.FAIL, f"{len(report.problems)} of {n_tensors} tensors differ from mt's "
                     f"conversion of the source: {report.problems[0]}", report.problems, data)
    made_from = ", ".join(f"{k if k == 'source' else k + ' intermediate'}: {v}" for k, v in report.intermediates.items())
    summary = f"{report.checked} of {n_tensors} tensors byte-identical to mt's conversion of the source ({made_from})"
    if not report.uncheckable:
        return Check("tensors", Status.PASS, summary, [], data)
    why = ("made with an importance matrix: pass it with --imatrix FILE to check them" if made_with_imatrix
           else "mt has no quantizer for their type")
    return Check("tensors", Status.WARN, f"{summary}; {len(report.uncheckable)} not checkable ({why})",
                 [f"not checked: {name}" for name in report.uncheckable], data)
