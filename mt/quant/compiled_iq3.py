"""Compiled CPU kernels (numba) for IQ3_XXS and IQ3_S: the same bytes as the references in mt/quant/iq3.py
(quantize_row_iq3_xxs_impl with grid 256, quantize_row_iq3_s_impl with block_size 32). The rules of
mt/quant/compiled.py hold: float32 everywhere, no FMA, every sum in ggml's order.

The techniques of mt/quant/compiled_iq2.py, for groups of 4 values with 8 levels each: a group is held by its grid
index g (-(g + 1) while off the grid); the lattice comes as `SearchTables` (see `tables`), each off-grid key's
neighbour list padded to a multiple of LANES and its points laid out [4][K] (dimension-major), so that
iq3_find_best_neighbour scores candidates side by side in SIMD lanes, each distance in ggml's order. The keys of all
trial scales are computed up front. A trial's grid points do not depend on the trials before it, so all trials' points
are found first (group after group, whose keys change little from one trial to the next) and their sums taken side by
side, each in ggml's order; then the best trial is chosen in ggml's order of trials.

Where no neighbour lies at a finite distance (ggml aborts there) the first listed one is taken, as the reference's
argmin does over infinities.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.compiled import (
    QK_K, clampf, f32_bits, fp32_to_fp16, jit, nearest_int_f32, put_fp16, sum_of_squares,
)
from mt.quant.compiled_iq2 import (
    FLT_MAX_BITS, LANES, NO_CANDIDATE, distance, fold_signs, scale_level, sub_block_weights,
)
from mt.quant.iq_grids import lattice

F32 = np.float32
KMAXQ = 8
XXS_EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
DIM = 4  # values per group
GROUPS = 8  # groups per sub-block of 32
TRIALS = 32  # room for the trial scales of a scale search (31 or 19)
PLACE_BITS = 6  # a neighbour list holds at most 1 << PLACE_BITS candidates


class SearchTables(NamedTuple):
    index: np.ndarray  # int32 [keys]: the key's grid index, negative off the grid
    starts: np.ndarray  # int32 [keys + 1]: key k's candidates are cand[starts[k]:starts[k + 1]] (none on the grid)
    cand: np.ndarray  # int32 [C]: ggml's neighbour lists, each padded to a multiple of LANES with its last entry
    qpts: np.ndarray  # int8 [4 C]: key k's candidates' points 2l + 1 at 4·starts[k], laid out [4][K]
    qgrid: np.ndarray  # float32 [G, 4]: each grid point's values 2l + 1


# ---------------------------------------------------------------- the neighbour search


@jit(inline="always")
def best_neighbour(starts: np.ndarray, cand: np.ndarray, qpts: np.ndarray, key: int, xval: np.ndarray,
                   waux: np.ndarray, at: int, scale: float) -> int:
    """iq3_find_best_neighbour: of the candidates of an off-grid key, the first with the smallest
    Σ waux·(scale·q - x)² over the group at `at` (the first listed where none is below FLT_MAX).

    A distance is a sum of terms >= 0, so its bits as uint32 order like the floats (NaN and inf above FLT_MAX), and
    the least (bits << PLACE_BITS | place) is the first smallest; the loop runs across candidates
    in SIMD lanes, each distance in ggml's order. A padding copy of a list's last entry never comes before it."""
    s = np.int64(starts[key])
    n = np.int64(starts[key + 1]) - s
    smallest = NO_CANDIDATE
    for j in range(n):
        d2 = distance(qpts, DIM * s, n, j, scale, xval, waux, at, DIM)
        smallest = min(smallest, (np.int64(np.uint32(f32_bits(d2))) << PLACE_BITS) | j)
    j = smallest & ((1 << PLACE_BITS) - 1) if smallest >> PLACE_BITS < FLT_MAX_BITS else 0
    return np.int64(cand[s + j])


@jit(inline="always")
def group_key(xval: np.ndarray, at: int, iscale: float) -> int:
    """The key of levels clamp(nearest_int(0.5·(iscale·x - 1)), 0, 7) of the group at `at`."""
    key = 0
    for i in range(DIM):
        l = clampf(nearest_int_f32(F32(0.5) * (iscale * xval[at + i] - F32(1))), F32(0), F32(KMAXQ - 1))
        key |= np.int64(l) << (3 * i)
    return key


@jit(inline="always")
def trial_keys(xval: np.ndarray, vmax: float, steps: int, iscales: np.ndarray, keys: np.ndarray) -> None:
    """The trial scales of a scale search: iscale (15 + 0.2·(t - steps))/vmax into iscales[t] and the key of group
    k's levels at it into keys[k, t], for t = 0..2·steps and on up to TRIALS (unused); the loops run across trials
    in SIMD lanes."""
    for t in range(TRIALS):
        iscales[t] = (F32(2 * KMAXQ - 1) + F32(t - steps) * F32(0.2)) / vmax
    keys[:] = 0
    for k in range(GROUPS):
        for i in range(DIM):
            x = xval[DIM * k + i]
            for t in range(TRIALS):
                l = clampf(nearest_int_f32(F32(0.5) * (iscales[t] * x - F32(1))), F32(0), F32(KMAXQ - 1))
                keys[k, t] |= np.int32(l) << np.int32(3 * i)


@jit(inline="always")
def group_grid(index: np.ndarray, starts: np.ndarray, cand: np.ndarray, qpts: np.ndarray, xval: np.ndarray,
               waux: np.ndarray, at: int, key: int, scale: float) -> int:
    """The grid point of the group at `at` with levels `key`: the key's own, or off the grid the best neighbour's at
    `scale` as -(g + 1)."""
    g = np.int64(index[key])
    if g >= 0:
        return g
    return -best_neighbour(starts, cand, qpts, key, xval, waux, at, scale) - 1


# ---------------------------------------------------------------- the scale search


@jit(inline="always")
def trial_levels(qgrid: np.ndarray, aux: np.ndarray, trials: int, qv: np.ndarray) -> None:
    """The trials' values q = 2l + 1 of each position i into qv[i, t], from their grid points aux[t, k]
    (-(g + 1) off the grid)."""
    for t in range(trials):
        for k in range(GROUPS):
            g = aux[t, k] if aux[t, k] >= 0 else -aux[t, k] - 1
            for i in range(DIM):
                qv[DIM * k + i, t] = qgrid[g, i]


@jit(inline="always")
def trial_sums(weight: np.ndarray, wx: np.ndarray, qv: np.ndarray, sumqx: np.ndarray, sumq2: np.ndarray) -> None:
    """Σ w·x·q and Σ w·q·q of every trial t (q = qv[i, t], wx = w·x), each in ggml's order (from 0, then
    i = 0..31); the trials run side by side in SIMD lanes."""
    sumqx[:] = 0
    sumq2[:] = 0
    for i in range(DIM * GROUPS):
        wxi = wx[i]
        wi = weight[i]
        for t in range(TRIALS):
            q = qv[i, t]
            sumqx[t] += wxi * q
            sumq2[t] += wi * q * q


@jit(inline="always")
def grid_sums(qgrid: np.ndarray, grid: np.ndarray, weight: np.ndarray, wx: np.ndarray) -> tuple[float, float]:
    """Σ w·x·q and Σ w·q·q over the groups' grid points (-(g + 1) off the grid), in ggml's order."""
    sumqx = F32(0)
    sumq2 = F32(0)
    for k in range(GROUPS):
        g = grid[k] if grid[k] >= 0 else -grid[k] - 1
        for i in range(DIM):
            q = qgrid[g, i]
            sumqx += wx[DIM * k + i] * q
            sumq2 += weight[DIM * k + i] * q * q
    return sumqx, sumq2


class Scratch(NamedTuple):
    weight: np.ndarray  # float32 [32]
    waux: np.ndarray  # float32 [32]: sqrtf(weight)
    xval: np.ndarray  # float32 [32]
    wx: np.ndarray  # float32 [32]: weight·xval
    signs: np.ndarray  # int64 [4]: the sign bits of each 8
    grid: np.ndarray  # int64 [8]: each group's grid point
    aux: np.ndarray  # int64 [TRIALS, 8]: the grid points of each trial
    iscales: np.ndarray  # float32 [TRIALS]
    scales: np.ndarray  # float32 [TRIALS]: 1/iscales
    keys: np.ndarray  # int32 [8, TRIALS]
    qv: np.ndarray  # float32 [32, TRIALS]: each trial's values q
    sumqx: np.ndarray  # float32 [TRIALS]
    sumq2: np.ndarray  # float32 [TRIALS]


@jit(inline="always")
def scratch() -> Scratch:
    """Work arrays for a sub-block of 32."""
    n = DIM * GROUPS
    return Scratch(np.empty(n, F32), np.empty(n, F32), np.empty(n, F32), np.empty(n, F32), np.zeros(n // 8, np.int64),
                   np.zeros(GROUPS, np.int64), np.zeros((TRIALS, GROUPS), np.int64), np.empty(TRIALS, F32),
                   np.empty(TRIALS, F32), np.empty((GROUPS, TRIALS), np.int32), np.zeros((n, TRIALS), F32),
                   np.empty(TRIALS, F32), np.empty(TRIALS, F32))


@jit()
def scale_search(tab: SearchTables, w: Scratch, vmax: float, steps: int, xxs: bool) -> float:
    """The scale search of quantize_row_iq3_{xxs,s}_impl for one sub-block: for iscale = (15 + 0.2·step)/vmax,
    |step| <= steps, each group's grid point and the sums, the best trial by sumqx²/sumq2; then, where a group of the
    best trial is off the grid, the groups off it (IQ3_S: every group) again at the best scale. The grid points into
    w.grid, the scale returned (negative: the signs flip). A trial's grid points do not depend on the trials before
    it, so all are found first and their sums taken side by side."""
    index, starts, cand, qpts, qgrid = tab
    xval, waux, weight, wx, grid, aux, iscales, keys = w.xval, w.waux, w.weight, w.wx, w.grid, w.aux, w.iscales, w.keys
    trial_scales, qv, trial_sumqx, trial_sumq2 = w.scales, w.qv, w.sumqx, w.sumq2
    trials = 2 * steps + 1
    trial_keys(xval, vmax, steps, iscales, keys)
    for t in range(trials):
        trial_scales[t] = F32(1) / iscales[t]
    for k in range(GROUPS):  # a group's keys change little from one trial to the next
        for t in range(trials):
            aux[t, k] = group_grid(index, starts, cand, qpts, xval, waux, DIM * k, keys[k, t], trial_scales[t])
    trial_levels(qgrid, aux, trials, qv)
    trial_sums(weight, wx, qv, trial_sumqx, trial_sumq2)
    best = F32(0)
    scale = vmax / F32(2 * KMAXQ - 1)
    chosen = -1
    for t in range(trials):
        sumqx = trial_sumqx[t]
        sumq2 = trial_sumq2[t]
        if sumq2 > F32(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            chosen = t
    for k in range(GROUPS):  # without a chosen trial: point 0 (all levels 0), IQ3_S's groups off the grid
        grid[k] = aux[chosen, k] if chosen >= 0 else (0 if xxs else -1)
    redo = False
    for k in range(GROUPS):
        redo |= grid[k] < 0
    if redo and scale > F32(0):
        iscale = F32(1) / scale
        for k in range(GROUPS):
            if grid[k] < 0 or not xxs:
                key = group_key(xval, DIM * k, iscale)
                grid[k] = group_grid(index, starts, cand, qpts, xval, waux, DIM * k, key, scale)
        sumqx, sumq2 = grid_sums(qgrid, grid, weight, wx)
        if sumq2 > F32(0):
            scale = sumqx / sumq2
    for k in range(GROUPS):
        grid[k] = grid[k] if grid[k] >= 0 else -grid[k] - 1
    return scale


# ---------------------------------------------------------------- per super-block


@jit(inline="always")
def pack_sub_block(y: np.ndarray, ib: int, slot: int, grid: np.ndarray, signs: np.ndarray, xxs: bool) -> None:
    """IQ3_XXS: the 8 grid indices at 2 + 8·ib, the 4 sign bytes of 7 bits in the word at 66 + 4·ib; IQ3_S: the
    indices' low bytes at 2 + 8·slot, their high bits in qh[ib], the sign bytes at 74 + 4·slot."""
    for k in range(GROUPS):
        g = grid[k]
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


@jit()
def iq3_blocks(x: np.ndarray, qw: np.ndarray, weighted: bool, out: np.ndarray, xxs: bool, tab: SearchTables) -> None:
    """quantize_row_iq3_xxs_impl (`xxs`, out [N, 98]) or quantize_row_iq3_s_impl (out [N, 110]) on x [N, 256];
    weights x² or, `weighted`, qw[b % R] · sqrtf(sigma2 + x²)."""
    w = scratch()
    scales = np.empty(8, F32)
    steps = 15 if xxs else 9
    sign_mask = 127 if xxs else 255
    for b in range(x.shape[0]):
        xbl = x[b]
        qbl = qw[b % qw.shape[0]]
        y = out[b]
        y[:] = 0
        sigma2 = F32(2) * sum_of_squares(xbl) / F32(QK_K)
        max_scale = F32(0)
        slot = 0  # IQ3_S: a skipped sub-block does not advance the qs and signs positions
        for ib in range(8):
            xb = xbl[32 * ib : 32 * ib + 32]
            sub_block_weights(xb, qbl[32 * ib : 32 * ib + 32], weighted, sigma2, w.weight, w.waux, False)
            vmax = fold_signs(xb, w.weight, xxs, w.xval, w.signs)
            scales[ib] = F32(0)
            if (vmax < XXS_EPS) if xxs else (vmax == F32(0)):
                continue
            for i in range(32):
                w.wx[i] = w.weight[i] * w.xval[i]
            scale = scale_search(tab, w, vmax, steps, xxs)
            if scale < F32(0):
                scale = -scale
                for k in range(4):
                    w.signs[k] = ~w.signs[k] & sign_mask
            pack_sub_block(y, ib, slot, w.grid, w.signs, xxs)
            slot += 1
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0):
            if xxs:
                y[:] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(y, 0, fp32_to_fp16(d * (F32(1.0125) if xxs else F32(1.033))))
        iscale = F32(1) / d
        for ib in range(8):
            level = scale_level(scales[ib], iscale)
            if xxs:
                y[66 + 4 * ib + 3] |= level << 4
            else:
                y[106 + ib // 2] |= level << (4 * (ib % 2))


@cache
def tables(ggml_type: GGMLQuantizationType) -> SearchTables:
    """The lattice of `ggml_type` (mt/quant/iq_grids.py) laid out for the kernels, see SearchTables."""
    lat = lattice(ggml_type)
    off = np.flatnonzero(lat.index < 0)
    heads = (-lat.index[off] - 1).astype(np.int64)  # each off-grid key's count in lat.neighbours, its list after it
    counts = lat.neighbours[heads].astype(np.int64)
    padded = -(-counts // LANES) * LANES
    assert padded.max() <= 1 << PLACE_BITS
    sizes = np.zeros(lat.index.size, np.int64)
    sizes[off] = padded
    starts = np.concatenate([[0], np.cumsum(sizes)])
    j = np.arange(starts[-1]) - np.repeat(starts[off], padded)  # each candidate's place in its key's list
    cand = lat.neighbours[np.repeat(heads + 1, padded) + np.minimum(j, np.repeat(counts - 1, padded))].astype(np.int32)
    qpts = np.empty(DIM * cand.size, np.int8)
    at = np.repeat(DIM * starts[off], padded) + j
    for i in range(DIM):
        qpts[at + i * np.repeat(padded, padded)] = lat.points[cand, i]
    glevels = ((lat.points - 1) // 2).astype(np.int8)
    point_keys = (glevels.astype(np.int64) << (3 * np.arange(DIM))).sum(axis=1)
    assert (lat.index[point_keys] == np.arange(len(glevels))).all()  # a grid point's key is its own index
    assert lat.index[0] == 0 and not glevels[0].any()  # grid point 0 stands for all levels 0
    return SearchTables(lat.index, starts.astype(np.int32), cand, qpts, lat.points.astype(F32))


NO_WEIGHTS = np.zeros((1, QK_K), F32)


def iq3_xxs_plain(x: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, NO_WEIGHTS, False, out, True, tables(GGMLQuantizationType.IQ3_XXS))


def iq3_xxs_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, qw, True, out, True, tables(GGMLQuantizationType.IQ3_XXS))


def iq3_s_plain(x: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, NO_WEIGHTS, False, out, False, tables(GGMLQuantizationType.IQ3_S))


def iq3_s_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    iq3_blocks(x, qw, True, out, False, tables(GGMLQuantizationType.IQ3_S))


KERNELS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {"iq3_xxs": iq3_xxs_plain, "iq3_s": iq3_s_plain}
WEIGHTED_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "iq3_xxs": iq3_xxs_weighted, "iq3_s": iq3_s_weighted}
