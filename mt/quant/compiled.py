"""Compiled CPU kernels (numba) for the block quantizers: the same bytes as the numpy references.

Each kernel fills `out` (uint8 [N, type_size]) from `x` (float32 [N, block_size]) one block at a
time, as ggml-quants.c's quantize_row_*_ref does. Byte equality rests on:
- float32 everywhere: numba types a Python float as float64, and float32 op float64/int64 gives
  float64, so every constant and every integer that meets a float goes through `F32(...)`;
- no fused multiply-add: numba compiles without fast-math flags, so LLVM never contracts a*b+c
  (ggml-base is built without FMA);
- every sum in ggml's order; `nearest_int` is ggml's magic-number trick on the float's bits, fp16
  conversion rounds to nearest even with ggml's NaN (0x7E00), roundf rounds half away from zero;
- error_model="numpy": x / 0 is inf or NaN as in C, never a Python exception.
Kernels release the GIL, so the thread pool in `QuantType.quantize` runs them in parallel.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
QK_K = 256


_uncached: list[str] = []


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """njit, GIL released, C's float errors; the machine code is cached beside the module (or in the
    user's cache folder). Where neither is writable numba refuses to cache: compile in each process."""

    def wrap(fn: Callable[..., Any]) -> Any:
        settings = dict(nogil=True, error_model="numpy", **options)
        try:
            return njit(cache=True, **settings)(fn)
        except RuntimeError as e:  # "cannot cache function ...: no locator available for file ..."
            if not _uncached:
                warnings.warn(f"mt: compiled quantizers are compiled in each run, not cached ({e}); "
                              "set NUMBA_CACHE_DIR to a writable folder", stacklevel=2)
            _uncached.append(fn.__name__)
            return njit(cache=False, **settings)(fn)

    return wrap


@intrinsic
def f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """float32 -> its bits as int32 (C's memcpy into an int)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The low 32 bits of an integer read as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        value = args[0]
        if x.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif x.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@jit(inline="always")
def nearest_int(fval: float) -> int:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the mantissa (round half to even)."""
    return (np.int64(f32_bits(fval + F32(12582912.0))) & 0x007FFFFF) - 0x00400000


@jit(inline="always")
def fp32_to_fp16(f: float) -> int:
    """float32 -> fp16 bits, round to nearest even; overflow -> inf, NaN -> 0x7E00 (ggml's NaN)."""
    w = np.int64(f32_bits(f)) & 0xFFFFFFFF
    sign = (w >> 16) & 0x8000
    a = w & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # 65520 and above round to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # 2^-14 and above: a normal fp16; add half an ulp (ties to even) and rebias
        return sign | ((a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13)
    if a <= 0x33000000:  # 2^-25 and below round to zero
        return sign
    # an fp16 subnormal: the value in units of 2^-24 is mantissa >> shift, rounded to nearest even
    shift = 126 - (a >> 23)
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rest = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (q & 1) == 1):
        q += 1
    return sign | q


@jit(inline="always")
def fp16_to_fp32(h: int) -> float:
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exponent == 0:
        magnitude = F32(mant) * F32(2.0**-24)  # exact
        return -magnitude if sign else magnitude
    if exponent == 31:  # inf, or a NaN made quiet as ggml's float arithmetic makes it
        return bits_f32(sign | 0x7F800000 | (mant << 13) | (0x400000 if mant else 0))
    return bits_f32(sign | ((exponent + 112) << 23) | (mant << 13))


@jit(inline="always")
def put_fp16(out: np.ndarray, pos: int, h: int) -> None:
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8


@jit(inline="always")
def roundf(x: float) -> float:
    """C roundf (half away from zero), exact in float64 for a float32 x."""
    a = np.floor(np.abs(np.float64(x)) + 0.5)
    return -a if x < 0 else a


@jit(inline="always")
def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


# ---------------------------------------------------------------- Q4_K / Q5_K


@jit()
def make_qkx2_quants(x: np.ndarray, w: np.ndarray, L: np.ndarray, laux: np.ndarray, nmax: int, rmin: float,
                     rdelta: float, nstep: int) -> tuple[float, float]:
    """ggml's make_qkx2_quants with use_mad = false: x, w float32 [n] -> (scale, the_min), L [n]."""
    n = x.shape[0]
    vmin = x[0]
    vmax = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < vmin:
            vmin = x[i]
        if x[i] > vmax:
            vmax = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if vmin > F32(0):
        vmin = F32(0)
    if vmax == vmin:
        L[:] = 0
        return F32(0), -vmin
    iscale = F32(nmax) / (vmax - vmin)
    scale = F32(1) / iscale
    best_error = F32(0)
    for i in range(n):
        l = clamp(nearest_int(iscale * (x[i] - vmin)), 0, nmax)
        L[i] = l
        diff = scale * F32(l) + vmin - x[i]
        best_error += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (vmax - vmin)
        sum_l = F32(0)
        sum_l2 = F32(0)
        sum_xl = F32(0)
        for i in range(n):
            l = clamp(nearest_int(iscale * (x[i] - vmin)), 0, nmax)
            laux[i] = l
            lf = F32(l)
            wl = w[i] * lf
            sum_l += wl
            sum_l2 += wl * lf
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0):
                this_min = F32(0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0)
            for i in range(n):
                diff = this_scale * F32(laux[i]) + this_min - x[i]
                cur_error += w[i] * (diff * diff)
            if cur_error < best_error:
                L[:] = laux
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@jit()
def affine_superblock(x: np.ndarray, out: np.ndarray, L: np.ndarray, weights: np.ndarray, laux: np.ndarray,
                      scales: np.ndarray, mins: np.ndarray, nmax: int, rmin: float, nstep: int) -> None:
    """The shared part of quantize_row_q4_K_ref / q5_K_ref for one super-block x [256]: writes d, dmin
    and the 12 scale bytes into out[0:16] and the quants into L [256]."""
    max_scale = F32(0)
    max_min = F32(0)
    for j in range(QK_K // 32):
        sub = x[32 * j : 32 * j + 32]
        sum_x2 = F32(0)
        for i in range(32):
            sum_x2 += sub[i] * sub[i]
        av_x = np.sqrt(sum_x2 / F32(32))
        for i in range(32):
            weights[i] = av_x + np.abs(sub[i])
        scales[j], mins[j] = make_qkx2_quants(sub, weights, L[32 * j : 32 * j + 32], laux, nmax, rmin, 0.1, nstep)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63) / max_scale if max_scale > F32(0) else F32(0)
    inv_min = F32(63) / max_min if max_min > F32(0) else F32(0)
    packed = out[4:16]
    packed[:] = 0
    for j in range(QK_K // 32):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d_bits = fp32_to_fp16(max_scale / F32(63))
    dmin_bits = fp32_to_fp16(max_min / F32(63))
    put_fp16(out, 0, d_bits)
    put_fp16(out, 2, dmin_bits)
    d_all = fp16_to_fp32(d_bits)
    dmin_all = fp16_to_fp32(dmin_bits)
    for j in range(QK_K // 32):
        if j < 4:
            sc = packed[j] & 63
            m = packed[j + 4] & 63
        else:
            sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
        d = d_all * F32(sc)
        if d == F32(0):
            continue
        dm = dmin_all * F32(m)
        for i in range(32):
            L[32 * j + i] = clamp(nearest_int((x[32 * j + i] + dm) / d), 0, nmax)


@jit()
def q4_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_K_ref: x float32 [N, 256] -> out uint8 [N, 144] (d, dmin, scales[12], qs[128])."""
    L = np.empty(QK_K, np.uint8)
    weights = np.empty(32, F32)
    laux = np.empty(32, np.uint8)
    scales = np.empty(8, F32)
    mins = np.empty(8, F32)
    for b in range(x.shape[0]):
        y = out[b]
        affine_superblock(x[b], y, L, weights, laux, scales, mins, 15, -1.0, 20)
        for g in range(4):  # byte l of group g holds L[64g + l] (low nibble) and L[64g + 32 + l] (high)
            for i in range(32):
                y[16 + 32 * g + i] = L[64 * g + i] | (L[64 * g + 32 + i] << 4)


@jit()
def q5_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_K_ref: x float32 [N, 256] -> out uint8 [N, 176] (d, dmin, scales[12], qh[32], qs[128])."""
    L = np.empty(QK_K, np.uint8)
    weights = np.empty(32, F32)
    laux = np.empty(32, np.uint8)
    scales = np.empty(8, F32)
    mins = np.empty(8, F32)
    for b in range(x.shape[0]):
        y = out[b]
        affine_superblock(x[b], y, L, weights, laux, scales, mins, 31, -0.5, 15)
        for i in range(32):
            y[16 + i] = 0
        for g in range(4):  # group g: low nibbles as Q4_K, bit 4 of its two halves in qh bits 2g, 2g + 1
            for i in range(32):
                lo = L[64 * g + i]
                hi = L[64 * g + 32 + i]
                y[48 + 32 * g + i] = (lo & 0xF) | ((hi & 0xF) << 4)
                y[16 + i] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1))


# ---------------------------------------------------------------- Q6_K


@jit()
def make_qx_quants_rmse1(x: np.ndarray, L: np.ndarray, nmax: int) -> float:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): x float32 [n] -> scale, L [n] in 0..2nmax-1."""
    n = x.shape[0]
    vmax = F32(0)
    amax = F32(0)
    for i in range(n):
        ax = np.abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return F32(0)
    iscale = F32(-nmax) / vmax
    sumlx = F32(0)
    suml2 = F32(0)
    for i in range(n):
        l = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l + nmax
        lf = F32(l)
        w = x[i] * x[i]
        sumlx += w * x[i] * lf
        suml2 += w * lf * lf
    scale = sumlx / suml2 if suml2 != F32(0) else F32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
        sumlx = F32(0)
        suml2 = F32(0)
        for i in range(n):
            lf = F32(clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1))
            w = x[i] * x[i]
            sumlx += w * x[i] * lf
            suml2 += w * lf * lf
        if suml2 > F32(0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@jit()
def q6_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q6_K_ref: x float32 [N, 256] -> out uint8 [N, 210] (ql[128], qh[64], scales[16] int8, d)."""
    L = np.empty(QK_K, np.uint8)
    scales = np.empty(16, F32)
    for b in range(x.shape[0]):
        xb = x[b]
        y = out[b]
        max_scale = F32(0)
        max_abs_scale = F32(0)
        for ib in range(16):
            scales[ib] = make_qx_quants_rmse1(xb[16 * ib : 16 * ib + 16], L[16 * ib : 16 * ib + 16], 32)
            abs_scale = np.abs(scales[ib])
            if abs_scale > max_abs_scale:
                max_abs_scale = abs_scale
                max_scale = scales[ib]
        if max_abs_scale < GROUP_MAX_EPS:
            y[:] = 0
            continue
        iscale = F32(-128) / max_scale
        d_bits = fp32_to_fp16(F32(1) / iscale)
        put_fp16(y, 208, d_bits)
        d_all = fp16_to_fp32(d_bits)
        for ib in range(16):
            q_scale = min(127, nearest_int(iscale * scales[ib]))
            y[192 + ib] = q_scale & 0xFF
            d = d_all * F32(np.int8(q_scale & 0xFF))
            if d == F32(0):
                continue
            for i in range(16):
                L[16 * ib + i] = clamp(nearest_int(xb[16 * ib + i] / d), -32, 31) + 32
        for half in range(2):  # per 128 values: 4 rows of 32 -> ql[64], qh[32]
            src = 128 * half
            for i in range(32):
                q1 = L[src + i]
                q2 = L[src + 32 + i]
                q3 = L[src + 64 + i]
                q4 = L[src + 96 + i]
                y[64 * half + i] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                y[64 * half + 32 + i] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                y[128 + 32 * half + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "q4_k": q4_k_blocks,
    "q5_k": q5_k_blocks,
    "q6_k": q6_k_blocks,
}
