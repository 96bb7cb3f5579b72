"""`mt convert --format safetensors`: any checkpoint mt opens, every tensor cast to one float dtype, written as a
Hugging Face folder (shards, index, config.json with its dtype updated, tokenizer and other side files).

For TADA this is the model card's fp16/bf16 deployment option (its int8 option is the Q8_0 GGUF)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mt.io.checkpoint import Checkpoint, LazyTensor, SideData
from mt.convert.plan import check_float
from mt.io.stream import Progress
from mt.io.dtypes import to_f32
from mt.errors import MtError
from mt.io.dtypes import STORAGE_DTYPES
from mt.io.safetensors_out import parse_size
from mt.merge.merge import write_folder
from mt.merge.merged import merged_config
from mt.merge.source import open_source
from mt.io.dtypes import f32_to_bf16_bits

SAFETENSORS_OUTTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


@dataclass
class ReexportResult:
    output: Path
    dtype: str
    tensors: int
    nbytes: int
    shards: int


@dataclass(frozen=True)
class CastTensor:
    """`source` cast to `dtype` (F32/F16/BF16) slab by slab, through float32 (BF16: round to nearest even)."""

    name: str
    dtype: str
    source: LazyTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * STORAGE_DTYPES[self.dtype].itemsize

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.source.read_rows(start, stop)
        if self.source.dtype == self.dtype:
            return rows
        values = to_f32(rows, self.source.dtype)
        if self.dtype == "BF16":
            return f32_to_bf16_bits(values)
        with np.errstate(over="ignore"):
            out = values.astype(STORAGE_DTYPES[self.dtype])
        if np.isinf(out).any() and np.isfinite(values).all():
            raise MtError(f"tensor {self.name!r} holds values beyond float16's range (±65504)",
                          "re-export with --outtype bf16 or f32")
        return out

    def read(self) -> np.ndarray:
        return self.read_rows()


def safetensors_dtype(outtype: str) -> str:
    if outtype not in SAFETENSORS_OUTTYPES:
        raise MtError(f"--outtype {outtype} is a GGUF type; --format safetensors writes plain float tensors",
                      f"choose --outtype {', '.join(SAFETENSORS_OUTTYPES)} (for int8 write a GGUF with --outtype q8_0)")
    return SAFETENSORS_OUTTYPES[outtype]


def cast_tensors(ckpt: Checkpoint, dtype: str) -> dict[str, CastTensor]:
    for name, ref in ckpt.tensors.items():
        check_float(name, ref, "--format safetensors re-exports float checkpoints (F32/F16/BF16)")
    return {name: CastTensor(name, dtype, ref) for name, ref in ckpt.tensors.items()}


def reexport(src: Path, out: Path, outtype: str, *, force: bool = False, allow_pickle: bool = False,
             adapter: Path | None = None, dequantized_base: bool = False, max_shard_size: str = "5GB",
             allow_non_finite: bool = False, progress: Progress | None = None) -> ReexportResult:
    dtype = safetensors_dtype(outtype)
    ckpt = open_source(src, adapter, dequantized_base=dequantized_base, allow_pickle=allow_pickle,
                       allow_non_finite=allow_non_finite)
    tensors = cast_tensors(ckpt, dtype)
    total, shards = write_folder(out, tensors, _side_files(ckpt, dtype), parse_size(max_shard_size), force, progress,
                                 not allow_non_finite)
    return ReexportResult(out, dtype, len(tensors), total, shards)


def _side_files(ckpt: Checkpoint, dtype: str) -> dict[str, SideData]:
    files = ckpt.side_files.mapping()
    files["config.json"] = (json.dumps(merged_config(ckpt.config, None, dtype), indent=2, sort_keys=True) + "\n").encode()
    return files
