"""`mt merge`: base checkpoint + PEFT adapter -> a merged Hugging Face folder, one slab of rows at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mt.convert.checkpoint import LazyTensor
from mt.convert.plan import SLAB_BYTES, row_ranges
from mt.io.safetensors_out import SafetensorsFolderWriter, TensorSpec, parse_size
from mt.merge.merged import MergedTensor
from mt.merge.source import open_merged, side_files

Progress = Callable[[int, int], None]  # (bytes just written, total bytes)


@dataclass
class MergeResult:
    output: Path
    tensors: int
    merged: int  # tensors an adapter delta or a saved module changed
    nbytes: int
    shards: int
    vocab_size: int | None


def merge(base: Path, adapter: Path, out: Path, *, dtype: str | None = None, max_shard_size: str = "5GB",
          force: bool = False, dequantized_base: bool = False, progress: Progress | None = None) -> MergeResult:
    """Merge `adapter` into `base` and write `out` (safetensors shards + index, config, tokenizer, generation config).
    Arithmetic in float32, cast once to `dtype` (f32/f16/bf16; default: each tensor's own dtype)."""
    shard_bytes = parse_size(max_shard_size)
    merged, base_ckpt, adapter_info = open_merged(base, adapter, dtype, dequantized_base)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in merged.tensors.items()]
    total = sum(s.nbytes for s in specs)
    with SafetensorsFolderWriter(out, specs, shard_bytes, force=force) as writer:
        for name, data in side_files(base_ckpt, merged.config, adapter_info).items():
            writer.add_file(name, data)
        for name, tensor in merged.tensors.items():
            writer.write_tensor(name, _reporting(row_slabs(tensor), progress, total))
        n_shards = len(writer.shards)
    changed = sum(isinstance(t, MergedTensor) and bool(t.deltas or t.bias_deltas or t.source is not base_ckpt.tensors.get(n))
                  for n, t in merged.tensors.items())
    return MergeResult(out, len(specs), changed, total, n_shards, merged.config.get("vocab_size"))


def row_slabs(tensor: LazyTensor) -> Iterator[np.ndarray]:
    """The tensor in slabs of rows of about SLAB_BYTES, so memory stays at a few slabs whatever its size."""
    if len(tensor.shape) < 2:
        yield tensor.read()
        return
    rows = tensor.shape[0]
    for start, stop in row_ranges(rows, tensor.nbytes // max(1, rows), SLAB_BYTES):
        yield tensor.read_rows(start, stop)


def _reporting(chunks: Iterator[np.ndarray], progress: Progress | None, total: int) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(chunk.nbytes, total)
