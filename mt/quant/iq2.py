"""IQ2_XXS, IQ2_XS and IQ2_S: numpy references of ggml-quants.c's quantize_row_iq2_xxs_impl, quantize_row_iq2_xs_impl
and quantize_row_iq2_s_impl (with iq2_find_best_neighbour), as quantize_iq2_xxs / _xs / _s call them row by row.

A super-block of 256 is cut into sub-blocks (32 values for IQ2_XXS, 16 for the others), each into groups of 8. A group
keeps its signs apart and its magnitudes as a point of the type's lattice (mt/quant/iq_grids.py): levels 0..2 of the
scaled magnitudes, moved to the nearest grid point (by weighted distance) when they fall off the grid. A scale search
picks each sub-block's scale; the scales are stored as 4 bits against one fp16 per super-block.

Arrays are [positions, S] across S sub-blocks, every sum in ggml's order (a loop over positions); the neighbour search
runs on all off-grid groups at once, one candidate per row of a flat array.
"""

from __future__ import annotations

from functools import cache, wraps
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from mt.errors import QuantizationError
from mt.quant.iq_grids import GridQuantType, Lattice, imatrix_required, lattice
from mt.quant.kquants import GROUP_MAX_EPS, QK_K, nearest_int

F32 = np.float32
KMAXQ = 3  # levels 0..2 per coordinate: 2l + 1 in {1, 3, 5}
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
FLT_MAX = F32(np.finfo(np.float32).max)


def no_neighbour() -> QuantizationError:
    """Where every neighbour's weighted distance is inf or NaN, ggml aborts (GGML_ASSERT in iq2_find_best_neighbour)."""
    return QuantizationError("a group of 8 values has no IQ2 grid point at a finite weighted distance (a value, its "
                             "square or its weight is beyond float32, or NaN)",
                             "check the tensor for inf, NaN or values above 1e19, or choose another type")


def ordered_sum(t: np.ndarray) -> np.ndarray:
    """sum over axis 0 of [n, S] one position after another -> [S] (mt.quant.weighted's, imported late: that
    module registers every QuantType when it loads, this one among them)."""
    from mt.quant.weighted import ordered_sum as weighted_ordered_sum

    return weighted_ordered_sum(t)


def block_weights(blocks: np.ndarray, qw: np.ndarray | None, sigma2_scale: float) -> np.ndarray:
    """The impls' weights for blocks [N, 256]: qw · sqrtf(sigma2 + x²) with sigma2 = sigma2_scale · Σx² / 256, or
    without an imatrix (IQ2_S) 0.25·sigma2 + x²."""
    sumx2 = ordered_sum(np.ascontiguousarray(blocks.T) * np.ascontiguousarray(blocks.T))
    sigma2 = (F32(sigma2_scale) * sumx2 / F32(QK_K))[:, None]
    if qw is None:
        return F32(0.25) * sigma2 + blocks * blocks
    return qw * np.sqrt(sigma2 + blocks * blocks)


def fold_signs(xt: np.ndarray, wt: np.ndarray, even: bool) -> tuple[np.ndarray, np.ndarray]:
    """xt, wt [m, S] -> (|x| [m, S], sign bits per group of 8 [m/8, S]). `even` (IQ2_XXS, IQ2_XS): a group with an
    odd count of negatives keeps its smallest w·x² unflipped (xval negative there), so 7 bits hold its signs."""
    negative = ~(xt >= 0)
    xval = np.where(negative, -xt, xt)
    bit = (1 << np.arange(8, dtype=np.int64))[:, None]
    groups = xt.shape[0] // 8
    signs = np.empty((groups, xt.shape[1]), dtype=np.int64)
    for k in range(groups):
        part = slice(8 * k, 8 * k + 8)
        s = (negative[part] * bit).sum(axis=0)
        if even:
            odd = negative[part].sum(axis=0) % 2 == 1
            imin = np.argmin(wt[part] * xt[part] * xt[part], axis=0)  # the first smallest, as ggml's strict <
            cols = np.flatnonzero(odd)
            xval[8 * k + imin[cols], cols] = -xval[8 * k + imin[cols], cols]
            s = np.where(odd, s ^ (1 << imin), s) & 127
        signs[k] = s
    return xval, signs


@cache
def _float_points(lat: Lattice) -> np.ndarray:
    """The grid's coordinates 2l + 1 as float32 [8, G]."""
    return np.ascontiguousarray(lat.points.T.astype(F32))


def best_neighbours(lat: Lattice, keys: np.ndarray, xv: np.ndarray, wv: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """iq2_find_best_neighbour for P off-grid groups at once: keys [P], xv, wv [8, P], scale [P] -> grid index [P], the
    first of the key's neighbours with the smallest Σ w·(scale·q - x)² (below FLT_MAX)."""
    starts = -lat.index[keys].astype(np.int64) - 1
    counts = lat.neighbours[starts].astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(keys.size), counts)
    slot = np.arange(owner.size) - first[owner]
    candidates = lat.neighbours[starts[owner] + 1 + slot].astype(np.int64)
    points = _float_points(lat)
    s = scale[owner]
    d2 = np.zeros(owner.size, dtype=F32)
    for i in range(8):
        diff = s * points[i][candidates] - xv[i][owner]
        d2 = d2 + wv[i][owner] * diff * diff
    best = np.fmin.reduceat(d2, first)
    hit = np.minimum.reduceat(np.where((d2 == best[owner]) & (d2 < FLT_MAX), np.arange(owner.size), owner.size), first)
    if (hit == owner.size).any():
        raise no_neighbour()
    return candidates[hit]


def group_levels(lat: Lattice, xv: np.ndarray, wv: np.ndarray, iscale: np.ndarray, scale: np.ndarray,
                 search: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One group of 8 per column: levels clamp(nearest_int(0.5·(iscale·x - 1)), 0, 2) and whether they are on the
    grid; off the grid (in the columns `search` marks) the levels of the best neighbour at `scale`. xv, wv [8, S] ->
    (levels [8, S], on_grid [S])."""
    levels = np.clip(nearest_int(F32(0.5) * (iscale * xv - F32(1))), 0, KMAXQ - 1)
    keys = (levels << (2 * np.arange(8))[:, None]).sum(axis=0)
    on_grid = lat.index[keys] >= 0
    cols = np.flatnonzero(~on_grid & search)
    if cols.size:
        found = best_neighbours(lat, keys[cols], xv[:, cols], wv[:, cols], scale[cols])
        levels[:, cols] = (lat.points[found].T.astype(np.int64) - 1) // 2
    return levels, on_grid


def level_sums(wt: np.ndarray, xval: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ w·x·q and Σ w·q·q with q = 2l + 1, in ggml's order: [m, S] -> ([S], [S])."""
    sumqx = np.zeros(wt.shape[1], dtype=F32)
    sumq2 = np.zeros(wt.shape[1], dtype=F32)
    for i in range(wt.shape[0]):
        q = (2 * levels[i] + 1).astype(F32)
        sumqx = sumqx + wt[i] * xval[i] * q
        sumq2 = sumq2 + wt[i] * q * q
    return sumqx, sumq2


def grid_indices(lat: Lattice, levels: np.ndarray) -> np.ndarray:
    """levels [m, S] (on the grid) -> grid index per group [m/8, S]."""
    groups = levels.reshape(levels.shape[0] // 8, 8, levels.shape[1])
    return lat.index[(groups << (2 * np.arange(8))[None, :, None]).sum(axis=1)].astype(np.int64)


class SubBlocks:
    """A sub-block search's state, [positions, S] across the S sub-blocks of the blocks being quantized."""

    def __init__(self, blocks: np.ndarray, weight: np.ndarray, size: int, even: bool, eps: np.float32,
                 ggml_type: GGMLQuantizationType) -> None:
        self.lat = lattice(ggml_type)
        self.wt = np.ascontiguousarray(weight.reshape(-1, size).T)
        self.waux = np.sqrt(self.wt)
        self.xval, self.signs = fold_signs(np.ascontiguousarray(blocks.reshape(-1, size).T), self.wt, even)
        self.vmax = self.xval.max(axis=0)
        self.active = ~(self.vmax < eps)  # ggml skips a sub-block whose largest |x| is below eps
        self.levels = np.zeros(self.xval.shape, dtype=np.int64)
        self.on_grid = np.ones((size // 8, self.xval.shape[1]), dtype=bool)

    def try_scales(self, eff_max: np.ndarray, steps: range, scale: np.ndarray) -> np.ndarray:
        """The search over id = (5 + 0.1·is) / eff_max: a step that raises (Σwxq)² / Σwq² sets scale and levels."""
        best = np.zeros_like(scale)
        for step in steps:
            iscale = (F32(2 * KMAXQ - 1) + F32(step) * F32(0.1)) / eff_max
            this_scale = F32(1) / iscale
            trial = np.empty_like(self.levels)
            on_grid = np.empty_like(self.on_grid)
            for k in range(self.on_grid.shape[0]):
                part = slice(8 * k, 8 * k + 8)
                trial[part], on_grid[k] = group_levels(self.lat, self.xval[part], self.waux[part], iscale, this_scale,
                                                       self.active)
            sumqx, sumq2 = level_sums(self.wt, self.xval, trial)
            better = self.active & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale)
            best = np.where(better, scale * sumqx, best)
            self.levels = np.where(better, trial, self.levels)
            self.on_grid = np.where(better, on_grid, self.on_grid)
        return scale

    def requantize(self, scale: np.ndarray, redo: np.ndarray) -> np.ndarray:
        """The groups `redo` [m/8, S] marks, again at the chosen scale; then the least-squares scale of the levels."""
        again = redo.any(axis=0)
        iscale = F32(1) / np.where(again, scale, F32(1))
        for k in range(redo.shape[0]):
            part = slice(8 * k, 8 * k + 8)
            levels, _ = group_levels(self.lat, self.xval[part], self.waux[part], iscale, scale, redo[k])
            self.levels[part] = np.where(redo[k], levels, self.levels[part])
        sumqx, sumq2 = level_sums(self.wt, self.xval, self.levels)
        refit = again & (sumq2 > 0)
        return np.where(refit, sumqx / np.where(refit, sumq2, F32(1)), scale)

    def positive(self, scale: np.ndarray, sign_mask: int) -> np.ndarray:
        """A negative scale flips to positive with every sign of its sub-block."""
        negative = self.active & (scale < 0)
        self.signs = np.where(negative, ~self.signs & sign_mask, self.signs)
        return np.where(negative, -scale, scale)


def search_xxs(blocks: np.ndarray, qw: np.ndarray) -> tuple[SubBlocks, np.ndarray]:
    """quantize_row_iq2_xxs_impl's sub-block search: sub-blocks of 32, starting from make_qp_quants' scale."""
    from mt.quant.weighted import make_qp_quants  # late: see ordered_sum

    sb = SubBlocks(blocks, block_weights(blocks, qw, 1.0), 32, True, GROUP_MAX_EPS, GGMLQuantizationType.IQ2_XXS)
    scale, _ = make_qp_quants(sb.xval.T, sb.wt.T, KMAXQ + 1)
    eff_max = scale * F32(KMAXQ)
    sb.active &= ~(eff_max <= 0)
    scale = sb.try_scales(np.where(sb.active, eff_max, F32(1)), range(-6, 7), scale)
    scale = sb.requantize(scale, np.broadcast_to(sb.active & (scale > 0), sb.on_grid.shape))
    return sb, sb.positive(scale, 127)


def search_16(blocks: np.ndarray, weight: np.ndarray, ggml_type: GGMLQuantizationType, even: bool,
              eps: np.float32) -> tuple[SubBlocks, np.ndarray]:
    """quantize_row_iq2_xs_impl / _s_impl's sub-block search: sub-blocks of 16, starting from max / 5."""
    sb = SubBlocks(blocks, weight, 16, even, eps, ggml_type)
    vmax = np.where(sb.active, sb.vmax, F32(1))
    scale = sb.try_scales(vmax, range(-9, 10), vmax / F32(2 * KMAXQ - 1))
    scale = sb.requantize(scale, ~sb.on_grid & (sb.active & (scale > 0)))
    return sb, sb.positive(scale, 127 if even else 255)


def scale_levels(scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The 4-bit sub-block scales: clamp(nearest_int(0.5·(scale/d - 1)), 0, 15) with 1/d taken first. [N, n], [N]."""
    iscale = F32(1) / d
    return np.clip(nearest_int(F32(0.5) * (iscale[:, None] * scales - F32(1))), 0, 15)


def super_block_scales(sb: SubBlocks, scale: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each super-block's sub-block scales [N, 8 or 16], 0 where skipped; d = max_scale / 31 [N]; max_scale == 0)."""
    scales = np.where(sb.active, scale, F32(0)).astype(F32).reshape(n, QK_K // sb.xval.shape[0])
    max_scale = np.zeros(n, dtype=F32)
    for ib in range(scales.shape[1]):
        max_scale = np.where(max_scale > scales[:, ib], max_scale, scales[:, ib])
    return scales, max_scale / F32(31), max_scale == 0


C_FLOATS = np.errstate(over="ignore", invalid="ignore", divide="ignore")  # inf and NaN arise as in ggml's C
BATCH = 1024  # super-blocks per pass: the neighbour search's flat arrays stay in tens of MB
Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def in_batches(quantize: Quantizer) -> Quantizer:
    """quantize(blocks, qw) over BATCH super-blocks at a time, with C's float errors."""

    @wraps(quantize)
    def run(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        parts = [quantize(blocks[i : i + BATCH], None if qw is None else qw[i : i + BATCH])
                 for i in range(0, max(1, blocks.shape[0]), BATCH)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    return C_FLOATS(run)


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


@in_batches
def iq2_xxs_quantize(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """blocks [N, 256], qw [N, 256] -> block_iq2_xxs bytes [N, 66]: d, then per sub-block of 32 two uint32: its four
    8-bit grid indices, and its four 7-bit sign sets with the 4-bit scale in the top bits."""
    if qw is None:
        raise imatrix_required("IQ2_XXS")
    n = blocks.shape[0]
    sb, scale = search_xxs(blocks, qw)
    scales, d, zero = super_block_scales(sb, scale, n)
    grid = np.where(sb.active, grid_indices(sb.lat, sb.levels), 0)
    signs = np.where(sb.active, sb.signs, 0)
    words = np.zeros((2, sb.active.size), dtype=np.uint32)
    for k in range(4):
        words[0] |= (grid[k] << (8 * k)).astype(np.uint32)
        words[1] |= (signs[k] << (7 * k)).astype(np.uint32)
    words = words.T.reshape(n, 16)
    words[:, 1::2] |= (scale_levels(scales, d).astype(np.uint32) << 28)
    words[zero] = 0
    qs = words.astype("<u4").view(np.uint8)
    return np.concatenate([fp16_bytes(np.where(zero, F32(0), d)), qs], axis=1)


@in_batches
def iq2_xs_quantize(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """blocks [N, 256], qw [N, 256] -> block_iq2_xs bytes [N, 74]: d, per group of 8 a uint16 of its 9-bit grid index
    and 7 sign bits, then the 4-bit scales of the 16 sub-blocks."""
    if qw is None:
        raise imatrix_required("IQ2_XS")
    n = blocks.shape[0]
    sb, scale = search_16(blocks, block_weights(blocks, qw, 1.0), GGMLQuantizationType.IQ2_XS, True, GROUP_MAX_EPS)
    scales, d, zero = super_block_scales(sb, scale, n)
    words = np.where(sb.active, grid_indices(sb.lat, sb.levels) | (sb.signs << 9), 0)  # [2, S]
    words = words.T.reshape(n, 32).astype("<u2")
    levels = np.where(zero[:, None], 0, scale_levels(scales, d)).astype(np.uint8)
    words[zero] = 0
    return np.concatenate([fp16_bytes(np.where(zero, F32(0), d)), words.view(np.uint8),
                           levels[:, 0::2] | (levels[:, 1::2] << 4)], axis=1)


@in_batches
def iq2_s_quantize(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """blocks [N, 256], qw [N, 256] or None -> block_iq2_s bytes [N, 82]: d·0.9875, the low bytes of the 10-bit grid
    indices [32], the sign bytes [32], their high bits (2 each) [8], the 4-bit scales [8]."""
    n = blocks.shape[0]
    sb, scale = search_16(blocks, block_weights(blocks, qw, 2.0), GGMLQuantizationType.IQ2_S, False,
                          GROUP_MAX_EPS_IQ2_S)
    scales, d, zero = super_block_scales(sb, scale, n)
    grid = np.where(sb.active, grid_indices(sb.lat, sb.levels), 0).T.reshape(n, 32)
    signs = np.where(sb.active, sb.signs, 0).T.reshape(n, 32)
    high = (grid >> 8).reshape(n, 8, 4) << (2 * np.arange(4))
    levels = np.where(zero[:, None], 0, scale_levels(scales, d)).astype(np.uint8)
    return np.concatenate([fp16_bytes(np.where(zero, F32(0), d * F32(0.9875))), (grid & 255).astype(np.uint8),
                           signs.astype(np.uint8), high.sum(axis=2).astype(np.uint8),
                           levels[:, 0::2] | (levels[:, 1::2] << 4)], axis=1)


class IQ2_XXS(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ2_XXS
    reference = staticmethod(iq2_xxs_quantize)
    needs_imatrix = True
    kernel = None
    weighted_kernel = "iq2_xxs"


class IQ2_XS(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ2_XS
    reference = staticmethod(iq2_xs_quantize)
    needs_imatrix = True
    kernel = None
    weighted_kernel = "iq2_xs"


class IQ2_S(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ2_S
    reference = staticmethod(iq2_s_quantize)
    kernel = weighted_kernel = "iq2_s"
