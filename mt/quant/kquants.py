"""K-quants (super-blocks of 256): numpy references of ggml-quants.c's quantize_row_q{4,5,6}_K_ref.

Every sum runs in ggml's order in float32 (a loop over the 32 or 16 positions, vectorised across
blocks), so the bytes equal ggml's. Shapes: N super-blocks -> S = 8N sub-blocks of 32 (Q4_K/Q5_K)
or 16N sub-blocks of 16 (Q6_K). These are the readable references; `QuantType.quantize` runs the
compiled kernels of mt/quant/compiled.py by default, which tests check against both ggml and these.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.types import QuantType, fp16_field

QK_K = 256
# the K-quant loops cost per numpy call, not per value: larger work items (measured: 2M values
# ~1.5x faster than 256k on 2 cores) keep Python's share down
K_CHUNK_VALUES = 1 << 21
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the mantissa (round half to even)."""
    bits = (x.astype(F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, w: [S, n] float32 -> (scale [S], the_min [S], L [S, n] uint8); `use_mad` weighs |error| instead of error².

    Works on [n, S] copies so each of ggml's per-position steps is a contiguous vector operation.
    """
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    n = xt.shape[0]
    xmin, xmax = xt.min(axis=0), xt.max(axis=0)  # order-free; NaN never reaches here
    sum_w = wt[0].copy()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        sum_w = sum_w + wt[i]
        sum_x = sum_x + wt[i] * xt[i]
    xmin = np.where(xmin > 0, F32(0), xmin)
    flat = xmax == xmin
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, F32(1), xmax - xmin)
        iscale = F32(nmax) / span
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (xt - xmin)), 0, nmax)
        best = _weighted_error(scale, xmin, L, xt, wt, use_mad)
        cur_min = xmin.copy()
        for step in range(nstep + 1):
            # ggml updates `min` when a step wins, and later steps measure from the new min
            span = np.where(flat, F32(1), xmax - cur_min)
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
            laux = np.clip(nearest_int(iscale * (xt - cur_min)), 0, nmax)
            lf = laux.astype(F32)
            sum_l = np.zeros_like(sum_w)
            sum_l2 = np.zeros_like(sum_w)
            sum_xl = np.zeros_like(sum_w)
            for i in range(n):
                wl = wt[i] * lf[i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * lf[i]
                sum_xl = sum_xl + wl * xt[i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive_min = this_min > 0
            this_min = np.where(positive_min, F32(0), this_min)
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            err = _weighted_error(this_scale, this_min, laux, xt, wt, use_mad)
            better = (D > 0) & (err < best) & ~flat
            L = np.where(better, laux, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            cur_min = np.where(better, this_min, cur_min)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat, 0, L)
    return scale, (-cur_min).astype(F32), np.ascontiguousarray(L.T).astype(np.uint8)


def _weighted_error(scale: np.ndarray, vmin: np.ndarray, L: np.ndarray, xt: np.ndarray, wt: np.ndarray,
                    use_mad: bool = False) -> np.ndarray:
    """sum over positions, in order, of w * (scale * L + min - x)^2 (or w * |…| with `use_mad`); arrays are [n, S]."""
    err = np.zeros(xt.shape[1], dtype=F32)
    lf = L.astype(F32)
    for i in range(xt.shape[0]):
        diff = scale * lf[i] + vmin - xt[i]
        err = err + wt[i] * (np.abs(diff) if use_mad else diff * diff)
    return err


def _sub_block_weights(sub: np.ndarray) -> np.ndarray:
    """weights = sqrt(mean(x^2)) + |x| with the sum of squares taken in order."""
    t = np.ascontiguousarray(sub.T)
    sum_x2 = np.zeros(t.shape[1], dtype=F32)
    for i in range(t.shape[0]):
        sum_x2 = sum_x2 + t[i] * t[i]
    av_x = np.sqrt(sum_x2 / F32(t.shape[0]))
    return av_x[:, None] + np.abs(sub)


def _running_max(values: np.ndarray) -> np.ndarray:
    """max over axis 1 starting from 0, as ggml's `if (v > m) m = v` loop."""
    m = np.zeros(values.shape[0], dtype=F32)
    for j in range(values.shape[1]):
        m = np.where(values[:, j] > m, values[:, j], m)
    return m


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins of 8 sub-blocks -> the 12 bytes of K_SCALE_SIZE. ls, lm: [N, 8] uint8."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def unpack_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: q [N, 12] -> (sc, m) [N, 8]."""
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)
    m = np.empty_like(sc)
    sc[:, :4] = q[:, 0:4] & 63
    m[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _affine_k_quants(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of Q4_K/Q5_K: (d fp16 bits [N], dmin fp16 bits [N], scales [N,12], L [N,256])."""
    n_blocks = blocks.shape[0]
    sub = blocks.reshape(-1, 32)
    scales, mins, L = make_qkx2_quants(sub, _sub_block_weights(sub), nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8), L.reshape(n_blocks, 256)
    max_scale, max_min = _running_max(scales), _running_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    packed = pack_scale_min_k4(ls, lm)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    return d, dmin, packed, requantize_affine(blocks, d, dmin, packed, L, nmax)


def requantize_affine(blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray, packed: np.ndarray, L: np.ndarray, nmax: int) -> np.ndarray:
    """Q4_K/Q5_K's last pass: each value again against the rounded fp16 d·scale and dmin·min; a sub-block
    whose d·scale is 0 keeps its search result L. blocks [N, 256], d/dmin fp16 [N], packed [N, 12] -> L [N, 256]."""
    n_blocks = blocks.shape[0]
    sc, m = unpack_scale_min_k4(packed)
    dsub = d.astype(F32)[:, None] * sc.astype(F32)
    dmsub = dmin.astype(F32)[:, None] * m.astype(F32)
    xs = blocks.reshape(n_blocks, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((xs + dmsub[:, :, None]) / dsub[:, :, None]), 0, nmax)
    keep = (dsub == 0)[:, :, None]
    return np.where(keep, L.reshape(n_blocks, 8, 32), requant).reshape(n_blocks, 256).astype(np.uint8)


def _dequantize_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: d·scale·q − dmin·min per sub-block; q [N, 4, 2, 32] in sub-block order."""
    d = fp16_field(blocks, 0)
    dmin = fp16_field(blocks, 2)
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    values = (d * sc.astype(F32))[:, :, None] * q.reshape(-1, 8, 32).astype(F32) - (dmin * m.astype(F32))[:, :, None]
    return values.reshape(-1, 256)


def q4_k_bytes(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, L: np.ndarray) -> np.ndarray:
    """block_q4_K: d, dmin (fp16), 12 scale bytes, then 4 groups of 64 where byte l holds L[l] (low
    nibble) and L[l + 32] (high nibble)."""
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, low_nibbles(L)], axis=1)


def low_nibbles(L: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's qs: 4 groups of 64 levels, byte l holding L[l]'s low nibble and L[l + 32]'s above it. -> [N, 128]"""
    low = L.reshape(-1, 4, 2, 32) & 0xF
    return (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)


def q5_k_bytes(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, L: np.ndarray) -> np.ndarray:
    """block_q5_K: as Q4_K's low nibbles, plus 32 bytes holding bit 4 of each quant."""
    high = (L.reshape(-1, 4, 2, 32) >> 4).astype(np.uint8)  # [N, 4, 2, 32] bit 4 of each quant
    shifts = (np.arange(8, dtype=np.uint8)).reshape(1, 4, 2, 1)
    qh = np.bitwise_or.reduce(high << shifts, axis=(1, 2)).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh, low_nibbles(L)], axis=1)


class Q4_K(QuantType):
    ggml_type = GGMLQuantizationType.Q4_K
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "q4_k"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return q4_k_bytes(*_affine_k_quants(blocks, 15, -1.0, 20))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        return _dequantize_affine(blocks, np.concatenate([qs & 0xF, qs >> 4], axis=2))


class Q5_K(QuantType):
    ggml_type = GGMLQuantizationType.Q5_K
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "q5_k"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return q5_k_bytes(*_affine_k_quants(blocks, 31, -0.5, 15))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        low = np.concatenate([qs & 0xF, qs >> 4], axis=2)
        shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        high = (blocks[:, 16:48][:, None, None, :] >> shifts) & 1
        return _dequantize_affine(blocks, low | (high << 4))


def largest_magnitude(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over axis 0 of [n, S]: (the largest |value|, the value holding it), the first one winning a tie as in ggml's
    `if (ax > amax) { amax = ax; max = x; }` loop from 0."""
    amax = np.zeros(t.shape[1], dtype=F32)
    vmax = np.zeros(t.shape[1], dtype=F32)
    for i in range(t.shape[0]):
        ax = np.abs(t[i])
        bigger = ax > amax
        amax = np.where(bigger, ax, amax)
        vmax = np.where(bigger, t[i], vmax)
    return amax, vmax


def make_qx_quants_rmse1(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): x [S, n] -> (scale [S], L [S, n] in 0..2nmax-1).

    Weights w [S, n] (an importance matrix's), or None for ggml's w = x². Works on [n, S] copies so
    each per-position step is a contiguous vector operation.
    """
    xt = np.ascontiguousarray(x.T)
    wt = xt * xt if w is None else np.ascontiguousarray(w.T)
    n = xt.shape[0]
    amax, vmax = largest_magnitude(xt)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    wx = wt * xt

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ls = np.clip(nearest_int(iscale * xt), -nmax, nmax - 1)
        lf = ls.astype(F32)
        sumlx = np.zeros(xt.shape[1], dtype=F32)
        suml2 = np.zeros(xt.shape[1], dtype=F32)
        for i in range(n):
            sumlx = sumlx + wx[i] * lf[i]
            suml2 = suml2 + wt[i] * lf[i] * lf[i]
        return ls, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # huge rows overflow best * suml2 to inf, as in ggml
        iscale = F32(-nmax) / safe_max
        ls, sumlx, suml2 = sums(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
            cand, sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            ls = np.where(better, cand, ls)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero, 0, ls + nmax)
    return np.where(zero, F32(0), scale).astype(F32), np.ascontiguousarray(L.T).astype(np.int8)


def q6_k_bytes(blocks: np.ndarray, scales: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q6_K's shared tail (ref and imatrix paths): 8-bit sub-block scales against the largest one, each
    value requantized against its rounded scale, then packed. blocks [N, 256], scales [16N], L [16N, 16]."""
    n_blocks = blocks.shape[0]
    scales, L = scales.reshape(n_blocks, 16), L.reshape(n_blocks, 256)
    max_abs, max_scale = largest_magnitude(scales.T)
    empty = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, F32(0), F32(-128) / np.where(empty, F32(1), max_scale))
        d = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    q_scales = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dsub = d.astype(F32)[:, None] * q_scales.astype(F32)
    xs = blocks.reshape(n_blocks, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(xs / dsub[:, :, None]), -32, 31) + 32
    L = np.where((dsub == 0)[:, :, None], L.reshape(n_blocks, 16, 16), requant).reshape(n_blocks, 256).astype(np.uint8)
    L = np.where(empty[:, None], 0, L).astype(np.uint8)
    q_scales = np.where(empty[:, None], 0, q_scales).astype(np.int8)
    # two halves of 128; within each, 4 rows of 32 quants
    h = L.reshape(n_blocks, 2, 4, 32)
    ql = np.concatenate([(h[:, :, 0] & 0xF) | ((h[:, :, 2] & 0xF) << 4), (h[:, :, 1] & 0xF) | ((h[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (h[:, :, 0] >> 4) | ((h[:, :, 1] >> 4) << 2) | ((h[:, :, 2] >> 4) << 4) | ((h[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64), q_scales.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


class Q6_K(QuantType):
    ggml_type = GGMLQuantizationType.Q6_K
    chunk_values = K_CHUNK_VALUES
    kernel = weighted_kernel = "q6_k"
    triton = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        scales, L = make_qx_quants_rmse1(blocks.reshape(-1, 16), 32)
        return q6_k_bytes(blocks, scales, L)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        ql = blocks[:, :128].reshape(n_blocks, 2, 64)
        qh = blocks[:, 128:192].reshape(n_blocks, 2, 32)
        scales = blocks[:, 192:208].view(np.int8).astype(F32)
        d = fp16_field(blocks, 208).reshape(-1)
        rows = [
            (ql[:, :, :32] & 0xF) | ((qh & 3) << 4),
            (ql[:, :, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
            (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4),
            (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4),
        ]
        q = np.stack(rows, axis=2).astype(np.int16).reshape(n_blocks, 16, 16) - 32
        return ((d[:, None] * scales)[:, :, None] * q.astype(F32)).reshape(-1, 256)
