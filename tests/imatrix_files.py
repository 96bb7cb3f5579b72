"""Importance-matrix files for tests, written as llama-imatrix writes them (tools/imatrix/imatrix.cpp
save_imatrix / save_imatrix_legacy), and the map tools/quantize/quantize.cpp builds from them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RawEntry:
    sums: np.ndarray  # float32 [n_mat, ne0]: sums of squared activations
    counts: np.ndarray  # [n_mat] tokens seen per matrix


@dataclass
class RawImatrix:
    entries: dict[str, RawEntry]
    datasets: list[str] = field(default_factory=lambda: ["wiki.train.raw"])
    chunk_count: int = 17
    chunk_size: int = 512

    def expected_gguf_map(self) -> dict[str, np.ndarray]:
        """quantize.cpp load_imatrix for a GGUF file: sums / count per matrix, 1 where count is 0."""
        out = {}
        for name, e in self.entries.items():
            count = e.counts.astype(np.float32)[:, None]
            out[name] = np.where(count > 0, e.sums / np.where(count > 0, count, 1), 1).astype(np.float32).reshape(-1)
        return out

    def legacy_values(self, name: str) -> tuple[int, np.ndarray]:
        """save_imatrix_legacy: ncall = ceil(max count / chunk_size), values (sum / count) * ncall."""
        e = self.entries[name]
        ncall = (int(e.counts.max()) + self.chunk_size - 1) // self.chunk_size
        count = e.counts.astype(np.float32)[:, None]
        value = np.where(count == 0, np.float32(1), e.sums)
        count = np.where(count == 0, np.float32(1), count)
        return ncall, ((value / count) * np.float32(ncall)).astype(np.float32).reshape(-1)

    def expected_legacy_map(self) -> dict[str, np.ndarray]:
        """quantize.cpp load_imatrix for a legacy file: values / ncall (as stored when ncall is 0)."""
        out = {}
        for name in self.entries:
            ncall, values = self.legacy_values(name)
            out[name] = (values / np.float32(ncall)).astype(np.float32) if ncall > 0 else values
        return out


def random_imatrix(shapes: dict[str, tuple[int, int]], seed: int = 0, chunk_size: int = 512) -> RawImatrix:
    """shapes: name -> (n_mat, ne0). Counts are multiples of the chunk size, sums chi-square-like."""
    rng = np.random.default_rng(seed)
    entries = {}
    for name, (n_mat, ne0) in shapes.items():
        counts = rng.integers(1, 40, n_mat) * chunk_size
        mean_sq = (rng.standard_normal((n_mat, ne0)) ** 2 * rng.uniform(0.01, 5)).astype(np.float32)
        entries[name] = RawEntry((mean_sq * counts[:, None]).astype(np.float32), counts)
    return RawImatrix(entries, chunk_size=chunk_size)


def write_gguf(raw: RawImatrix, path: Path, *, metadata: bool = True, counts_dtype: type = np.float32) -> Path:
    tensors = {}
    for name in sorted(raw.entries):
        e = raw.entries[name]
        tensors[f"{name}.in_sum2"] = e.sums.astype(np.float32)
        tensors[f"{name}.counts"] = e.counts.astype(counts_dtype).reshape(-1, 1)
    return write_gguf_tensors(path, tensors, raw.datasets if metadata else None, raw.chunk_count, raw.chunk_size)


def write_gguf_tensors(path: Path, tensors: dict[str, np.ndarray], datasets: list[str] | None = None,
                       chunk_count: int = 1, chunk_size: int = 512) -> Path:
    """An imatrix GGUF as llama-imatrix lays it out, holding exactly `tensors`; no imatrix.* keys when
    datasets is None."""
    from gguf import GGMLQuantizationType as T

    from mt.io import gguf_out

    w = gguf_out.GGUFContents("imatrix")
    w.remove("general.architecture")  # llama-imatrix writes no architecture
    w.add_string("general.type", "imatrix")
    if datasets is not None:
        w.add_array("imatrix.datasets", datasets)
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, data in tensors.items():
        w.add_slot(name, data.shape, {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16}[data.dtype], data.nbytes)
    gguf_out.write_gguf(path, w, ([data] for data in tensors.values()))
    return path


def write_legacy(raw: RawImatrix, path: Path, *, trailer: bool = True) -> Path:
    parts = [struct.pack("<i", len(raw.entries))]
    for name in sorted(raw.entries):
        ncall, values = raw.legacy_values(name)
        encoded = name.encode()
        parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, values.size), values.tobytes()]
    if trailer:
        dataset = raw.datasets[-1].encode() if raw.datasets else b""
        parts += [struct.pack("<i", raw.chunk_count), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(parts))
    return path
