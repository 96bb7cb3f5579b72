"""Compiled CPU kernels (numba) for IQ2_XXS, IQ2_XS and IQ2_S: the same bytes as the references in mt/quant/iq2.py.
The rules of mt/quant/compiled.py hold (float32 everywhere, no FMA, ggml's order). One super-block at a time, one
sub-block after another, as quantize_row_iq2_{xxs,xs,s}_impl run.

A group of 8 values is held by its grid index g: its levels are the grid point's. The lattice comes as `SearchTables`
(see `tables`): the key map, each off-grid key's neighbour list padded to a multiple of LANES, and the list's points
in one block laid out [8][K] (dimension-major), so that iq2_find_best_neighbour runs across candidates in SIMD lanes
while each candidate's distance keeps ggml's order over the 8 dimensions.

A sub-block's scratch (`Scratch`): `weight`, `waux` = sqrtf(weight), `xval` = |x| (ggml's sign folding), the
products ggml sums for each position i and level l (q = 2l + 1): `wxq[3i + l]` = weight·xval·q and
`wqq[3i + l]` = weight·q·q, and the trial scales' iscales and keys. `failed` [1] counts the groups that found no
neighbour at a finite distance, where ggml aborts; the Python wrappers raise then.

Indices into the big tables are uint64 where a loop should vectorize: numba checks a signed index for wraparound,
which turns contiguous loads into gathers.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.compiled import (
    GROUP_MAX_EPS, QK_K, clampf, f32_bits, fp32_to_fp16, jit, make_qp_quants, nearest_int, nearest_int_f32, put_fp16,
    sum_of_squares,
)
from mt.quant.iq2 import no_neighbour
from mt.quant.iq_grids import lattice

F32 = np.float32
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
FLT_MAX_BITS = 0x7F7FFFFF  # a distance d2 >= 0 is below FLT_MAX exactly when its bits are below these
LANE_BITS = 3
LANES = 1 << LANE_BITS  # candidates per SIMD step of the neighbour search
NO_CANDIDATE = 1 << 40  # above any (distance bits << LANE_BITS | lane)
TRIALS = 24  # room for the trial scales of a scale search (13 or 19), a multiple of 8
NO_POINT = -(1 << 40)  # group_grid's answer where no neighbour lies at a finite distance


class SearchTables(NamedTuple):
    index: np.ndarray  # int32 [keys]: the key's grid index, negative off the grid
    starts: np.ndarray  # int32 [keys + 1]: key k's candidates are cand[starts[k]:starts[k + 1]] (none on the grid)
    cand: np.ndarray  # int32 [C]: ggml's neighbour lists, each padded to a multiple of LANES with its last entry
    qpts: np.ndarray  # int8 [8 C]: key k's candidates' points 2l + 1 at 8·starts[k], laid out [8][K]
    glevels: np.ndarray  # int8 [G, 8]: each grid point's levels


# ---------------------------------------------------------------- the neighbour search


@jit(inline="always")
def distance(qpts: np.ndarray, base: int, n: int, j: int, scale: float, xval: np.ndarray, waux: np.ndarray,
             at: int, width: int) -> float:
    """Σ waux·(scale·q - x)² over the group of `width` values at `at` for candidate j of the block [width][n] at
    qpts[base], in ggml's order (d2 starts at 0, then i = 0..width-1); the IQ3 searches use it with width 4."""
    d2 = F32(0)
    for i in range(width):
        diff = scale * F32(qpts[np.uint64(base + i * n + j)]) - xval[at + i]
        d2 += waux[at + i] * diff * diff
    return d2


@jit(inline="always")
def best_neighbour(starts: np.ndarray, cand: np.ndarray, qpts: np.ndarray, key: int, xval: np.ndarray,
                   waux: np.ndarray, at: int, scale: float) -> int:
    """iq2_find_best_neighbour: of the candidates of an off-grid key, the first with the smallest
    Σ waux·(scale·q - x)² below FLT_MAX over the group at `at`; -1: none.

    A distance is a sum of terms >= 0 (waux = sqrtf(weight) is >= 0, -0 or NaN), never negative or -0, so its bits
    as uint32 order like the floats, NaN and inf above FLT_MAX. LANES candidates at a time run in SIMD lanes, each
    distance in ggml's order; (bits << LANE_BITS | lane) orders a chunk by distance, then place, and the first chunk
    with the smallest bits holds the answer. A padding copy of a list's last entry never comes before it. (A single
    return keeps numba's reference counting out of the loop.)"""
    s = np.int64(starts[key])
    n = np.int64(starts[key + 1]) - s
    smallest = NO_CANDIDATE
    first = 0
    for c in range(n // LANES):
        chunk = NO_CANDIDATE
        for jj in range(LANES):
            d2 = distance(qpts, 8 * s, n, LANES * c + jj, scale, xval, waux, at, 8)
            chunk = min(chunk, (np.int64(np.uint32(f32_bits(d2))) << LANE_BITS) | jj)
        if chunk >> LANE_BITS < smallest >> LANE_BITS:  # an equal distance in a later chunk comes after
            smallest = chunk
            first = c
    g = np.int64(cand[s + LANES * first + (smallest & (LANES - 1))])
    return g if smallest >> LANE_BITS < FLT_MAX_BITS else -1


@jit(inline="always")
def group_key(xval: np.ndarray, at: int, iscale: float) -> int:
    """The key of levels clamp(nearest_int(0.5·(iscale·x - 1)), 0, 2) of the group at `at`."""
    key = 0
    for i in range(8):
        l = clampf(nearest_int_f32(F32(0.5) * (iscale * xval[at + i] - F32(1))), F32(0), F32(2))
        key |= np.int64(l) << (2 * i)
    return key


@jit(inline="always")
def trial_keys(xval: np.ndarray, vmax: float, steps: int, iscales: np.ndarray, keys: np.ndarray) -> None:
    """The trial scales of a scale search: iscale (5 + 0.1·(t - steps))/vmax into iscales[t] and the key of group k's
    levels at it into keys[k, t], for t = 0..2·steps and on up to TRIALS (unused); the loops run across trials in
    SIMD lanes."""
    for t in range(TRIALS):
        iscales[t] = (F32(5) + F32(t - steps) * F32(0.1)) / vmax
    keys[:] = 0
    for k in range(keys.shape[0]):
        for i in range(8):
            x = xval[8 * k + i]
            for t in range(TRIALS):
                l = clampf(nearest_int_f32(F32(0.5) * (iscales[t] * x - F32(1))), F32(0), F32(2))
                keys[k, t] |= np.int32(l) << np.int32(2 * i)


@jit(inline="always")
def group_grid(index: np.ndarray, starts: np.ndarray, cand: np.ndarray, qpts: np.ndarray, xval: np.ndarray,
               waux: np.ndarray, at: int, key: int, scale: float) -> int:
    """The grid point of the group at `at` with levels `key`: the key's own, or off the grid the best neighbour's at
    `scale` as -(g + 1); NO_POINT where no neighbour lies at a finite distance."""
    g = np.int64(index[key])
    if g >= 0:
        return g
    g = best_neighbour(starts, cand, qpts, key, xval, waux, at, scale)
    return -g - 1 if g >= 0 else NO_POINT


@jit(inline="always")
def counted(g: int, failed: np.ndarray) -> int:
    """group_grid's g; NO_POINT counted in `failed` (ggml aborts there) and read as grid point 0 (all levels 0)."""
    if g == NO_POINT:
        failed[0] += 1
        return -1
    return g


# ---------------------------------------------------------------- the scale search


@jit(inline="always")
def level_products(weight: np.ndarray, xval: np.ndarray, wxq: np.ndarray, wqq: np.ndarray) -> None:
    """For each position i and level l (q = 2l + 1): wxq[3i + l] = weight·xval·q, wqq[3i + l] = weight·q·q, the
    products ggml's sums take."""
    for i in range(weight.shape[0]):
        wx = weight[i] * xval[i]
        for l in range(3):
            q = F32(2 * l + 1)
            wxq[3 * i + l] = wx * q
            wqq[3 * i + l] = weight[i] * q * q


@jit(inline="always")
def level_sums(glevels: np.ndarray, grid: np.ndarray, wxq: np.ndarray, wqq: np.ndarray) -> tuple[float, float]:
    """Σ w·x·q and Σ w·q·q over the groups' grid points (-(g + 1) off the grid), in ggml's order."""
    sumqx = F32(0)
    sumq2 = F32(0)
    for k in range(grid.shape[0]):
        g = grid[k] if grid[k] >= 0 else -grid[k] - 1
        for i in range(8):
            p = 3 * (8 * k + i) + np.int64(glevels[g, i])
            sumqx += wxq[p]
            sumq2 += wqq[p]
    return sumqx, sumq2


class Scratch(NamedTuple):
    weight: np.ndarray  # float32 [n]
    waux: np.ndarray  # float32 [n]
    xval: np.ndarray  # float32 [n]
    wxq: np.ndarray  # float32 [3 n]
    wqq: np.ndarray  # float32 [3 n]
    signs: np.ndarray  # int64 [n / 8]: each group's sign bits
    grid: np.ndarray  # int64 [n / 8]: each group's grid point
    aux: np.ndarray  # int64 [n / 8]: the grid points of a trial
    iscales: np.ndarray  # float32 [TRIALS]
    keys: np.ndarray  # int32 [n / 8, TRIALS]


@jit(inline="always")
def scratch(n: int) -> Scratch:
    """Work arrays for sub-blocks of n values."""
    groups = n // 8
    return Scratch(np.empty(n, F32), np.empty(n, F32), np.empty(n, F32), np.empty(3 * n, F32), np.empty(3 * n, F32),
                   np.zeros(groups, np.int64), np.zeros(groups, np.int64), np.zeros(groups, np.int64),
                   np.empty(TRIALS, F32), np.empty((groups, TRIALS), np.int32))


@jit()
def scale_search(tab: SearchTables, w: Scratch, vmax: float, scale: float, steps: int, redo_all: bool,
                 failed: np.ndarray) -> float:
    """The scale search of quantize_row_iq2_{xxs,xs,s}_impl for one sub-block: for iscale = (5 + 0.1·step)/vmax,
    |step| <= steps, each group's grid point and the sums, the best trial by sumqx²/sumq2; then the groups
    (`redo_all`: every one, else those off the grid) again at the best scale. The grid points into w.grid, the scale
    returned (negative: the signs flip); `scale` is the one kept where no trial wins."""
    index, starts, cand, qpts, glevels = tab
    xval, waux, wxq, wqq, grid, aux, iscales, keys = w.xval, w.waux, w.wxq, w.wqq, w.grid, w.aux, w.iscales, w.keys
    grid[:] = 0
    best = F32(0)
    sumqx = F32(0)
    sumq2 = F32(0)
    trial_keys(xval, vmax, steps, iscales, keys)
    for t in range(2 * steps + 1):
        this_scale = F32(1) / iscales[t]
        changed = t == 0
        for k in range(aux.shape[0]):
            g = counted(group_grid(index, starts, cand, qpts, xval, waux, 8 * k, keys[k, t], this_scale), failed)
            changed |= g != aux[k]
            aux[k] = g
        if changed:  # the grid points of the last trial have its sums
            sumqx, sumq2 = level_sums(glevels, aux, wxq, wqq)
        if sumq2 > F32(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            grid[:] = aux
    redo = False
    for k in range(grid.shape[0]):
        redo |= redo_all or grid[k] < 0
    if redo and scale > F32(0):
        iscale = F32(1) / scale
        for k in range(grid.shape[0]):
            if redo_all or grid[k] < 0:
                key = group_key(xval, 8 * k, iscale)
                grid[k] = counted(group_grid(index, starts, cand, qpts, xval, waux, 8 * k, key, scale), failed)
        sumqx, sumq2 = level_sums(glevels, grid, wxq, wqq)
        if sumq2 > F32(0):
            scale = sumqx / sumq2
    for k in range(grid.shape[0]):
        grid[k] = grid[k] if grid[k] >= 0 else -grid[k] - 1
    return scale


# ---------------------------------------------------------------- per sub-block


@jit(inline="always")
def sub_block_weights(xb: np.ndarray, qb: np.ndarray, weighted: bool, sigma2: float, weight: np.ndarray,
                      waux: np.ndarray, quarter_sigma2: bool) -> None:
    """qw·sqrtf(sigma2 + x²), or without qw 0.25·sigma2 + x² (IQ2_S) or x² (IQ3); waux = sqrtf(weight)."""
    for i in range(xb.shape[0]):
        v = xb[i]
        if weighted:
            weight[i] = qb[i] * F32(np.sqrt(sigma2 + v * v))
        elif quarter_sigma2:
            weight[i] = F32(0.25) * sigma2 + v * v
        else:
            weight[i] = v * v
        waux[i] = F32(np.sqrt(weight[i]))


@jit(inline="always")
def fold_signs(xb: np.ndarray, weight: np.ndarray, even: bool, xval: np.ndarray, signs: np.ndarray) -> float:
    """|x| into xval and the sign bits of each group of 8 into signs; `even`: a group with an odd count of negatives
    keeps its value of least w·x² negative, and 7 bits hold its signs. Returns the largest xval."""
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
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@jit(inline="always")
def scale_level(scale: float, iscale: float) -> int:
    return max(0, min(15, nearest_int(F32(0.5) * (iscale * scale - F32(1)))))


# ---------------------------------------------------------------- IQ2_XXS


@jit()
def xxs_sub_block(tab: SearchTables, w: Scratch, Lqp: np.ndarray, failed: np.ndarray) -> tuple[float, bool]:
    """The search of quantize_row_iq2_xxs_impl for one sub-block of 32: grid points into w.grid, the scale (negative:
    the signs flip) and False where make_qp_quants' scale is not positive (ggml skips the sub-block)."""
    scale = make_qp_quants(w.xval, w.weight, 4, Lqp)
    eff_max = scale * F32(3)
    if eff_max <= F32(0):
        return F32(0), False
    level_products(w.weight, w.xval, w.wxq, w.wqq)
    return scale_search(tab, w, eff_max, scale, 6, True, failed), True


@jit()
def iq2_xxs_blocks(x: np.ndarray, qw: np.ndarray, out: np.ndarray, tab: SearchTables, failed: np.ndarray) -> None:
    """quantize_row_iq2_xxs_impl: x float32 [N, 256], qw float32 [R, 256] -> out uint8 [N, 66]."""
    w = scratch(32)
    Lqp = np.empty(32, np.uint8)
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
            sub_block_weights(xb, qbl[32 * ib : 32 * ib + 32], True, sigma2, w.weight, w.waux, True)
            scales[ib] = F32(0)
            if fold_signs(xb, w.weight, True, w.xval, w.signs) < GROUP_MAX_EPS:
                continue
            scale, searched = xxs_sub_block(tab, w, Lqp, failed)
            if not searched:
                continue
            if scale < F32(0):
                scale = -scale
                for k in range(4):
                    w.signs[k] = ~w.signs[k] & 127
            for k in range(4):
                q2[2 * ib] |= np.uint32(w.grid[k] << (8 * k))
                q2[2 * ib + 1] |= np.uint32(w.signs[k] << (7 * k))
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


@jit(inline="always")
def pack_16(y: np.ndarray, ib: int, grid: np.ndarray, signs: np.ndarray, is_s: bool) -> None:
    """The two groups of sub-block ib: IQ2_XS a uint16 grid index | signs << 9 each; IQ2_S the index's low byte in
    qs, its 2 high bits in qh, the signs byte 32 bytes after the low bytes."""
    for k in range(2):
        g = grid[k]
        i8 = 2 * ib + k
        if is_s:
            y[2 + i8] = g & 255
            y[66 + i8 // 4] |= (g >> 8) << (2 * (i8 % 4))
            y[34 + i8] = signs[k]
        else:
            put_fp16(y, 2 + 2 * i8, g | (signs[k] << 9))


@jit()
def iq2_16_blocks(x: np.ndarray, qw: np.ndarray, weighted: bool, is_s: bool, out: np.ndarray, tab: SearchTables,
                  failed: np.ndarray) -> None:
    """quantize_row_iq2_xs_impl (out [N, 74]) or, `is_s`, quantize_row_iq2_s_impl (out [N, 82]): x float32 [N, 256],
    qw float32 [R, 256] (read only where `weighted`)."""
    w = scratch(16)
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
            sub_block_weights(xb, qbl[16 * ib : 16 * ib + 16], weighted, sigma2, w.weight, w.waux, True)
            scales[ib] = F32(0)
            vmax = fold_signs(xb, w.weight, not is_s, w.xval, w.signs)
            if vmax < eps:
                continue
            level_products(w.weight, w.xval, w.wxq, w.wqq)
            scale = scale_search(tab, w, vmax, vmax / F32(5), 9, False, failed)
            if scale < F32(0):
                scale = -scale
                for k in range(2):
                    w.signs[k] = ~w.signs[k] & sign_mask
            pack_16(y, ib, w.grid, w.signs, is_s)
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
def tables(ggml_type: GGMLQuantizationType) -> SearchTables:
    """The lattice of `ggml_type` (mt/quant/iq_grids.py) laid out for the kernels, see SearchTables."""
    lat = lattice(ggml_type)
    off = np.flatnonzero(lat.index < 0)
    heads = (-lat.index[off] - 1).astype(np.int64)  # each off-grid key's count in lat.neighbours, its list after it
    counts = lat.neighbours[heads].astype(np.int64)
    padded = -(-counts // LANES) * LANES
    sizes = np.zeros(lat.index.size, np.int64)
    sizes[off] = padded
    starts = np.concatenate([[0], np.cumsum(sizes)])
    j = np.arange(starts[-1]) - np.repeat(starts[off], padded)  # each candidate's place in its key's list
    cand = lat.neighbours[np.repeat(heads + 1, padded) + np.minimum(j, np.repeat(counts - 1, padded))].astype(np.int32)
    qpts = np.empty(8 * cand.size, np.int8)
    at = np.repeat(8 * starts[off], padded) + j
    for i in range(8):
        qpts[at + i * np.repeat(padded, padded)] = lat.points[cand, i]
    glevels = ((lat.points - 1) // 2).astype(np.int8)
    assert lat.index[0] == 0 and not glevels[0].any()  # `counted` stands in grid point 0, all levels 0
    return SearchTables(lat.index, starts.astype(np.int32), cand, qpts, glevels)


NO_WEIGHTS = np.zeros((1, QK_K), F32)


def run_checked(kernel: Callable[..., None], ggml_type: GGMLQuantizationType, *args: object) -> None:
    """kernel(*args, tables, failed); a QuantizationError where a group found no neighbour at a finite distance."""
    failed = np.zeros(1, np.int64)
    kernel(*args, tables(ggml_type), failed)
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
