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


@intrinsic
def nearest_int_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """float32(nearest_int(x)) in float32 arithmetic and int32 bits only, so a loop of it vectorizes.
    Exact: nearest_int's result lies in [-2^22, 2^22)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        shifted = builder.fadd(args[0], ir.Constant(ir.FloatType(), 12582912.0))
        mantissa = builder.and_(builder.bitcast(shifted, i32), ir.Constant(i32, 0x007FFFFF))
        return builder.sitofp(builder.sub(mantissa, ir.Constant(i32, 0x00400000)), ir.FloatType())

    return types.float32(types.float32), codegen


@jit(inline="always")
def clampf(v: float, lo: float, hi: float) -> float:
    """MAX(lo, MIN(hi, v)) on whole numbers held in float32."""
    v = v if v < hi else hi
    return v if v > lo else lo


@jit(inline="always")
def largest_magnitude_lanes(xt: np.ndarray, lanes: int, amax: np.ndarray, vmax: np.ndarray) -> None:
    """Per lane over the positions of xt [n, S]: the largest |x| into amax, the first value holding it into vmax."""
    for s in range(lanes):
        amax[s] = F32(0)
        vmax[s] = F32(0)
    for i in range(xt.shape[0]):
        for s in range(lanes):
            ax = np.abs(xt[i, s])
            bigger = ax > amax[s]
            vmax[s] = xt[i, s] if bigger else vmax[s]
            amax[s] = ax if bigger else amax[s]


@jit(inline="always")
def sum_of_squares(xb: np.ndarray) -> float:
    total = F32(0)
    for i in range(xb.shape[0]):
        total += xb[i] * xb[i]
    return total


@jit(inline="always")
def imatrix_weights(xb: np.ndarray, qb: np.ndarray, sigma2: float, w: np.ndarray, sub_len: int, lane0: int) -> None:
    """ggml's quantize_row_*_impl weights qw · sqrt(sigma2 + x²): position i of sub-block j (of sub_len values) of
    the block xb into w[i, lane0 + j]."""
    for j in range(xb.shape[0] // sub_len):
        for i in range(sub_len):
            v = xb[sub_len * j + i]
            w[i, lane0 + j] = qb[sub_len * j + i] * F32(np.sqrt(sigma2 + v * v))


# ---------------------------------------------------------------- Q4_K / Q5_K
#
# make_qkx2_quants runs on the 8 sub-blocks of GROUP super-blocks at once, one sub-block per lane:
# arrays are [position, lane], every lane keeps its own sums in ggml's order, so the inner loops over
# lanes vectorize without reordering a single addition. ggml's branches become per-lane selects.
# Rather than copying L whenever a step wins, a lane records the (iscale, min) that produced its L;
# L is only needed where a sub-block's quantized scale is 0 (elsewhere the final pass requantizes).

GROUP = 8  # super-blocks per lane batch (measured: 2 is ~1.5x slower than 4-16); x, w, laux [32, 64] stay in L1
# rows of the per-lane state array
VMIN, VMAX, SUM_W, SUM_X, BEST, SCALE, ISCALE, L_ISCALE, L_MIN, SUM_L, SUM_L2, SUM_XL, ERR, T_SCALE, T_MIN, OK, FLAT = range(17)
N_STATE = 17


@jit()
def qkx2_lanes(xt: np.ndarray, w: np.ndarray, laux: np.ndarray, st: np.ndarray, lanes: int, nmax: int, rmin: float,
               rdelta: float, nstep: int, use_mad: bool = False) -> None:
    """make_qkx2_quants on `lanes` sub-blocks: xt, w, laux [n, S] -> per lane in st: SCALE, VMIN (the_min = -VMIN),
    and the L_ISCALE, L_MIN that rebuild L. `use_mad` weighs |error| instead of error² (Q2_K)."""
    n = xt.shape[0]
    fmax = F32(nmax)
    vmin, vmax, sum_w, sum_x = st[VMIN], st[VMAX], st[SUM_W], st[SUM_X]
    best, scale, iscale, l_iscale, l_min = st[BEST], st[SCALE], st[ISCALE], st[L_ISCALE], st[L_MIN]
    sum_l, sum_l2, sum_xl, err, t_scale, t_min, ok = st[SUM_L], st[SUM_L2], st[SUM_XL], st[ERR], st[T_SCALE], st[T_MIN], st[OK]
    flat = st[FLAT]  # 1 where max == min (checked once, before any step moves min)
    for s in range(lanes):
        vmin[s] = xt[0, s]
        vmax[s] = xt[0, s]
        sum_w[s] = w[0, s]
        sum_x[s] = w[0, s] * xt[0, s]
    for i in range(1, n):
        for s in range(lanes):
            v = xt[i, s]
            vmin[s] = v if v < vmin[s] else vmin[s]
            vmax[s] = v if v > vmax[s] else vmax[s]
            sum_w[s] += w[i, s]
            sum_x[s] += w[i, s] * v
    for s in range(lanes):
        vmin[s] = vmin[s] if vmin[s] <= F32(0) else F32(0)
        flat[s] = F32(1) if vmax[s] == vmin[s] else F32(0)
        iscale[s] = fmax / (vmax[s] - vmin[s])
        scale[s] = F32(1) / iscale[s]
        best[s] = F32(0)
        # a flat sub-block (max == min) keeps scale 0 and L 0: iscale 0 rebuilds L = 0
        l_iscale[s] = iscale[s] if flat[s] == F32(0) else F32(0)
        l_min[s] = vmin[s]
    for i in range(n):
        for s in range(lanes):
            l = clampf(nearest_int_f32(iscale[s] * (xt[i, s] - vmin[s])), F32(0), fmax)
            diff = scale[s] * l + vmin[s] - xt[i, s]
            best[s] += w[i, s] * (np.abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        factor = F32(rmin) + F32(rdelta) * F32(step) + fmax
        for s in range(lanes):
            iscale[s] = factor / (vmax[s] - vmin[s])
            sum_l[s] = F32(0)
            sum_l2[s] = F32(0)
            sum_xl[s] = F32(0)
        for i in range(n):
            for s in range(lanes):
                l = clampf(nearest_int_f32(iscale[s] * (xt[i, s] - vmin[s])), F32(0), fmax)
                laux[i, s] = l
                wl = w[i, s] * l
                sum_l[s] += wl
                sum_l2[s] += wl * l
                sum_xl[s] += wl * xt[i, s]
        for s in range(lanes):
            d = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            this_scale = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / d
            this_min = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / d
            positive_min = this_min > F32(0)
            t_scale[s] = sum_xl[s] / sum_l2[s] if positive_min else this_scale
            t_min[s] = F32(0) if positive_min else this_min
            ok[s] = F32(1) if d > F32(0) and flat[s] == F32(0) else F32(0)
            err[s] = F32(0)
        for i in range(n):
            for s in range(lanes):
                diff = t_scale[s] * laux[i, s] + t_min[s] - xt[i, s]
                err[s] += w[i, s] * (np.abs(diff) if use_mad else diff * diff)
        for s in range(lanes):
            if ok[s] != F32(0) and err[s] < best[s]:
                l_iscale[s] = iscale[s]
                l_min[s] = vmin[s]
                best[s] = err[s]
                scale[s] = t_scale[s]
                vmin[s] = t_min[s]
    for s in range(lanes):
        if flat[s] != F32(0):
            scale[s] = F32(0)


@jit(inline="always")
def requantize_sub_block(x: np.ndarray, L: np.ndarray, j: int, d: np.float32, dm: np.float32,
                         l_iscale: np.ndarray, l_min: np.ndarray, nmax: int) -> None:
    """Sub-block j's levels L[32j:32j+32] from its fp16-rounded scale d and min dm, as ggml recomputes
    them; where d rounds to 0 the scale search's own levels (iscale, min) stand."""
    sub = x[32 * j : 32 * j + 32]
    out = L[32 * j : 32 * j + 32]
    if d == F32(0):
        for i in range(32):
            out[i] = np.uint8(clampf(nearest_int_f32(l_iscale[j] * (sub[i] - l_min[j])), F32(0), F32(nmax)))
        return
    for i in range(32):
        out[i] = np.uint8(clampf(nearest_int_f32((sub[i] + dm) / d), F32(0), F32(nmax)))


@jit()
def affine_superblock(x: np.ndarray, y: np.ndarray, L: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                      l_iscale: np.ndarray, l_min: np.ndarray, nmax: int) -> None:
    """The rest of quantize_row_q4_K_ref / q5_K_ref for one super-block x [256], given its 8 sub-block
    scales and mins: d, dmin and the 12 scale bytes into y[0:16], the quants into L [256]."""
    max_scale = F32(0)
    max_min = F32(0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63) / max_scale if max_scale > F32(0) else F32(0)
    inv_min = F32(63) / max_min if max_min > F32(0) else F32(0)
    d_bits = fp32_to_fp16(max_scale / F32(63))
    dmin_bits = fp32_to_fp16(max_min / F32(63))
    put_fp16(y, 0, d_bits)
    put_fp16(y, 2, dmin_bits)
    d_all = fp16_to_fp32(d_bits)
    dmin_all = fp16_to_fp32(dmin_bits)
    packed = y[4:16]
    for j in range(8):  # 6-bit scale and min of sub-block j; get_scale_min_k4 reads back the same
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
        requantize_sub_block(x, L, j, d_all * F32(ls), dmin_all * F32(lm), l_iscale, l_min, nmax)


@jit()
def affine_k_blocks(x: np.ndarray, out: np.ndarray, nmax: int, rmin: float, nstep: int, five_bits: bool) -> None:
    """Q4_K (nmax 15) or Q5_K (nmax 31, five_bits): x float32 [N, 256] -> out uint8 [N, 144 or 176]."""
    lanes_max = 8 * GROUP
    xt = np.empty((32, lanes_max), F32)
    w = np.empty((32, lanes_max), F32)
    laux = np.empty((32, lanes_max), F32)
    st = np.empty((N_STATE, lanes_max), F32)
    L = np.empty(QK_K, np.uint8)
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 8 * n_sb
        for b in range(n_sb):  # lane 8b + j = sub-block j of super-block b0 + b
            for j in range(8):
                for i in range(32):
                    xt[i, 8 * b + j] = x[b0 + b, 32 * j + i]
        sum_x2 = st[ERR]
        for s in range(lanes):
            sum_x2[s] = F32(0)
        for i in range(32):
            for s in range(lanes):
                sum_x2[s] += xt[i, s] * xt[i, s]
        for s in range(lanes):
            sum_x2[s] = F32(np.sqrt(sum_x2[s] / F32(32)))  # av_x
        for i in range(32):
            for s in range(lanes):
                w[i, s] = sum_x2[s] + np.abs(xt[i, s])
        qkx2_lanes(xt, w, laux, st, lanes, nmax, rmin, 0.1, nstep)
        for s in range(lanes):
            st[VMIN, s] = -st[VMIN, s]  # the_min
        for b in range(n_sb):
            y = out[b0 + b]
            lane = slice(8 * b, 8 * b + 8)
            y[4:16] = 0
            affine_superblock(x[b0 + b], y, L, st[SCALE, lane], st[VMIN, lane], st[L_ISCALE, lane], st[L_MIN, lane], nmax)
            if five_bits:
                pack_q5_k(L, y)
            else:
                pack_q4_k(L, y)


@jit(inline="always")
def pack_q4_k(L: np.ndarray, y: np.ndarray) -> None:
    for g in range(4):  # byte i of group g holds L[64g + i] (low nibble) and L[64g + 32 + i] (high)
        for i in range(32):
            y[16 + 32 * g + i] = L[64 * g + i] | (L[64 * g + 32 + i] << 4)


@jit(inline="always")
def pack_q5_k(L: np.ndarray, y: np.ndarray) -> None:
    for i in range(32):
        y[16 + i] = 0
    for g in range(4):  # low nibbles as Q4_K; bit 4 of the group's two halves in qh bits 2g, 2g + 1
        for i in range(32):
            lo = L[64 * g + i]
            hi = L[64 * g + 32 + i]
            y[48 + 32 * g + i] = (lo & 0xF) | ((hi & 0xF) << 4)
            y[16 + i] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1))


def q4_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_K_ref: x float32 [N, 256] -> out uint8 [N, 144] (d, dmin, scales[12], qs[128])."""
    affine_k_blocks(x, out, 15, -1.0, 20, False)


def q5_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_K_ref: x float32 [N, 256] -> out uint8 [N, 176] (d, dmin, scales[12], qh[32], qs[128])."""
    affine_k_blocks(x, out, 31, -0.5, 15, True)


# ---------------------------------------------------------------- Q6_K
#
# make_qx_quants (rmse_type 1) on the 16 sub-blocks of GROUP super-blocks at once, one per lane, as above.

# rows of the per-lane state array
AMAX, XMAX, Q_SCALE, Q_BEST, Q_ISCALE, Q_L_ISCALE, SUMLX, SUML2 = range(8)
N_Q_STATE = 8


@jit()
def qx_lanes(xt: np.ndarray, wx: np.ndarray, w: np.ndarray, st: np.ndarray, lanes: int, nmax: int) -> None:
    """make_qx_quants(16, nmax, x, L, rmse_type=1, NULL) on `lanes` sub-blocks: xt [n, S] with w = x * x
    and wx = w * x -> per lane in st: Q_SCALE and Q_L_ISCALE (0 for an all-zero sub-block) that rebuilds L."""
    n = xt.shape[0]
    amax, vmax, scale, best = st[AMAX], st[XMAX], st[Q_SCALE], st[Q_BEST]
    iscale, l_iscale, sumlx, suml2 = st[Q_ISCALE], st[Q_L_ISCALE], st[SUMLX], st[SUML2]
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    largest_magnitude_lanes(xt, lanes, amax, vmax)
    for step in range(-10, 10):  # -10: ggml's first pass with iscale = -nmax / max
        if step == 0:
            continue
        factor = F32(-nmax) if step == -10 else -(F32(nmax) + F32(0.1) * F32(step))
        for s in range(lanes):
            iscale[s] = factor / vmax[s]
            sumlx[s] = F32(0)
            suml2[s] = F32(0)
        for i in range(n):
            for s in range(lanes):
                l = clampf(nearest_int_f32(iscale[s] * xt[i, s]), lo, hi)
                sumlx[s] += wx[i, s] * l
                suml2[s] += w[i, s] * l * l
        for s in range(lanes):
            if step == -10:
                scale[s] = sumlx[s] / suml2[s] if suml2[s] != F32(0) else F32(0)
                best[s] = scale[s] * sumlx[s]
                l_iscale[s] = iscale[s]
            elif suml2[s] > F32(0) and sumlx[s] * sumlx[s] > best[s] * suml2[s]:
                scale[s] = sumlx[s] / suml2[s]
                best[s] = scale[s] * sumlx[s]
                l_iscale[s] = iscale[s]
    for s in range(lanes):
        if amax[s] < GROUP_MAX_EPS:
            scale[s] = F32(0)
            l_iscale[s] = F32(0)


@jit()
def q6_k_superblock(x: np.ndarray, y: np.ndarray, L: np.ndarray, scales: np.ndarray, l_iscale: np.ndarray, amax: np.ndarray) -> None:
    """The rest of quantize_row_q6_K_ref for one super-block x [256] given its 16 sub-block scales."""
    max_scale = F32(0)
    max_abs_scale = F32(0)
    for ib in range(16):
        abs_scale = np.abs(scales[ib])
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        y[:] = 0
        return
    iscale = F32(-128) / max_scale
    d_bits = fp32_to_fp16(F32(1) / iscale)
    put_fp16(y, 208, d_bits)
    d_all = fp16_to_fp32(d_bits)
    for ib in range(16):
        q_scale = np.int8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)
        y[192 + ib] = np.uint8(q_scale & 0xFF)
        d = d_all * F32(q_scale)
        sub = x[16 * ib : 16 * ib + 16]
        out = L[16 * ib : 16 * ib + 16]
        if d != F32(0):
            for i in range(16):
                out[i] = np.uint8(clampf(nearest_int_f32(sub[i] / d), F32(-32), F32(31)) + F32(32))
        elif amax[ib] < GROUP_MAX_EPS:
            out[:] = 0
        else:  # make_qx_quants' own L
            for i in range(16):
                out[i] = np.uint8(clampf(nearest_int_f32(l_iscale[ib] * sub[i]), F32(-32), F32(31)) + F32(32))
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


@jit()
def q6_k_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q6_K_ref: x float32 [N, 256] -> out uint8 [N, 210] (ql[128], qh[64], scales[16] int8, d)."""
    lanes_max = 16 * GROUP
    xt = np.empty((16, lanes_max), F32)
    w = np.empty((16, lanes_max), F32)
    wx = np.empty((16, lanes_max), F32)
    st = np.empty((N_Q_STATE, lanes_max), F32)
    L = np.empty(QK_K, np.uint8)
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        for b in range(n_sb):  # lane 16b + j = sub-block j of super-block b0 + b
            for j in range(16):
                for i in range(16):
                    v = x[b0 + b, 16 * j + i]
                    xt[i, 16 * b + j] = v
                    w[i, 16 * b + j] = v * v
                    wx[i, 16 * b + j] = (v * v) * v
        qx_lanes(xt, wx, w, st, lanes, 32)
        for b in range(n_sb):
            lane = slice(16 * b, 16 * b + 16)
            q6_k_superblock(x[b0 + b], out[b0 + b], L, st[Q_SCALE, lane], st[Q_L_ISCALE, lane], st[AMAX, lane])


# ---------------------------------------------------------------- with an importance matrix
#
# quantize_row_q{4,5,6}_K_impl with quant_weights: the same lane kernels, fed the imatrix weights;
# `qw` [R, 256] is the row's weights cut into super-blocks, and block b of `x` uses qw[b % R].


@jit(inline="always")
def get_scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """The 6-bit scale and min of sub-block j as ggml reads them back from the 12 packed bytes."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@jit(inline="always")
def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray, q: np.ndarray) -> None:
    """Eight 8-bit levels into 12 bytes as ggml stores them (levels above 63 lose bits as in C)."""
    for j in range(8):
        if j < 4:
            q[j] = ls[j]
            q[j + 4] = lm[j]
        else:
            q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            q[j - 4] |= ((ls[j] >> 4) << 6) & 0xFF
            q[j] |= ((lm[j] >> 4) << 6) & 0xFF


@jit()
def make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int, L: np.ndarray) -> float:
    """ggml's make_qp_quants: x, w float32 [n] -> the scale; levels into L (uint8, a negative one wraps)."""
    n = x.shape[0]
    vmax = F32(0)
    for i in range(n):
        vmax = vmax if vmax > x[i] else x[i]
    if vmax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0)
    fmax = F32(nmax)
    iscale = fmax / vmax
    scale = F32(1) / iscale
    best = F32(0)
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
        diff = x[i] - scale * F32(L[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (F32(0.1) * F32(step) + fmax) / vmax
        scale_step = F32(1) / iscale_step
        mse = F32(0)
        for i in range(n):
            diff = x[i] - scale_step * F32(min(nmax, nearest_int(iscale_step * x[i])))
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_step
    sumlx = F32(0)
    suml2 = F32(0)
    for i in range(n):
        level = min(nmax, nearest_int(iscale * x[i]))
        L[i] = level & 0xFF
        sumlx += w[i] * x[i] * F32(level)  # the int level, not the wrapped byte
        suml2 += w[i] * F32(level) * F32(level)
    for _ in range(5):
        changed = False
        for i in range(n):
            old = F32(L[i])
            slx = sumlx - w[i] * x[i] * old
            sl2 = suml2 - w[i] * old * old
            if slx > F32(0) and sl2 > F32(0):
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w[i] * x[i] * F32(new_l)
                    sl2 += w[i] * F32(new_l) * F32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > F32(0) else F32(0)


@jit()
def weighted_affine_superblock(x: np.ndarray, y: np.ndarray, L: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                               sw: np.ndarray, l_iscale: np.ndarray, l_min: np.ndarray, ls: np.ndarray, lm: np.ndarray,
                               nmax: int, clamp_levels: bool) -> None:
    """The rest of quantize_row_q4_K_impl / q5_K_impl for one super-block x [256], given its 8 sub-block
    scales, mins and weight sums: d, dmin and the 12 scale bytes into y[0:16], the quants into L [256]."""
    d_block = make_qp_quants(scales, sw, 63, ls)
    m_block = make_qp_quants(mins, sw, 63, lm)
    if clamp_levels:  # Q5_K clamps to 63; Q4_K stores make_qp_quants' levels as they are
        for j in range(8):
            ls[j] = min(63, ls[j])
            lm[j] = min(63, lm[j])
    packed = y[4:16]
    pack_scale_min_k4(ls, lm, packed)
    d_bits = fp32_to_fp16(d_block)
    dmin_bits = fp32_to_fp16(m_block)
    put_fp16(y, 0, d_bits)
    put_fp16(y, 2, dmin_bits)
    d_all = fp16_to_fp32(d_bits)
    dmin_all = fp16_to_fp32(dmin_bits)
    for j in range(8):
        sc, m = get_scale_min_k4(j, packed)
        requantize_sub_block(x, L, j, d_all * F32(sc), dmin_all * F32(m), l_iscale, l_min, nmax)


@jit()
def weighted_affine_k_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray, nmax: int, clamp_levels: bool,
                             five_bits: bool) -> None:
    """Q4_K (nmax 15) or Q5_K (nmax 31, clamp_levels, five_bits) with an imatrix:
    x float32 [N, 256], qw float32 [R, 256] -> out uint8 [N, 144 or 176]."""
    lanes_max = 8 * GROUP
    xt = np.empty((32, lanes_max), F32)
    w = np.empty((32, lanes_max), F32)
    laux = np.empty((32, lanes_max), F32)
    st = np.empty((N_STATE, lanes_max), F32)
    sw = np.empty(lanes_max, F32)
    L = np.empty(QK_K, np.uint8)
    ls = np.empty(8, np.uint8)
    lm = np.empty(8, np.uint8)
    n_qw = qw.shape[0]
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 8 * n_sb
        for b in range(n_sb):  # lane 8b + j = sub-block j of super-block b0 + b
            xb = x[b0 + b]
            qb = qw[(b0 + b) % n_qw]
            for j in range(8):
                for i in range(32):
                    xt[i, 8 * b + j] = xb[32 * j + i]
            imatrix_weights(xb, qb, F32(2) * sum_of_squares(xb) / F32(QK_K), w, 32, 8 * b)
        for s in range(lanes):
            sw[s] = F32(0)
        for i in range(32):
            for s in range(lanes):
                sw[s] += w[i, s]
        qkx2_lanes(xt, w, laux, st, lanes, nmax, -0.9, 0.05, 36)  # make_qkx3_quants with weights
        for s in range(lanes):
            st[VMIN, s] = -st[VMIN, s]  # the_min
        for b in range(n_sb):
            y = out[b0 + b]
            lane = slice(8 * b, 8 * b + 8)
            weighted_affine_superblock(x[b0 + b], y, L, st[SCALE, lane], st[VMIN, lane], sw[lane], st[L_ISCALE, lane],
                                       st[L_MIN, lane], ls, lm, nmax, clamp_levels)
            if five_bits:
                pack_q5_k(L, y)
            else:
                pack_q4_k(L, y)


@jit()
def weighted_q6_k_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q6_K_impl: make_qx_quants weighs by the imatrix alone. x [N, 256], qw [R, 256] -> out [N, 210]."""
    lanes_max = 16 * GROUP
    xt = np.empty((16, lanes_max), F32)
    w = np.empty((16, lanes_max), F32)
    wx = np.empty((16, lanes_max), F32)
    st = np.empty((N_Q_STATE, lanes_max), F32)
    L = np.empty(QK_K, np.uint8)
    n_qw = qw.shape[0]
    for b0 in range(0, x.shape[0], GROUP):
        n_sb = min(GROUP, x.shape[0] - b0)
        lanes = 16 * n_sb
        for b in range(n_sb):  # lane 16b + j = sub-block j of super-block b0 + b
            qb = qw[(b0 + b) % n_qw]
            for j in range(16):
                for i in range(16):
                    v = x[b0 + b, 16 * j + i]
                    q = qb[16 * j + i]
                    xt[i, 16 * b + j] = v
                    w[i, 16 * b + j] = q
                    wx[i, 16 * b + j] = q * v
        qx_lanes(xt, wx, w, st, lanes, 32)
        for b in range(n_sb):
            lane = slice(16 * b, 16 * b + 16)
            q6_k_superblock(x[b0 + b], out[b0 + b], L, st[Q_SCALE, lane], st[Q_L_ISCALE, lane], st[AMAX, lane])


def q4_k_weighted_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    weighted_affine_k_blocks(x, qw, out, 15, False, False)


def q5_k_weighted_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    weighted_affine_k_blocks(x, qw, out, 31, True, True)


# ---------------------------------------------------------------- Q8_0

HALF_BELOW = F32(0.5 - 2.0**-25)  # the largest float32 below 0.5: x + copysign(it, x) truncated is roundf(x)


@jit(inline="always")
def abs_bits(v: float) -> int:
    return f32_bits(v) & np.int32(0x7FFFFFFF)


@jit()
def q8_0_blocks(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q8_0_ref: x float32 [N, 32] -> out uint8 [N, 34] (d, qs[32] int8)."""
    for b in range(x.shape[0]):
        v = x[b]
        y = out[b]
        # amax = MAX(amax, fabsf(v)) from 0: without NaN the largest magnitude, whose bits are the
        # largest as integers (an integer max vectorizes; a float one would need fast-math)
        top = np.int32(0)
        for j in range(32):
            a = abs_bits(v[j])
            top = a if a > top else top
        if top > np.int32(0x7F800000):  # a NaN: MAX's result depends on where it sits; follow it
            amax = F32(0)
            for j in range(32):
                a = np.abs(v[j])
                amax = amax if amax > a else a
        else:
            amax = bits_f32(top)
        d = amax / F32(127)
        inv = F32(1) / d if d != F32(0) else F32(0)
        put_fp16(y, 0, fp32_to_fp16(d))
        for j in range(32):
            q = v[j] * inv
            y[2 + j] = np.int32(q + (HALF_BELOW if q >= F32(0) else -HALF_BELOW)) & 0xFF


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "q8_0": q8_0_blocks,
    "q4_k": q4_k_blocks,
    "q5_k": q5_k_blocks,
    "q6_k": q6_k_blocks,
}


# (x float32 [N, 256], qw float32 [R, 256] with N a multiple of R, out uint8 [N, type_size])
WEIGHTED_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "q4_k": q4_k_weighted_blocks,
    "q5_k": q5_k_weighted_blocks,
    "q6_k": weighted_q6_k_blocks,
}
