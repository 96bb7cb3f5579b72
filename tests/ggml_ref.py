"""ggml's own quantizer through ctypes (libggml-base.so shipped in llama-cpp-python): the byte oracle."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    for name in ("ggml_fp32_to_fp16_row", "ggml_fp16_to_fp32_row"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [nrows, n_per_row] -> ggml's bytes [nrows, row_size]; `imatrix` float32 [n_per_row]
    is the importance-matrix pointer llama.cpp passes (the same weights for every row)."""
    src = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = src.shape
    row_size = _lib().ggml_row_size(ggml_type, n_per_row)
    dst = np.zeros((nrows, row_size), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    assert weights is None or weights.shape == (n_per_row,)
    pointer = None if weights is None else weights.ctypes.data
    written = _lib().ggml_quantize_chunk(ggml_type, src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, pointer)
    assert written == dst.nbytes
    return dst


def ggml_fp32_to_fp16_bits(values: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 over a float32 array -> uint16 bits."""
    src = np.ascontiguousarray(values, dtype=np.float32)
    dst = np.empty(src.shape, dtype=np.uint16)
    _lib().ggml_fp32_to_fp16_row(src.ctypes.data, dst.ctypes.data, src.size)
    return dst


def ggml_fp16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    src = np.ascontiguousarray(bits, dtype=np.uint16)
    dst = np.empty(src.shape, dtype=np.float32)
    _lib().ggml_fp16_to_fp32_row(src.ctypes.data, dst.ctypes.data, src.size)
    return dst
