"""mt's one GGUF writer, on gguf-py's public API.

A `GGUFContents` collects what a file will hold (gguf-py's add_* helpers fill it); `write_gguf` writes the
header, metadata and tensor infos through a `gguf.GGUFWriter`, then streams each tensor's bytes one chunk at a
time. Callers give it a temporary path (`mt.io.atomic`) that is renamed over the target only when complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from mt.errors import MtError
from mt.io.gguf_in import SCALAR_FORMATS
from mt.io.safetensors import FileSpan

Chunk = np.ndarray | FileSpan


@dataclass(frozen=True)
class MetaValue:
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorSlot:
    """One tensor info: `shape` in gguf-py's order (outermost first), `nbytes` of its encoded data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    nbytes: int


class GGUFContents(GGUFWriter):
    """What one GGUF file will hold: metadata in order and tensor infos, never a file of its own.

    gguf-py's add_* helpers all end in `add_key_value`, which keeps the value in this object's ordered
    `metadata`, so a key can be read back, removed or moved to the end (llama-quantize re-sets some keys).
    """

    def __init__(self, arch: str) -> None:
        self.metadata: dict[str, MetaValue] = {}
        self.slots: list[TensorSlot] = []
        super().__init__(path=None, arch=arch)

    def add_key_value(self, key: str, val: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        if vtype == GGUFValueType.ARRAY and sub_type is None:
            sub_type = _element_type(val)
        self.metadata[key] = MetaValue(val, vtype, sub_type)

    def add_tensor_info(self, name: str, tensor_shape: Sequence[int], tensor_dtype: np.dtype, tensor_nbytes: int,
                        raw_dtype: GGMLQuantizationType | None = None) -> None:
        """Only encoded tensors (`raw_dtype` given): mt always knows the GGML type and byte size it writes."""
        if raw_dtype is None:
            raise TypeError("GGUFContents takes tensor infos with their GGML type (raw_dtype)")
        super().add_tensor_info(name, tensor_shape, tensor_dtype, tensor_nbytes, raw_dtype)
        self.slots.append(TensorSlot(name, tuple(int(d) for d in tensor_shape), raw_dtype, int(tensor_nbytes)))

    def add_slot(self, name: str, shape: Sequence[int], ggml_type: GGMLQuantizationType, nbytes: int) -> None:
        self.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)

    def value(self, key: str) -> Any:
        field = self.metadata.get(key)
        return None if field is None else field.value

    def remove(self, key: str) -> None:
        self.metadata.pop(key, None)


def _element_type(val: Any) -> GGUFValueType | None:
    """The element type of an array whose items are all of one Python type (gguf-py would otherwise find it by
    checking every item as it writes the file); None leaves it to gguf-py."""
    if isinstance(val, (bytes, bytearray)) or not isinstance(val, Sequence) or len(val) == 0:
        return None
    if len({type(item) for item in val}) != 1:
        return None
    try:
        return GGUFValueType.get_type(val[0])
    except ValueError:
        return None


class _HeaderWriter(GGUFWriter):
    """gguf-py's writer taking every key from a GGUFContents, general.architecture included, in its order."""

    def add_architecture(self) -> None:
        pass


def write_gguf(path: Path, contents: GGUFContents, payloads: Iterable[Iterable[Chunk]] | None = None) -> int:
    """Write `contents` to `path`; `payloads` gives each tensor's chunks, in the order of its slots (None: the
    header alone, no tensor data). Returns the tensor bytes written. The contents' metadata is dropped once it
    is on disk (a 128k-token vocabulary is ~100 MB of Python objects)."""
    header = _HeaderWriter(path=None, arch=contents.arch)
    header.data_alignment = contents.data_alignment
    for key, field in contents.metadata.items():
        header.add_key_value(key, field.value, field.vtype, field.sub_type)
    for slot in contents.slots:
        header.add_tensor_info(slot.name, slot.shape, np.dtype(np.float32), slot.nbytes, raw_dtype=slot.ggml_type)
    try:
        header.write_header_to_file(path=path)
        header.write_kv_data_to_file()
        header.write_ti_data_to_file()
    finally:
        header.close()
    if payloads is None:
        return 0
    del header
    contents.metadata.clear()
    release_freed_memory()
    with open(path, "r+b") as fout:
        fout.seek(0, os.SEEK_END)
        return _write_payloads(fout, contents.slots, payloads, contents.data_alignment)


_VALUE_SIZES = {vtype: struct.calcsize(fmt) for vtype, fmt in SCALAR_FORMATS.items()}


def header_size(contents: GGUFContents) -> int:
    """The bytes `write_gguf` writes before the tensor data's padding: magic, version, counts, metadata, tensor
    infos (known without packing a 128k-token vocabulary)."""
    size = 4 + 4 + 8 + 8
    for key, field in contents.metadata.items():
        size += _string_size(key) + 4 + _value_size(field.value, field.vtype, field.sub_type)
    for slot in contents.slots:
        size += _string_size(slot.name) + 4 + 8 * len(slot.shape) + 4 + 8
    return size


def _string_size(value: str | bytes) -> int:
    return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)


def _value_size(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> int:
    if vtype in _VALUE_SIZES:
        return _VALUE_SIZES[vtype]
    if vtype == GGUFValueType.STRING:
        return _string_size(value)
    item = sub_type or (GGUFValueType.UINT8 if isinstance(value, bytes) else GGUFValueType.get_type(value[0]))
    if item in _VALUE_SIZES:
        return 4 + 8 + _VALUE_SIZES[item] * len(value)
    return 4 + 8 + sum(_value_size(v, item, None) for v in value)


class PlacedTensors:
    """A GGUF whose tensors are written at their own offsets, in any order of tensors (each tensor's chunks in
    order): several files can be filled from one read of the source. The header is written first, or, with
    `header_later`, by `write_header` at any time before `finish` (from another thread too: packing a vocabulary
    is Python work that can run while the quantizers do).

    Its sha256 is computed as it is written: bytes that arrive in file order are hashed from memory; those that
    arrive ahead of a gap (the header, when it comes later) wait in the file until the gap is filled, and are then
    read back from the page cache.
    """

    def __init__(self, path: Path, contents: GGUFContents, header_later: bool = False) -> None:
        self.header_length = header_size(contents)
        position = GGUFWriter.ggml_pad(self.header_length, contents.data_alignment)
        self.offsets: dict[str, int] = {}
        for slot in contents.slots:
            self.offsets[slot.name] = position
            position += GGUFWriter.ggml_pad(slot.nbytes, contents.data_alignment)
        self.path, self.size, self.slots = path, position, contents.slots
        self.written = {slot.name: 0 for slot in contents.slots}
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._contents: GGUFContents | None = contents
        self._lock = threading.Lock()
        self._sha = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the hash
        self._next = 0  # index in `slots` of the first tensor not yet wholly hashed
        self.sha256: str | None = None
        if not header_later:
            self.write_header()

    def write_header(self) -> None:
        """Pack the header with gguf-py (through a file beside the output, as its writer writes to files) and place
        it at the start; the contents' metadata is dropped once it is written."""
        contents = self._contents
        assert contents is not None, "the header is written once"
        scratch = self.path.with_name(f".{self.path.name}.header")
        try:
            write_gguf(scratch, contents)
            header = scratch.read_bytes()
        finally:
            scratch.unlink(missing_ok=True)
        if len(header) != self.header_length:
            raise MtError(f"internal error: {self.path.name}'s header is {len(header)} bytes, planned "
                          f"{self.header_length}", "please report it")
        _place_bytes(self.fd, memoryview(header), 0)
        self._contents = None
        contents.metadata.clear()
        with self._lock:
            self._sha.update(header)
            self._hashed = len(header)
            self._catch_up()

    def write(self, name: str, chunk: Chunk) -> int:
        """The next chunk of tensor `name`."""
        at = self.offsets[name] + self.written[name]
        if isinstance(chunk, FileSpan):
            n = _place_span(self.fd, chunk, at)
        else:
            view = memoryview(np.ascontiguousarray(chunk)).cast("B")
            n = _place_bytes(self.fd, view, at)
        with self._lock:
            if not isinstance(chunk, FileSpan) and self._hashed and self._next < len(self.slots) \
                    and self.slots[self._next].name == name:
                self._hash_zeros_to(self.offsets[name])
                if at == self._hashed:
                    self._sha.update(view)
                    self._hashed += n
            self.written[name] += n
            self._catch_up()
        return n

    def _catch_up(self) -> None:
        """Hash what has become contiguous: padding as zeros, tensor bytes read back (after the header)."""
        if not self._hashed:
            return
        while self._next < len(self.slots):
            slot = self.slots[self._next]
            start = self.offsets[slot.name]
            self._hash_zeros_to(start)
            done = start + self.written[slot.name]
            while self._hashed < done:
                piece = os.pread(self.fd, min(done - self._hashed, 16 << 20), self._hashed)
                self._sha.update(piece)
                self._hashed += len(piece)
            if self.written[slot.name] < slot.nbytes:
                return
            self._next += 1

    def _hash_zeros_to(self, offset: int) -> None:
        if self._hashed < offset:
            self._sha.update(bytes(offset - self._hashed))
            self._hashed = offset

    def finish(self) -> None:
        """Check the header and every tensor are whole, end the file where its last tensor's padding ends, and take
        the sha256."""
        try:
            if self._contents is not None:
                raise MtError(f"internal error: {self.path.name}'s header was never written", "please report it")
            for slot in self.slots:
                if self.written[slot.name] != slot.nbytes:
                    raise MtError(f"internal error: tensor {slot.name} wrote {self.written[slot.name]} bytes, "
                                  f"planned {slot.nbytes}", "please report it")
            os.ftruncate(self.fd, self.size)
            self._hash_zeros_to(self.size)
            self.sha256 = self._sha.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _place_bytes(fd: int, view: memoryview, at: int) -> int:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)
    return len(view)


def _place_span(fd: int, span: FileSpan, at: int) -> int:
    """Source bytes copied in the kernel to offset `at`, else through a buffer."""
    with open(span.path, "rb") as src:
        done = 0
        try:
            while done < span.nbytes:
                n = os.copy_file_range(src.fileno(), fd, span.nbytes - done, span.offset + done, at + done)
                if n == 0:
                    raise MtError(f"{span.path.name} ended while copying a tensor", "the file is truncated; download it again")
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or done:
                raise
            src.seek(span.offset)
            _place_bytes(fd, memoryview(src.read(span.nbytes)), at)
    return span.nbytes


def _write_payloads(fout: Any, slots: list[TensorSlot], payloads: Iterable[Iterable[Chunk]], alignment: int) -> int:
    """The payloads are read to their end, so a generator's code after its last yield (progress) runs."""
    written = 0
    count = 0
    for chunks in payloads:
        if count == len(slots):
            raise MtError(f"internal error: more tensors written than the {len(slots)} planned", "please report it")
        slot = slots[count]
        _pad(fout, fout.tell(), alignment)
        nbytes = sum(_copy_span(fout, c) if isinstance(c, FileSpan) else _write_array(fout, c) for c in chunks)
        if nbytes != slot.nbytes:
            raise MtError(f"internal error: tensor {slot.name} wrote {nbytes} bytes, planned {slot.nbytes}", "please report it")
        _pad(fout, nbytes, alignment)
        written += nbytes
        count += 1
    if count != len(slots):
        raise MtError(f"internal error: {count} tensors written, {len(slots)} planned", "please report it")
    # no fsync: like llama.cpp's tools; the rename still makes a half-written file impossible to see
    fout.flush()
    return written


def _pad(fout: Any, n: int, alignment: int) -> None:
    if pad := GGUFWriter.ggml_pad(n, alignment) - n:
        fout.write(bytes(pad))


def _write_array(fout: Any, chunk: np.ndarray) -> int:
    data = np.ascontiguousarray(chunk)
    fout.write(memoryview(data).cast("B"))
    return data.nbytes


def _copy_span(fout: Any, span: FileSpan) -> int:
    fout.flush()
    n = _place_span(fout.fileno(), span, fout.tell())
    fout.seek(n, os.SEEK_CUR)
    return n


def release_freed_memory() -> None:
    """Hand freed heap back to the OS so the vocabulary's peak does not stay resident while tensors stream."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
