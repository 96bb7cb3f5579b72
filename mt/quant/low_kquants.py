"""Q2_K and Q3_K (super-blocks of 256 in 16 sub-blocks of 16): numpy references of ggml-quants.c's
quantize_row_q{2,3}_K_ref and, with an importance matrix, quantize_row_q{2,3}_K_impl.

Float32 arithmetic in ggml's order, vectorised across sub-blocks, as in mt/quant/kquants.py. Dequantizing is
gguf-py's (QuantType's default).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.kquants import (
    GROUP_MAX_EPS, K_CHUNK_VALUES, QK_K, _running_max, largest_magnitude, make_qkx2_quants, nearest_int,
)
from mt.quant.types import QuantType

F32 = np.float32


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs of Q2_K/Q3_K: per half of 128, byte l holds levels l, l+32, l+64, l+96 two bits each. L [N, 256] -> [N, 64]"""
    h = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


# ---- Q2_K: x = d·scale·q − dmin·min, q in 0..3, 4-bit scales and mins


def requantize_q2(blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Each value again against the fp16-rounded d·scale and dmin·min; a sub-block whose d·scale is 0 keeps L.
    blocks [N, 256], d/dmin fp16 [N], sc uint8 [N, 16], L [N, 256] -> [N, 256]"""
    dsub = d.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    msub = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    xs = blocks.reshape(-1, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((xs + msub[:, :, None]) / dsub[:, :, None]), 0, 3)
    keep = (dsub == 0)[:, :, None]
    return np.where(keep, L.reshape(-1, 16, 16), requant).reshape(-1, QK_K)


def q2_k_bytes(sc: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """block_q2_K: 16 scale bytes (scale low nibble, min high nibble), 64 bytes of 2-bit levels, d, dmin."""
    return np.concatenate([sc, pack_2bit(L), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


def _levels_against_max(values: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """nearest_int(15 / vmax · value) where vmax > 0, else 0: [N, 16] int."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(15) / np.where(vmax > 0, vmax, F32(1))
    return np.where(vmax[:, None] > 0, nearest_int(iscale[:, None] * values), 0)


def q2_k_ref(blocks: np.ndarray) -> np.ndarray:
    n_blocks = blocks.shape[0]
    sub = blocks.reshape(-1, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
    max_scale, max_min = _running_max(scales), _running_max(mins)
    # ggml stores the int levels into uint8 (a stray negative level wraps)
    sc = ((_levels_against_max(scales, max_scale) & 0xFF) | ((_levels_against_max(mins, max_min) << 4) & 0xFF))
    sc = sc.astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(np.float16)
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(np.float16)
    return q2_k_bytes(sc, requantize_q2(blocks, d, dmin, sc, L.reshape(n_blocks, QK_K)), d, dmin)


# ---- Q3_K: x = d·scale·(q − 4), q in 0..7 (a high-bit mask and 2 low bits), 6-bit signed scales


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse = true): x [S, n] -> (scale [S], L [S, n] in 0..2nmax-1).

    The coordinate descent runs all 5 rounds: a sub-block with no change in a round would repeat it unchanged.
    """
    xt = np.ascontiguousarray(x.T)
    n = xt.shape[0]
    amax, vmax = largest_magnitude(xt)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / np.where(zero, F32(1), vmax)
        L = np.clip(nearest_int(iscale * xt), -nmax, nmax - 1)
        w = xt * xt
        wx = w * xt
        sumlx = np.zeros(xt.shape[1], dtype=F32)
        suml2 = np.zeros(xt.shape[1], dtype=F32)
        for i in range(n):
            lf = L[i].astype(F32)
            sumlx = sumlx + wx[i] * lf
            suml2 = suml2 + w[i] * lf * lf
        for _ in range(5):
            for i in range(n):
                old = L[i].astype(F32)
                slx = sumlx - wx[i] * old
                sl2 = suml2 - w[i] * old * old
                movable = slx > 0
                new_l = np.clip(nearest_int(xt[i] * sl2 / np.where(movable, slx, F32(1))), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx = slx + wx[i] * nf
                sl2 = sl2 + w[i] * nf * nf
                accept = movable & (new_l != L[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(accept, new_l, L[i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    L = np.where(zero, 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(F32), np.ascontiguousarray(L.T).astype(np.int8)


def pack_q3_scales(levels: np.ndarray) -> np.ndarray:
    """16 6-bit scale levels (0..63) -> 12 bytes: low nibbles of 0-7 and 8-15 share bytes 0-7, the high 2 bits go
    to byte 8 + j%4 at bit 2·(j/4). levels [N, 16] int -> [N, 12] uint8"""
    lv = levels.astype(np.int32)
    low = (lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4)
    high = lv >> 4
    top = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    return np.concatenate([low, top], axis=1).astype(np.uint8)


def unpack_q3_scales(packed: np.ndarray) -> np.ndarray:
    """The signed scales (level − 32) of 12 packed bytes: [N, 12] -> int [N, 16]"""
    p = packed.astype(np.int32)
    low = np.concatenate([p[:, :8] & 0xF, p[:, :8] >> 4], axis=1)
    high = np.concatenate([(p[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1)
    return (low | (high << 4)) - 32


def q3_k_bytes(blocks: np.ndarray, packed: np.ndarray, d: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Requantize against the fp16-rounded d·scale (a sub-block whose product is 0 keeps L), then block_q3_K:
    hmask (bit k of byte m: level 32k+m is above 3), the low 2 bits, the 12 scale bytes, d."""
    dsub = d.astype(F32)[:, None] * unpack_q3_scales(packed).astype(F32)
    xs = blocks.reshape(-1, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(xs / dsub[:, :, None]), -4, 3) + 4
    L = np.where((dsub == 0)[:, :, None], L.reshape(-1, 16, 16), requant).reshape(-1, QK_K)
    high = (L > 3).astype(np.uint8).reshape(-1, 8, 32)
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([hmask, pack_2bit(L - 4 * (L > 3)), packed, _fp16_bytes(d)], axis=1)


def q3_k_ref(blocks: np.ndarray) -> np.ndarray:
    n_blocks = blocks.shape[0]
    scales, L = make_q3_quants(blocks.reshape(-1, 16), 4)
    scales = scales.reshape(n_blocks, 16)
    _, max_scale = largest_magnitude(scales.T)
    some = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / np.where(some, max_scale, F32(1))
        d = np.where(some, F32(1) / iscale, F32(0)).astype(np.float16)
    levels = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
    packed = np.where(some[:, None], pack_q3_scales(levels), 0).astype(np.uint8)
    return q3_k_bytes(blocks, packed, d, L.reshape(n_blocks, QK_K))


class Q2_K(QuantType):
    ggml_type = GGMLQuantizationType.Q2_K
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "q2_k"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return q2_k_ref(blocks)


class Q3_K(QuantType):
    ggml_type = GGMLQuantizationType.Q3_K
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "q3_k"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return q3_k_ref(blocks)
