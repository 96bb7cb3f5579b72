"""A fast GGUF header reader.

gguf-py's GGUFReader builds a numpy view per array element, which takes ~10 s for a 128k-token
vocabulary; this reads the same header in a fraction of a second and leaves tensor data on disk.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mt.errors import GGUFError
from mt.io.shards import SPLIT_COUNT, SPLIT_KEYS, SPLIT_NO, SPLIT_TENSORS_COUNT, part_path, split_prefix

GGUF_MAGIC = b"GGUF"
KNOWN_VERSIONS = (2, 3)
SCALAR_FORMATS = {  # GGUF's fixed-size value types, as struct formats
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (fastest dimension first)
    type: GGMLQuantizationType
    offset: int  # absolute, in `path`
    path: Path  # the file holding its bytes (a part of a split model, or the one file)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, tuple[GGUFValueType, Any]]
    tensors: list[TensorInfo]
    array_types: dict[str, GGUFValueType]  # element type of each array-valued key
    parts: list[Path] = field(default_factory=list)  # a split model's files (the first is `path`); empty for one file

    def value(self, key: str, default: Any = None) -> Any:
        return self.kv[key][1] if key in self.kv else default

    def read_tensor(self, info: TensorInfo) -> bytes:
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.nbytes)


class _Reader:
    def __init__(self, f: BinaryIO, raw_strings: bool) -> None:
        self.f = f
        self.size = os.fstat(f.fileno()).st_size
        self.raw_strings = raw_strings
        self.last_array_type: GGUFValueType | None = None

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise EOFError
        return struct.unpack(fmt, raw)[0]

    def _bounded(self, n: int) -> int:
        """A length read from the file, refused before anything is allocated for it when the file cannot hold it."""
        if n > 1 << 16 and n > self.size - self.f.tell():  # small lengths fail at the read instead
            raise EOFError(f"a length of {n:,} bytes runs past the end of the file")
        return n

    def string(self) -> str | bytes:
        n = self._bounded(self.unpack("<Q"))
        raw = self.f.read(n)
        if len(raw) != n:
            raise EOFError
        return raw if self.raw_strings else raw.decode("utf-8", errors="surrogateescape")

    def key(self) -> str:
        n = self._bounded(self.unpack("<Q"))
        return self.f.read(n).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(self.unpack("<I"))
            self.last_array_type = sub
            n = self._bounded(self.unpack("<Q"))  # every item takes at least a byte
            if sub in SCALAR_FORMATS:
                dtype = np.dtype(SCALAR_FORMATS[sub])
                self._bounded(n * dtype.itemsize)
                return np.frombuffer(self.f.read(n * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(sub) for _ in range(n)]
        return self.unpack(SCALAR_FORMATS[vtype])


def read_header(path: Path, raw_strings: bool = False, header_only: bool = False) -> GGUFHeader:
    """The header of a GGUF file; string values as str, or as bytes with raw_strings (for copying). The tensors' data
    must lie inside the file, apart, unless `header_only` (a header written without its data).

    Given the first part of a split model it reads every part: the metadata is the first part's without the
    split keys (as llama.cpp loads it), the tensors are all the parts' with the file each lives in."""
    first = _read_file(Path(path), raw_strings, header_only)
    count = int(first.value(SPLIT_COUNT, 0) or 0)
    if count == 0:  # one file (gguf-split --merge leaves split.count = 0 in it)
        return _without_split_keys(first, [first], split=False)
    index = int(first.value(SPLIT_NO, 0))
    named = split_prefix(first.path)
    if index != 0:
        hint = f"pass {part_path(named[0], 0, count).name}" if named else "pass the split model's first part"
        raise GGUFError(f"{path} is part {index + 1} of {count} of a split model", hint)
    if count > 1 and (named is None or named[1:] != (0, count)):
        raise GGUFError(f"{path} is the first of {count} parts but is not named PREFIX-00001-of-{count:05d}.gguf",
                        "rename the parts as gguf-split names them; llama.cpp finds the others by name")
    parts = [first] + [_read_part(part_path(named[0], i, count), i, count, raw_strings, header_only)
                       for i in range(1, count)]
    n_tensors = sum(len(part.tensors) for part in parts)
    if n_tensors != first.value(SPLIT_TENSORS_COUNT, n_tensors):
        raise GGUFError(f"{path}: the parts hold {n_tensors} tensors, split.tensors.count says "
                        f"{first.value(SPLIT_TENSORS_COUNT)}", "split the model again")
    return _without_split_keys(first, parts, split=True)


def _without_split_keys(first: GGUFHeader, parts: list[GGUFHeader], split: bool) -> GGUFHeader:
    kv = {k: v for k, v in first.kv.items() if k not in SPLIT_KEYS}
    array_types = {k: v for k, v in first.array_types.items() if k in kv}
    tensors = [t for part in parts for t in part.tensors]
    return GGUFHeader(first.path, first.version, kv, tensors, array_types, [p.path for p in parts] if split else [])


def _read_part(path: Path, index: int, count: int, raw_strings: bool, header_only: bool) -> GGUFHeader:
    if not path.is_file():
        raise GGUFError(f"part {index + 1} of {count} of the split model is missing: {path}",
                        "put every part in the same folder")
    part = _read_file(path, raw_strings, header_only)
    if (part.value(SPLIT_NO), part.value(SPLIT_COUNT)) != (index, count):
        raise GGUFError(f"{path} is not part {index + 1} of {count} (split.no {part.value(SPLIT_NO)}, "
                        f"split.count {part.value(SPLIT_COUNT)})", "keep the parts of one split together")
    return part


def _read_file(path: Path, raw_strings: bool, header_only: bool = False) -> GGUFHeader:
    if path.is_dir():
        raise GGUFError(f"{path} is a folder, not a GGUF file", "pass the .gguf file")
    if not path.is_file():
        raise GGUFError(f"{path} does not exist", "check the path")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (bad magic)", "check the path or re-create the file")
        r = _Reader(f, raw_strings)
        array_types: dict[str, GGUFValueType] = {}
        try:
            version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
            kv: dict[str, tuple[GGUFValueType, Any]] = {}
            for _ in range(n_kv):
                key = r.key()
                vtype = GGUFValueType(r.unpack("<I"))
                kv[key] = (vtype, r.value(vtype))
                if vtype == GGUFValueType.ARRAY and r.last_array_type is not None:
                    array_types[key] = r.last_array_type
            raw_infos = []
            for _ in range(n_tensors):
                name = r.key()
                dims = tuple(r.unpack("<Q") for _ in range(r.unpack("<I")))
                raw_infos.append((name, dims, GGMLQuantizationType(r.unpack("<I")), r.unpack("<Q")))
        except (EOFError, ValueError, struct.error) as e:
            raise GGUFError(f"{path} has a truncated or corrupt header ({e or 'end of file'})", "re-create the file") from None
        alignment = kv.get("general.alignment", (None, 32))[1]
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path} has general.alignment {alignment!r}, not a power of two", "re-create the file")
        start = f.tell()
        data_offset = start + (-start % alignment)
        size = os.fstat(f.fileno()).st_size
    if version not in KNOWN_VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; mt reads versions 2 and 3", "re-create the file with llama.cpp's tools")
    tensors = [TensorInfo(n, d, t, data_offset + off, Path(path)) for n, d, t, off in raw_infos]
    if not header_only:
        _check_data_ranges(Path(path), tensors, data_offset, size)
    return GGUFHeader(Path(path), version, kv, tensors, array_types)


def _check_data_ranges(path: Path, tensors: list[TensorInfo], data_offset: int, size: int) -> None:
    """Every tensor's bytes inside the file and apart from the others'."""
    end_of = data_offset
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end_of:
            raise GGUFError(f"{path}: tensor {t.name!r} overlaps the bytes before it", "the file is damaged; re-create it")
        end_of = t.offset + t.nbytes
        if end_of > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ends at byte {end_of:,}, past the end of the file ({size:,} bytes)",
                            "the file is truncated; download or write it again")
