"""Compiled CPU kernels (numba) for IQ1_S and IQ1_M: the same bytes as the references in mt/quant/iq1.py. The rules of
mt/quant/compiled.py hold (float32 everywhere, no FMA, ggml's order). One super-block at a time, one block after
another, as quantize_row_iq1_s_impl and quantize_row_iq1_m_impl run; the lattice tables come as arguments.

The split search dominates. Until a candidate beats the best so far the best does not change, so each row i1 of
candidates is first tested against the best at the row's start in one vectorizable pass, and walked in ggml's order
only from its first winner on.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.compiled import QK_K, fp32_to_fp16, jit, nearest_int, put_fp16, sum_of_squares
from mt.quant.iq1 import GROUP_MAX_EPS_IQ1_M, GROUP_MAX_EPS_IQ1_S, IQ1M_MASKS, X_M, X_P, search_failed
from mt.quant.iq_grids import lattice

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
N_GRID = 2048
MASKS = IQ1M_MASKS.astype(np.int64)
# rows of the float32 scratch [7, 33]: weights, prefix sums Σw·x and Σw (two rows each: IQ1_M keeps them per half),
# block scales, the 24 terms of a neighbour search
W, SUM_X, SUM_W, SCALES, TERMS = 0, 1, 3, 5, 6
# rows of the int64 scratch [6, 33]: sorted positions, levels, (i1, i2, shift), grid indices, shifts, 3-bit scales
ORDER, LEVELS, FOUND, INDEX, SHIFTS, LS = range(6)


@cache
def tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQ1_S's lattice as the kernels take it: levels int8 [2048, 8] (0..2), key map int32, neighbour lists uint16."""
    lat = lattice(GGMLQuantizationType.IQ1_S)
    return ((lat.points - 1) // 2).astype(np.int8), lat.index, lat.neighbours


# ---------------------------------------------------------------- shared steps


@jit(inline="always")
def c_max(a: float, b: float) -> float:
    """C's MAX(a, b): a > b ? a : b."""
    return a if a > b else b


@jit(inline="always")
def block_weights(xb: np.ndarray, qb: np.ndarray, weighted: bool, sigma2: float, w: np.ndarray) -> float:
    """qw · sqrtf(sigma2 + x²) (or x² unweighted) into w; returns ggml's max |x| of the block."""
    amax = np.abs(xb[0])
    for i in range(xb.shape[0]):
        v = xb[i]
        w[i] = qb[i] * F32(np.sqrt(sigma2 + v * v)) if weighted else v * v
        amax = c_max(amax, np.abs(v))
    return amax


@jit(inline="always")
def stable_order(xb: np.ndarray, order: np.ndarray) -> None:
    """Positions of xb by ascending value, equal values in position order: what glibc's qsort (a stable merge sort
    for arrays this small) gives with iq1_sort_helper. Each position's rank is counted in a vectorizable loop."""
    n = xb.shape[0]
    for j in range(n):
        order[j] = j  # a NaN has no rank: its slot keeps a valid position
    for i in range(n):
        v = xb[i]
        rank = 0
        for j in range(n):
            rank += (xb[j] < v) | ((xb[j] == v) & (j < i))
        order[rank] = i


@jit(inline="always")
def offer(qx: float, q2: float, best: float) -> bool:
    """ggml's test of a candidate split against the running best (without branches, so a loop of it vectorizes)."""
    return (q2 > F32(0)) & (qx * qx > best * q2)


@jit(inline="always")
def group_values(is_m: bool, shift: int, k: int) -> np.ndarray:
    """The level values of group k: IQ1_S's block on X_M for shift -1; IQ1_M's first group for shift k >= 2, its
    second for odd k."""
    if not is_m:
        return X_M if shift == -1 else X_P
    on_m = shift >= 2 if k == 0 else shift % 2 == 1
    return X_M if on_m else X_P


@jit(inline="always")
def best_neighbour(nb: np.ndarray, start: int, levels: np.ndarray, xval: np.ndarray, w: np.ndarray, at: int,
                   scale: float, xx: np.ndarray, terms: np.ndarray, flat: np.ndarray, flat_at: int) -> int:
    """iq1_find_best_neighbour2: of the neighbours listed at nb[start], the first of least Σ w·(scale·xx[l] - x)² over
    the group at `at`; its 24 terms w·diff·diff (position, level) are computed once into terms. Failing that (none
    below FLT_MAX), ggml searches the whole grid reading grid point i's value at xval[i], i.e. flat[flat_at + i] of
    the row data (NaN past the data held here). -1 if that fails too."""
    for i in range(8):
        for l in range(3):
            diff = scale * xx[l] - xval[at + i]
            terms[3 * i + l] = w[at + i] * diff * diff
    best_d2 = FLT_MAX
    found = -1
    for j in range(1, np.int64(nb[start]) + 1):
        g = np.int64(nb[start + j])
        d2 = F32(0)
        for i in range(8):
            d2 += terms[3 * i + levels[g, i]]
        if d2 < best_d2:
            best_d2 = d2
            found = g
    if found >= 0:
        return found
    for g in range(N_GRID):
        value = flat[flat_at + g] if flat_at + g < flat.shape[0] else F32(np.nan)
        d2 = F32(0)
        for i in range(8):
            diff = scale * xx[levels[g, i]] - value
            d2 += w[at + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            found = g
    return found


@jit(inline="always")
def snap_block(xb: np.ndarray, wb: np.ndarray, scale: float, is_m: bool, fs: np.ndarray, iw: np.ndarray,
               levels: np.ndarray, kmap: np.ndarray, nb: np.ndarray, flat: np.ndarray, flat_at: int) -> float:
    """After the split search (iw[FOUND]): the levels of the runs (2 - L for a negative scale, whose shift flips), each
    group of 8 moved to its best neighbour when off the grid, the scale refit if any moved. Grid indices into
    iw[INDEX], the shift into iw[FOUND, 2]; returns the scale, or -1 where ggml aborts (a group found no grid point,
    or the scale is NaN)."""
    n = xb.shape[0]
    order, L, found, index = iw[ORDER], iw[LEVELS], iw[FOUND], iw[INDEX]
    flip = scale < F32(0)
    for j in range(n):
        level = 0 if j < found[0] else (1 if j < found[1] else 2)
        L[order[j]] = 2 - level if flip else level
    if flip:
        scale = -scale
        found[2] = 3 - found[2] if is_m else -found[2]
    on_grid = True
    for k in range(n // 8):
        key = 0
        for i in range(8):
            key |= L[8 * k + i] << (2 * i)
        g = np.int64(kmap[key])
        if g < 0:
            on_grid = False
            g = best_neighbour(nb, -g - 1, levels, xb, wb, 8 * k, scale, group_values(is_m, found[2], k),
                               fs[TERMS], flat, flat_at + 8 * k)
            if g < 0:
                return F32(-1)
        index[k] = g
    if on_grid:
        return scale if scale >= F32(0) else F32(-1)
    sumqx = F32(0)
    sumq2 = F32(0)
    for k in range(n // 8):
        xx = group_values(is_m, found[2], k)
        for j in range(8):
            q = xx[levels[index[k], j]]
            sumqx += wb[8 * k + j] * q * xb[8 * k + j]
            sumq2 += wb[8 * k + j] * q * q
    if sumqx > F32(0) and sumq2 > F32(0):
        scale = sumqx / sumq2
    return scale if scale >= F32(0) else F32(-1)


@jit(inline="always")
def three_bit_scale(inv: float, scale: float) -> int:
    return max(0, min(7, nearest_int(F32(0.5) * (inv * scale - F32(1)))))


# ---------------------------------------------------------------- IQ1_S


@jit(inline="always")
def iq1_s_split(sumx: np.ndarray, sumw: np.ndarray, n: int, i1: int, i2: int, v: np.ndarray) -> tuple[float, float]:
    """Σw·q·x and Σw·q² of the split (i1, i2) with levels v, as quantize_row_iq1_s_impl sums them."""
    qx = (sumx[i1] - sumx[0]) * v[0] + (sumx[i2] - sumx[i1]) * v[1] + (sumx[n] - sumx[i2]) * v[2]
    q2 = (sumw[i1] - sumw[0]) * v[0] * v[0] + (sumw[i2] - sumw[i1]) * v[1] * v[1] + (sumw[n] - sumw[i2]) * v[2] * v[2]
    return qx, q2


@jit(inline="always")
def first_iq1_s_hit(sumx: np.ndarray, sumw: np.ndarray, n: int, i1: int, best: float) -> int:
    """The first i2 of row i1 where a candidate beats `best` (n + 1 if none)."""
    first = n + 1
    for i2 in range(i1, n + 1):
        qx_p, q2_p = iq1_s_split(sumx, sumw, n, i1, i2, X_P)
        qx_m, q2_m = iq1_s_split(sumx, sumw, n, i1, i2, X_M)
        hit = offer(qx_p, q2_p, best) | offer(qx_m, q2_m, best)
        first = min(first, i2 if hit else n + 1)
    return first


@jit(inline="always")
def search_iq1_s(sumx: np.ndarray, sumw: np.ndarray, n: int, found: np.ndarray) -> float:
    """quantize_row_iq1_s_impl's split search over the prefix sums [n + 1]: runs [0, i1), [i1, i2), [i2, n) of the
    sorted block take levels 0, 1, 2 of X_P (shift 1) or X_M (shift -1). found = (i1, i2, shift), or i1 = -1;
    returns the scale."""
    best = -FLT_MAX
    scale = F32(0)
    found[0] = -1
    for i1 in range(n + 1):
        for i2 in range(first_iq1_s_hit(sumx, sumw, n, i1, best), n + 1):
            for s in range(2):
                qx, q2 = iq1_s_split(sumx, sumw, n, i1, i2, X_P if s == 0 else X_M)
                if offer(qx, q2, best):
                    scale = qx / q2
                    best = scale * qx
                    found[0] = i1
                    found[1] = i2
                    found[2] = 1 - 2 * s
    return scale


@jit()
def iq1_s_superblock(xbl: np.ndarray, qbl: np.ndarray, y: np.ndarray, fs: np.ndarray, iw: np.ndarray,
                     levels: np.ndarray, kmap: np.ndarray, nb: np.ndarray, flat: np.ndarray, base: int) -> int:
    """One block_iq1_s (d, qs[32], qh[8] u16) into y. Returns 1 where ggml aborts (see snap_block)."""
    w, sumx, sumw, scales = fs[W], fs[SUM_X], fs[SUM_W], fs[SCALES]
    order, shifts, index = iw[ORDER], iw[SHIFTS], iw[INDEX]
    for k in range(50):
        y[k] = 0
    sigma2 = F32(2) * sum_of_squares(xbl) / F32(QK_K)
    max_scale = F32(0)
    for ib in range(8):
        xb = xbl[32 * ib : 32 * ib + 32]
        scales[ib] = F32(0)
        shifts[ib] = 1
        if block_weights(xb, qbl[32 * ib : 32 * ib + 32], True, sigma2, w) < GROUP_MAX_EPS_IQ1_S:
            continue
        stable_order(xb, order)
        sumx[0] = F32(0)
        sumw[0] = F32(0)
        for j in range(32):
            i = order[j]
            sumx[j + 1] = sumx[j] + w[i] * xb[i]
            sumw[j + 1] = sumw[j] + w[i]
        scale = search_iq1_s(sumx, sumw, 32, iw[FOUND])
        if iw[FOUND, 0] < 0:
            continue
        scale = snap_block(xb, w, scale, False, fs, iw, levels, kmap, nb, flat, base + 32 * ib)
        if scale < F32(0):
            return 1
        h = 0
        for k in range(4):
            y[2 + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        y[34 + 2 * ib] = h & 0xFF
        y[35 + 2 * ib] = h >> 8
        scales[ib] = scale
        shifts[ib] = iw[FOUND, 2]
        max_scale = c_max(max_scale, scale)
    if max_scale == F32(0):
        return 0
    d = max_scale / F32(15)
    put_fp16(y, 0, fp32_to_fp16(d * F32(1.125)))
    inv = F32(1) / d
    for ib in range(8):
        y[35 + 2 * ib] |= (three_bit_scale(inv, scales[ib]) | (8 if shifts[ib] == -1 else 0)) << 4
    return 0


@jit()
def iq1_s_rows(x: np.ndarray, qw: np.ndarray, out: np.ndarray, levels: np.ndarray, kmap: np.ndarray,
               nb: np.ndarray) -> int:
    """quantize_iq1_s: x float32 [N, 256], qw float32 [R, 256] (super-block b weighs by qw[b % R]) -> out [N, 50].
    Returns the number of super-blocks ggml would abort on."""
    fs = np.empty((7, 33), F32)
    iw = np.empty((6, 33), np.int64)
    flat = x.reshape(-1)
    failed = 0
    for b in range(x.shape[0]):
        failed += iq1_s_superblock(x[b], qw[b % qw.shape[0]], out[b], fs, iw, levels, kmap, nb, flat, QK_K * b)
    return failed


# ---------------------------------------------------------------- IQ1_M


@jit(inline="always")
def iq1_m_halves(px: np.ndarray, pw: np.ndarray, n: int, i1: int, i2: int,
                 v: np.ndarray) -> tuple[float, float, float, float]:
    """Per half, Σw·q·x and Σw·q² of the split (i1, i2) with levels v, as quantize_row_iq1_m_impl sums them from its
    per-half prefix sums px, pw [2, n + 1]: with steps of 1 between levels a half's sum collapses to
    T·v[2] - S[i1] - S[i2]. -> (qx of half 0, of half 1, q2 of half 0, of half 1)."""
    c1 = v[0] * v[0] - v[1] * v[1]
    c2 = v[1] * v[1] - v[2] * v[2]
    sx0 = px[0, i1] + px[0, i2]
    sx1 = px[1, i1] + px[1, i2]
    return (px[0, n] * v[2] - sx0, px[1, n] * v[2] - sx1,
            pw[0, n] * v[2] * v[2] + pw[0, i1] * c1 + pw[0, i2] * c2,
            pw[1, n] * v[2] * v[2] + pw[1, i1] * c1 + pw[1, i2] * c2)


@jit(inline="always")
def iq1_m_split(px: np.ndarray, pw: np.ndarray, n: int, i1: int,
                i2: int) -> tuple[float, float, float, float, float, float, float, float]:
    """Σw·q·x and Σw·q² of the split (i1, i2) for shifts k = 0..3 (the first half on X_M for k >= 2, the second for
    odd k): (qx0, q20, qx1, q21, qx2, q22, qx3, q23), each the sum of the halves as ggml adds them."""
    x0p, x1p, w0p, w1p = iq1_m_halves(px, pw, n, i1, i2, X_P)
    x0m, x1m, w0m, w1m = iq1_m_halves(px, pw, n, i1, i2, X_M)
    return x0p + x1p, w0p + w1p, x0p + x1m, w0p + w1m, x0m + x1p, w0m + w1p, x0m + x1m, w0m + w1m


@jit(inline="always")
def first_iq1_m_hit(px: np.ndarray, pw: np.ndarray, n: int, i1: int, best: float) -> int:
    """The first i2 of row i1 where a candidate beats `best` (n + 1 if none)."""
    first = n + 1
    for i2 in range(i1, n + 1):
        qx0, q20, qx1, q21, qx2, q22, qx3, q23 = iq1_m_split(px, pw, n, i1, i2)
        hit = offer(qx0, q20, best) | offer(qx1, q21, best) | offer(qx2, q22, best) | offer(qx3, q23, best)
        first = min(first, i2 if hit else n + 1)
    return first


@jit(inline="always")
def search_iq1_m(px: np.ndarray, pw: np.ndarray, n: int, found: np.ndarray) -> float:
    """quantize_row_iq1_m_impl's split search: each half of the block takes X_P or X_M. found = (i1, i2, k) or
    i1 = -1; returns the scale."""
    best = -FLT_MAX
    scale = F32(0)
    found[0] = -1
    for i1 in range(n + 1):
        for i2 in range(first_iq1_m_hit(px, pw, n, i1, best), n + 1):
            qx0, q20, qx1, q21, qx2, q22, qx3, q23 = iq1_m_split(px, pw, n, i1, i2)
            for k in range(4):
                qx = qx0 if k == 0 else (qx1 if k == 1 else (qx2 if k == 2 else qx3))
                q2 = q20 if k == 0 else (q21 if k == 1 else (q22 if k == 2 else q23))
                if offer(qx, q2, best):
                    scale = qx / q2
                    best = scale * qx
                    found[0] = i1
                    found[1] = i2
                    found[2] = k
    return scale


@jit(inline="always")
def half_prefix_sums(xb: np.ndarray, wb: np.ndarray, order: np.ndarray, px: np.ndarray, pw: np.ndarray) -> None:
    """Σw·x and Σw over the sorted block, kept per half (positions 0..7, 8..15): px, pw [2, 17]."""
    for h in range(2):
        px[h, 0] = F32(0)
        pw[h, 0] = F32(0)
    for j in range(16):
        i = order[j]
        h = 0 if i < 8 else 1
        px[h, j + 1] = px[h, j] + wb[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + wb[i]
        pw[1 - h, j + 1] = pw[1 - h, j]


@jit(inline="always")
def iq1_m_refit(xbl: np.ndarray, w: np.ndarray, y: np.ndarray, levels: np.ndarray, shifts: np.ndarray,
                ls: np.ndarray, d: float) -> float:
    """Σw·q·x / Σw·q² over the super-block with q = xx[stored grid level]·(2l+1); d where Σw·q² is not positive."""
    sumqx = F32(0)
    sumq2 = F32(0)
    for ib in range(16):
        mult = F32(2 * ls[ib] + 1)
        for k in range(2):
            xx = group_values(True, shifts[ib], k)
            g = np.int64(y[2 * ib + k]) + (((np.int64(y[32 + ib]) >> (4 * k)) & 7) << 8)
            for j in range(8):
                at = 16 * ib + 8 * k + j
                q = xx[levels[g, j]] * mult
                sumqx += w[at] * q * xbl[at]
                sumq2 += w[at] * q * q
    return sumqx / sumq2 if sumq2 > F32(0) else d


@jit()
def iq1_m_superblock(xbl: np.ndarray, qbl: np.ndarray, weighted: bool, y: np.ndarray, w: np.ndarray,
                     fs: np.ndarray, iw: np.ndarray, levels: np.ndarray, kmap: np.ndarray, nb: np.ndarray,
                     flat: np.ndarray, base: int) -> int:
    """One block_iq1_m (qs[32], qh[16], scales[8]) into y; w float32 [256] receives the super-block's weights.
    Returns 1 where ggml aborts (see snap_block)."""
    px, pw, scales = fs[SUM_X : SUM_X + 2], fs[SUM_W : SUM_W + 2], fs[SCALES]
    order, shifts, index, ls = iw[ORDER], iw[SHIFTS], iw[INDEX], iw[LS]
    for k in range(56):
        y[k] = 0
    sigma2 = F32(2) * sum_of_squares(xbl) / F32(QK_K)
    max_scale = F32(0)
    for ib in range(16):
        xb = xbl[16 * ib : 16 * ib + 16]
        wb = w[16 * ib : 16 * ib + 16]
        scales[ib] = F32(0)
        shifts[ib] = 0
        if block_weights(xb, qbl[16 * ib : 16 * ib + 16], weighted, sigma2, wb) < GROUP_MAX_EPS_IQ1_M:
            continue
        stable_order(xb, order)
        half_prefix_sums(xb, wb, order, px, pw)
        scale = search_iq1_m(px, pw, 16, iw[FOUND])
        if iw[FOUND, 0] < 0:
            continue
        scale = snap_block(xb, wb, scale, True, fs, iw, levels, kmap, nb, flat, base + 16 * ib)
        if scale < F32(0):
            return 1
        y[2 * ib] = index[0] & 255
        y[2 * ib + 1] = index[1] & 255
        y[32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        scales[ib] = scale
        shifts[ib] = iw[FOUND, 2]
        max_scale = c_max(max_scale, scale)
    if max_scale == F32(0):
        return 0
    d = max_scale / F32(15)
    inv = F32(1) / d
    for ib in range(16):
        ls[ib] = three_bit_scale(inv, scales[ib])
        y[32 + ib] |= MASKS[shifts[ib]]
    s = fp32_to_fp16(iq1_m_refit(xbl, w, y, levels, shifts, ls, d) * F32(1.1125))
    for j in range(4):
        sc = ls[4 * j] | (ls[4 * j + 1] << 3) | (ls[4 * j + 2] << 6) | (ls[4 * j + 3] << 9)
        put_fp16(y, 48 + 2 * j, sc | (((s >> (4 * j)) & 0xF) << 12))
    return 0


@jit()
def iq1_m_rows(x: np.ndarray, qw: np.ndarray, weighted: bool, out: np.ndarray, levels: np.ndarray,
               kmap: np.ndarray, nb: np.ndarray) -> int:
    """quantize_iq1_m: x float32 [N, 256], qw float32 [R, 256] (read only when `weighted`) -> out [N, 56].
    Returns the number of super-blocks ggml would abort on."""
    w = np.empty(QK_K, F32)
    fs = np.empty((7, 33), F32)
    iw = np.empty((6, 33), np.int64)
    flat = x.reshape(-1)
    failed = 0
    for b in range(x.shape[0]):
        failed += iq1_m_superblock(x[b], qw[b % qw.shape[0]], weighted, out[b], w, fs, iw, levels, kmap, nb, flat,
                                   QK_K * b)
    return failed


# ---------------------------------------------------------------- entry points


def check(failed: int, name: str) -> None:
    if failed:
        raise search_failed(name, failed)


def iq1_s_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    check(iq1_s_rows(np.ascontiguousarray(x), np.ascontiguousarray(qw), out, *tables()), "IQ1_S")


def iq1_m_plain(x: np.ndarray, out: np.ndarray) -> None:
    check(iq1_m_rows(np.ascontiguousarray(x), np.zeros((1, QK_K), F32), False, out, *tables()), "IQ1_M")


def iq1_m_weighted(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    check(iq1_m_rows(np.ascontiguousarray(x), np.ascontiguousarray(qw), True, out, *tables()), "IQ1_M")


KERNELS = {"iq1_m": iq1_m_plain}
WEIGHTED_KERNELS = {"iq1_s": iq1_s_weighted, "iq1_m": iq1_m_weighted}
