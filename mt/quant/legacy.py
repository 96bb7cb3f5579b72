"""Legacy blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1): numpy references of ggml-quants.c's quantize_row_q{4_0,4_1,5_0,5_1}_ref.

llama.cpp falls back to these when a row is not a multiple of 256 (Q4_1: the first ffn_down layers
of a Q4_0 file made with an importance matrix). The block scans run position by
position as ggml's loops do (vectorised across blocks), so ties, signed zeros and NaNs pick the
same element; the rest is float32 arithmetic in ggml's order.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.types import QuantType, fp16_field

QK = 32
F32 = np.float32


def signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude (`if (amax < fabsf(v))`), +0 if none: [N, 32] -> [N]."""
    amax = np.zeros(blocks.shape[0], dtype=F32)
    vmax = np.zeros(blocks.shape[0], dtype=F32)
    for j in range(blocks.shape[1]):
        a = np.abs(blocks[:, j])
        bigger = amax < a
        amax = np.where(bigger, a, amax)
        vmax = np.where(bigger, blocks[:, j], vmax)
    return vmax


def block_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`if (v < min) min = v; if (v > max) max = v;` from ±FLT_MAX: [N, 32] -> ([N], [N])."""
    fmax = np.finfo(F32).max
    vmin = np.full(blocks.shape[0], fmax, dtype=F32)
    vmax = np.full(blocks.shape[0], -fmax, dtype=F32)
    for j in range(blocks.shape[1]):
        v = blocks[:, j]
        vmin = np.where(v < vmin, v, vmin)
        vmax = np.where(v > vmax, v, vmax)
    return vmin, vmax


def inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def affine_levels(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1's d = (max - min) / nmax and (x - min) / d + 0.5 before the cast: [N, 32] -> ([N], [N], [N, 32])."""
    vmin, vmax = block_min_max(blocks)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (vmax - vmin) / F32(nmax)
        shifted = (blocks - vmin[:, None]) * inverse(d)[:, None] + F32(0.5)
    return d, vmin, shifted


def truncate_to_int(x: np.ndarray) -> np.ndarray:
    """C's float -> integer cast as x86 does it (cvttss2si to int32, then keep the low byte)."""
    with np.errstate(invalid="ignore"):
        return x.astype(np.int32).astype(np.uint8)


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # past fp16 range becomes inf, as in ggml
        return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Byte j holds q[j] (low nibble) and q[j + 16] (high nibble): [N, 32] -> [N, 16]."""
    return (q[:, : QK // 2] & 0xF) | ((q[:, QK // 2 :] & 0xF) << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of quant j goes to bit j of a little-endian uint32: [N, 32] -> [N, 4]."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def symmetric_quants(blocks: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0: d = max / -half, q = MIN(2 half - 1, (int8_t)(x * id + (half + 0.5))) -> (d [N], q [N, 32])."""
    d = signed_absmax(blocks) / F32(-half)
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = blocks * inverse(d)[:, None] + F32(half + 0.5)
    q = np.minimum(truncate_to_int(shifted).view(np.int8), 2 * half - 1)
    return d, q.view(np.uint8)


class Q4_0(QuantType):
    ggml_type = GGMLQuantizationType.Q4_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, q = symmetric_quants(blocks, 8)
        return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = fp16_field(blocks, 0)
        q = unpack_nibbles(blocks[:, 2:]).astype(np.int8) - 8
        return q.astype(F32) * d


class Q4_1(QuantType):
    ggml_type = GGMLQuantizationType.Q4_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, vmin, shifted = affine_levels(blocks, 15)
        q = np.minimum(truncate_to_int(shifted).view(np.int8), 15).view(np.uint8)  # MIN(15, (int8_t)(x + 0.5f))
        qs = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)  # ggml stores the low quant unmasked
        return np.concatenate([fp16_bytes(d), fp16_bytes(vmin), qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = fp16_field(blocks, 0)
        m = fp16_field(blocks, 2)
        return unpack_nibbles(blocks[:, 4:]).astype(F32) * d + m


class Q5_0(QuantType):
    ggml_type = GGMLQuantizationType.Q5_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, q = symmetric_quants(blocks, 16)
        return np.concatenate([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = fp16_field(blocks, 0)
        q = (unpack_nibbles(blocks[:, 6:]) | unpack_high_bits(blocks[:, 2:6])).astype(np.int8) - 16
        return q.astype(F32) * d


class Q5_1(QuantType):
    ggml_type = GGMLQuantizationType.Q5_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, vmin, shifted = affine_levels(blocks, 31)
        q = truncate_to_int(shifted)  # no clamp in ggml: (uint8_t)(x0 + 0.5f)
        return np.concatenate([fp16_bytes(d), fp16_bytes(vmin), pack_high_bits(q), pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = fp16_field(blocks, 0)
        m = fp16_field(blocks, 2)
        q = unpack_nibbles(blocks[:, 8:]) | unpack_high_bits(blocks[:, 4:8])
        return q.astype(F32) * d + m
