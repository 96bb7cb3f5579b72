"""Compiled CPU kernels (numba) for IQ3_XXS and IQ3_S: the same bytes as the references in mt/quant/iq3.py
(quantize_row_iq3_xxs_impl with grid 256, quantize_row_iq3_s_impl with block_size 32). The rules of
mt/quant/compiled.py hold: float32 everywhere, no FMA, every sum in ggml's order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.compiled import fp32_to_fp16, jit, nearest_int, put_fp16, sum_of_squares
from mt.quant.iq_grids import lattice

F32 = np.float32
FLT_MAX = F32(3.4028234663852886e38)
KMAXQ = 8
XXS_EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS


@jit(inline="always")
def best_neighbour(neighbours: np.ndarray, start: int, gridf: np.ndarray, xval: np.ndarray, waux: np.ndarray,
                   at: int, scale: float) -> int:
    """iq3_find_best_neighbour for the group xval[at:at + 4]: the listed grid index of least sum waux·(scale·q - x)²,
    the first on a tie (-1 if none is below FLT_MAX, where ggml aborts)."""
    best_d2 = FLT_MAX
    found = -1
    for j in range(start + 1, start + 1 + np.int64(neighbours[start])):
        g = np.int64(neighbours[j])
        d2 = F32(0)
        for i in range(4):
            diff = scale * gridf[g, i] - xval[at + i]
            d2 += waux[at + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            found = g
    return found


@jit(inline="always")
def round_group(xval: np.ndarray, at: int, inv: float, L: np.ndarray) -> int:
    """The levels of xval[at:at + 4] against 1/inv into L[at:at + 4] -> their key."""
    key = 0
    for i in range(4):
        level = max(0, min(KMAXQ - 1, nearest_int(F32(0.5) * (inv * xval[at + i] - F32(1)))))
        L[at + i] = level
        key |= level << (3 * i)
    return key


@jit(inline="always")
def set_levels(grid_levels: np.ndarray, g: int, L: np.ndarray, at: int) -> None:
    for i in range(4):
        L[at + i] = grid_levels[g, i]


@jit(inline="always")
def weighted_sums(xval: np.ndarray, weight: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    sumqx = F32(0)
    sumq2 = F32(0)
    for i in range(32):
        q = F32(2 * L[i] + 1)
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@jit()
def search(xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, vmax: float, steps: int, xxs: bool,
           L: np.ndarray, Laux: np.ndarray, on_grid: np.ndarray, gridf: np.ndarray, grid_levels: np.ndarray,
           index: np.ndarray, neighbours: np.ndarray) -> float:
    """The scale search and the refinement of one sub-block of 32 -> its scale; its levels into L."""
    best = F32(0)
    scale = vmax / F32(2 * KMAXQ - 1)
    for k in range(8):
        on_grid[k] = xxs  # IQ3_S starts with every group off the grid
    for i in range(32):
        L[i] = 0
    for step in range(-steps, steps + 1):
        inv = (F32(2 * KMAXQ - 1) + F32(step) * F32(0.2)) / vmax
        this_scale = F32(1) / inv
        on_mask = 0
        for k in range(8):
            g = index[round_group(xval, 4 * k, inv, Laux)]
            if g >= 0:
                on_mask |= 1 << k
            else:
                g = best_neighbour(neighbours, -g - 1, gridf, xval, waux, 4 * k, this_scale)
                set_levels(grid_levels, g, Laux, 4 * k)
        sumqx, sumq2 = weighted_sums(xval, weight, Laux)
        if sumq2 > F32(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on_grid[k] = (on_mask >> k) & 1 == 1
    n_off = 0
    for k in range(8):
        n_off += 0 if on_grid[k] else 1
    if n_off > 0 and scale > F32(0):
        inv = F32(1) / scale
        for k in range(8):
            if xxs and on_grid[k]:  # IQ3_S redoes every group
                continue
            g = index[round_group(xval, 4 * k, inv, L)]
            if g < 0:
                g = best_neighbour(neighbours, -g - 1, gridf, xval, waux, 4 * k, scale)
                set_levels(grid_levels, g, L, 4 * k)
        sumqx, sumq2 = weighted_sums(xval, weight, L)
        if sumq2 > F32(0):
            scale = sumqx / sumq2
    return scale


@jit(inline="always")
def magnitudes(xb: np.ndarray, weight: np.ndarray, xval: np.ndarray, signs: np.ndarray, xxs: bool) -> float:
    """xval = |x| and the sign byte of each 8 (IQ3_XXS: an even count, the least w·x² flipped back, bit 7 dropped)
    -> the largest xval."""
    for k in range(4):
        s = 0
        nflip = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= F32(0):
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                s |= 1 << i
                nflip += 1
        if xxs and nflip % 2 == 1:
            imin = 0
            least = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                cost = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if cost < least:
                    least = cost
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if xxs else s
    vmax = xval[0]
    for i in range(1, 32):
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@jit()
def iq3_blocks(x: np.ndarray, qw: np.ndarray, weighted: bool, out: np.ndarray, xxs: bool, gridf: np.ndarray,
               grid_levels: np.ndarray, index: np.ndarray, neighbours: np.ndarray) -> None:
    """quantize_row_iq3_xxs_impl (`xxs`, out [N, 98]) or quantize_row_iq3_s_impl (out [N, 110]) on x [N, 256];
    weights x² or, `weighted`, qw[b % R] · sqrtf(sigma2 + x²)."""
    weight = np.empty(32, F32)
    waux = np.empty(32, F32)
    xval = np.empty(32, F32)
    L = np.empty(32, np.int64)
    Laux = np.empty(32, np.int64)
    on_grid = np.empty(8, np.bool_)
    signs = np.empty(4, np.int64)
    scales = np.empty(8, F32)
    steps = 15 if xxs else 9
    n_qw = qw.shape[0]
    for b in range(x.shape[0]):
        xbl = x[b]
        y = out[b]
        y[:] = 0
        sigma2 = F32(2) * sum_of_squares(xbl) / F32(256)
        max_scale = F32(0)
        slot = 0  # IQ3_S: a skipped sub-block does not advance the qs and signs positions
        for ib in range(8):
            xb = xbl[32 * ib : 32 * ib + 32]
            for i in range(32):
                if weighted:
                    weight[i] = qw[b % n_qw, 32 * ib + i] * F32(np.sqrt(sigma2 + xb[i] * xb[i]))
                else:
                    weight[i] = xb[i] * xb[i]
                waux[i] = F32(np.sqrt(weight[i]))
            vmax = magnitudes(xb, weight, xval, signs, xxs)
            if (vmax < XXS_EPS) if xxs else (vmax == F32(0)):
                scales[ib] = F32(0)
                continue
            scale = search(xval, weight, waux, vmax, steps, xxs, L, Laux, on_grid, gridf, grid_levels, index,
                           neighbours)
            if scale < F32(0):
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & (127 if xxs else 255)
            for k in range(8):
                g = index[L[4 * k] | (L[4 * k + 1] << 3) | (L[4 * k + 2] << 6) | (L[4 * k + 3] << 9)]
                if xxs:
                    y[2 + 8 * ib + k] = g
                else:
                    y[2 + 8 * slot + k] = g & 255
                    y[66 + ib] |= (g >> 8) << k
            if xxs:
                word = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                for j in range(4):
                    y[66 + 4 * ib + j] = (word >> (8 * j)) & 255
            else:
                for k in range(4):
                    y[74 + 4 * slot + k] = signs[k]
                slot += 1
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0):
            if xxs:
                y[:] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(y, 0, fp32_to_fp16(d * (F32(1.0125) if xxs else F32(1.033))))
        inv = F32(1) / d
        for ib in range(8):
            level = max(0, min(15, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1)))))
            if xxs:
                y[66 + 4 * ib + 3] |= level << 4
            else:
                y[106 + ib // 2] |= level << (4 * (ib % 2))


def _tables(ggml_type: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The grid as float32 coordinates and as levels, the key index, the neighbour lists."""
    lat = lattice(ggml_type)
    return (lat.points.astype(F32), ((lat.points.astype(np.int64) - 1) // 2), lat.index.astype(np.int64),
            lat.neighbours)


XXS_TABLES = _tables(GGMLQuantizationType.IQ3_XXS)
S_TABLES = _tables(GGMLQuantizationType.IQ3_S)
NO_WEIGHTS = np.zeros((1, 256), F32)


def iq3_xxs_plain(x: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, NO_WEIGHTS, False, out, True, *XXS_TABLES)


def iq3_xxs_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, qw, True, out, True, *XXS_TABLES)


def iq3_s_plain(x: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, NO_WEIGHTS, False, out, False, *S_TABLES)


def iq3_s_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, qw, True, out, False, *S_TABLES)


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {"iq3_xxs": iq3_xxs_plain, "iq3_s": iq3_s_plain}
WEIGHTED_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "iq3_xxs": iq3_xxs_weighted, "iq3_s": iq3_s_weighted}
