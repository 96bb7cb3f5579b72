"""Corrupted copies of a GGUF, written with the gguf package (GGUFReader -> modify -> GGUFWriter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

TensorEdit = Callable[[str, np.ndarray], tuple[str | None, np.ndarray]]  # a None name drops the tensor
_DROP = object()  # kv value that removes the key


def rewrite(src: Path, dst: Path, kv: dict[str, Any] | None = None, tensors: TensorEdit | None = None) -> Path:
    """Copy src to dst; kv maps a key to a new value (same type), to a function of the old value, or to DROP."""
    kv = kv or {}
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name in kv:
            edit = kv[name]
            if edit is _DROP:
                continue
            value = edit(value) if callable(edit) else edit
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        name, data = t.name, np.array(t.data)
        if tensors is not None:
            name, data = tensors(name, data)
        if name is None:
            continue
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


DROP = _DROP


def swap_layers(a: int, b: int) -> TensorEdit:
    def edit(name: str, data: np.ndarray) -> tuple[str, np.ndarray]:
        for x, y in ((a, b), (b, a)):
            if name.startswith(f"blk.{x}."):
                return f"blk.{y}." + name[len(f"blk.{x}."):], data
        return name, data
    return edit


def scale_tensor(target: str, factor: float) -> TensorEdit:
    def edit(name: str, data: np.ndarray) -> tuple[str, np.ndarray]:
        if name == target:
            return name, (data * factor).astype(data.dtype)
        return name, data
    return edit


def swap_items(i: int, j: int) -> Callable[[list[Any]], list[Any]]:
    def edit(values: list[Any]) -> list[Any]:
        values = list(values)
        values[i], values[j] = values[j], values[i]
        return values
    return edit


def drop_tensor(target: str) -> TensorEdit:
    def edit(name: str, data: np.ndarray) -> tuple[str | None, np.ndarray]:
        return (None if name == target else name), data
    return edit


def flip_block(target: str, block: int, type_size: int) -> TensorEdit:
    """8 bytes inside one block of a quantized tensor (past its scale) flipped."""
    def edit(name: str, data: np.ndarray) -> tuple[str, np.ndarray]:
        if name != target:
            return name, data
        raw = data.copy().reshape(-1)
        raw.view(np.uint8)[block * type_size + 4: block * type_size + 12] ^= 0x5A
        return name, raw.reshape(data.shape)
    return edit
