"""`mt merge`: base checkpoint + PEFT adapter -> a merged Hugging Face folder, one slab of rows at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from mt.errors import NonFiniteWeights
from mt.io.checkpoint import LazyTensor, SideData
from mt.io.dtypes import NON_FINITE_EXPONENT, first_non_finite, place_of
from mt.io.stream import SLAB_BYTES, Progress, reporting, row_ranges
from mt.io.safetensors_out import SafetensorsFolderWriter, TensorSpec, parse_size
from mt.merge.merged import MergedTensor
from mt.merge.source import open_merged


@dataclass
class MergeResult:
    output: Path
    tensors: int
    merged: int  # tensors an adapter delta or a saved module changed
    nbytes: int
    shards: int
    vocab_size: int | None


def merge(base: Path, adapter: Path, out: Path, *, dtype: str | None = None, max_shard_size: str = "5GB",
          force: bool = False, dequantized_base: bool = False, allow_non_finite: bool = False,
          progress: Progress | None = None) -> MergeResult:
    """Merge `adapter` into `base` and write `out` (safetensors shards + index, config, tokenizer, generation config).
    Arithmetic in float32, cast once to `dtype` (f32/f16/bf16; default: each tensor's own dtype).
    `allow_non_finite`: write NaN/Inf weights (the base's, or the merge's) as they come instead of refusing them."""
    merged, base_ckpt, adapter_info = open_merged(base, adapter, dtype, dequantized_base,
                                                  allow_non_finite=allow_non_finite)
    total, n_shards = write_folder(out, merged.tensors, merged.side_files.mapping(),
                                   parse_size(max_shard_size), force, progress, not allow_non_finite)
    changed = sum(isinstance(t, MergedTensor) and bool(t.deltas or t.bias_deltas or t.source is not base_ckpt.tensors.get(n))
                  for n, t in merged.tensors.items())
    return MergeResult(out, len(merged.tensors), changed, total, n_shards, merged.config.get("vocab_size"))


def write_folder(out: Path, tensors: Mapping[str, LazyTensor], files: Mapping[str, SideData], shard_bytes: int,
                 force: bool, progress: Progress | None, check_finite: bool = True) -> tuple[int, int]:
    """`tensors` (each already in its output dtype) as save_pretrained's shards and index, with `files` beside
    them, written atomically slab by slab; the tensor bytes and the number of shards. `check_finite`: a NaN or Inf
    in a float tensor is an error naming it and the first place, found as its slabs stream past."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    total = sum(s.nbytes for s in specs)
    with SafetensorsFolderWriter(out, specs, shard_bytes, force=force) as writer:
        for name, data in files.items():
            writer.add_file(name, data)
        for name, tensor in tensors.items():
            slabs = row_slabs(tensor)
            # a merged tensor checks itself as it is cast, naming the base or the adapter as the cause
            if check_finite and tensor.dtype in NON_FINITE_EXPONENT and not isinstance(tensor, MergedTensor):
                slabs = finite_slabs(name, tensor.shape, tensor.dtype, slabs)
            writer.write_tensor(name, reporting(slabs, progress, total))
        return total, len(writer.shards)


def finite_slabs(name: str, shape: tuple[int, ...], dtype: str, slabs: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    start = 0
    for slab in slabs:
        if (bad := first_non_finite(slab, dtype)) is not None:
            raise NonFiniteWeights(name, place_of(shape, start, bad))
        start += len(slab)
        yield slab


def row_slabs(tensor: LazyTensor) -> Iterator[np.ndarray]:
    """The tensor in slabs of rows of about SLAB_BYTES, so memory stays at a few slabs whatever its size."""
    if len(tensor.shape) < 2:
        yield tensor.read()
        return
    rows = tensor.shape[0]
    for start, stop in row_ranges(rows, tensor.nbytes // max(1, rows), SLAB_BYTES):
        yield tensor.read_rows(start, stop)
