"""A validating, lazy safetensors reader.

Only the JSON header is parsed up front; tensor bytes are read with pread when asked for, so
nothing is memory-mapped and the resident set stays at the size of what is being processed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from mt.errors import CorruptTensorFile
from mt.io.dtypes import STORAGE_DTYPES, first_non_finite

T = TypeVar("T")

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; reading happens only in `read_rows`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) along dim 0, in the storage dtype (BF16 as uint16)."""
        stop = self.n_rows if stop is None else stop
        count = (stop - start) * self.row_bytes
        buf = np.empty(count, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], self.offset + start * self.row_bytes)
        if got != count:
            raise CorruptTensorFile(
                f"{self.path.name}: tensor {self.name!r} is cut short ({got} of {count} bytes)",
                "the file is truncated; download it again",
            )
        shape = ((stop - start),) + self.shape[1:] if self.shape else ()
        return buf.view(STORAGE_DTYPES[self.dtype]).reshape(shape)

    def read(self) -> np.ndarray:
        return self.read_rows()

    def span(self, start: int, stop: int) -> "FileSpan":
        """Where rows [start, stop) lie in the file, for a kernel-side copy."""
        return FileSpan(self.path, self.offset + start * self.row_bytes, (stop - start) * self.row_bytes)


@dataclass(frozen=True)
class FileSpan:
    """A byte range of a file, copied to the output without passing through Python."""

    path: Path
    offset: int
    nbytes: int

    def max_u16_and_i16(self) -> tuple[int, int]:
        """max over the range as uint16 and as int16, read through a temporary mapping (no copy)."""
        return self._on_mapping(np.uint16, lambda view: (int(view.max()), int(view.view(np.int16).max())))

    def first_non_finite(self, dtype: str) -> int | None:
        """The index of the first NaN or Inf among the range's float values (`dtype`: F32, F16, BF16), read through a
        temporary mapping; None when all are finite."""
        return self._on_mapping(STORAGE_DTYPES[dtype], lambda view: first_non_finite(view, dtype))

    def _on_mapping(self, dtype: np.dtype | type, fn: Callable[[np.ndarray], T]) -> T:
        """`fn` of the range viewed as `dtype` through a mapping, which closes once no view of it is left."""
        import mmap

        page = mmap.ALLOCATIONGRANULARITY
        start = self.offset - self.offset % page
        itemsize = np.dtype(dtype).itemsize
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), self.offset - start + self.nbytes, access=mmap.ACCESS_READ, offset=start) as m:
            view = np.frombuffer(m, dtype=dtype, count=self.nbytes // itemsize, offset=self.offset - start)
            try:
                return fn(view)
            finally:
                del view


def _corrupt(path: Path, what: str) -> CorruptTensorFile:
    return CorruptTensorFile(f"{path.name}: {what}", "the file is damaged or truncated; download it again")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json.loads otherwise keeps the last of two, silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors by name, __metadata__)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {header_len} runs past the end of the file ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise _corrupt(path, f"header names tensor {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_ref(path, name, info, data_start, data_len) for name, info in header.items()}
    _check_no_overlap(path, tensors.values(), data_start)
    return tensors, metadata


def _tensor_ref(path: Path, name: str, info: object, data_start: int, data_len: int) -> TensorRef:
    if not isinstance(info, dict):
        raise _corrupt(path, f"tensor {name!r} has no dtype/shape/offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in STORAGE_DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise _corrupt(path, f"tensor {name!r} ends at byte {end}, past the data section ({data_len} bytes)")
    expected = math.prod(shape) * STORAGE_DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _corrupt(
            path, f"tensor {name!r} spans {end - begin} bytes but {dtype} {shape} needs {expected}"
        )
    return TensorRef(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_no_overlap(path: Path, refs, data_start: int) -> None:
    ordered = sorted((r for r in refs if r.nbytes), key=lambda r: r.offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise _corrupt(path, f"tensors {prev.name!r} and {cur.name!r} overlap")
