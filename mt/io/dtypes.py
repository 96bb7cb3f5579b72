"""Storage dtypes: the one table of how each tensor dtype is held in numpy, and decoding to float32."""

from __future__ import annotations

import numpy as np

# safetensors dtype name -> numpy storage dtype. BF16 is held as its raw uint16 bits.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
FLOAT_DTYPE_NAMES = {STORAGE_DTYPES[name]: name for name in FLOAT_DTYPES}  # numpy storage dtype -> "BF16" …


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: NaN made quiet, then round to nearest even."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    # uint32 cannot wrap: the largest sum is -inf's 0xff800000 + 0x8000 (NaNs were cleared to 0x..ff0000 | 0x400000)
    return ((n + (np.uint32(0x7FFF) + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# the exponent bits that are all ones in a NaN or an Inf, per float storage dtype (as unsigned integers of its width)
NON_FINITE_EXPONENT = {"F32": (np.dtype(np.uint32), 0x7F800000), "F16": (np.dtype(np.uint16), 0x7C00),
                       "BF16": (np.dtype(np.uint16), 0x7F80)}


def place_of(shape: tuple[int, ...], start: int, flat: int) -> tuple[int, ...]:
    """Where the value at flat index `flat` of a slab beginning at row `start` lies in a tensor of `shape`: (row, column
    in the row's flattened rest), or (flat,) for a 1-D tensor."""
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 0
    return (flat,) if not row else (start + flat // row, flat % row)


def first_non_finite(raw: np.ndarray | memoryview, dtype: str) -> int | None:
    """Flat index of the first NaN or Inf among float storage values (an array or a buffer of them); None when all
    are finite."""
    bits_type, exponent = NON_FINITE_EXPONENT[dtype]
    bits = np.frombuffer(raw, dtype=bits_type) if isinstance(raw, memoryview) else \
        np.ascontiguousarray(raw).reshape(-1).view(bits_type)
    all_ones = (bits & bits_type.type(exponent)) == exponent
    return int(np.argmax(all_ones)) if all_ones.any() else None


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    return raw.astype(np.float32, copy=False)
