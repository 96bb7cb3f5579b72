"""A fast GGUF header reader.

gguf-py's GGUFReader builds a numpy view per array element, which takes ~10 s for a 128k-token
vocabulary; this reads the same header in a fraction of a second and leaves tensor data on disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mt.errors import GGUFError

GGUF_MAGIC = b"GGUF"
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (fastest dimension first)
    type: GGMLQuantizationType
    offset: int  # absolute, in the file

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

    def value(self, key: str, default: Any = None) -> Any:
        return self.kv[key][1] if key in self.kv else default

    def read_tensor(self, info: TensorInfo) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.nbytes)


class _Reader:
    def __init__(self, f: BinaryIO, raw_strings: bool) -> None:
        self.f = f
        self.raw_strings = raw_strings
        self.last_array_type: GGUFValueType | None = None

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise EOFError
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str | bytes:
        n = self.unpack("<Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise EOFError
        return raw if self.raw_strings else raw.decode("utf-8", errors="surrogateescape")

    def key(self) -> str:
        n = self.unpack("<Q")
        return self.f.read(n).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(self.unpack("<I"))
            self.last_array_type = sub
            n = self.unpack("<Q")
            if sub in _SCALARS:
                dtype = np.dtype(_SCALARS[sub])
                return np.frombuffer(self.f.read(n * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(sub) for _ in range(n)]
        return self.unpack(_SCALARS[vtype])


def read_header(path: Path, raw_strings: bool = False) -> GGUFHeader:
    """The header of a GGUF file; string values as str, or as bytes with raw_strings (for copying)."""
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
        start = f.tell()
        data_offset = start + (-start % alignment)
    tensors = [TensorInfo(n, d, t, data_offset + off) for n, d, t, off in raw_infos]
    return GGUFHeader(Path(path), version, kv, tensors, array_types)
