"""IQ1_S and IQ1_M: numpy references of ggml-quants.c's quantize_row_iq1_s_impl and quantize_row_iq1_m_impl (with
iq1_find_best_neighbour2 and iq1_sort_helper), as quantize_iq1_s / quantize_iq1_m call them row by row.

A super-block of 256 is cut into blocks (32 values for IQ1_S, 16 for IQ1_M) and each block into groups of 8. A value
becomes one of three levels v = (-1, 0, 1) + delta, delta = ±1/8 per block (IQ1_S) or per group (IQ1_M). ggml sorts
the block's values and tries every split of the sorted order into three runs (and every sign of delta), keeping the
split of largest (Σw·v·x)² / Σw·v²; a group whose levels fall off IQ1_S's lattice (mt/quant/iq_grids.py) moves to the
neighbour of least weighted distance. Block scales are stored as 3 bits against one fp16 per super-block.

Every step runs on all S blocks at once, every sum in ggml's order (a loop over positions, on [n, S] arrays); the split
search offers ggml's candidates one after another, each a vector step across the blocks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from mt.errors import QuantizationError
from mt.quant.iq_grids import GridQuantType, Lattice, imatrix_required, lattice
from mt.quant.kquants import QK_K, nearest_int

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
DELTA = 0.125  # IQ1S_DELTA = IQ1M_DELTA
X_P = np.array([-1 + DELTA, DELTA, 1 + DELTA], dtype=F32)  # the levels with delta +1/8
X_M = np.array([-1 - DELTA, -DELTA, 1 - DELTA], dtype=F32)  # and with -1/8
GROUP_MAX_EPS_IQ1_S = F32(1e-12)
GROUP_MAX_EPS_IQ1_M = F32(1e-7)
IQ1M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.uint8)  # the delta signs of IQ1_M's two groups, by shift
NEIGHBOUR_BATCH = 4096  # off-grid groups per vector step of the neighbour search


def search_failed(name: str, blocks: int) -> QuantizationError:
    """Where ggml's GGML_ASSERTs end the process: a block whose weights overflow float32 leaves no grid point below
    FLT_MAX or a NaN scale."""
    return QuantizationError(f"{name}: {blocks} block(s) overflow float32 in ggml's grid search (ggml aborts on them)",
                             "rescale or clip the tensor's outliers, or choose another type")


def ordered_sum(t: np.ndarray) -> np.ndarray:
    """mt.quant.weighted's ordered_sum, imported when called: that module registers every QuantType as it loads."""
    from mt.quant.weighted import ordered_sum as weighted_ordered_sum

    return weighted_ordered_sum(t)


def block_weights(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """blocks [N, 256] -> qw · sqrtf(sigma2 + x²), sigma2 = 2·Σx²/256 over the super-block; x² without qw (IQ1_M)."""
    if qw is None:
        return blocks * blocks
    xt = np.ascontiguousarray(blocks.T)
    sigma2 = F32(2) * ordered_sum(xt * xt) / F32(QK_K)
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


def c_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C's MAX(a, b): a > b ? a : b (a NaN in a is dropped, one in b kept)."""
    return np.where(a > b, a, b)


def running_max(t: np.ndarray) -> np.ndarray:
    """MAX over axis 0 of [n, S], from t[0] on as ggml's loops take it -> [S]."""
    top = t[0]
    for i in range(1, t.shape[0]):
        top = c_max(top, t[i])
    return top


def sorted_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """qsort of (value, index) pairs by value with iq1_sort_helper, equal values in index order (glibc's qsort is a
    stable merge sort for arrays this small): x [S, n] -> (order [S, n], rank [S, n])."""
    order = np.argsort(x, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(x.shape[1])[None, :], axis=1)
    return order, rank


def prefix_sums(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """sums[j] = values of the j smallest x added in sorted order: values, order [S, n] -> [n + 1, S]."""
    in_order = np.take_along_axis(values, order, axis=1).T
    sums = np.zeros((values.shape[1] + 1, values.shape[0]), dtype=F32)
    for j in range(values.shape[1]):
        sums[j + 1] = sums[j] + in_order[j]
    return sums


class SplitSearch:
    """The running best of ggml's split search across S blocks: a candidate wins where
    sumq2 > 0 && sumqx² > best·sumq2, and then scale = sumqx/sumq2, best = scale·sumqx."""

    def __init__(self, size: int) -> None:
        self.best = np.full(size, -FLT_MAX, dtype=F32)
        self.scale = np.zeros(size, dtype=F32)
        self.i1 = np.full(size, -1, dtype=np.int64)
        self.i2 = np.full(size, -1, dtype=np.int64)
        self.shift = np.zeros(size, dtype=np.int64)

    def offer(self, sumqx: np.ndarray, sumq2: np.ndarray, i1: int, i2: int, shift: int) -> None:
        better = (sumq2 > 0) & (sumqx * sumqx > self.best * sumq2)
        if not better.any():
            return
        self.scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), self.scale)
        self.best = np.where(better, self.scale * sumqx, self.best)
        self.i1 = np.where(better, i1, self.i1)
        self.i2 = np.where(better, i2, self.i2)
        self.shift = np.where(better, shift, self.shift)


def search_iq1_s(sumx: np.ndarray, sumw: np.ndarray) -> SplitSearch:
    """quantize_row_iq1_s_impl's split search: runs [0, i1), [i1, i2), [i2, n) of the sorted block take levels 0, 1, 2
    of X_P (shift 1) or X_M (shift -1). sumx, sumw [n + 1, S] prefix sums of w·x and w."""
    n = sumx.shape[0] - 1
    found = SplitSearch(sumx.shape[1])
    for i1 in range(n + 1):  # a row of candidates i2 = i1..n, [n + 1 - i1, S]
        lo_x, lo_w = sumx[i1] - sumx[0], sumw[i1] - sumw[0]
        mid_x, mid_w = sumx[i1:] - sumx[i1], sumw[i1:] - sumw[i1]
        hi_x, hi_w = sumx[n] - sumx[i1:], sumw[n] - sumw[i1:]
        row = [(shift, lo_x * v[0] + mid_x * v[1] + hi_x * v[2],
                lo_w * v[0] * v[0] + mid_w * v[1] * v[1] + hi_w * v[2] * v[2]) for shift, v in ((1, X_P), (-1, X_M))]
        for t in range(n + 1 - i1):
            for shift, qx, q2 in row:
                found.offer(qx[t], q2[t], i1, i1 + t, shift)
    return found


def half_prefix_sums(wx: np.ndarray, w: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ1_M's prefix sums kept per half of the block (positions 0..7 and 8..15): [S, 16] -> px, pw [2, 17, S]."""
    n = order.shape[1]
    wx_in, w_in = np.take_along_axis(wx, order, axis=1).T, np.take_along_axis(w, order, axis=1).T
    upper = (order >= n // 2).T
    px = np.zeros((2, n + 1, order.shape[0]), dtype=F32)
    pw = np.zeros((2, n + 1, order.shape[0]), dtype=F32)
    for j in range(n):
        for h, mine in ((0, ~upper[j]), (1, upper[j])):
            px[h, j + 1] = np.where(mine, px[h, j] + wx_in[j], px[h, j])
            pw[h, j + 1] = np.where(mine, pw[h, j] + w_in[j], pw[h, j])
    return px, pw


def search_iq1_m(px: np.ndarray, pw: np.ndarray) -> SplitSearch:
    """quantize_row_iq1_m_impl's split search: each half takes X_P or X_M, shift k = 2·(first half on X_M) + (second
    half on X_M); with steps of 1 between levels a run split collapses to T·v[2] - S[i1] - S[i2] per half."""
    n = px.shape[1] - 1
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    txs, tws = px[:, n], pw[:, n]
    found = SplitSearch(px.shape[2])
    for i1 in range(n + 1):
        qx_p, qx_m, q2_p, q2_m = [], [], [], []
        for h in range(2):
            sx = px[h, i1] + px[h, i1:]
            qx_p.append(txs[h] * p2 - sx)
            qx_m.append(txs[h] * m2 - sx)
            q2_p.append(tws[h] * p2 * p2 + pw[h, i1] * cp1 + pw[h, i1:] * cp2)
            q2_m.append(tws[h] * m2 * m2 + pw[h, i1] * cm1 + pw[h, i1:] * cm2)
        sumqx = (qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1])
        sumq2 = (q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1])
        for t in range(n + 1 - i1):
            for k in range(4):
                found.offer(sumqx[k][t], sumq2[k][t], i1, i1 + t, k)
    return found


def split_levels(rank: np.ndarray, found: SplitSearch) -> np.ndarray:
    """Levels 0, 1, 2 of the runs before i1, before i2 and after: rank [S, n] -> int64 [S, n]."""
    return (rank >= found.i1[:, None]).astype(np.int64) + (rank >= found.i2[:, None])


def flip_negative(L: np.ndarray, found: SplitSearch, flipped_shift: np.ndarray) -> None:
    """A negative scale becomes positive with levels 2 - L and the opposite delta signs (in place)."""
    negative = found.scale < 0
    L[negative] = 2 - L[negative]
    found.scale = np.where(negative, -found.scale, found.scale)
    found.shift = np.where(negative, flipped_shift, found.shift)


def grid_levels(lat: Lattice) -> np.ndarray:
    """The lattice's points as levels 0..2: int64 [G, 8]."""
    return (lat.points.astype(np.int64) - 1) // 2


def best_neighbours(lat: Lattice, keys: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray,
                    xx: np.ndarray) -> np.ndarray:
    """iq1_find_best_neighbour2 on off-grid groups: keys [G], x, w [G, 8], scale [G], xx [G, 3] (the group's level
    values) -> the neighbour of least Σ w·(scale·xx[l] - x)² (the first on a tie; -1 where none is below FLT_MAX)."""
    table = lat.neighbour_table
    levels = grid_levels(lat)
    out = np.empty(keys.size, dtype=np.int64)
    rows = np.arange(NEIGHBOUR_BATCH)
    for start in range(0, keys.size, NEIGHBOUR_BATCH):
        part = slice(start, start + NEIGHBOUR_BATCH)
        cand = table[keys[part]]
        lv = levels[np.maximum(cand, 0)]  # [g, M, 8]
        xg = xx[part]
        q = np.take_along_axis(xg[:, None, :], lv.reshape(len(cand), 1, -1), axis=2).reshape(lv.shape)
        d2 = np.zeros(cand.shape, dtype=F32)
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(8):
                diff = scale[part, None] * q[:, :, i] - x[part, i, None]
                d2 = d2 + w[part, i, None] * diff * diff
        d2 = np.where((cand >= 0) & (d2 < FLT_MAX), d2, np.inf)
        pick = np.argmin(d2, axis=1)
        hit = np.isfinite(d2[rows[: len(cand)], pick])
        out[part] = np.where(hit, cand[rows[: len(cand)], pick], -1)
    return out


def whole_grid_fallback(lat: Lattice, flat: np.ndarray, at: int, w: np.ndarray, scale: float,
                        xx: np.ndarray) -> int:
    """iq1_find_best_neighbour2's search of the whole grid when no neighbour scores below FLT_MAX. ggml reads the
    value of grid point i at xval[i], i.e. `flat[at + i]` of the row data; past the data we hold it is NaN (no match).
    Returns -1 where nothing scores below FLT_MAX (ggml then aborts)."""
    levels = grid_levels(lat)
    n_grid = levels.shape[0]
    xval = np.full(n_grid, np.nan, dtype=F32)
    avail = max(0, min(n_grid, flat.size - at))
    xval[:avail] = flat[at : at + avail]
    q = xx[levels]  # [G, 8]
    d2 = np.zeros(n_grid, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(8):
            diff = F32(scale) * q[:, j] - xval
            d2 = d2 + w[j] * diff * diff
    d2 = np.where(d2 < FLT_MAX, d2, np.inf)
    pick = int(np.argmin(d2))
    return pick if np.isfinite(d2[pick]) else -1


def snap_to_grid(lat: Lattice, L: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, xx: np.ndarray,
                 flat: np.ndarray, offsets: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of the groups of 8 levels: L, x, w [S, n]; xx [S, n/8, 3] per group; offsets [S] of each block in
    `flat`. -> (index [S, n/8], any group of the block was off the grid [S])."""
    n_groups = L.shape[1] // 8
    keys = lat.key(L.reshape(L.shape[0], n_groups, 8))
    index = lat.index[keys].astype(np.int64)
    off = index < 0
    s, g = np.nonzero(off)
    if s.size:
        xg, wg = x.reshape(-1, n_groups, 8)[s, g], w.reshape(-1, n_groups, 8)[s, g]
        picked = best_neighbours(lat, keys[s, g], xg, wg, scale[s], xx[s, g])
        for m in np.flatnonzero(picked < 0):
            at = int(offsets[s[m]]) + 8 * int(g[m])
            picked[m] = whole_grid_fallback(lat, flat, at, wg[m], scale[s[m]], xx[s[m], g[m]])
            if picked[m] < 0:
                raise search_failed(name, 1)
        index[s, g] = picked
    return index, off.any(axis=1)


def refit_scale(lat: Lattice, index: np.ndarray, x: np.ndarray, w: np.ndarray, xx: np.ndarray, scale: np.ndarray,
                refit: np.ndarray) -> np.ndarray:
    """Where a group moved off its levels: scale = Σw·q·x / Σw·q² over the block, q = xx[grid level], if both > 0."""
    lv = grid_levels(lat)[index].reshape(index.shape[0], 8 * index.shape[1])  # [S, n]
    groups = np.repeat(np.arange(index.shape[1]), 8)
    q = np.take_along_axis(xx[:, groups, :], lv[:, :, None], axis=2)[:, :, 0]
    wq = w * q
    sumqx = ordered_sum(np.ascontiguousarray((wq * x).T))
    sumq2 = ordered_sum(np.ascontiguousarray((wq * q).T))
    ok = refit & (sumqx > 0) & (sumq2 > 0)
    return np.where(ok, sumqx / np.where(ok, sumq2, F32(1)), scale)


def group_values(first: np.ndarray, second: np.ndarray, n_groups: int) -> np.ndarray:
    """Per block, the level values of each group: X_M where `first` (group 0) / `second` (the others) hold, else X_P
    -> [S, n_groups, 3]."""
    on_m = np.stack([first] + [second] * (n_groups - 1), axis=1)
    return np.where(on_m[:, :, None], X_M, X_P)


def iq1_s_values(shift: np.ndarray) -> np.ndarray:
    return group_values(shift == -1, shift == -1, 4)


def iq1_m_values(shift: np.ndarray) -> np.ndarray:
    """Shift k of an IQ1_M block: its first group uses X_M for k >= 2, its second for odd k."""
    return group_values(shift >= 2, shift % 2 == 1, 2)


def grid_part(x: np.ndarray, w: np.ndarray, rank: np.ndarray, found: SplitSearch, flipped_shift: np.ndarray,
              values: Callable[[np.ndarray], np.ndarray], active: np.ndarray,
              name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both impls after the split search, on the blocks that searched (`active`): the levels of the best split (flipped
    to a positive scale), snapped to the grid group by group, the scale refit. -> (grid index [S, n/8], scale [S])."""
    lat = lattice(GGMLQuantizationType.IQ1_S)
    L = split_levels(rank, found)
    flip_negative(L, found, flipped_shift)
    xx = values(found.shift)
    a = np.flatnonzero(active)
    index = np.zeros((x.shape[0], x.shape[1] // 8), dtype=np.int64)
    scale = np.zeros(x.shape[0], dtype=F32)
    index[a], refit = snap_to_grid(lat, L[a], x[a], w[a], found.scale[a], xx[a], x.reshape(-1), a * x.shape[1], name)
    scale[a] = refit_scale(lat, index[a], x[a], w[a], xx[a], found.scale[a], refit)
    if not (scale[a] >= 0).all():
        raise search_failed(name, int((~(scale[a] >= 0)).sum()))
    return index, scale


def iq1_s_quantize(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq1_s_impl: blocks [N, 256], qw [N, 256] -> block_iq1_s bytes [N, 50]: d, qs[32], qh[8] (u16)."""
    if qw is None:
        raise imatrix_required("IQ1_S")
    n = blocks.shape[0]
    x = blocks.reshape(-1, 32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # C's float semantics, inf and NaN included
        w = block_weights(blocks, qw).reshape(-1, 32)
        skip = running_max(np.abs(x.T)) < GROUP_MAX_EPS_IQ1_S
        order, rank = sorted_order(x)
        found = search_iq1_s(prefix_sums(w * x, order), prefix_sums(w, order))
        empty = skip | (found.i1 < 0)
        index, scale = grid_part(x, w, rank, found, -found.shift, iq1_s_values, ~empty, "IQ1_S")
        shift = np.where(empty, 1, found.shift).reshape(n, 8)
        return pack_iq1_s(index.reshape(n, 8, 4), scale.reshape(n, 8), shift)


def three_bit_scales(d: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """l = clamp(nearest_int((scale/d - 1)/2), 0, 7) as ggml computes it (with 1/d): d [N], scale [N, B] -> [N, B]."""
    return np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * scale - F32(1))), 0, 7)


def pack_iq1_s(index: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """d = max scale / 15 (stored ·1.125), each block's scale as 3 bits l with (2l+1)·d ≈ scale, its delta sign in
    bit 15 of qh beside the grid indices' high bits: index [N, 8, 4], scale, shift [N, 8] -> [N, 50]."""
    max_scale = running_max(scale.T)  # every scale is >= 0, so this equals MAX from 0
    d = max_scale / F32(15)
    l = three_bit_scales(d, scale)
    qh = np.bitwise_or.reduce((index >> 8) << (3 * np.arange(4)), axis=2)
    qh = qh | np.where(max_scale[:, None] > 0, (l | np.where(shift == -1, 8, 0)) << 12, 0)
    d16 = np.where(max_scale > 0, d * F32(1.125), F32(0)).astype(np.float16)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), (index & 255).astype(np.uint8).reshape(-1, 32),
                           qh.astype(np.uint16).view(np.uint8)], axis=1)


def iq1_m_quantize(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq1_m_impl: blocks [N, 256], qw [N, 256] or None -> block_iq1_m bytes [N, 56]: qs[32], qh[16],
    scales[8] (4 u16 holding 3-bit block scales and, in their top nibbles, the fp16 super-block scale)."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # C's float semantics, inf and NaN included
        w = block_weights(blocks, qw).reshape(-1, 16)
        skip = running_max(np.abs(x.T)) < GROUP_MAX_EPS_IQ1_M
        order, rank = sorted_order(x)
        found = search_iq1_m(*half_prefix_sums(w * x, w, order))
        empty = skip | (found.i1 < 0)
        index, scale = grid_part(x, w, rank, found, 3 - found.shift, iq1_m_values, ~empty, "IQ1_M")
        shift = np.where(empty, 0, found.shift).reshape(n, 16)
        return pack_iq1_m(blocks, w.reshape(n, 256), index.reshape(n, 16, 2), scale.reshape(n, 16), shift)


def iq1_m_scale(blocks: np.ndarray, w: np.ndarray, index: np.ndarray, shift: np.ndarray, l: np.ndarray,
                d: np.ndarray) -> np.ndarray:
    """The super-block scale refit against the stored levels: Σw·q·x / Σw·q² with q = xx[grid level]·(2l+1), over the
    256 values in order (d where Σw·q² is not positive). -> [N]."""
    lv = grid_levels(lattice(GGMLQuantizationType.IQ1_S))[index].reshape(index.shape[0], 256)
    xx = iq1_m_values(shift.reshape(-1)).reshape(index.shape[0], 32, 1, 3)
    q = np.take_along_axis(xx, lv.reshape(-1, 32, 8, 1), axis=3).reshape(-1, 256)
    q = q * np.repeat((2 * l + 1).astype(F32), 16, axis=1)
    wq = w * q
    sumqx = ordered_sum(np.ascontiguousarray((wq * blocks).T))
    sumq2 = ordered_sum(np.ascontiguousarray((wq * q).T))
    return np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), d)


def pack_iq1_m(blocks: np.ndarray, w: np.ndarray, index: np.ndarray, scale: np.ndarray,
               shift: np.ndarray) -> np.ndarray:
    """index [N, 16, 2], scale, shift [N, 16] -> [N, 56]; the fp16 scale is refit by iq1_m_scale and stored ·1.1125."""
    max_scale = running_max(scale.T)  # every scale is >= 0, so this equals MAX from 0
    has_scale = max_scale > 0
    l = three_bit_scales(max_scale / F32(15), scale)
    d = iq1_m_scale(blocks, w, index, shift, l, max_scale / F32(15))
    s = (d * F32(1.1125)).astype(np.float16).view(np.uint16).astype(np.int64)
    qh = (index[:, :, 0] >> 8) | ((index[:, :, 1] >> 8) << 4)
    qh = qh | np.where(has_scale[:, None], IQ1M_MASKS[shift], 0)
    sc = np.bitwise_or.reduce(l.reshape(-1, 4, 4) << (3 * np.arange(4)), axis=2)
    sc = sc | ((s[:, None] >> (4 * np.arange(4))) & 0xF) << 12
    sc = np.where(has_scale[:, None], sc, 0)
    return np.concatenate([(index & 255).astype(np.uint8).reshape(-1, 32), qh.astype(np.uint8),
                           sc.astype(np.uint16).view(np.uint8)], axis=1)


class IQ1_S(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ1_S
    reference = staticmethod(iq1_s_quantize)
    needs_imatrix = True
    kernel = None
    weighted_kernel = "iq1_s"


class IQ1_M(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ1_M
    reference = staticmethod(iq1_m_quantize)
    kernel = weighted_kernel = "iq1_m"
