"""Streaming, sharded, atomic safetensors output: a Hugging Face model folder written one tensor at a time.

Every name, dtype and shape is known up front, so the shards are planned first, exactly as
`huggingface_hub.split_torch_state_dict_into_shards` (transformers' `save_pretrained`) splits a state
dict, and each shard's header is final before any data arrives. Inside a shard the data is laid out as
`safetensors.torch.save_file` lays it out (F32 first, then BF16, then F16, each by name); tensors arrive
in planned order and are written at their offsets, so each shard is byte-identical to save_file's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from mt.errors import MtError, TensorWriteError
from mt.io.atomic import atomic_dir, check_output
from mt.io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES

SINGLE_FILE = "model.safetensors"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FILE_METADATA = {"format": "pt"}  # what save_pretrained puts in every shard's __metadata__
HEADER_ALIGNMENT = 8
# save_file orders data by dtype, highest in safetensors' Dtype enum first (F16 < BF16 < F32), then by name
LAYOUT_RANK = {"F32": 0, "BF16": 1, "F16": 2}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"5GB" -> 5*10**9, "2GiB" -> 2*2**30, "1000" -> 1000 bytes; as huggingface_hub reads max_shard_size."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match[2].upper()) if match else None
    if match is None or unit is None:
        raise MtError(f"cannot read the size {text!r}", "give a number with an optional unit, e.g. 5GB, 500MB, 2GiB or 1000 (bytes)")
    number = match[1]
    size = int(float(number) * unit) if "." in number else int(number) * unit  # huggingface_hub's float rounding
    if size < 1:
        raise MtError(f"the size {text!r} is less than one byte", "give a positive size, e.g. 5GB")
    return size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE_DTYPES[self.dtype].itemsize

    @property
    def storage_dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.dtype]  # BF16 as uint16


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[TensorSpec, ...]  # in planned (write) order
    header: bytes  # u64 length + JSON padded with spaces; the data starts right after it
    data_offsets: Mapping[str, tuple[int, int]]  # [begin, end) from the start of the data

    @property
    def file_size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def shard_header(tensors: Sequence[TensorSpec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header save_file writes for these tensors, and where each one's data goes."""
    entries: dict[str, object] = {"__metadata__": FILE_METADATA}
    offsets: dict[str, tuple[int, int]] = {}
    end = 0
    for t in sorted(tensors, key=lambda t: (LAYOUT_RANK[t.dtype], t.name)):
        offsets[t.name] = (end, end + t.nbytes)
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(offsets[t.name])}
        end += t.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text, offsets


def _check_specs(specs: Sequence[TensorSpec]) -> None:
    if not specs:
        raise TensorWriteError("no tensors to write", "the model has no tensors; check the source")
    seen: set[str] = set()
    for spec in specs:
        if spec.dtype not in FLOAT_DTYPES:
            raise TensorWriteError(f"tensor {spec.name!r} has dtype {spec.dtype!r}", f"write one of {', '.join(FLOAT_DTYPES)}")
        if any(not isinstance(d, int) or d < 0 for d in spec.shape):
            raise TensorWriteError(f"tensor {spec.name!r} has a malformed shape {spec.shape!r}", "dimensions are counts >= 0")
        if spec.name in seen or spec.name == "__metadata__" or not spec.name:
            raise TensorWriteError(f"tensor name {spec.name!r} is repeated or reserved", "give each tensor its own name")
        seen.add(spec.name)


def _group(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """split_state_dict_into_shards_factory's greedy split, in order; a tensor over the limit gets its own
    shard, placed before the shard still being filled."""
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        if spec.nbytes > max_shard_size:
            groups.append([spec])
            continue
        if current_size + spec.nbytes > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += spec.nbytes
    if current:
        groups.append(current)
    return groups


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[Shard]:
    _check_specs(specs)
    groups = _group(specs, max_shard_size)
    names = [SINGLE_FILE] if len(groups) == 1 else [SHARD_FILE.format(index=i + 1, count=len(groups)) for i in range(len(groups))]
    return [Shard(name, tuple(group), *shard_header(group)) for name, group in zip(names, groups)]


def index_json(shards: Sequence[Shard]) -> bytes:
    """model.safetensors.index.json as transformers' save_pretrained writes it."""
    tensors = [t for shard in shards for t in shard.tensors]
    index = {
        "metadata": {"total_parameters": sum(math.prod(t.shape) for t in tensors), "total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: shard.filename for shard in shards for t in shard.tensors},
    }
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


class SafetensorsFolderWriter:
    """Writes a sharded safetensors model folder (plus side files) atomically, one tensor at a time.

        with SafetensorsFolderWriter(out_dir, specs, parse_size("5GB")) as w:
            w.add_file("config.json", config_bytes)
            for spec in specs:
                w.write_tensor(spec.name, row_chunks(spec))   # np.ndarray chunks, BF16 as uint16
    """

    def __init__(self, out_dir: Path, specs: Sequence[TensorSpec], max_shard_size: int, force: bool = False) -> None:
        check_output(out_dir, force, folder=True)
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_shard_size)
        self._order = [spec.name for spec in specs]
        self._spec = {spec.name: spec for spec in specs}
        self._shard_of = {t.name: shard for shard in self.shards for t in shard.tensors}
        self._left = {shard.filename: len(shard.tensors) for shard in self.shards}
        self._fds: dict[str, int] = {}
        self._written = 0
        self._folder: Path | None = None
        self._session: AbstractContextManager[SafetensorsFolderWriter] | None = None

    def __enter__(self) -> SafetensorsFolderWriter:
        self._session = self._run()
        return self._session.__enter__()

    def __exit__(self, *exc: object) -> bool | None:
        assert self._session is not None
        return self._session.__exit__(*exc)

    @contextmanager
    def _run(self) -> Iterator[SafetensorsFolderWriter]:
        with atomic_dir(self.out_dir) as folder:
            self._folder = folder
            try:
                yield self
                self._finish()
            finally:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()

    @property
    def folder(self) -> Path:
        if self._folder is None:
            raise TensorWriteError("the writer is used outside its with-block", "write inside `with SafetensorsFolderWriter(...)`")
        return self._folder

    def add_file(self, name: str, content: bytes | Path) -> None:
        """A side file (config.json, tokenizer files): bytes, or a file to copy. `name` may hold subfolders."""
        target = self.folder / self._side_file_name(name)
        if target.exists():
            raise TensorWriteError(f"{name} is added twice", "add each side file once")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            if not content.is_file():
                raise MtError(f"{content} is not a file", "check the path of the file to copy")
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)

    def _side_file_name(self, name: str) -> PurePosixPath:
        path = PurePosixPath(name)
        reserved = {shard.filename for shard in self.shards} | {INDEX_FILE}
        if not name or path.is_absolute() or ".." in path.parts or str(path) in reserved:
            raise TensorWriteError(f"cannot add a side file named {name!r}", "give a relative path inside the folder, not a weights file")
        return path

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Stream one tensor's data (rows in order, any chunking), in the order of the specs."""
        spec = self._next_spec(name)
        shard = self._shard_of[name]
        fd = self._open(shard)
        offset = len(shard.header) + shard.data_offsets[name][0]
        written = 0
        for chunk in chunks:
            data = self._chunk_bytes(spec, chunk)
            if written + len(data) > spec.nbytes:
                raise TensorWriteError(f"tensor {name!r} got more than its {spec.nbytes} bytes", "internal error; please report it")
            _pwrite_all(fd, data, offset + written)
            written += len(data)
        if written != spec.nbytes:
            raise TensorWriteError(f"tensor {name!r} got {written} of its {spec.nbytes} bytes", "internal error; please report it")
        self._written += 1
        self._left[shard.filename] -= 1
        if not self._left[shard.filename]:
            os.close(self._fds.pop(shard.filename))

    def _next_spec(self, name: str) -> TensorSpec:
        if self._written == len(self._order):
            raise TensorWriteError(f"tensor {name!r} comes after the last planned tensor", "write each planned tensor once")
        expected = self._order[self._written]
        if name != expected:
            raise TensorWriteError(f"tensor {name!r} written where {expected!r} was planned", "write the tensors in the planned order")
        return self._spec[name]

    @staticmethod
    def _chunk_bytes(spec: TensorSpec, chunk: np.ndarray) -> memoryview:
        if chunk.dtype != spec.storage_dtype:
            raise TensorWriteError(
                f"tensor {spec.name!r} ({spec.dtype}) got a {chunk.dtype} chunk", f"pass {spec.storage_dtype} arrays for {spec.dtype}"
            )
        return memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))

    def _open(self, shard: Shard) -> int:
        if shard.filename not in self._fds:
            fd = os.open(self.folder / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds[shard.filename] = fd
            os.ftruncate(fd, shard.file_size)
            _pwrite_all(fd, memoryview(shard.header), 0)
        return self._fds[shard.filename]

    def _finish(self) -> None:
        if self._written != len(self._order):
            missing = len(self._order) - self._written
            raise TensorWriteError(f"{missing} planned tensors were not written, from {self._order[self._written]!r}", "internal error; please report it")
        if len(self.shards) > 1:
            (self.folder / INDEX_FILE).write_bytes(index_json(self.shards))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # one write(2) moves at most ~2 GiB
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
