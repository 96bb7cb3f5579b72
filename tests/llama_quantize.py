"""llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python): the whole-file oracle."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import LlamaFileType


def llama_quantize(src: Path, out: Path, ftype: LlamaFileType, nthread: int = 2, *, pure: bool = False,
                   output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                   imatrix: dict[str, np.ndarray] | None = None, kv_overrides: list[tuple[str, str | int]] | None = None) -> None:
    """`imatrix`: tensor name -> averaged weights, the map tools/quantize/quantize.cpp hands over;
    `kv_overrides`: (key, str or int) in order, as quantize.cpp adds quantize.imatrix.* after loading a file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    params.pure = pure
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    keep: list[object] = []  # the C side reads these during the call
    if imatrix:
        params.imatrix = _imatrix_array(imatrix, keep)
    if kv_overrides:
        params.kv_overrides = _kv_override_array(kv_overrides, keep)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def _imatrix_array(imatrix: dict[str, np.ndarray], keep: list[object]) -> ctypes.Array:
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed terminator at the end
    for slot, (name, values) in zip(entries, imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(data)
        slot.name = name.encode()
        slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = data.size
    keep.append(entries)
    return entries


def _kv_override_array(overrides: list[tuple[str, str | int]], keep: list[object]) -> ctypes.Array:
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()  # empty key terminates
    for slot, (key, value) in zip(array, overrides):
        slot.key = key.encode()
        if isinstance(value, int):
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            slot.value.val_i64 = value
        else:
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            slot.value.val_str = value.encode()[:127]
    keep.append(array)
    return array
