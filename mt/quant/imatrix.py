"""Importance-matrix files, read as llama.cpp's quantize tool reads them (common/imatrix-loader.cpp and
tools/quantize/quantize.cpp) and written as llama-imatrix writes them (tools/imatrix/imatrix.cpp).

Two formats:
- GGUF (llama-imatrix's default): per weight tensor NAME an F32 tensor `NAME.in_sum2` [ne0, n_mat]
  (sums of squared activations) and `NAME.counts` [1, n_mat] (tokens seen per matrix, one matrix per
  expert); keys imatrix.datasets (string array), imatrix.chunk_count and imatrix.chunk_size (u32),
  all three required. Weights = in_sum2 / lround(count) per matrix, 1 where a matrix saw no token.
- legacy `.dat`: int32 n_entries; per entry int32 name length, the name, int32 ncall, int32 nval,
  nval float32 (already averaged, times ncall); then optionally int32 chunk count, int32 length and
  the dataset name. Weights = values / ncall (as stored when ncall is 0).

mt is stricter than llama.cpp in one way: a file whose trailing chunk count or dataset is cut short
is an error here, where llama.cpp reads what is there.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from mt.errors import GGUFError, MtError
from mt.io.gguf_in import GGUF_MAGIC, TensorInfo, read_header
from mt.io.gguf_out import GGUFContents, write_gguf

SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
KV_MAX_STRING = 127  # llama_model_kv_override holds 128 chars with the terminating NUL
REMEDY = "use a file written by llama-imatrix (GGUF or --output-format dat), computed for this model"


class ImatrixError(MtError):
    """An importance-matrix file cannot be read or does not fit the model."""


@dataclass
class Imatrix:
    """Per-column weights by tensor name, float32 [n_mat * ne0] (matrix j's ne0 values at j * ne0)."""

    entries: dict[str, np.ndarray]
    datasets: list[bytes] = field(default_factory=list)
    chunk_count: int = 0
    is_legacy: bool = False
    chunk_size: int = 0  # tokens per chunk (GGUF files record it)

    def weights_for(self, name: str, ne: tuple[int, ...]) -> np.ndarray | None:
        """llama-quant.cpp's lookup for a tensor being quantized, shape ne in ggml order: its weights as
        [n_mat, ne0], None when the file has no entry (or a misfitting one for token_embd, which
        llama.cpp lets pass); a misfitting entry for any other tensor is an error."""
        weights = self.entries.get(name)
        if weights is None:
            return None
        n_mat = ne[2] if len(ne) > 2 else 1
        if weights.size == ne[0] * n_mat:
            return weights.reshape(n_mat, ne[0])
        if name == "token_embd.weight":
            return None
        raise ImatrixError(f"the imatrix has {weights.size} values for {name!r} but the tensor needs {ne[0] * n_mat} "
                           f"({ne[0]} per row x {n_mat} matrices)", "use the imatrix computed for this model")


@dataclass(frozen=True)
class GivenImatrix:
    """An importance matrix and its path as the user gave it (llama-quantize records that string in the file)."""

    imatrix: Imatrix
    given_as: str


def open_imatrix(path: str | Path) -> GivenImatrix:
    return GivenImatrix(load_imatrix(Path(path)), str(path))


def load_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"cannot read imatrix file {path}: {e.strerror or e}", "check the path") from None
    loaded = _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)
    if not loaded.entries:
        raise ImatrixError(f"imatrix {path} holds no NAME.in_sum2 / NAME.counts entries", REMEDY)
    for name, weights in loaded.entries.items():
        if not np.isfinite(weights).all():
            raise ImatrixError(f"imatrix {path}: entry {name!r} holds NaN or Inf values", REMEDY)
    return loaded


def _u32(header_kv: dict, key: str, path: Path) -> int:
    vtype, value = header_kv[key]
    if vtype != GGUFValueType.UINT32:
        raise ImatrixError(f"imatrix {path}: {key} is {vtype.name}, not UINT32", REMEDY)
    return int(value)


def _load_gguf(path: Path) -> Imatrix:
    try:
        header = read_header(path, raw_strings=True)
    except GGUFError as e:
        raise ImatrixError(f"imatrix {path}: {e.problem}", REMEDY) from None
    if not header.tensors:
        raise ImatrixError(f"imatrix {path} holds no tensors", REMEDY)
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in header.kv]
    if missing:
        raise ImatrixError(f"imatrix {path} lacks the metadata {', '.join(missing)}", "write it again with a current llama-imatrix")
    chunk_count = _u32(header.kv, KEY_CHUNK_COUNT, path)
    chunk_size = _u32(header.kv, KEY_CHUNK_SIZE, path)
    datasets: list[bytes] = []
    if header.kv[KEY_DATASETS][0] == GGUFValueType.ARRAY and header.array_types.get(KEY_DATASETS) == GGUFValueType.STRING:
        datasets = list(header.kv[KEY_DATASETS][1])
    size = os.path.getsize(path)
    pairs = _pair_tensors(header.tensors, path)
    entries = {name: _average(_read_f32(path, sums, size), _read_f32(path, counts, size), name, path)
               for name, (sums, counts) in sorted(pairs.items())}
    # chunk_count is read as u32 into an int32 in quantize.cpp
    return Imatrix(entries, datasets, int(np.uint32(chunk_count).view(np.int32)), is_legacy=False, chunk_size=chunk_size)


def _pair_tensors(tensors: list[TensorInfo], path: Path) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    sums = {t.name[: -len(SUMS)]: t for t in tensors if t.name.endswith(SUMS) and len(t.name) > len(SUMS)}
    counts = {t.name[: -len(COUNTS)]: t for t in tensors if t.name.endswith(COUNTS) and len(t.name) > len(COUNTS)}
    for name in sorted(sums.keys() ^ counts.keys()):
        raise ImatrixError(f"imatrix {path}: {name!r} has {'sums' if name in sums else 'counts'} but no "
                           f"{'counts' if name in sums else 'sums'}", REMEDY)
    for t in [*sums.values(), *counts.values()]:
        if t.type != GGMLQuantizationType.F32:
            raise ImatrixError(f"imatrix {path}: tensor {t.name!r} is {t.type.name}, not F32", REMEDY)
    return {name: (sums[name], counts[name]) for name in sums}


def _read_f32(path: Path, info: TensorInfo, file_size: int) -> np.ndarray:
    if info.offset + info.nbytes > file_size:
        raise ImatrixError(f"imatrix {path} is truncated: tensor {info.name!r} ends past the end of the file", REMEDY)
    return np.fromfile(path, dtype="<f4", count=info.n_elements, offset=info.offset).astype(np.float32)


def _average(sums: np.ndarray, counts: np.ndarray, name: str, path: Path) -> np.ndarray:
    """quantize.cpp's load_imatrix for GGUF: each matrix's sums / (float) lround(count), 1 where count <= 0."""
    if counts.size == 0 or sums.size % counts.size != 0 or sums.size == 0:
        raise ImatrixError(f"imatrix {path}: {name!r} has {sums.size} sums for {counts.size} counts "
                           "(needs a whole number of values per matrix)", REMEDY)
    if not np.isfinite(counts).all():
        raise ImatrixError(f"imatrix {path}: the counts of {name!r} hold NaN or Inf values", REMEDY)
    rounded = np.trunc(counts.astype(np.float64) + np.copysign(0.5, counts.astype(np.float64)))  # lround
    per_matrix = sums.reshape(counts.size, -1)
    count = rounded.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        averaged = np.where(count > 0, per_matrix / np.where(count > 0, count, np.float32(1)), np.float32(1))
    return averaged.astype(np.float32).reshape(-1)


class _LegacyReader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ImatrixError(f"imatrix {self.path} is truncated (reading {what} at byte {self.pos})", REMEDY)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _c_string(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _load_legacy(path: Path) -> Imatrix:
    r = _LegacyReader(path.read_bytes(), path)
    if len(r.data) < 4:
        raise ImatrixError(f"{path} is neither a GGUF nor a legacy imatrix file (too short)", REMEDY)
    n_entries = r.int32("the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path} is not an imatrix file (entry count {n_entries})", REMEDY)
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        name = _c_string(r.take(r.int32(f"entry {i + 1}'s name length"), f"entry {i + 1}'s name"))
        ncall = r.int32(f"entry {i + 1}'s call count")
        nval = r.int32(f"entry {i + 1}'s value count")
        if nval < 1:
            raise ImatrixError(f"imatrix {path}: entry {i + 1} ({name.decode(errors='replace')!r}) has {nval} values", REMEDY)
        values = np.frombuffer(r.take(4 * nval, f"entry {i + 1}'s values"), dtype="<f4").astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            entries[name.decode("utf-8", errors="surrogateescape")] = values / np.float32(ncall) if ncall > 0 else values
    chunk_count, datasets = 0, []
    if not r.at_end():
        chunk_count = r.int32("the chunk count")
        if not r.at_end():
            length = r.int32("the dataset name length")
            if length > 0:
                datasets.append(_c_string(r.take(length, "the dataset name")))
    return Imatrix(entries, datasets, chunk_count, is_legacy=True)


def output_keys(imatrix: Imatrix, file_arg: str) -> list[tuple[str, GGUFValueType, object]]:
    """The keys llama-quantize writes after general.file_type, in its order: the imatrix path as given on
    the command line and the first dataset (each cut to 127 bytes), the entry count and, if positive,
    the chunk count (both as UINT32)."""
    keys: list[tuple[str, GGUFValueType, object]] = [
        ("quantize.imatrix.file", GGUFValueType.STRING, os.fsencode(file_arg)[:KV_MAX_STRING]),
    ]
    if imatrix.datasets:
        keys.append(("quantize.imatrix.dataset", GGUFValueType.STRING, _c_string(imatrix.datasets[0])[:KV_MAX_STRING]))
    keys.append(("quantize.imatrix.entries_count", GGUFValueType.UINT32, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", GGUFValueType.UINT32, imatrix.chunk_count))
    return keys


@dataclass
class ImatrixSums:
    """What llama-imatrix accumulates: per weight tensor NAME the sums of squared input activations, float32
    [n_mat, ne0] (one row per expert), and the tokens each matrix saw, [n_mat]."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    dataset: str  # the calibration file as the user named it
    chunk_size: int

    @property
    def chunk_count(self) -> int:
        """llama-imatrix's last chunk: the most tokens any matrix saw, in whole chunks."""
        return max((int(c.max()) for c in self.counts.values() if c.size), default=0) // self.chunk_size


def write_imatrix_gguf(path: Path, imatrix: ImatrixSums) -> None:
    """llama-imatrix's GGUF: general.type, the dataset, chunk count and size, then per name (sorted)
    NAME.in_sum2 [ne0, n_mat] and NAME.counts [1, n_mat], all F32."""
    contents = GGUFContents("imatrix")
    contents.remove("general.architecture")
    contents.add_type("imatrix")
    contents.add_array(KEY_DATASETS, [imatrix.dataset])
    contents.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
    contents.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
    payloads = []
    for name in sorted(imatrix.sums):
        sums = np.ascontiguousarray(imatrix.sums[name], dtype=np.float32)
        counts = np.asarray(imatrix.counts[name], dtype=np.float32).reshape(-1, 1)
        for suffix, values in ((SUMS, sums), (COUNTS, counts)):
            contents.add_slot(name + suffix, _ggml_dims(values.shape), GGMLQuantizationType.F32, values.nbytes)
            payloads.append([values])
    write_gguf(path, contents, payloads)


def _ggml_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape as gguf_add_tensor records it: ggml's trailing dimensions of 1 (numpy's leading ones) dropped."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def write_imatrix_dat(path: Path, imatrix: ImatrixSums) -> None:
    """The legacy format (llama-imatrix --output-format dat): per name with data, sorted, the call count
    ncall = ceil(most tokens / chunk size) and the values averaged per matrix times ncall (1 times ncall
    for a matrix that saw nothing), then the chunk count and the dataset name."""
    out = bytearray()
    stored = sorted(name for name, counts in imatrix.counts.items() if counts.size and counts.max() > 0)
    out += struct.pack("<i", len(stored))
    for name in stored:
        counts = np.asarray(imatrix.counts[name], dtype=np.int64)
        sums = np.asarray(imatrix.sums[name], dtype=np.float32).reshape(counts.size, -1)
        ncall = int((counts.max() + imatrix.chunk_size - 1) // imatrix.chunk_size)
        count = counts.astype(np.float32)[:, None]
        seen = count != 0
        averaged = np.where(seen, sums, np.float32(1)) / np.where(seen, count, np.float32(1))
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, sums.size)
        out += (averaged * np.float32(ncall)).astype("<f4").tobytes()
    dataset = imatrix.dataset.encode()
    out += struct.pack("<ii", imatrix.chunk_count, len(dataset)) + dataset
    path.write_bytes(bytes(out))
