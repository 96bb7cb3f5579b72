"""IQ3_XXS and IQ3_S (super-blocks of 256 in 8 sub-blocks of 32): numpy references of ggml-quants.c's
quantize_row_iq3_xxs_impl (grid of 256) as quantize_iq3_xxs calls it, and quantize_row_iq3_s_impl (grid of 512,
block_size 32) as quantize_iq3_s calls it. Neither needs an importance matrix: without one the weights are x².

A sub-block's magnitudes are cut into 8 groups of 4; each group is a point of the type's grid (`mt.quant.iq_grids`),
found by rounding against a trial scale and, off the grid, by the nearest of the key's neighbour list. The search runs
on all sub-blocks at once, position-major ([32, S] arrays), every sum in ggml's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from mt.quant.iq_grids import GridQuantType, Lattice, lattice
from mt.quant.kquants import QK_K, nearest_int

F32 = np.float32
KMAXQ = 8  # levels 0..7: the grid coordinate 2l + 1 runs over 1, 3, ..., 15
SUB = 32  # values per sub-block
GROUPS = SUB // 4  # grid points per sub-block
SLICE = 256  # super-blocks per pass (bounds the neighbour-search temporaries)


@dataclass(frozen=True)
class Variant:
    """What differs between the two impls."""

    ggml_type: GGMLQuantizationType
    steps: int  # the scale search tries (15 + 0.2·is) / max for is in -steps..steps
    even_signs: bool  # IQ3_XXS: an even number of minus signs per 8, the 8th implied
    fudge: float  # the super-block scale is stored as max_scale / 31 times this

    @property
    def lattice(self) -> Lattice:
        return lattice(self.ggml_type)

    def skipped(self, vmax: np.ndarray) -> np.ndarray:
        """The sub-blocks ggml leaves as zeros: max < GROUP_MAX_EPS_IQ3_XXS, or (IQ3_S) max == 0."""
        return vmax < F32(1e-8) if self.even_signs else vmax == F32(0)


IQ3_XXS_VARIANT = Variant(GGMLQuantizationType.IQ3_XXS, 15, True, 1.0125)
IQ3_S_VARIANT = Variant(GGMLQuantizationType.IQ3_S, 9, False, 1.033)


def ordered_sum_rows(t: np.ndarray) -> np.ndarray:
    """sum over axis 1 of [N, n], position after position -> [N]."""
    total = np.zeros(t.shape[0], dtype=F32)
    for i in range(t.shape[1]):
        total = total + t[:, i]
    return total


def importance(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x² without quant weights; qw · sqrtf(sigma2 + x²) with them, sigma2 = 2·sum(x²)/256 per super-block."""
    if qw is None:
        return blocks * blocks
    sigma2 = F32(2) * ordered_sum_rows(blocks * blocks) / F32(QK_K)
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


def magnitudes(xt: np.ndarray, wt: np.ndarray, even_signs: bool) -> tuple[np.ndarray, np.ndarray]:
    """xval = |x| and the sign bytes of each 8 values ([32, S] -> [32, S], uint8 [4, S]). With `even_signs` an odd
    count of negatives flips the value of least w·x² (the first on a tie) back, and bit 7 is dropped."""
    xval = np.where(xt >= 0, xt, -xt)
    neg = ~(xt >= 0)
    bit = (np.uint8(1) << np.arange(8, dtype=np.uint8))[None, :, None]
    signs = np.bitwise_or.reduce(np.where(neg.reshape(4, 8, -1), bit, np.uint8(0)), axis=1).astype(np.uint8)
    if not even_signs:
        return xval, signs
    odd = neg.reshape(4, 8, -1).sum(axis=1) % 2 == 1  # [4, S]
    cost = (wt * xt * xt).reshape(4, 8, -1)
    imin = np.argmin(cost, axis=1)  # [4, S]: np.argmin keeps the first of equal minima
    k, s = np.nonzero(odd)
    xv = xval.reshape(4, 8, -1)
    xv[k, imin[k, s], s] = -xv[k, imin[k, s], s]
    signs[k, s] ^= (np.uint8(1) << imin[k, s].astype(np.uint8))
    return xval, signs & np.uint8(127)


def best_neighbour(lat: Lattice, keys: np.ndarray, xv: np.ndarray, wa: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """iq3_find_best_neighbour: of the key's neighbours the grid index of least sum wa·(scale·q - x)², the first on a
    tie. keys [M], xv, wa [M, 4], scale [M] -> [M]."""
    candidates = lat.neighbour_table[keys]  # [M, K], -1 past each list
    q = lat.points[np.maximum(candidates, 0)].astype(F32)  # [M, K, 4]
    d2 = np.zeros(candidates.shape, dtype=F32)
    for i in range(4):
        diff = scale[:, None] * q[:, :, i] - xv[:, None, i]
        d2 = d2 + wa[:, None, i] * diff * diff
    d2 = np.where(candidates < 0, F32(np.inf), d2)
    return candidates[np.arange(keys.size), np.argmin(d2, axis=1)]


def project(lat: Lattice, xt: np.ndarray, waux: np.ndarray, inv: np.ndarray,
            scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group of 4 rounded against 1/inv: its levels if on the grid, else the best neighbour's (searched with
    `scale`). -> (levels int64 [32, S], on the grid [8, S])."""
    levels = np.clip(nearest_int(F32(0.5) * (inv * xt - F32(1))), 0, KMAXQ - 1).reshape(GROUPS, 4, -1)
    keys = (levels << (3 * np.arange(4))[None, :, None]).sum(axis=1)  # [8, S]
    index = lat.index[keys]
    g, s = np.nonzero(index < 0)
    if g.size:
        xg, wg = xt.reshape(GROUPS, 4, -1), waux.reshape(GROUPS, 4, -1)
        found = best_neighbour(lat, keys[g, s], xg[g, :, s], wg[g, :, s], scale[s])
        levels[g, :, s] = (lat.points[found].astype(np.int64) - 1) // 2
    return levels.reshape(SUB, -1), index >= 0


def weighted_sums(xt: np.ndarray, wt: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w·x·q and sum w·q·q with q = 2l + 1, position after position -> ([S], [S])."""
    q = (2 * levels + 1).astype(F32)
    sumqx = np.zeros(xt.shape[1], dtype=F32)
    sumq2 = np.zeros(xt.shape[1], dtype=F32)
    for i in range(SUB):
        sumqx = sumqx + wt[i] * xt[i] * q[i]
        sumq2 = sumq2 + wt[i] * q[i] * q[i]
    return sumqx, sumq2


def search(v: Variant, xt: np.ndarray, wt: np.ndarray, vmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scale search and the off-grid refinement of one sub-block per lane: xval, weights [32, S], max [S] (> 0)
    -> (scale [S], levels [32, S])."""
    lat = v.lattice
    waux = np.sqrt(wt)
    best = np.zeros(xt.shape[1], dtype=F32)
    scale = vmax / F32(2 * KMAXQ - 1)
    levels = np.zeros(xt.shape, dtype=np.int64)
    on_grid = np.full((GROUPS, xt.shape[1]), v.even_signs)  # IQ3_S starts with every group "off"
    for step in range(-v.steps, v.steps + 1):
        inv = (F32(2 * KMAXQ - 1) + F32(step) * F32(0.2)) / vmax
        trial, trial_on = project(lat, xt, waux, inv, F32(1) / inv)
        sumqx, sumq2 = weighted_sums(xt, wt, trial)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale)
        best = np.where(better, scale * sumqx, best)
        levels = np.where(better, trial, levels)
        on_grid = np.where(better, trial_on, on_grid)
    refine = (~on_grid).any(axis=0) & (scale > 0)
    if refine.any():
        inv = F32(1) / np.where(refine, scale, F32(1))
        again, _ = project(lat, xt, waux, inv, scale)
        redo = refine & ~on_grid if v.even_signs else np.broadcast_to(refine, on_grid.shape)  # IQ3_S redoes all
        levels = np.where(np.repeat(redo, 4, axis=0), again, levels)
        sumqx, sumq2 = weighted_sums(xt, wt, levels)
        fits = refine & (sumq2 > 0)
        scale = np.where(fits, sumqx / np.where(fits, sumq2, F32(1)), scale)
    return scale, levels


def sub_blocks(v: Variant, blocks: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Per sub-block (s = 8·block + ib): scale [S] (0 where skipped), skipped [S], grid indices [8, S], signs [4, S]."""
    weights = importance(blocks, qw)
    xt = np.ascontiguousarray(blocks.reshape(-1, SUB).T)
    wt = np.ascontiguousarray(weights.reshape(-1, SUB).T)
    xval, signs = magnitudes(xt, wt, v.even_signs)
    vmax = xval.max(axis=0)
    skipped = v.skipped(vmax)
    scale, levels = search(v, xval, wt, np.where(skipped, F32(1), vmax))
    flip = scale < 0  # ggml's guard: a negative scale becomes positive with every sign inverted
    scale = np.where(flip, -scale, scale)
    signs = np.where(flip, ~signs & np.uint8(127 if v.even_signs else 255), signs)
    keys = (levels.reshape(GROUPS, 4, -1) << (3 * np.arange(4))[None, :, None]).sum(axis=1)
    index = v.lattice.index[keys]
    assert (index >= 0).all(), "a group's levels off the grid"
    unset = np.where(skipped, 0, index), np.where(skipped, np.uint8(0), signs)  # ggml writes nothing for those
    return np.where(skipped, F32(0), scale), skipped, *unset


def super_scale(v: Variant, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """max_scale / 31 stored as fp16 (times the fudge), and the 4-bit scale of each sub-block against it:
    scales [N, 8] -> (max_scale [N], d fp16 [N], levels [N, 8])."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        dh = (d * F32(v.fudge)).astype(np.float16)
        inv = F32(1) / d
        levels = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15)
    zero = max_scale == 0
    return max_scale, np.where(zero, np.float16(0), dh), np.where(zero[:, None], 0, levels)


def iq3_xxs_bytes(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    v = IQ3_XXS_VARIANT
    n = blocks.shape[0]
    scales, _, index, signs = sub_blocks(v, blocks, qw)
    max_scale, dh, levels = super_scale(v, scales.reshape(n, 8))
    grid = index.T.reshape(n, 64).astype(np.uint8)  # byte 8·ib + k
    s = signs.T.astype(np.uint32).reshape(n, 8, 4)
    words = s[..., 0] | (s[..., 1] << 7) | (s[..., 2] << 14) | (s[..., 3] << 21) | (levels.astype(np.uint32) << 28)
    body = np.concatenate([grid, words.astype("<u4").view(np.uint8)], axis=1)
    body[max_scale == 0] = 0
    return np.concatenate([dh.view(np.uint8).reshape(n, 2), body], axis=1)


def iq3_s_bytes(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """block_iq3_s: d, qs[64], qh[8], signs[32], scales[4]. As in ggml a skipped sub-block (max 0) does not advance
    the qs and signs positions: the next sub-block's bytes land where its would have gone."""
    v = IQ3_S_VARIANT
    n = blocks.shape[0]
    scales, skipped, index, signs = sub_blocks(v, blocks, qw)
    _, dh, levels = super_scale(v, scales.reshape(n, 8))
    kept = ~skipped.reshape(n, 8)
    slot = np.cumsum(kept, axis=1) - kept  # where each kept sub-block's qs and signs go
    qs = np.zeros((n, 8, 8), dtype=np.uint8)
    sg = np.zeros((n, 8, 4), dtype=np.uint8)
    b, ib = np.nonzero(kept)
    qs[b, slot[b, ib]] = (index.T.reshape(n, 8, 8)[b, ib] & 255).astype(np.uint8)
    sg[b, slot[b, ib]] = signs.T.reshape(n, 8, 4)[b, ib]
    high = (index.T.reshape(n, 8, 8) >> 8) << np.arange(8)
    qh = np.where(kept, np.bitwise_or.reduce(high, axis=2), 0).astype(np.uint8)
    packed = (levels[:, 0::2] | (levels[:, 1::2] << 4)).astype(np.uint8)
    return np.concatenate([dh.view(np.uint8).reshape(n, 2), qs.reshape(n, 64), qh, sg.reshape(n, 32), packed], axis=1)


def _sliced(write: Callable[[np.ndarray, np.ndarray | None], np.ndarray], blocks: np.ndarray, qw: np.ndarray | None,
            type_size: int) -> np.ndarray:
    """write() on SLICE super-blocks at a time."""
    blocks = np.asarray(blocks, dtype=F32)
    parts = [write(blocks[i : i + SLICE], None if qw is None else np.asarray(qw[i : i + SLICE], dtype=F32))
             for i in range(0, blocks.shape[0], SLICE)]
    return np.concatenate(parts) if parts else np.zeros((0, type_size), np.uint8)


def iq3_xxs_quantize(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """quantize_iq3_xxs: blocks [N, 256] (qw the same shape, or None) -> block_iq3_xxs bytes [N, 98]."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        return _sliced(iq3_xxs_bytes, blocks, qw, 98)


def iq3_s_quantize(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """quantize_iq3_s: blocks [N, 256] (qw the same shape, or None) -> block_iq3_s bytes [N, 110]."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        return _sliced(iq3_s_bytes, blocks, qw, 110)


class IQ3_XXS(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ3_XXS
    reference = staticmethod(iq3_xxs_quantize)
    kernel = weighted_kernel = "iq3_xxs"


class IQ3_S(GridQuantType):
    ggml_type = GGMLQuantizationType.IQ3_S
    reference = staticmethod(iq3_s_quantize)
    kernel = weighted_kernel = "iq3_s"
