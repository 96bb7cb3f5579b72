"""Compiled CPU kernels (numba) for IQ2_XXS, IQ2_XS and IQ2_S: the same bytes as the references in mt/quant/iq2.py.
The rules of mt/quant/compiled.py hold (float32 everywhere, no FMA, ggml's order). One super-block at a time, one
sub-block after another, as quantize_row_iq2_{xxs,xs,s}_impl run.

The lattice comes as four arrays (`tables`): the key map `index`, the neighbour lists `nb`, the grid points 2l + 1 as
float32 `points` [G, 8] and their `levels` [G, 8]. `failed` [1] counts the groups that found no neighbour at a finite
distance, where ggml aborts; the Python wrappers raise then. A sub-block's scratch: `weight`, `waux` = sqrtf(weight),
`xval` = |x| (ggml's sign folding), `wx` = weight·xval.
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.compiled import (
    GROUP_MAX_EPS, QK_K, fp32_to_fp16, jit, make_qp_quants, nearest_int, put_fp16, sum_of_squares,
)
from mt.quant.iq2 import no_neighbour
from mt.quant.iq_grids import lattice

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
GROUP_MAX_EPS_IQ2_S = F32(1e-8)


@jit(inline="always")
def best_neighbour(nb: np.ndarray, start: int, points: np.ndarray, levels: np.ndarray, xval: np.ndarray,
                   waux: np.ndarray, at: int, scale: float, L: np.ndarray) -> int:
    """iq2_find_best_neighbour: of the neighbours listed at nb[start] (count, then grid indices) the first with the
    smallest Σ waux·(scale·q - x)² below FLT_MAX over the group at `at`; its levels into L[at:at + 8]. -1: none."""
    best_d2 = FLT_MAX
    found = -1
    for j in range(1, np.int64(nb[start]) + 1):
        g = np.int64(nb[start + j])
        d2 = F32(0)
        for i in range(8):
            diff = scale * points[g, i] - xval[at + i]
            d2 += waux[at + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            found = g
    for i in range(8):
        L[at + i] = levels[found, i] if found >= 0 else 0
    return found


@jit(inline="always")
def group_levels(xval: np.ndarray, waux: np.ndarray, at: int, iscale: float, scale: float, L: np.ndarray,
                 index: np.ndarray, nb: np.ndarray, points: np.ndarray, levels: np.ndarray, failed: np.ndarray) -> bool:
    """Levels clamp(nearest_int(0.5·(iscale·x - 1)), 0, 2) of the group at `at` into L; off the grid, the best
    neighbour's at `scale`. True when the levels were on the grid."""
    key = 0
    for i in range(8):
        l = max(0, min(2, nearest_int(F32(0.5) * (iscale * xval[at + i] - F32(1)))))
        L[at + i] = l
        key |= l << (2 * i)
    if index[key] >= 0:
        return True
    if best_neighbour(nb, -np.int64(index[key]) - 1, points, levels, xval, waux, at, scale, L) < 0:
        failed[0] += 1
    return False


@jit(inline="always")
def level_sums(weight: np.ndarray, wx: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """Σ w·x·q and Σ w·q·q with q = 2l + 1, in ggml's order (w·x is the product ggml takes first)."""
    sumqx = F32(0)
    sumq2 = F32(0)
    for i in range(L.shape[0]):
        q = F32(2 * np.int64(L[i]) + 1)
        sumqx += wx[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@jit(inline="always")
def grid_index(L: np.ndarray, at: int, index: np.ndarray) -> int:
    key = 0
    for i in range(8):
        key |= np.int64(L[at + i]) << (2 * i)
    return index[key]


@jit(inline="always")
def sub_block_weights(xb: np.ndarray, qb: np.ndarray, weighted: bool, sigma2: float, weight: np.ndarray,
                      waux: np.ndarray) -> None:
    """qw·sqrtf(sigma2 + x²), or without qw 0.25·sigma2 + x²; waux = sqrtf(weight)."""
    for i in range(xb.shape[0]):
        v = xb[i]
        if weighted:
            weight[i] = qb[i] * F32(np.sqrt(sigma2 + v * v))
        else:
            weight[i] = F32(0.25) * sigma2 + v * v
        waux[i] = F32(np.sqrt(weight[i]))


@jit(inline="always")
def fold_signs(xb: np.ndarray, weight: np.ndarray, even: bool, xval: np.ndarray, wx: np.ndarray,
               signs: np.ndarray) -> float:
    """|x| into xval, weight·xval into wx and the sign bits of each group of 8 into signs; `even`: a group with an odd
    count of negatives keeps its value of least w·x² negative, and 7 bits hold its signs. Returns the largest xval."""
    for k in range(xb.shape[0] // 8):
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= F32(0):
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if even and nflip % 2 == 1:
            imin = 0
            smallest = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < smallest:
                    smallest = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if even else s
    vmax = xval[0]
    for i in range(xb.shape[0]):
        wx[i] = weight[i] * xval[i]
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@jit(inline="always")
def scale_level(scale: float, iscale: float) -> int:
    return max(0, min(15, nearest_int(F32(0.5) * (iscale * scale - F32(1)))))


# ---------------------------------------------------------------- IQ2_XXS


@jit()
def xxs_sub_block(xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, wx: np.ndarray, L: np.ndarray,
                  Laux: np.ndarray, Lqp: np.ndarray, index: np.ndarray, nb: np.ndarray, points: np.ndarray,
                  levels: np.ndarray, failed: np.ndarray) -> tuple[float, bool]:
    """The search of quantize_row_iq2_xxs_impl for one sub-block of 32: levels into L, the scale (negative: the signs
    flip) and False where make_qp_quants' scale is not positive (ggml skips the sub-block)."""
    scale = make_qp_quants(xval, weight, 4, Lqp)
    eff_max = scale * F32(3)
    if eff_max <= F32(0):
        return F32(0), False
    best = F32(0)
    for step in range(-6, 7):
        iscale = (F32(5) + F32(step) * F32(0.1)) / eff_max
        this_scale = F32(1) / iscale
        for k in range(4):
            group_levels(xval, waux, 8 * k, iscale, this_scale, Laux, index, nb, points, levels, failed)
        sumqx, sumq2 = level_sums(weight, wx, Laux)
        if sumq2 > F32(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
    if scale > F32(0):
        iscale = F32(1) / scale
        for k in range(4):
            group_levels(xval, waux, 8 * k, iscale, scale, L, index, nb, points, levels, failed)
        sumqx, sumq2 = level_sums(weight, wx, L)
        if sumq2 > F32(0):
            scale = sumqx / sumq2
    return scale, True


@jit()
def iq2_xxs_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray, index: np.ndarray, nb: np.ndarray,
                   points: np.ndarray, levels: np.ndarray, failed: np.ndarray) -> None:
    """quantize_row_iq2_xxs_impl: x float32 [N, 256], qw float32 [R, 256] -> out uint8 [N, 66]."""
    weight = np.empty(32, F32)
    waux = np.empty(32, F32)
    xval = np.empty(32, F32)
    wx = np.empty(32, F32)
    L = np.zeros(32, np.int8)
    Laux = np.empty(32, np.int8)
    Lqp = np.empty(32, np.uint8)
    signs = np.empty(4, np.int64)
    scales = np.empty(8, F32)
    q2 = np.empty(16, np.uint32)
    for b in range(x.shape[0]):
        xbl = x[b]
        qbl = qw[b % qw.shape[0]]
        y = out[b]
        q2[:] = 0
        max_scale = F32(0)
        sigma2 = sum_of_squares(xbl) / F32(QK_K)
        for ib in range(8):
            xb = xbl[32 * ib : 32 * ib + 32]
            sub_block_weights(xb, qbl[32 * ib : 32 * ib + 32], True, sigma2, weight, waux)
            scales[ib] = F32(0)
            if fold_signs(xb, weight, True, xval, wx, signs) < GROUP_MAX_EPS:
                continue
            scale, searched = xxs_sub_block(xval, weight, waux, wx, L, Laux, Lqp, index, nb, points, levels, failed)
            if not searched:
                continue
            if scale < F32(0):
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                q2[2 * ib] |= np.uint32(grid_index(L, 8 * k, index) << (8 * k))
                q2[2 * ib + 1] |= np.uint32(signs[k] << (7 * k))
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0):
            y[:] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(y, 0, fp32_to_fp16(d))
        iscale = F32(1) / d
        for ib in range(8):
            q2[2 * ib + 1] |= np.uint32(scale_level(scales[ib], iscale) << 28)
        for j in range(16):
            for byte in range(4):
                y[2 + 4 * j + byte] = (q2[j] >> np.uint32(8 * byte)) & np.uint32(0xFF)


# ---------------------------------------------------------------- IQ2_XS / IQ2_S


@jit()
def sub_block_16(xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, wx: np.ndarray, vmax: float, L: np.ndarray,
                 Laux: np.ndarray, on_grid: np.ndarray, index: np.ndarray, nb: np.ndarray, points: np.ndarray,
                 levels: np.ndarray, failed: np.ndarray) -> float:
    """The search of quantize_row_iq2_xs_impl / _s_impl for one sub-block of 16 whose largest xval is vmax: levels
    into L, the scale returned (negative: the signs flip)."""
    best = F32(0)
    scale = vmax / F32(5)
    L[:] = 0
    on_grid[:] = True
    for step in range(-9, 10):
        iscale = (F32(5) + F32(step) * F32(0.1)) / vmax
        this_scale = F32(1) / iscale
        aux0 = group_levels(xval, waux, 0, iscale, this_scale, Laux, index, nb, points, levels, failed)
        aux1 = group_levels(xval, waux, 8, iscale, this_scale, Laux, index, nb, points, levels, failed)
        sumqx, sumq2 = level_sums(weight, wx, Laux)
        if sumq2 > F32(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[0] = aux0
            on_grid[1] = aux1
    if (not on_grid[0] or not on_grid[1]) and scale > F32(0):
        iscale = F32(1) / scale
        for k in range(2):
            if not on_grid[k]:
                group_levels(xval, waux, 8 * k, iscale, scale, L, index, nb, points, levels, failed)
        sumqx, sumq2 = level_sums(weight, wx, L)
        if sumq2 > F32(0):
            scale = sumqx / sumq2
    return scale


@jit(inline="always")
def pack_16(y: np.ndarray, ib: int, L: np.ndarray, signs: np.ndarray, index: np.ndarray, is_s: bool) -> None:
    """The two groups of sub-block ib: IQ2_XS a uint16 grid index | signs << 9 each; IQ2_S the index's low byte in
    qs, its 2 high bits in qh, the signs byte 32 bytes after the low bytes."""
    for k in range(2):
        g = grid_index(L, 8 * k, index)
        i8 = 2 * ib + k
        if is_s:
            y[2 + i8] = g & 255
            y[66 + i8 // 4] |= (g >> 8) << (2 * (i8 % 4))
            y[34 + i8] = signs[k]
        else:
            put_fp16(y, 2 + 2 * i8, g | (signs[k] << 9))


@jit()
def iq2_16_blocks(x: np.ndarray, qw: np.ndarray, weighted: bool, is_s: bool, out: np.ndarray, index: np.ndarray,
                  nb: np.ndarray, points: np.ndarray, levels: np.ndarray, failed: np.ndarray) -> None:
    """quantize_row_iq2_xs_impl (out [N, 74]) or, `is_s`, quantize_row_iq2_s_impl (out [N, 82]): x float32 [N, 256],
    qw float32 [R, 256] (read only where `weighted`)."""
    weight = np.empty(16, F32)
    waux = np.empty(16, F32)
    xval = np.empty(16, F32)
    wx = np.empty(16, F32)
    L = np.zeros(16, np.int8)
    Laux = np.empty(16, np.int8)
    on_grid = np.empty(2, np.bool_)
    signs = np.empty(2, np.int64)
    scales = np.empty(16, F32)
    eps = GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS
    sign_mask = 255 if is_s else 127
    scales_at = 74 if is_s else 66
    for b in range(x.shape[0]):
        xbl = x[b]
        qbl = qw[b % qw.shape[0]]
        y = out[b]
        y[:] = 0
        max_scale = F32(0)
        sumx2 = sum_of_squares(xbl)
        sigma2 = F32(2) * sumx2 / F32(QK_K) if is_s else sumx2 / F32(QK_K)
        for ib in range(16):
            xb = xbl[16 * ib : 16 * ib + 16]
            sub_block_weights(xb, qbl[16 * ib : 16 * ib + 16], weighted, sigma2, weight, waux)
            scales[ib] = F32(0)
            vmax = fold_signs(xb, weight, not is_s, xval, wx, signs)
            if vmax < eps:
                continue
            scale = sub_block_16(xval, weight, waux, wx, vmax, L, Laux, on_grid, index, nb, points, levels, failed)
            if scale < F32(0):
                scale = -scale
                for k in range(2):
                    signs[k] = ~signs[k] & sign_mask
            pack_16(y, ib, L, signs, index, is_s)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0):  # IQ2_XS clears its quants; IQ2_S keeps them, with d and the scales 0
            if not is_s:
                y[:] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(y, 0, fp32_to_fp16(d * F32(0.9875) if is_s else d))
        iscale = F32(1) / d
        for ib in range(16):
            y[scales_at + ib // 2] |= scale_level(scales[ib], iscale) << (4 * (ib % 2))


@cache
def tables(ggml_type: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(key map int32, neighbour lists uint16, grid points 2l + 1 as float32 [G, 8], their levels int8 [G, 8])."""
    lat = lattice(ggml_type)
    return lat.index, lat.neighbours, lat.points.astype(F32), ((lat.points - 1) // 2).astype(np.int8)


NO_WEIGHTS = np.zeros((1, QK_K), F32)


def run_checked(kernel: Callable[..., None], ggml_type: GGMLQuantizationType, *args: object) -> None:
    """kernel(*args, *tables, failed); a QuantizationError where a group found no neighbour at a finite distance."""
    failed = np.zeros(1, np.int64)
    kernel(*args, *tables(ggml_type), failed)
    if failed[0]:
        raise no_neighbour()


def iq2_xxs_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    run_checked(iq2_xxs_blocks, GGMLQuantizationType.IQ2_XXS, x, qw, out)


def iq2_xs_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    run_checked(iq2_16_blocks, GGMLQuantizationType.IQ2_XS, x, qw, True, False, out)


def iq2_s_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    run_checked(iq2_16_blocks, GGMLQuantizationType.IQ2_S, x, qw, True, True, out)


def iq2_s_plain(x: np.ndarray, out: np.ndarray) -> None:
    run_checked(iq2_16_blocks, GGMLQuantizationType.IQ2_S, x, NO_WEIGHTS, False, True, out)


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {"iq2_s": iq2_s_plain}
WEIGHTED_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "iq2_xxs": iq2_xxs_weighted,
    "iq2_xs": iq2_xs_weighted,
    "iq2_s": iq2_s_weighted,
}
